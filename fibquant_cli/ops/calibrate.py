"""``fibquant calibrate``: learn a model's basis file from calibration dumps (docs/transform.md).

1. Open every dump and digest it (``file_digest``); check they share one geometry and one
   RoPE. The dumps are then processed in digest order, so the result (to the last bit) does
   not depend on the order they were given in.
2. Stream each dump layer by layer, adding the float64 sum and sum of outer products of the
   rows (tokens after ``keep_first``; keys with RoPE undone) per (layer, role).
3. Per (layer, role): covariance, ``eigh``, columns by decreasing variance, signs fixed.
4. With queries in a dump: the sensitivity of each (layer, role) to noise shaped like its data
   (``_sensitivity``) and the queries' energy along each key column (``measure_query_weight``),
   averaged over those dumps.
5. Write the basis file (``storage/basis.write_basis``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from fibquant_cli.codecs.transform import heads_apart, heads_side_by_side
from fibquant_cli.core.attention import FidelityStats, attention_fidelity
from fibquant_cli.core.rope import rotate, unrotate
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import stfile
from fibquant_cli.formats.basis import ROLES, BasisRope, BasisSource
from fibquant_cli.formats.digest import file_digest, tensor_digest_of_chunks
from fibquant_cli.formats.kvdump import Dump, open_dump, read_layer
from fibquant_cli.formats.manifest import manifest_path_for
from fibquant_cli.ops.fidelity import kv_entries, read_query_layer, sample_windows, scoring_threads
from fibquant_cli.ops.process import one_blas_thread
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.threads import in_order
from fibquant_cli.storage.basis import write_basis
from fibquant_cli.storage.publish import check_output, output_path

DEFAULT_KEEP_FIRST = 1
# Sensitivity: relative noise power of the probe, query positions scored, and the seed the
# noise of (layer, role) is drawn from (with the layer and role, so reruns agree).
SENSITIVITY_EPS = 0.01
SENSITIVITY_QUERIES = 256
SENSITIVITY_SEED = 0x5E45
# The summary's measure of how compressible a basis is: variance in the top quarter.
TOP_FRACTION = 0.25


@dataclass(frozen=True)
class _Source:
    """An opened calibration dump, its digest, and the indices of its key and value entries."""

    dump: Dump
    digest: str
    key: int
    value: int

    @property
    def name(self) -> str:
        return self.dump.path.name


@dataclass
class CalibrationReport:
    output: str
    digest: str
    layers: int
    kv_heads: int
    head_dim: int
    dim: int
    tokens: int  # rows fitted per matrix
    rope_undone: bool
    keep_first: int
    sources: list = field(default_factory=list)  # {"file", "digest", "queries"}
    top_variance: dict = field(default_factory=dict)  # role -> mean over layers
    sensitivity: dict | None = None  # {"min", "max", "by_role": {role: [per layer]}}
    sensitivity_by: str | None = None  # "attention cosine" or "model KL (MODEL, TEXT)"
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"output": self.output, "digest": self.digest, "layers": self.layers,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dim": self.dim,
                "tokens": self.tokens, "rope_undone": self.rope_undone,
                "keep_first": self.keep_first, "sources": self.sources,
                "top_variance_fraction": self.top_variance, "sensitivity": self.sensitivity,
                "sensitivity_by": self.sensitivity_by,
                "seconds": self.seconds}


# ------------------------------------------------------------------------- opening the dumps


def _dump_digest(dump: Dump) -> str:
    """``file_digest`` of the whole dump (every tensor), as ``fibquant digest`` prints it."""
    digests = {name: tensor_digest_of_chunks(info.dtype, info.shape,
                                             stfile.iter_raw(dump.header, name))
               for name, info in dump.header.tensors.items()}
    return file_digest(digests)


def key_rope(source: _Source, rope_undo: bool) -> BasisRope | None:
    """The RoPE to undo on this dump's keys, or None (pre-RoPE keys, or not asked to)."""
    entry = source.dump.manifest.entries[source.key]
    if not rope_undo or entry.shape.rope_state != "post_rope":
        return None
    if entry.rope is None:
        raise InvalidInputError(
            f"the key entry of {source.dump.manifest_path.name} is post_rope but lacks a 'rope' "
            "object (theta, style, first_position), so RoPE cannot be undone; {no_rope_undo} "
            "fits the keys as stored (worse: 0.93 -> 0.85 attention cosine at 16x in a "
            "prototype)", path=str(source.dump.path), options=("no_rope_undo",))
    return BasisRope(entry.rope.theta, entry.rope.style)


