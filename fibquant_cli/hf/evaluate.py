"""``eval --model`` and ``sweep --model``: a compressed cache judged by the model's own loss.

The prefix's cache is captured and written as a dump; each operating point is compressed
and restored by the library's ``compress`` and ``decompress`` (the very code of the
commands), read back into a fresh cache, and the continuation is scored through it against
the uncompressed cache in the dump's dtype (the reference). Two self-checks run every time:

* ``cache``: the continuation's NLL through the model's own float32 prefix cache equals a
  no-cache forward pass over prefix + continuation within ``CACHE_CHECK_NATS``, so the cached
  path scores what the model computes;
* ``round trip``: the dump written and read back through the reader that restored dumps go
  through gives ΔNLL and KL exactly 0 against the reference, so every nonzero ΔNLL below is
  the codec's.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fibquant_cli.errors import FibQuantError, InvalidInputError, UsageError
from fibquant_cli.hf.capture import build_cache, run_prefix
from fibquant_cli.hf.kvfile import NUMPY_DTYPES, as_dtype, read_kv, write_dump
from fibquant_cli.hf.model import (
    LoadedModel,
    check_before_load,
    check_cache_of,
    load_model,
    read_token_ids,
)
from fibquant_cli.hf.scoring import compare, continuation_logp, full_logp
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.compress_plan import check_block_dim
from fibquant_cli.ops.decompress import decompress
from fibquant_cli.ops.spec import BITS_PRESETS, CompressSpec, as_run
from fibquant_cli.ops.sweep import OWN_BASIS, own_basis_runs, transform_specs

DEFAULT_PREFIX_TOKENS = 1024
DEFAULT_CONTINUATION_TOKENS = 512
CACHE_CHECK_NATS = 1e-3
# The llama.cpp cache types set beside fibquant in ``sweep --model`` (gguf package).
MODEL_PEERS = ("q8_0", "q4_1", "q4_0")


@dataclass
class ModelPoint:
    method: str  # "fibquant", "transform", "reference" or a peer name
    label: str
    ratio: float
    bits_per_value: float
    nll: float
    delta_nll: float
    kl: float
    top1: float
    seconds: float
    attention: dict | None = None  # compress's attention-fidelity summary, when measured
    spec: dict | None = None
    pareto: bool = False


@dataclass
class ModelEvalReport:
    model: str
    text: str
    prefix_tokens: int
    continuation_tokens: int
    dtype: str
    reference_nll: float
    checks: list = field(default_factory=list)  # dicts: name, value, limit, passed, what
    points: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def checks_passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


class Session:
    """One model, one text: the prefix's dump, the reference scores and the self-checks."""

    def __init__(self, lm: LoadedModel, ids: np.ndarray, prefix: int, continuation: int,
                 workdir: Path, dtype: str = "f16"):
        if prefix < 1 or continuation < 1:
            raise UsageError("--prefix-tokens and --continuation-tokens must be >= 1")
        self.lm, self.dtype, self.workdir = lm, dtype, Path(workdir)
        self.prefix_ids = ids[:, :prefix]
        self.cont_ids = ids[:, prefix:prefix + continuation]
        self.targets = ids[:, prefix + 1:prefix + continuation + 1].reshape(-1)
        self.capture = run_prefix(lm, self.prefix_ids)
        self.dump, _ = write_dump(lm, self.capture, self.prefix_ids,
                                  self.workdir / "prefix.safetensors", dtype)
        self.checks: list[dict] = []
        self.logp_ref = self.logp([as_dtype(k, dtype) for k in self.capture.keys],
                                   [as_dtype(v, dtype) for v in self.capture.values])
        self.reference_nll = compare(self.logp_ref, self.logp_ref, self.targets).nll
        self._cache_check(ids[:, :prefix + continuation], prefix)
        self._round_trip_check()

    def logp(self, keys, values) -> np.ndarray:
        return continuation_logp(self.lm, build_cache(keys, values), self.cont_ids)

    def _cache_check(self, ids: np.ndarray, prefix: int) -> None:
        cached = compare(self.logp_ref, self.logp(self.capture.keys, self.capture.values),
                         self.targets).nll
        direct = compare(self.logp_ref, full_logp(self.lm, ids, prefix), self.targets).nll
        gap = abs(cached - direct)
        self.checks.append({"name": "cache", "value": gap, "limit": CACHE_CHECK_NATS,
                            "passed": gap <= CACHE_CHECK_NATS,
                            "what": f"|NLL through the float32 cache ({cached:.6f}) - NLL of a "
                                    f"no-cache forward ({direct:.6f})| nats"})

    def _round_trip_check(self) -> None:
        result = compare(self.logp_ref, self.logp(*read_kv(self.dump)), self.targets)
        self.checks.append({"name": "round trip", "value": result.delta_nll, "limit": 0.0,
                            "passed": result.delta_nll == 0.0 and result.kl == 0.0,
                            "what": f"ΔNLL of the uncompressed {self.dtype} dump written and "
                                    f"read back (KL {result.kl:.1e})"})

    def score_restored(self, path: Path):
        return compare(self.logp_ref, self.logp(*read_kv(path)), self.targets)

    def run_spec(self, spec: CompressSpec, *, attention: bool = False,
                 max_queries: int | None = None, own_basis: str = "never",
                 shown: CompressSpec | None = None) -> ModelPoint:
        """Compress and restore the prefix's dump with ``spec`` (and ``own_basis``, as
        compress's); score the continuation. ``shown``: the spec the point stands for, when
        ``spec`` runs it another way (``sweep.against_own_basis``)."""
        fq = self.workdir / "point.fq.safetensors"
        restored = self.workdir / "point.restored.safetensors"
        start = time.perf_counter()
        try:
            rep = compress(self.dump, output=fq, spec=spec, force=True, attention=attention,
                           max_queries=max_queries, own_basis=own_basis)
            decompress(fq, output=restored, force=True, basis=spec.decode_basis)
        except FibQuantError as err:  # named by what it is, not by a deleted temporary file
            if err.path in (str(self.dump), str(fq), str(restored)):
                raise err.moved(f"the model's {self.prefix_ids.shape[1]}-token prefix "
                                "cache") from None
            raise
        seconds = time.perf_counter() - start
        result = self.score_restored(restored)
        fid = None if rep.attention is None else rep.attention.overall
        own = rep.own_basis is not None and rep.own_basis["choice"] == "own basis"
        label = as_run(shown or spec, rep).label()  # "auto" as the window it came to
        if shown is not None:
            method = OWN_BASIS if shown.own_transform else shown.codec
        else:
            method = "transform" if own else spec.codec
            label += " -> own basis" if own and not spec.own_transform else ""
        return ModelPoint(method, label,
                          rep.total.ratio, rep.total.bits_per_value,
                          result.nll, result.delta_nll, result.kl, result.top1, seconds,
                          attention=fid, spec=spec.to_json())

    def run_peer(self, name: str) -> ModelPoint:
        from fibquant_cli.formats.peers import get_peer

        codec = get_peer(name)
        keys, values = read_kv(self.dump)
        start = time.perf_counter()
        bits = 0.0
        out = {"key": [], "value": []}
        for role, layers in (("key", keys), ("value", values)):
            for x in layers:
                x_hat = codec.roundtrip(x, role)
                out[role].append(as_dtype(x_hat, self.dtype).astype(np.float32))
                bits += codec.bits_per_value(x.shape, role) * x.size
        seconds = time.perf_counter() - start
        result = compare(self.logp_ref, self.logp(out["key"], out["value"]), self.targets)
        values_n = sum(x.size for x in keys + values)
        source_bits = 8 * NUMPY_DTYPES[self.dtype].itemsize * values_n
        return ModelPoint(name, name, source_bits / bits, bits / values_n, result.nll,
                          result.delta_nll, result.kl, result.top1, seconds)


