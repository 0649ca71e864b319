"""The memory-fidelity frontier: many operating points on one dump, measured the same way.

Every point reconstructs K and V layer by layer and is scored by ``fidelity.measure`` (attention
output cosine with the dump's queries, or the key self-attention proxy), so FibQuant, the scalar
baseline and the peer formats are compared on one yardstick. Sizes are all-inclusive: FibQuant
points are real compressed files (indices, norms, codebooks, rotations, means, kept tokens,
metadata); the scalar baseline counts its norms and rotation; peers count their scales and zeros.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fibquant_cli.core.codebook import STREAM_ROTATION, stream
from fibquant_cli.core.layer import SOURCE_DTYPES
from fibquant_cli.core.rotation import haar_rotation
from fibquant_cli.core.scalar import ScalarQuantizer
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import dtypes
from fibquant_cli.formats.kvdump import Dump, open_dump, read_layer
from fibquant_cli.formats.peers import available_peers
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.fidelity import DEFAULT_MAX_QUERIES, kv_entries, measure, require_kv_pair
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.reader import open_verified, reconstructor
from fibquant_cli.ops.spec import (
    BITS_PRESETS,
    DEFAULT_KEEP_FIRST,
    KEEP_LAST_AUTO,
    CompressSpec,
    as_run,
)

# The transform codec's points in a sweep with --basis or --own-basis: ratios, all inclusive.
TRANSFORM_RATIOS = (4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
OWN_BASIS = "own basis"  # the method of the points coded against the dump's own basis
PEER_ORDER = ("fp8_e4m3", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "kivi_int4", "kivi_int2")


@dataclass
class Point:
    method: str  # "fibquant", "transform", "own basis", "scalar" or a peer name
    label: str
    ratio: float
    bits_per_value: float
    rel_mse: float
    cosine_mean: float
    cosine_p1: float
    top8: float | None  # None: not computed (a search scores the cosine alone)
    seconds: float
    pareto: bool = False
    spec: dict | None = None


@dataclass
class SweepReport:
    source: str
    proxy: bool
    query_positions: int
    points: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # name -> reason

    def to_json(self) -> dict:
        return asdict(self)


def transform_specs(basis, ratios=TRANSFORM_RATIOS) -> list[CompressSpec]:
    """The transform codec at a ladder of ratios (``compress --basis B --ratio R``; with
    ``basis`` None, ``compress --ratio R``: against the dump's own basis), with compress's
    default recent window: "auto" against ``basis``, none against an own basis (as
    ``recent_window`` decides; an own ladder runs with a basis file, ``against_own_basis``,
    where "auto" would keep one)."""
    return [CompressSpec(keep_first=DEFAULT_KEEP_FIRST,
                         keep_last=0 if basis is None else KEEP_LAST_AUTO, center_keys=False,
                         basis=None if basis is None else str(basis), ratio=r) for r in ratios]


def against_own_basis(spec: CompressSpec, path) -> CompressSpec:
    """An own-basis ``spec`` (``own_transform``) as the sweep and the target search run it:
    against that basis, fitted once and written at ``path``, embedded in every file (the same
    file ``compress`` writes, without fitting the basis again for every point)."""
    return replace(spec, basis=str(path), embed_basis=True)


def own_basis_runs(dump: Dump, workdir: Path) -> list[tuple[CompressSpec, CompressSpec]]:
    """The own-basis ladder as (how each point runs, the spec it stands for): the basis fitted
    on ``dump`` once and written in ``workdir``, every ratio of ``transform_specs(None)``
    against it (``against_own_basis``). Raises ``UsageError`` or ``InvalidInputError`` where
    no basis can be fitted (too few tokens, say): callers skip the ladder with the reason."""
    from fibquant_cli.ops.own_basis import write_own_basis

    path = workdir / "own.basis.safetensors"
    write_own_basis(dump, DEFAULT_KEEP_FIRST, Progress(), path)
    return [(against_own_basis(s, path), s) for s in transform_specs(None)]


def fibquant_specs(seed: int = 0) -> list[CompressSpec]:
    """FibQuant's default sweep: presets, role-aware rates, protected tokens, lever ablations."""
    return [replace(s, seed=seed) for s in _specs()]


def _specs() -> list[CompressSpec]:
    p = BITS_PRESETS
    five = (2, 1024)  # 5 bits: shipped, reached with --block-dim 2 --size 1024
    specs = [CompressSpec(key=five, value=five, keep_first=0),
             CompressSpec(key=five, value=p[4], keep_first=0)]
    specs += [CompressSpec(key=p[b], value=p[b], keep_first=0) for b in (4, 3, 2, 1, 0.5)]
    specs += [CompressSpec(key=p[kb], value=p[vb], keep_first=0)
              for kb, vb in ((4, 2), (3, 2), (4, 3), (2, 1))]
    specs += [CompressSpec(key=p[b], value=p[b], keep_first=1) for b in (3, 2, 1)]
    specs += [CompressSpec(key=p[kb], value=p[vb], keep_first=1) for kb, vb in ((3, 2), (2, 1))]
    specs += [CompressSpec(key=p[b], value=p[b], center_keys=False, keep_first=0)
              for b in (3, 2, 1)]
    specs += [CompressSpec(key=p[b], value=p[b], center_keys=False, keep_first=1) for b in (3, 2)]
    return specs


def kv_values_and_bytes(dump: Dump, pair: tuple[int, int]) -> tuple[int, int]:
    values = source_bytes = 0
    for i in pair:
        shape = dump.manifest.entries[i].shape
        values += shape.element_count
        source_bytes += shape.element_count * np.dtype(
            dtypes.numpy_dtype_for(SOURCE_DTYPES[shape.dtype])).itemsize
    return values, source_bytes


def run_fibquant(dump: Dump, spec: CompressSpec, workdir: Path, max_queries: int,
                 shown: CompressSpec | None = None, scoring: dict | None = None):
    """Compress to a real file, then score what it restores. Returns (Point, compress report).
    ``shown``: the spec the point stands for (its method and label), when ``spec`` runs it
    another way (``against_own_basis``). ``scoring``: ``fidelity.measure``'s keywords beyond
    the queries (a search scores the cosine alone, the point's top-8 then None; a sweep no TV;
    both keep ``references`` across their points)."""
    out = workdir / "point.fq.safetensors"
    start = time.perf_counter()
    rep = compress(dump.path, manifest=dump.manifest_path, output=out, spec=spec,
                            force=True, attention=False, jobs=1)
    seconds = time.perf_counter() - start
    fid = measure(dump, reconstructor(open_verified(out, basis=spec.decode_basis)),
                  max_queries=max_queries, **(scoring or {}))
    pair = kv_entries(dump)
    rows = [rep.entries[i] for i in pair]
    kv_bytes = sum(r.compressed_bytes for r in rows)
    values, source_bytes = kv_values_and_bytes(dump, pair)
    shown = as_run(shown or spec, rep)
    point = Point(OWN_BASIS if shown.own_transform else shown.codec, shown.label(),
                  source_bytes / kv_bytes, 8 * kv_bytes / values, fid.overall["rel_mse"],
                  fid.overall["cosine_mean"], fid.overall["cosine_p1"],
                  fid.overall["top8_agreement"], seconds, spec=spec.to_json())
    return point, fid


def run_codec(dump: Dump, name: str, roundtrip, bits_per_value, max_queries: int,
              overhead_bits: float = 0.0, scoring: dict | None = None) -> Point:
    """Score a codec given as roundtrip(x [b,h,t,d] float32, role) -> x_hat.

    ``bits_per_value(shape, role)`` counts what each tensor stores; ``overhead_bits`` what the
    whole dump stores once (a shared rotation, a table); ``scoring`` as for ``run_fibquant``.
    """
    pair = kv_entries(dump)
    cache: dict = {}
    start = time.perf_counter()
    total_bits = float(overhead_bits)
    for i in pair:
        entry = dump.manifest.entries[i]
        for layer in range(entry.shape.layers):
            x = read_layer(dump, entry, layer).astype(np.float32)
            x_hat = roundtrip(x, entry.shape.role)
            if entry.shape.dtype != "f32":  # stored back in the source dtype, as a restore would
                x_hat = x_hat.astype(dtypes.numpy_dtype_for(
                    SOURCE_DTYPES[entry.shape.dtype])).astype(np.float32)
            cache[(i, layer)] = x_hat
            total_bits += bits_per_value(x.shape, entry.shape.role) * x.size
    seconds = time.perf_counter() - start
    fid = measure(dump, lambda i, layer: cache[(i, layer)], max_queries=max_queries,
                  **(scoring or {}))
    values, source_bytes = kv_values_and_bytes(dump, pair)
    return Point(name, name, source_bytes / (total_bits / 8), total_bits / values,
                 fid.overall["rel_mse"],
                 fid.overall["cosine_mean"], fid.overall["cosine_p1"],
                 fid.overall["top8_agreement"], seconds)


def scalar_codec(d: int, bits: int, seed: int = 0):
    """The scalar baseline: same norm (fp16) and rotation, Lloyd-Max per coordinate."""
    rotation = haar_rotation(d, stream(seed, STREAM_ROTATION)).astype(np.float32)
    sq = ScalarQuantizer(d, bits, rotation)

    def roundtrip(x: np.ndarray, role: str) -> np.ndarray:
        flat = x.reshape(-1, d)
        codes, norms = sq.encode(flat)
        return sq.decode(codes, norms.astype(np.float16).astype(np.float32)).reshape(x.shape)

    def bits_per_value(shape, role) -> float:
        return (d * bits + 16) / d  # codes and an fp16 norm per vector

    overhead_bits = 32 * d * d + 64 * 2**bits  # the f32 rotation and the f64 level table, once
    return roundtrip, bits_per_value, overhead_bits


def mark_pareto(points: list[Point]) -> None:
    """A point is on the frontier when no other point is at least as small and as faithful."""
    for p in points:
        p.pareto = not any(
            (o.ratio >= p.ratio and o.cosine_mean >= p.cosine_mean)
            and (o.ratio > p.ratio or o.cosine_mean > p.cosine_mean) for o in points)


def sweep(source, *, manifest=None, max_queries: int = DEFAULT_MAX_QUERIES,
          specs: list[CompressSpec] | None = None, peers: bool = True, scalar: bool = True,
          basis=None, own_basis: bool = False, progress: Progress | None = None) -> SweepReport:
    """Every operating point on one dump; ``basis`` adds the transform codec's ladder,
    ``own_basis`` the ladder again with a basis fitted on the dump (once) and embedded in
    every file, its bytes counted: what ``compress`` does for a long dump, at each ratio
    (points of method "own basis"; skipped, with the reason, where it cannot be fitted)."""
    progress = progress or Progress()
    dump = open_dump(source, manifest)
    pair = require_kv_pair(dump, "the sweep")
    d = dump.manifest.entries[pair[0]].shape.head_dim
    specs = fibquant_specs() if specs is None else specs
    if basis is not None:
        from fibquant_cli.formats.basis import load_basis
        from fibquant_cli.ops.transform import check_basis

        # the basis asked for, refused now rather than every one of its points skipped
        check_basis(dump, load_basis(basis))
        specs = [*specs, *transform_specs(basis)]
    avail = available_peers() if peers else None
    peer_list = [n for n in PEER_ORDER if avail and n in avail.runnable]
    own = len(TRANSFORM_RATIOS) if own_basis else 0
    total = len(specs) + own + (4 if scalar else 0) + len(peer_list)
    progress.start(total, "sweep")
    rep = SweepReport(str(dump.path), dump.manifest.attention is None,
                      min(max_queries, dump.manifest.entries[pair[0]].shape.tokens))
    # a point shows no TV: every point is scored against the original attention kept once
    scoring = {"total_variation": False, "references": {}}
    with tempfile.TemporaryDirectory(prefix="fibquant-sweep-") as tmp:
        runs = [(spec, spec) for spec in specs]  # (how it runs, what it stands for)
        if own_basis:
            try:
                runs += own_basis_runs(dump, Path(tmp))
            except (InvalidInputError, UsageError) as err:  # e.g. too few tokens
                rep.skipped[OWN_BASIS] = err.reason
                for _ in range(own):
                    progress.advance(OWN_BASIS)
        for spec, shown in runs:
            try:
                point, _ = run_fibquant(dump, spec, Path(tmp), max_queries, shown, scoring)
                rep.points.append(point)
            except (InvalidInputError, UsageError) as err:
                # e.g. a block length that does not divide d, a ratio below a file's fixed cost
                rep.skipped[shown.label()] = err.reason
            progress.advance(shown.label())
    if scalar:
        for bits in (4, 3, 2, 1):
            roundtrip, bpv, once = scalar_codec(d, bits)
            rep.points.append(run_codec(dump, f"scalar {bits}-bit", roundtrip, bpv, max_queries,
                                        once, scoring))
            rep.points[-1].method = "scalar"
            progress.advance(f"scalar {bits}")
    if avail is not None:
        rep.skipped.update(avail.unavailable)
        for name in peer_list:
            codec = avail.runnable[name]
            try:
                rep.points.append(run_codec(dump, name, codec.roundtrip, codec.bits_per_value,
                                            max_queries, scoring=scoring))
            except InvalidInputError as err:
                rep.skipped[name] = err.reason
            progress.advance(name)
    rep.points.sort(key=lambda p: -p.ratio)
    mark_pareto(rep.points)
    return rep