def _geometry(source: _Source, rope_undo: bool) -> dict:
    shape = source.dump.manifest.entries[source.key].shape
    rope = key_rope(source, rope_undo)
    return {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "key rope_state": shape.rope_state,
            "rope theta": None if rope is None else rope.theta,
            "rope style": None if rope is None else rope.style}


def open_sources(paths: list[str], rope_undo: bool, progress: Progress) -> list[_Source]:
    """The dumps, checked to agree, in digest order."""
    sources: list[_Source] = []
    progress.start(len(paths), "digest dumps")
    for path in paths:
        dump = open_dump(path)
        pair = kv_entries(dump)
        if pair is None:
            raise InvalidInputError("calibrate needs exactly one key and one value entry of the "
                                    "same geometry", path=str(dump.manifest_path))
        sources.append(_Source(dump, _dump_digest(dump), *pair))
        progress.advance("digest dumps")
    first = _geometry(sources[0], rope_undo)
    for source in sources[1:]:
        for name, value in _geometry(source, rope_undo).items():
            if value != first[name]:
                raise InvalidInputError(
                    f"{name} {value} differs from {first[name]} in {sources[0].name} (all "
                    "calibration dumps must be of one model)", path=str(source.dump.path))
    seen: dict[str, _Source] = {}
    for source in sources:
        if source.digest in seen:
            raise UsageError(f"the same dump is given twice ({seen[source.digest].dump.path} "
                             "and this one)", path=str(source.dump.path))
        seen[source.digest] = source
    return sorted(sources, key=lambda s: s.digest)


# ------------------------------------------------------------------------- rows and moments


def positions(source: _Source, tokens: int) -> np.ndarray:
    """Absolute positions of the dump's tokens ``0 .. tokens - 1``."""
    rope = source.dump.manifest.entries[source.key].rope
    return (0 if rope is None else rope.first_position) + np.arange(tokens)


def _fit_rows(source: _Source, role: str, layer: int, keep_first: int,
              rope: BasisRope | None) -> np.ndarray:
    """Float64 rows of one layer and role, tokens ``keep_first:``, RoPE undone on keys."""
    entry = source.dump.manifest.entries[source.key if role == "key" else source.value]
    x = read_layer(source.dump, entry, layer)[:, :, keep_first:].astype(np.float64)
    if role == "key" and rope is not None:
        pos = positions(source, entry.shape.tokens)[keep_first:]
        x = unrotate(x, pos, rope.theta, rope.style)
    return heads_side_by_side(x)