def model_specs(seed: int = 0, basis=None) -> list[CompressSpec]:
    """``sweep --model``'s points: the presets with and without the sink kept, centering
    with and without it, longer protected prefixes, and role-aware rates; with ``basis``, the
    transform codec's ladder of ratios too."""
    p = BITS_PRESETS
    specs = []
    for b in (4, 3, 2, 1):
        specs += [CompressSpec(key=p[b], value=p[b], keep_first=kf) for kf in (0, 1)]
    for b in (4, 3, 2):
        specs += [CompressSpec(key=p[b], value=p[b], keep_first=kf, center_keys=False)
                  for kf in (0, 1)]
    specs += [CompressSpec(key=p[3], value=p[3], keep_first=kf) for kf in (2, 4, 16)]
    specs += [CompressSpec(key=p[kb], value=p[vb], keep_first=1) for kb, vb in ((4, 3), (3, 2))]
    specs = [replace(s, seed=seed) for s in specs]
    if basis is not None:
        specs += transform_specs(basis)
    return specs


def evaluate_model(model: Path, *, text: Path | None = None, ids_from: Path | None = None,
                   specs: list[CompressSpec], peers: tuple[str, ...] = (),
                   prefix: int = DEFAULT_PREFIX_TOKENS,
                   continuation: int = DEFAULT_CONTINUATION_TOKENS, dtype: str = "f16",
                   attention: bool = False, max_queries: int | None = None,
                   progress=None, own_basis: str = "never",
                   own_ladder: bool = False, skip_failed: bool = True) -> ModelEvalReport:
    """Score each of ``specs`` (and each peer) on ``model`` with ``text``'s continuation;
    ``own_basis`` as compress's (the per-vector specs may become an own basis).
    ``own_ladder``: also the transform codec's ladder of ratios against a basis fitted on the
    prefix's cache (once) and embedded in every file, as ``sweep --own-basis`` runs it.
    ``skip_failed``: a point its file cannot be made for (a block length that does not divide
    head_dim) is listed in ``skipped`` with the reason, as a sweep wants; False raises it, as
    ``eval --model``, which asked for that one point, wants.

    Inputs are refused before the waits they would waste: the model's path, the text and the
    basis files before the model loads, a basis of another geometry or RoPE than the model's
    cache right after."""
    from fibquant_cli.formats.basis import load_basis
    from fibquant_cli.ops.progress import Progress

    progress = progress or Progress()
    check_before_load(model, text=text, ids_from=ids_from)
    bases = [load_basis(path) for path in dict.fromkeys(s.basis for s in specs if s.basis)]
    lm = load_model(model)
    for basis in bases:
        check_cache_of(lm, f"the basis {basis.path}", (basis.layers, basis.kv_heads,
                                                        basis.head_dim), basis.rope)
    if not skip_failed:  # the points a sweep would skip, refused before the prefix runs
        for spec in specs:
            if spec.codec == "fibquant":
                for role in ("key", "value"):
                    check_block_dim(spec, role, lm.head_dim, str(model), "the model")
    ids = read_token_ids(lm, text=text, ids_from=ids_from, needed=prefix + continuation + 1,
                         positions=prefix + continuation)
    with tempfile.TemporaryDirectory(prefix="fibquant-eval-") as tmp:
        own_specs = transform_specs(None) if own_ladder else []
        progress.start(1 + len(specs) + len(own_specs) + len(peers),
                       "prefix, reference and self-checks")
        session = Session(lm, ids, prefix, continuation, Path(tmp), dtype)
        progress.advance("self-checks")
        rep = ModelEvalReport(str(model), str(text or ids_from), prefix, continuation, dtype,
                              session.reference_nll, session.checks, note=session.capture.note)
        rep.points.append(ModelPoint("reference", f"uncompressed {dtype}", 1.0,
                                     8.0 * NUMPY_DTYPES[dtype].itemsize, session.reference_nll,
                                     0.0, 0.0, 1.0, 0.0))
        for spec in specs:
            try:
                rep.points.append(session.run_spec(spec, attention=attention,
                                                   max_queries=max_queries,
                                                   own_basis=own_basis))
            except InvalidInputError as err:  # e.g. a block length that does not divide d
                if not skip_failed:
                    raise
                rep.skipped[spec.label()] = err.reason
            progress.advance(spec.label())
        _run_own_ladder(session, own_specs, rep, Path(tmp), attention, max_queries, progress)
        for name in peers:
            try:
                rep.points.append(session.run_peer(name))
            except (InvalidInputError, UsageError) as err:
                rep.skipped[name] = err.reason
            progress.advance(name)
    mark_pareto(rep.points)
    return rep


