"""What to compress with: operating points per role, from --bits presets or explicit (k, N).

A ``CompressSpec`` says, for keys and for values, the block length k and codebook size N, plus
the seed, the protected token positions (``keep_first`` / ``keep_last`` tokens of every layer are
stored uncompressed: attention sinks at position 0 carry much of the attention mass), and
whether keys are centered (each head's mean key over the compressed tokens is stored and
subtracted before encoding: real keys share a large common component, outlier channels
included, and softmax ignores a shift common to all keys, so only the residual needs bits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fibquant_cli.errors import UsageError

# --bits presets (docs/method.md §1): rate -> (k, N).
BITS_PRESETS: dict[float, tuple[int, int]] = {
    4: (2, 256), 3: (2, 64), 2: (4, 256), 1: (8, 256), 0.5: (8, 16),
}
DEFAULT_BITS = 3
# The attention sink: token 0 draws much of every head's attention, and its key lies far from
# the others, so quantizing it costs the model most of its KL. Keeping it exact cut SmolLM2's KL
# 4-6x at --bits 3 for 0.6% of the ratio; more tokens bought little (README, "Defaults").
DEFAULT_KEEP_FIRST = 1


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


@dataclass(frozen=True)
class CompressSpec:
    key: tuple[int, int] = BITS_PRESETS[DEFAULT_BITS]
    value: tuple[int, int] = BITS_PRESETS[DEFAULT_BITS]
    seed: int = 0
    keep_first: int = DEFAULT_KEEP_FIRST
    keep_last: int = 0
    center_keys: bool = True

    def point(self, role: str) -> tuple[int, int]:
        return self.key if role == "key" else self.value

    def to_json(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        k, v = self.key, self.value
        text = f"k={k[0]},N={k[1]}" if k == v else f"K k={k[0]},N={k[1]} / V k={v[0]},N={v[1]}"
        if self.keep_first or self.keep_last:
            text += f" keep {self.keep_first}+{self.keep_last}"
        if not self.center_keys:
            text += " uncentered"
        return text


def _role_point(role: str, bits, block_dim, size, default: tuple[int, int]) -> tuple[int, int]:
    names = (f"{role}_bits", f"{role}_block_dim", f"{role}_size")
    if (block_dim is None) != (size is None):
        raise UsageError(f"give {{{names[1]}}} and {{{names[2]}}} together", options=names[1:])
    if bits is not None and block_dim is not None:
        raise UsageError(f"give either {{{names[0]}}} or {{{names[1]}}}/{{{names[2]}}}",
                         options=names)
    if block_dim is not None:
        return (block_dim, size)
    if bits is not None:
        return preset_for(bits, names[0])
    return default


def resolve_spec(*, bits=None, block_dim=None, size=None, key_bits=None, value_bits=None,
                 key_block_dim=None, key_size=None, value_block_dim=None, value_size=None,
                 seed: int = 0, keep_first: int = DEFAULT_KEEP_FIRST, keep_last: int = 0,
                 center_keys: bool = True) -> CompressSpec:
    """Combine the command-line flags into one spec; role flags override the common ones."""
    if (block_dim is None) != (size is None):
        raise UsageError("give {block_dim} and {size} together", options=("block_dim", "size"))
    if bits is not None and block_dim is not None:
        raise UsageError("give either {bits} or {block_dim}/{size}, not both",
                         options=("bits", "block_dim", "size"))
    if keep_first < 0 or keep_last < 0:
        raise UsageError("{keep_first} and {keep_last} must be >= 0",
                         options=("keep_first", "keep_last"))
    common = (block_dim, size) if block_dim is not None else preset_for(
        DEFAULT_BITS if bits is None else bits)
    return CompressSpec(
        key=_role_point("key", key_bits, key_block_dim, key_size, common),
        value=_role_point("value", value_bits, value_block_dim, value_size, common),
        seed=seed, keep_first=keep_first, keep_last=keep_last, center_keys=center_keys,
    )