class Moments:
    """Float64 count, sum and sum of outer products of rows, about a shift (the first
    batch's mean), so the covariance does not lose digits to a large mean."""

    def __init__(self, dim: int):
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros((dim, dim))

    def add(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        if self.shift is None:
            self.shift = rows.mean(axis=0)
        y = rows - self.shift
        self.n += len(rows)
        self.s1 += y.sum(axis=0)
        self.s2 += y.T @ y

    def fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, basis, variance)`` float64: columns by decreasing variance, each column's
        largest-magnitude entry positive (eigh's signs are arbitrary)."""
        m = self.s1 / self.n
        cov = self.s2 / self.n - np.outer(m, m)
        cov = (cov + cov.T) / 2
        variance, basis = np.linalg.eigh(cov)
        variance, basis = variance[::-1], basis[:, ::-1]
        rows = np.argmax(np.abs(basis), axis=0)
        basis = basis * np.sign(basis[rows, np.arange(basis.shape[1])])
        return self.shift + m, np.ascontiguousarray(basis), np.maximum(variance, 0.0)


# ------------------------------------------------------------------------- sensitivity


def probe(x: np.ndarray, fit, layer: int, role: str, keep_first: int,
          rope: BasisRope | None, pos: np.ndarray, draw: int = 0) -> np.ndarray:
    """``x`` float32 with Gaussian noise of covariance ``eps * B diag(variance) B^T`` added to
    the rows after ``keep_first`` (in the fitted space: keys with RoPE undone, then redone);
    ``draw`` > 0: another noise, seeded by it too (draw 0 is the noise of every release)."""
    _, basis, variance = fit
    b, h = x.shape[:2]
    tail = x[:, :, keep_first:].astype(np.float64)
    if role == "key" and rope is not None:
        tail = unrotate(tail, pos[keep_first:], rope.theta, rope.style)
    rows = heads_side_by_side(tail)
    seed = (SENSITIVITY_SEED, layer, ROLES.index(role)) + ((draw,) if draw else ())
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(rows.shape)
    rows = rows + (z * np.sqrt(SENSITIVITY_EPS * variance)) @ basis.T
    tail = heads_apart(rows, b, h)
    if role == "key" and rope is not None:
        tail = rotate(tail, pos[keep_first:], rope.theta, rope.style)
    out = x.astype(np.float32)
    out[:, :, keep_first:] = tail
    return out


def _layer_drops(source: _Source, layer: int, fits, keep_first: int,
                 rope: BasisRope | None, queries: int = SENSITIVITY_QUERIES) -> list[float]:
    """Per role, 1 - mean attention cosine of this layer with only that matrix perturbed."""
    entries = source.dump.manifest.entries
    k = read_layer(source.dump, entries[source.key], layer).astype(np.float32)
    v = read_layer(source.dump, entries[source.value], layer).astype(np.float32)
    tokens = k.shape[2]
    pos = positions(source, tokens)
    causal = source.dump.manifest.attention.causal
    windows = sample_windows(tokens, queries)
    queries = [read_query_layer(source.dump, layer, w) for w in windows]
    drops = []
    for role in ROLES:
        x = k if role == "key" else v
        x_hat = probe(x, fits[(layer, role)], layer, role, keep_first, rope, pos)
        k_hat, v_hat = (x_hat, v) if role == "key" else (k, x_hat)
        stats = []
        for window, q in zip(windows, queries):
            stop = window.stop if causal else tokens
            stats.append(attention_fidelity(q, k[:, :, :stop], v[:, :, :stop],
                                            k_hat[:, :, :stop], v_hat[:, :, :stop],
                                            causal=causal, cosine_only=True))
        drops.append(max(0.0, 1.0 - FidelityStats.merge(stats).cosine_mean))
    return drops


def measure_sensitivity(sources: list[_Source], fits, layers: int, keep_first: int,
                        rope: BasisRope | None, progress: Progress,
                        queries: int = SENSITIVITY_QUERIES) -> np.ndarray | None:
    """``(layers, 2)`` mean over the dumps with queries of drop / eps, or None without any;
    ``queries`` positions scored per layer.

    Layers are probed in ``fidelity.scoring_threads()`` threads: each layer's noise comes from
    its own seed and its sums are added in layer order, so the result does not depend on it
    (tested).
    """
    with_queries = [s for s in sources if s.dump.manifest.attention is not None]
    if not with_queries:
        return None
    total = np.zeros((layers, len(ROLES)))
    progress.start(len(with_queries) * layers, "sensitivity")
    jobs = scoring_threads()
    for source in with_queries:
        def drops(layer: int, source=source) -> list[float]:
            return _layer_drops(source, layer, fits, keep_first, rope, queries)

        for layer, found in enumerate(in_order(drops, range(layers), jobs, "fibquant-probe")):
            total[layer] += found
            progress.advance("sensitivity")
    return total / len(with_queries) / SENSITIVITY_EPS


def measure_query_weight(sources: list[_Source], fits, layers: int, keep_first: int,
                         rope: BasisRope | None) -> np.ndarray | None:
    """``(layers, D)``: per key column u_i, E[(q . u_i)^2] over the calibration queries,
    relative to the mean column, averaged over the dumps with queries; None without any.

    A key error e moves a logit by q . e, so e along a column the queries barely reach costs
    little however large its variance. With RoPE undone, the query meets the key turned by
    the tokens' relative angle; taking that angle as uniform, each channel pair's query energy
    is shared equally by its two channels. Per KV head the energies of its query heads add.
    """
    with_queries = [s for s in sources if s.dump.manifest.attention is not None]
    if not with_queries:
        return None
    total = None
    for source in with_queries:
        shape = source.dump.manifest.entries[source.key].shape
        h, d, group = shape.kv_heads, shape.head_dim, shape.query_heads // shape.kv_heads
        out = np.zeros((layers, h * d))
        for layer in range(layers):
            q = read_query_layer(source.dump, layer, slice(min(keep_first, shape.tokens),
                                                           shape.tokens)).astype(np.float64)
            energy = (q * q).mean(axis=(0, 2))  # (query heads, d)
            if rope is not None:
                pair = _pair_energy(energy, rope.style)
                energy = pair / 2.0
            per_channel = energy.reshape(h, group, d).sum(axis=1).reshape(-1)
            u = fits[(layer, "key")][1]
            g = (u * u * per_channel[:, None]).sum(axis=0)
            out[layer] = g / g.mean() if g.mean() > 0 else 1.0
        total = out if total is None else total + out
    return total / len(with_queries)


def _pair_energy(energy: np.ndarray, style: str) -> np.ndarray:
    """Each channel's energy replaced by its RoPE pair's total (channels of a pair share it)."""
    d = energy.shape[-1]
    out = np.empty_like(energy)
    if style == "half":
        both = energy[:, :d // 2] + energy[:, d // 2:]
        out[:, :d // 2], out[:, d // 2:] = both, both
    else:
        both = energy[:, 0::2] + energy[:, 1::2]
        out[:, 0::2], out[:, 1::2] = both, both
    return out


# ------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class Fit:
    """What calibrate learns from its dumps, before it is written: per (layer, role) the
    ``(mean, basis, variance)`` float64 (float32 values, as the file stores them), the
    sensitivity and query-weight tables (None without queries), the rows fitted per matrix."""

    matrices: dict
    sensitivity: np.ndarray | None
    query_weight: np.ndarray | None
    rows: int
    dim: int


def source_of(dump: Dump, digest: str) -> _Source:
    """An open dump as a calibration source (``compress``'s own basis fits one)."""
    pair = kv_entries(dump)
    if pair is None:
        raise InvalidInputError("fitting a basis needs exactly one key and one value entry of "
                                "the same geometry", path=str(dump.manifest_path or dump.path))
    return _Source(dump, digest, *pair)


def fit_sources(sources: list[_Source], keep_first: int, rope: BasisRope | None,
                progress: Progress, sensitivity_queries: int = SENSITIVITY_QUERIES,
                sensitivity_of=None) -> Fit:
    """The basis of ``sources`` (in the order given; ``open_sources`` sorts them by digest):
    moments, ``eigh``, then sensitivity (``sensitivity_queries`` positions per layer, or
    ``sensitivity_of(fits, layers, keep_first, rope, progress)``: the model's own, from
    ``hf/sensitivity``) and query weights from the dumps with queries.

    Raises:
        InvalidInputError: fewer than D + 1 rows per matrix after ``keep_first``.
    """
    shape = sources[0].dump.manifest.entries[sources[0].key].shape
    layers, dim = shape.layers, shape.kv_heads * shape.head_dim
    rows = sum(s.dump.manifest.entries[s.key].shape.batch
               * max(0, s.dump.manifest.entries[s.key].shape.tokens - keep_first)
               for s in sources)
    if rows < dim + 1:
        raise InvalidInputError(
            f"too few tokens: a {dim}-dimensional basis needs at least {dim + 1} rows per "
            f"matrix after the first {keep_first} token(s), the dumps give {rows}",
            path=str(sources[0].dump.path))
    moments = {(layer, role): Moments(dim) for layer in range(layers) for role in ROLES}
    progress.start(len(sources) * layers, "fit")
    for source in sources:
        for layer in range(layers):
            for role in ROLES:
                moments[(layer, role)].add(_fit_rows(source, role, layer, keep_first, rope))
            progress.advance("fit")
    fits = {key: tuple(a.astype(np.float32).astype(np.float64) for a in m.fit())
            for key, m in moments.items()}
    if sensitivity_of is not None:
        sensitivity = sensitivity_of(fits, layers, keep_first, rope, progress)
    else:
        sensitivity = measure_sensitivity(sources, fits, layers, keep_first, rope, progress,
                                          sensitivity_queries)
    query_weight = measure_query_weight(sources, fits, layers, keep_first, rope)
    return Fit(fits, sensitivity, query_weight, rows, dim)


# ------------------------------------------------------------------------- the command


def calibrate(paths: list[str], *, output: str, keep_first: int = DEFAULT_KEEP_FIRST,
              rope_undo: bool = True, force: bool = False,
              progress: Progress | None = None, model_sensitivity=None) -> CalibrationReport:
    """Fit a basis file from the dumps ``paths`` and write it to ``output``.

    ``model_sensitivity``: ``(label, prepare)`` to measure the sensitivity with a model
    rather than the attention (``hf/sensitivity``). ``prepare(shape, rope, progress)`` runs
    once the dumps are checked and before the fit, so that a model or text that cannot serve
    is refused before that wait; it returns the ``sensitivity_of`` that ``fit_sources`` calls.

    Raises:
        UsageError: no dumps, a negative ``keep_first``, an output that exists without
            ``force``, a dump given twice.
        InvalidInputError: dumps that disagree (layers, kv_heads, head_dim, RoPE), a post-RoPE
            key entry without its ``rope`` object, fewer than D + 1 rows per matrix.
    """
    start = time.perf_counter()
    progress = progress or Progress()
    if not paths:
        raise UsageError("calibrate needs at least one dump")
    if keep_first < 0:
        raise UsageError(f"{{keep_first}} must be >= 0, found {keep_first}",
                         options=("keep_first",))
    out = output_path(output)
    inputs = {p: "input file" for p in paths}
    inputs.update({manifest_path_for(p): "manifest file" for p in paths})
    check_output(out, force=force, inputs=inputs)  # before the long run, not after it
    with one_blas_thread():  # small matmuls (see ops/fidelity); one thread is also repeatable
        sources = open_sources(paths, rope_undo, progress)
        shape = sources[0].dump.manifest.entries[sources[0].key].shape
        rope = key_rope(sources[0], rope_undo)
        sensitivity_of = model_sensitivity[1](shape, rope, progress) if model_sensitivity \
            else None
        fit = fit_sources(sources, keep_first, rope, progress, sensitivity_of=sensitivity_of)
    layers, dim, fits, sensitivity = shape.layers, fit.dim, fit.matrices, fit.sensitivity
    basis = write_basis(out, layers=layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                        rope=rope, keep_first=keep_first, tokens=fit.rows,
                        sources=[BasisSource(s.name, s.digest) for s in sources],
                        matrices=fit.matrices, sensitivity=fit.sensitivity,
                        query_weight=fit.query_weight, force=force)
    top = max(1, math.ceil(TOP_FRACTION * dim))
    report = CalibrationReport(
        output=str(out), digest=basis.digest, layers=layers, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, dim=dim, tokens=fit.rows, rope_undone=rope is not None,
        keep_first=keep_first,
        sources=[{"file": str(s.dump.path), "digest": s.digest,
                  "queries": s.dump.manifest.attention is not None} for s in sources],
        top_variance={role: float(np.mean([_top_share(fits[(layer, role)][2], top)
                                           for layer in range(layers)])) for role in ROLES})
    if sensitivity is not None:
        report.sensitivity_by = model_sensitivity[0] if model_sensitivity else "attention cosine"
        report.sensitivity = {"min": float(sensitivity.min()), "max": float(sensitivity.max()),
                              "by_role": {role: [float(x) for x in sensitivity[:, i]]
                                          for i, role in enumerate(ROLES)}}
    report.seconds = time.perf_counter() - start
    return report


def _top_share(variance: np.ndarray, top: int) -> float:
    total = float(variance.sum())
    return float(variance[:top].sum()) / total if total > 0 else 0.0