def _run_own_ladder(session: Session, specs: list[CompressSpec], rep: ModelEvalReport,
                    workdir: Path, attention: bool, max_queries: int | None, progress) -> None:
    """The own-basis ladder: the basis fitted on the prefix's cache once (as compress fits
    it), each ratio coded against it and embedding it; all skipped, with the reason, when
    the cache is too short for a basis."""
    from fibquant_cli.formats.kvdump import open_dump

    if not specs:
        return
    try:
        runs = own_basis_runs(open_dump(session.dump), workdir)
    except (InvalidInputError, UsageError) as err:  # e.g. fewer tokens than channels
        rep.skipped[OWN_BASIS] = err.reason
        for spec in specs:
            progress.advance(spec.label())
        return
    for runs_as, spec in runs:
        try:
            rep.points.append(session.run_spec(runs_as, attention=attention,
                                               max_queries=max_queries, shown=spec))
        except (InvalidInputError, UsageError) as err:  # a ratio below the fixed cost
            rep.skipped[spec.label()] = err.reason
        progress.advance(spec.label())


def mark_pareto(points: list[ModelPoint]) -> None:
    """On the frontier: no other point is at least as small and has at most its KL."""
    for p in points:
        p.pareto = not any((o.ratio >= p.ratio and o.kl <= p.kl)
                           and (o.ratio > p.ratio or o.kl < p.kl) for o in points)
