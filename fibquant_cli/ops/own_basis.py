"""compress without ``--basis``: a basis fitted on the dump itself, when storing it pays.

The transform codec needs a basis; a model-level one (``fibquant calibrate``) is a file every
cache of the model shares. A long enough dump can instead carry its own: fitted here with
calibrate's code (``calibrate.fit_sources``: moments, ``eigh``, sensitivity and query weights
from the dump's own queries), embedded in the file (only the coded columns, fp16:
docs/container.md, format 5), and counted in its size. Whether it pays is measured per run
(``decide``):

1. the budget is the size of the file the per-vector codec writes for the options given;
2. when the own basis with every column would take more than ``SKIP_SHARE`` of that budget's
   KV bytes, it cannot pay and nothing is tried (short dumps: today's file, at no cost);
3. otherwise the basis is fitted and the transform codec planned for the same budget (the
   basis columns it codes counted like any other byte), and every layer is encoded both ways
   and scored on a sample of query positions: attention-output cosine with the dump's
   queries (the keys stand in without them, as compress's own scoring does). The better
   codec writes the file.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.errors import UsageError
from fibquant_cli.formats.kvdump import Dump, read_layer
from fibquant_cli.ops.progress import Progress

MODES = ("auto", "always", "never")
# The trial is skipped when the own basis with every column, in fp16, would exceed this share
# of the per-vector file's KV bytes. Measured on SmolLM2-135M at --bits 3 (docs/transform.md,
# "An own basis"): at 90% (1,024 tokens) the own basis loses (attention cosine 0.9754 vs
# 0.9801), at 60% (1,536) it wins, at 45% (2,048) clearly; 75% keeps short dumps at today's
# cost. At lower rates it is conservative (1,024 tokens at --bits 2 or 1 would pay).
SKIP_SHARE = 0.75
# The trial scores every layer (None): the transform codec moves bits between layers, so a
# sample of layers favours whichever codec its layers suit. On SmolLM2 at 1,536 tokens, 6
# layers measured a tie (0.9834 vs 0.9837 per-vector) where every layer, like the full
# scoring of the files afterwards, found the own basis better (0.9834 vs 0.9797; files:
# 0.9849 vs 0.9794). Query positions: windows over the context (``fidelity.sample_windows``);
# 128 or 256 of them gave the same verdict.
TRIAL_LAYERS = None
TRIAL_QUERIES = 128
# Query positions per layer the own basis' sensitivity is measured on (calibrate: 256). The
# sensitivity only weighs layers against each other: on SmolLM2-135M at 4,096 tokens, 64
# positions gave the same file quality (attention cosine 0.9951 vs 0.9950 with 256, all
# layers, last 512 positions) for half the fit's time (10.9 s vs 23.1 s).
SENSITIVITY_QUERIES = 64
PER_VECTOR, OWN = "per-vector", "own basis"


@dataclass
class OwnBasisDecision:
    """How compress chose between the per-vector codec and an own basis, and why."""

    mode: str  # auto, always
    choice: str  # PER_VECTOR or OWN
    reason: str
    budget_bytes: int  # the per-vector file's size: both are compared at it
    basis_bytes_bound: int  # the own basis with every column (fp16)
    basis_bytes: int | None = None  # the columns the transform codes (in its file)
    basis_share: float | None = None  # of the file's KV bytes (pass-through tensors aside)
    metric: str | None = None  # what was measured (attention cosine, or the key proxy)
    per_vector: float | None = None
    own: float | None = None
    layers: list | None = None  # the layers scored
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_mode(mode: str | None, spec) -> None:
    """``mode`` is one of ``MODES`` (or None: the caller's default) and fits ``spec``."""
    if mode is not None and mode not in MODES:
        raise UsageError(f"{{own_basis}} must be one of {', '.join(MODES)}, got {mode!r}",
                         options=("own_basis",))
    if mode == "never" and spec.own_transform:
        raise UsageError("{ratio} without {basis} codes against the dump's own basis, which "
                         "{own_basis} never forbids: give a {basis} or drop one of them",
                         options=("ratio", "basis", "own_basis"))
    if mode == "always" and spec.basis is not None:
        raise UsageError("{own_basis} always fits a basis on the dump; {basis} gives one: drop "
                         "one of them", options=("own_basis", "basis"))


def fit_own_basis(dump: Dump, keep_first: int, progress: Progress):
    """The dump's own basis, in memory (``formats.basis.basis_of``): calibrate's fit of this
    one dump, keys with RoPE undone when the manifest says how, the first ``keep_first``
    tokens left out (compress keeps them exactly)."""
    from fibquant_cli.formats.basis import basis_of, encode_basis

    return basis_of(*encode_basis(**_fit(dump, keep_first, progress)), dump.path)


def write_own_basis(dump: Dump, keep_first: int, progress: Progress, path: Path):
    """``fit_own_basis`` written as a basis file at ``path`` (for ``sweep --own-basis``,
    whose ladder of ratios then embeds it like ``--embed-basis``); returns it loaded."""
    from fibquant_cli.storage.basis import write_basis

    return write_basis(path, **_fit(dump, keep_first, progress), force=True)


def _fit(dump: Dump, keep_first: int, progress: Progress) -> dict:
    """The arguments of ``encode_basis`` (and ``write_basis``) for the dump's own basis."""
    from fibquant_cli.formats.basis import BasisSource
    from fibquant_cli.formats.container import PLACEHOLDER_DIGEST
    from fibquant_cli.ops.calibrate import fit_sources, key_rope, source_of
    from fibquant_cli.ops.compress_plan import check_queries_finite

    why = _why_not(dump, keep_first)
    if why is not None:
        raise UsageError(why, path=str(dump.path))
    check_queries_finite(dump)  # the sensitivity reads every layer's queries
    # A basis file names its sources by digest; this one is never published (a compressed
    # file records only the basis' own digest), so hashing the dump is skipped.
    source = source_of(dump, PLACEHOLDER_DIGEST)
    key = dump.manifest.entries[source.key]
    rope = key_rope(source, key.rope is not None)
    fit = fit_sources([source], keep_first, rope, progress, SENSITIVITY_QUERIES)
    return dict(layers=key.shape.layers, kv_heads=key.shape.kv_heads,
                head_dim=key.shape.head_dim, rope=rope, keep_first=keep_first, tokens=fit.rows,
                sources=[BasisSource(dump.path.name, source.digest)], matrices=fit.matrices,
                sensitivity=fit.sensitivity, query_weight=fit.query_weight)


def _why_not(dump: Dump, keep_first: int) -> str | None:
    """Why an own basis cannot be fitted on ``dump`` at all (None: it can)."""
    from fibquant_cli.ops.fidelity import kv_entries

    roles = sorted(e.shape.role for e in dump.manifest.entries)
    if roles != ["key", "value"] or kv_entries(dump) is None:
        return "an own basis needs exactly one key and one value entry of the same geometry"
    shape = dump.manifest.entries[0].shape
    dim = shape.kv_heads * shape.head_dim
    rows = shape.batch * max(0, shape.tokens - keep_first)
    if rows < dim + 1:
        return (f"too few tokens for an own basis: a {dim}-dimensional basis needs {dim + 1} "
                f"rows, the dump has {rows}")
    return None


def _bound(dump: Dump) -> int:
    """The bytes of an own basis with every column (fp16): D x D per layer and role."""
    shape = dump.manifest.entries[0].shape
    dim = shape.kv_heads * shape.head_dim
    return 2 * dim * dim * shape.layers * len(dump.manifest.entries)


def worth_trying(dump: Dump, spec) -> bool:
    """Whether ``auto`` would try an own basis against the per-vector file of ``spec``: one
    can be fitted, and with every column it takes at most ``SKIP_SHARE`` of that file's KV
    bytes (``--target-cosine`` asks before searching the own basis' ratios)."""
    from fibquant_cli.ops.compress_plan import per_vector_bytes
    from fibquant_cli.ops.transform import raw_bytes

    kv_budget = per_vector_bytes(dump, spec, Progress()) - raw_bytes(dump)
    return _why_not(dump, spec.keep_first) is None and _bound(dump) <= SKIP_SHARE * kv_budget


def decide(dump: Dump, spec, mode: str, progress: Progress, jobs: int = 1):
    """``(OwnBasisDecision, TransformPlan or None, basis or None)``: the plan and basis when
    the own basis is chosen. ``mode`` auto measures (see the module docstring), always takes
    the own basis unmeasured."""
    from fibquant_cli.ops.compress_plan import per_vector_bytes, prepare_transform
    from fibquant_cli.ops.transform import raw_bytes, target_bytes

    start = time.perf_counter()
    # the size to meet: the one asked for (compress --ratio without --basis), else the
    # per-vector file's
    budget = (int(target_bytes(dump, spec, raw_bytes(dump))) if spec.own_transform
              else per_vector_bytes(dump, spec, progress))
    bound = _bound(dump)
    dec = OwnBasisDecision(mode, PER_VECTOR, "", budget, bound)
    kv_budget = budget - raw_bytes(dump)
    why = _why_not(dump, spec.keep_first)
    if why is not None:
        if mode == "always":
            asked = ("{ratio} without {basis}", ("ratio", "basis")) if spec.own_transform \
                else ("{own_basis} always", ("own_basis",))
            raise UsageError(f"{asked[0]}: {why}", path=str(dump.path), options=asked[1])
        dec.reason = f"not tried: {why}"
    elif mode == "auto" and bound > SKIP_SHARE * kv_budget:
        dec.reason = (f"not tried: the own basis with every column would take "
                      f"{bound / kv_budget:.0%} of the per-vector file's KV bytes (more than "
                      f"{SKIP_SHARE:.0%}: it cannot pay)")
    if dec.reason:
        dec.seconds = time.perf_counter() - start
        return dec, None, None
    basis = fit_own_basis(dump, spec.keep_first, progress)
    try:
        planned = prepare_transform(dump, spec, basis, progress, jobs, target=budget, own=True)
    except UsageError:  # the transform file's fixed cost alone exceeds the budget
        if mode == "always":
            raise
        dec.reason = ("not tried: the transform file's fixed cost (kept tokens, statistics, "
                      "header) alone exceeds the per-vector file's size")
        dec.seconds = time.perf_counter() - start
        return dec, None, None
    dec.basis_bytes = sum(2 * math.prod(dims) for name, _, dims in
                          planned.doc.expected_layout({}) if name.startswith("fq/b/"))
    dec.basis_share = dec.basis_bytes / kv_budget
    if mode == "always":
        dec.choice, dec.reason = OWN, ("the size asked for, without a basis file"
                                       if spec.own_transform else "always: taken without measuring")
    else:
        _trial(dump, spec, planned, dec, progress)
    dec.seconds = time.perf_counter() - start
    return dec, (planned if dec.choice == OWN else None), (basis if dec.choice == OWN else None)


def _trial(dump: Dump, spec, planned, dec: OwnBasisDecision, progress: Progress) -> None:
    """Encode and decode the sampled layers both ways, score both, keep the better."""
    from fibquant_cli.ops.fidelity import HEADLINE_LABELS, measure, sample_layers

    progress.start(2, "own basis: trial")
    per_vector = _per_vector_reconstructor(dump, spec)
    own = _transform_reconstructor(dump, planned)
    # the decision is on the cosine: TV and top-8 are not computed, and the original
    # attention is computed once for both
    references: dict = {}
    fid_pv = measure(dump, per_vector, sample=TRIAL_QUERIES, layers=TRIAL_LAYERS,
                     cosine_only=True, references=references)
    progress.advance("per-vector")
    fid_own = measure(dump, own, sample=TRIAL_QUERIES, layers=TRIAL_LAYERS, cosine_only=True,
                      references=references)
    progress.advance("own basis")
    dec.metric = HEADLINE_LABELS["cosine_mean"] + (" (key self-attention proxy)"
                                                   if fid_pv.proxy else "")
    dec.per_vector = float(fid_pv.overall["cosine_mean"])
    dec.own = float(fid_own.overall["cosine_mean"])
    dec.layers = sample_layers(dump.manifest.entries[0].shape.layers, TRIAL_LAYERS)
    better = dec.own > dec.per_vector
    dec.choice = OWN if better else PER_VECTOR
    dec.reason = (f"measured at {dec.budget_bytes:,} bytes: {dec.metric} {dec.own:.4f} with "
                  f"the own basis ({dec.basis_share:.1%} of the KV bytes), {dec.per_vector:.4f} "
                  "per-vector")


def _per_vector_reconstructor(dump: Dump, spec):
    """(entry, layer) -> the layer as the per-vector codec would restore it (float32)."""
    from fibquant_cli import codecs
    from fibquant_cli.codecs.fibquant import LayerPlan, norms_dtype
    from fibquant_cli.ops.compress_plan import document, entry_profiles, make_quantizers

    profiles = entry_profiles(dump, spec)
    quantizers = make_quantizers(profiles, Progress())
    doc = document(dump, quantizers, {}, spec)
    codec = codecs.get("fibquant")

    def restore(i: int, layer: int) -> np.ndarray:
        entry, rec = dump.manifest.entries[i], doc.entries[i]
        arr = read_layer(dump, entry, layer, check=False)
        kf, kl = rec.keep(entry.shape.tokens)
        plan = LayerPlan(i, layer, kf, kl, rec.center, norms_dtype(arr, rec.center, kf, kl))
        out = np.empty(arr.shape, dtype=np.float32)
        codec.encode_layer(quantizers[profiles[i]], arr, plan, False, restored=out)
        return out

    return restore


def _transform_reconstructor(dump: Dump, planned):
    """(entry, layer) -> the layer as the planned transform file restores it (float32). The
    encoded parts are kept on the matrix: if the own basis wins, the file is written from them
    (``transform.encode_all``) instead of encoding every layer again."""
    from fibquant_cli.codecs import transform as codec

    mats = {(m.entry, m.layer): (m, w) for m, w in zip(planned.mats, planned.widths)}

    def restore(i: int, layer: int) -> np.ndarray:
        m, widths = mats[i, layer]
        arr = read_layer(dump, dump.manifest.entries[i], layer, check=False)
        out = np.empty(arr.shape, dtype=np.float32)
        m.encoded = codec.encode_layer(m.lb, arr, m.stats, widths, *m.keep, c=m.coefficients,
                                       restored=out)
        m.coefficients = None  # encoded: the file is written from ``m.encoded``
        return out

    return restore
