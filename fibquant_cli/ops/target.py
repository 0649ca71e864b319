"""--target-cosine: the cheapest FibQuant operating point whose attention cosine meets a target."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fibquant_cli.core.params import Profile
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats.kvdump import open_dump
from fibquant_cli.ops.fidelity import DEFAULT_MAX_QUERIES, require_kv_pair
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.spec import DEFAULT_KEEP_FIRST, CompressSpec
from fibquant_cli.ops.sweep import against_own_basis, fibquant_specs, run_fibquant


def estimated_bits_per_value(spec: CompressSpec, head_dim: int, tokens: int) -> float:
    """Payload bits per value of a spec (both roles averaged), to try the cheapest first."""
    kept = min(tokens, spec.keep_first + spec.keep_last) / tokens
    total = 0.0
    for k, n in (spec.key, spec.value):
        p = Profile(head_dim, k, n)
        total += (1 - kept) * p.bits_per_vector / head_dim + kept * 16
    return total / 2


@dataclass
class TargetChoice:
    target: float
    chosen: dict | None
    measured_cosine: float | None
    tried: list = field(default_factory=list)  # dicts: label, ratio, cosine_mean
    chosen_ratio: float | None = None  # the measured ratio of the chosen point

    def to_json(self) -> dict:
        return asdict(self)


# --target-cosine with --basis: the ratios searched (a bisection on log ratio) and its steps.
TRANSFORM_RATIO_RANGE = (2.0, 32.0)
TRANSFORM_SEARCH_STEPS = 7  # ratio found within 2^(log2(16) / 2^7) ~ 2% of the best


def choose_for_target(source, target: float, *, manifest=None, seed: int = 0,
                      max_queries: int = DEFAULT_MAX_QUERIES, basis=None,
                      own_basis: bool = False,
                      progress: Progress | None = None) -> tuple[CompressSpec, TargetChoice]:
    """The cheapest FibQuant operating point whose attention cosine (mean) meets ``target``;
    with ``basis``, the highest transform ratio that does. ``own_basis``: also the highest
    ratio against the dump's own basis (fitted once, embedded, counted), when the dump is long
    enough for one to pay (``own_basis.worth_trying``); the smaller file wins."""
    if not 0.0 < target <= 1.0:
        raise UsageError(f"{{target_cosine}} must be in (0, 1], got {target}",
                         options=("target_cosine",))
    progress = progress or Progress()
    dump = open_dump(source, manifest)
    require_kv_pair(dump, "a target cosine")
    # every point is scored on the cosine alone, against the original attention computed by
    # the first point of either search (``fidelity.measure``)
    scoring = {"cosine_only": True, "references": {}}
    if basis is not None:
        return _transform_ratio(dump, target, basis, max_queries, progress, scoring)
    try:
        chosen, missed = _per_vector(dump, target, seed, max_queries, progress, scoring), None
    except UsageError as err:
        if not own_basis:
            raise
        chosen, missed = None, err
    if not own_basis:
        return chosen
    from fibquant_cli.ops.own_basis import worth_trying, write_own_basis
    from fibquant_cli.ops.spec import resolve_spec

    if not worth_trying(dump, chosen[0] if chosen else resolve_spec(seed=seed)):
        if missed is not None:
            raise missed
        return chosen
    with tempfile.TemporaryDirectory(prefix="fibquant-target-") as tmp:
        path = Path(tmp) / "own.basis.safetensors"
        write_own_basis(dump, DEFAULT_KEEP_FIRST, Progress(), path)
        try:  # the answer is an own-basis spec: compress fits the same basis again
            spec, own = _transform_ratio(dump, target, None, max_queries, progress, scoring,
                                         path)
        except UsageError as err:
            if missed is not None:
                raise UsageError(f"{missed.reason}; against its own basis: {err.reason}",
                                 path=str(dump.path)) from None
            return chosen
    if chosen is not None:
        own.tried = chosen[1].tried + own.tried
        if chosen[1].chosen_ratio >= own.chosen_ratio:
            chosen[1].tried = own.tried
            return chosen
    return spec, own


def _per_vector(dump, target: float, seed: int, max_queries: int, progress: Progress,
                scoring: dict) -> tuple[CompressSpec, TargetChoice]:
    """The first per-vector point, cheapest first, whose cosine meets ``target``
    (``scoring``: ``run_fibquant``'s, shared by the whole search)."""
    pair = require_kv_pair(dump, "a target cosine")
    shape = dump.manifest.entries[pair[0]].shape
    specs = sorted(fibquant_specs(seed),
                   key=lambda s: estimated_bits_per_value(s, shape.head_dim, shape.tokens))
    choice = TargetChoice(target, None, None)
    progress.start(len(specs), f"searching for cosine >= {target}")
    with tempfile.TemporaryDirectory(prefix="fibquant-target-") as tmp:
        for spec in specs:
            try:
                point, _ = run_fibquant(dump, spec, Path(tmp), max_queries, scoring=scoring)
            except InvalidInputError:
                continue
            choice.tried.append({"label": spec.label(), "ratio": point.ratio,
                                 "cosine_mean": point.cosine_mean})
            progress.advance(spec.label())
            if point.cosine_mean >= target:
                choice.chosen, choice.measured_cosine = spec.to_json(), point.cosine_mean
                choice.chosen_ratio = point.ratio
                return spec, choice
    best = max(choice.tried, key=lambda t: t["cosine_mean"], default=None)
    detail = f"; the best is {best['cosine_mean']:.4f} ({best['label']})" if best else ""
    raise UsageError(f"no FibQuant operating point reaches attention cosine {target}{detail}",
                     path=str(dump.path))


def _transform_ratio(dump, target: float, basis, max_queries: int, progress: Progress,
                     scoring: dict, own_path=None) -> tuple[CompressSpec, TargetChoice]:
    """Bisection on log ratio between ``TRANSFORM_RATIO_RANGE``: the cosine falls as the ratio
    grows (fewer bits everywhere), so the last ratio that met the target is kept. ``basis``
    None: against the dump's own basis, fitted once and written at ``own_path``."""
    import math

    from fibquant_cli.ops.sweep import transform_specs

    choice = TargetChoice(target, None, None)
    lo, hi = (math.log2(r) for r in TRANSFORM_RATIO_RANGE)
    best = None
    progress.start(TRANSFORM_SEARCH_STEPS + 1, f"searching for cosine >= {target}")
    with tempfile.TemporaryDirectory(prefix="fibquant-target-") as tmp:
        for step in range(TRANSFORM_SEARCH_STEPS + 1):
            ratio = 2 ** (lo if step == 0 else (lo + hi) / 2)
            spec = transform_specs(basis, (round(ratio, 3),))[0]
            runs = spec if basis is not None else against_own_basis(spec, own_path)
            try:
                point, _ = run_fibquant(dump, runs, Path(tmp), max_queries, spec, scoring)
                ok = point.cosine_mean >= target
                choice.tried.append({"label": spec.label(), "ratio": point.ratio,
                                     "cosine_mean": point.cosine_mean})
            except UsageError:  # the ratio is below the file's fixed cost
                ok = False
            progress.advance(spec.label())
            if step == 0 and not ok:
                break  # even the lowest ratio misses
            if ok:
                best = (spec, point.cosine_mean, point.ratio)
                lo = math.log2(ratio) if step else lo
            else:
                hi = math.log2(ratio)
    if best is None:
        top = max(choice.tried, key=lambda t: t["cosine_mean"], default=None)
        detail = f"; {top['label']} reaches {top['cosine_mean']:.4f}" if top else ""
        raise UsageError(f"no transform ratio of at least {TRANSFORM_RATIO_RANGE[0]:g}x reaches "
                         f"attention cosine {target}{detail}", path=str(dump.path))
    choice.chosen, choice.measured_cosine, choice.chosen_ratio = best[0].to_json(), *best[1:]
    return best[0], choice
