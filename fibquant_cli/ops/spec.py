"""What to compress with: operating points per role, from --bits presets or explicit (k, N).

A ``CompressSpec`` says, for keys and for values, the block length k and codebook size N, plus
the seed, the protected token positions (``keep_first`` / ``keep_last`` tokens of every layer are
stored uncompressed: attention sinks at position 0 carry much of the attention mass), and
whether keys are centered (each head's mean key over the compressed tokens is stored and
subtracted before encoding: real keys share a large common component, outlier channels
included, and softmax ignores a shift common to all keys, so only the residual needs bits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from fibquant_cli.core.params import MAX_HEAD_DIM, MAX_SIZE
from fibquant_cli.errors import UsageError

SEED_LIMIT = 2**63  # seeds are hashed as unsigned 64-bit integers, below 2**63 (Profile)

# --bits presets (docs/method.md §1): rate -> (k, N).
BITS_PRESETS: dict[float, tuple[int, int]] = {
    4: (2, 256), 3: (2, 64), 2: (4, 256), 1: (8, 256), 0.5: (8, 16),
}
DEFAULT_BITS = 3
# The attention sink: token 0 draws much of every head's attention, and its key lies far from
# the others, so quantizing it costs the model most of its KL. Keeping it exact cut SmolLM2's KL
# 4-6x at --bits 3 for 0.6% of the ratio; more tokens bought little (README, "Defaults").
DEFAULT_KEEP_FIRST = 1
# compress --basis without --bits or --ratio: all-inclusive bits per value (6.4x on fp16).
DEFAULT_TRANSFORM_BITS = 2.5
# The recent window (``keep_last`` "auto", the default): a continuation's queries read the last
# tokens of the cache most, so the transform codec keeps the last T / (WINDOW_SHARE x R) tokens
# of a T-token cache at ratio R exact (the window takes 1/16 of the file), at ratios of at least
# WINDOW_MIN_RATIO and when that is at least WINDOW_MIN_TOKENS. Measured on SmolLM2 with four
# texts at 2,048-7,168 tokens (docs/transform.md, "A recent window"): where the window was 1/16
# of the file the model's KL fell by 14-20% (geometric mean over the texts; on 10 of 12), while
# windows of 1/4 raised it, a 1,024-token cache lost with one, and below 8x the effect was mixed.
# Against a dump's own basis (which fits its own tokens, the recent ones too) it did not pay
# (+4%), and the per-vector codec keeps none.
KEEP_LAST_AUTO = "auto"
WINDOW_SHARE = 16
WINDOW_MIN_TOKENS = 16
WINDOW_MIN_RATIO = 8.0


def preset_for(bits: float, option: str = "bits") -> tuple[int, int]:
    """(k, N) for a --bits value: >= 4 -> (2, 256); otherwise one of the presets exactly."""
    if bits >= 4:
        return BITS_PRESETS[4]
    for rate, point in BITS_PRESETS.items():
        if abs(bits - rate) < 1e-9:
            return point
    choices = ", ".join(f"{r:g}" for r in sorted(BITS_PRESETS))
    raise UsageError(f"{{{option}}} {bits:g} has no preset; choose one of {choices} "
                     "(or give {block_dim} and {size})", options=(option, "block_dim", "size"))


def check_point(block_dim: int, size: int, options: tuple[str, str],
                head_dim: int | None = None) -> None:
    """Refuse a (k, N) no profile can have, naming the option that gave it (``UsageError``)."""
    k_opt, n_opt = options
    if block_dim < 2:
        raise UsageError(f"{{{k_opt}}} must be >= 2, got {block_dim}", options=(k_opt,))
    if not 2 <= size <= MAX_SIZE:
        raise UsageError(f"{{{n_opt}}} must be in [2, {MAX_SIZE}], got {size}", options=(n_opt,))
    if head_dim is not None and (block_dim >= head_dim or head_dim % block_dim):
        raise UsageError(f"{{{k_opt}}} {block_dim} must divide head_dim {head_dim} and be "
                         f"smaller", options=(k_opt,))


def keep_last_tokens(keep_last) -> int | str:
    """A ``--keep-last`` value: a number of tokens >= 0, or ``KEEP_LAST_AUTO``."""
    if isinstance(keep_last, str):
        if keep_last.strip().lower() == KEEP_LAST_AUTO:
            return KEEP_LAST_AUTO
        try:
            keep_last = int(keep_last)
        except ValueError:
            raise UsageError(f"{{keep_last}} takes a number of tokens or auto, got {keep_last!r}",
                             options=("keep_last",)) from None
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise UsageError(f"{{keep_last}} must be a number of tokens >= 0 or auto, got "
                         f"{keep_last!r}", options=("keep_last",))
    return keep_last


def recent_window(spec: CompressSpec, tokens: int, source_bits: int) -> int:
    """The last tokens of a ``tokens``-token cache (``source_bits`` bits a value) that ``spec``
    keeps exact: its ``keep_last``, or for "auto" the transform codec's window against a
    model-level basis (``WINDOW_SHARE``) at ratios of at least ``WINDOW_MIN_RATIO``."""
    if spec.keep_last != KEEP_LAST_AUTO:
        return spec.keep_last
    if spec.basis is None:  # the per-vector codec, or a dump's own basis: measured not to pay
        return 0
    ratio = spec.ratio if spec.ratio is not None else source_bits / spec.transform_bits
    window = int(tokens / (WINDOW_SHARE * ratio))
    return window if ratio >= WINDOW_MIN_RATIO and window >= WINDOW_MIN_TOKENS else 0


def as_run(spec: CompressSpec, report) -> CompressSpec:
    """``spec`` with the recent window its compress ``report`` says "auto" came to, so that a
    point is labelled by what was scored ("keep 1+16", not "keep 1+auto")."""
    chosen = {e.profile["keep_last"] for e in report.entries
              if e.profile and "keep_last" in e.profile}
    if spec.keep_last != KEEP_LAST_AUTO or len(chosen) != 1:
        return spec
    return replace(spec, keep_last=chosen.pop())


def check_seed(seed: int, option: str = "seed") -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"{{{option}}} must be in [0, 2**63), got {seed}", options=(option,))


def check_head_dim(head_dim: int, option: str = "head_dim") -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise UsageError(f"{{{option}}} must be in [1, {MAX_HEAD_DIM}], got {head_dim}",
                         options=(option,))


@dataclass(frozen=True)
class CompressSpec:
    key: tuple[int, int] = BITS_PRESETS[DEFAULT_BITS]
    value: tuple[int, int] = BITS_PRESETS[DEFAULT_BITS]
    seed: int = 0
    keep_first: int = DEFAULT_KEEP_FIRST
    keep_last: int | str = 0  # tokens, or KEEP_LAST_AUTO (transform specs: recent_window)
    center_keys: bool = True
    # The options that gave each role's (k, N), for errors that name them (not recorded).
    key_options: tuple[str, str] = field(default=("block_dim", "size"), compare=False)
    value_options: tuple[str, str] = field(default=("block_dim", "size"), compare=False)
    # The transform codec (compress --basis): the basis file, whether the file embeds it, and
    # the size asked for: all-inclusive bits per KV value, or a ratio to the source's bytes.
    basis: str | None = None
    embed_basis: bool = False
    transform_bits: float | None = None
    ratio: float | None = None

    @property
    def own_transform(self) -> bool:
        """A size for the transform codec without a basis file: ``compress --ratio R`` codes
        against a basis fitted on the dump (``ops/own_basis``), embedded."""
        return self.basis is None and (self.ratio is not None or self.transform_bits is not None)

    @property
    def codec(self) -> str:
        return "transform" if self.basis is not None or self.own_transform else "fibquant"

    @property
    def decode_basis(self) -> str | None:
        """The basis file decoding needs (None: the file is self-contained)."""
        return None if self.basis is None or self.embed_basis else self.basis

    def point(self, role: str) -> tuple[int, int]:
        return self.key if role == "key" else self.value

    def options(self, role: str) -> tuple[str, str]:
        return self.key_options if role == "key" else self.value_options

    def to_json(self) -> dict:
        obj = asdict(self)
        del obj["key_options"], obj["value_options"]
        return obj

    def label(self) -> str:
        if self.codec == "transform":
            size = (f"{self.ratio:g}x" if self.ratio is not None
                    else f"{self.transform_bits:g} bits/value")
            name = "own basis" if self.own_transform else "transform"
            return f"{name} {size} keep {self.keep_first}+{self.keep_last}"
        k, v = self.key, self.value
        text = f"k={k[0]},N={k[1]}" if k == v else f"K k={k[0]},N={k[1]} / V k={v[0]},N={v[1]}"
        if self.keep_first or self.keep_last:
            text += f" keep {self.keep_first}+{self.keep_last}"
        if not self.center_keys:
            text += " uncentered"
        return text


def _role_point(role: str, bits, block_dim, size, default: tuple[int, int],
                default_options: tuple[str, str]) -> tuple[tuple[int, int], tuple[str, str]]:
    """(k, N) of one role and the options that gave them."""
    names = (f"{role}_bits", f"{role}_block_dim", f"{role}_size")
    if (block_dim is None) != (size is None):
        raise UsageError(f"give {{{names[1]}}} and {{{names[2]}}} together", options=names[1:])
    if bits is not None and block_dim is not None:
        raise UsageError(f"give either {{{names[0]}}} or {{{names[1]}}}/{{{names[2]}}}",
                         options=names)
    if block_dim is not None:
        check_point(block_dim, size, names[1:])
        return (block_dim, size), names[1:]
    if bits is not None:
        return preset_for(bits, names[0]), (names[0], names[0])
    return default, default_options


def resolve_spec(*, bits=None, block_dim=None, size=None, key_bits=None, value_bits=None,
                 key_block_dim=None, key_size=None, value_block_dim=None, value_size=None,
                 seed: int = 0, keep_first: int = DEFAULT_KEEP_FIRST,
                 keep_last: int | str = KEEP_LAST_AUTO,
                 center_keys: bool = True, basis=None, embed_basis: bool = False,
                 ratio: float | None = None) -> CompressSpec:
    """Combine the command-line flags into one spec; role flags override the common ones.

    With ``basis`` (the transform codec), ``bits`` is all-inclusive bits per KV value (any
    positive number) and ``ratio`` the alternative; the per-vector codec's flags are refused.
    ``ratio`` without ``basis``: the transform codec against the dump's own basis
    (``CompressSpec.own_transform``).
    """
    keep_last = keep_last_tokens(keep_last)
    if basis is not None or ratio is not None:
        if basis is None and embed_basis:
            raise UsageError("{embed_basis} goes with {basis}; a {ratio} without {basis} "
                             "embeds the dump's own basis anyway",
                             options=("embed_basis", "basis", "ratio"))
        return _transform_spec(basis, embed_basis, bits, ratio, keep_first, keep_last,
                               block_dim=block_dim, size=size, key_bits=key_bits,
                               value_bits=value_bits, key_block_dim=key_block_dim,
                               key_size=key_size, value_block_dim=value_block_dim,
                               value_size=value_size)
    if embed_basis:
        raise UsageError("{embed_basis} goes with {basis} (the transform codec)",
                         options=("embed_basis", "basis"))
    if (block_dim is None) != (size is None):
        raise UsageError("give {block_dim} and {size} together", options=("block_dim", "size"))
    if bits is not None and block_dim is not None:
        raise UsageError("give either {bits} or {block_dim}/{size}, not both",
                         options=("bits", "block_dim", "size"))
    if keep_first < 0:
        raise UsageError("{keep_first} must be >= 0", options=("keep_first",))
    keep_last = 0 if keep_last == KEEP_LAST_AUTO else keep_last  # no window: recent_window
    check_seed(seed)
    if block_dim is not None:
        check_point(block_dim, size, ("block_dim", "size"))
        common, common_options = (block_dim, size), ("block_dim", "size")
    else:
        common = preset_for(DEFAULT_BITS if bits is None else bits)
        common_options = ("bits", "bits")
    key, key_options = _role_point("key", key_bits, key_block_dim, key_size, common,
                                   common_options)
    value, value_options = _role_point("value", value_bits, value_block_dim, value_size, common,
                                       common_options)
    return CompressSpec(key=key, value=value, seed=seed, keep_first=keep_first,
                        keep_last=keep_last, center_keys=center_keys, key_options=key_options,
                        value_options=value_options)


def _transform_spec(basis, embed_basis: bool, bits, ratio, keep_first: int, keep_last: int,
                    **vector_flags) -> CompressSpec:
    given = [name for name, value in vector_flags.items() if value is not None]
    if given:
        raise UsageError(f"{{{given[0]}}} sets the per-vector codec; the transform codec "
                         "({basis}, or {ratio} alone) takes {bits} (all-inclusive bits per "
                         "value) or {ratio}", options=(given[0], "basis", "bits", "ratio"))
    if bits is not None and ratio is not None:
        raise UsageError("give either {bits} or {ratio}, not both", options=("bits", "ratio"))
    if bits is not None and not 0 < bits <= 64:
        raise UsageError(f"{{bits}} must be in (0, 64] bits per value, got {bits:g}",
                         options=("bits",))
    if ratio is not None and not ratio > 1:
        raise UsageError(f"{{ratio}} must be > 1, got {ratio:g}", options=("ratio",))
    if keep_first < 0:
        raise UsageError("{keep_first} must be >= 0", options=("keep_first",))
    if bits is None and ratio is None:
        bits = DEFAULT_TRANSFORM_BITS
    return CompressSpec(keep_first=keep_first, keep_last=keep_last, center_keys=False,
                        basis=None if basis is None else str(basis), embed_basis=embed_basis,
                        transform_bits=bits,
                        ratio=ratio)
