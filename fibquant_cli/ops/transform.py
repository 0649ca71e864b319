"""``compress --basis``: a dump transform-coded against a model-level basis (docs/transform.md).

Three passes over the KV layers, nothing written before the third:

1. the usual check (NaN/Inf, source digests: ``compress_plan.check_and_digest``);
2. statistics: per layer and role, the rows' mean, each coefficient's standard deviation
   (``scale``) and how many of its values lie beyond the codebooks' reach (exceptions);
3. after one allocation for the whole file, the layers coded by ``codecs/transform`` and
   streamed to the output with the coefficient tables (and, with ``embed_basis``, the basis).

The allocation spends the budget where it buys the most attention fidelity: each layer and
role's squared error is weighted by the basis's measured sensitivity (``fibquant calibrate``)
over its total variance, so a layer whose small errors move attention a lot gets the bits it
needs. The budget is all-inclusive: the greedy allocator's steps are taken while the whole
file -- header, tables, statistics, exceptions, kept tokens and codes -- fits the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fibquant_cli.codecs import transform as codec
from fibquant_cli.core import transform as T
from fibquant_cli.core.metrics import ErrorAccumulator
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import container, dtypes, stfile
from fibquant_cli.formats.container import (
    PLACEHOLDER_DIGEST,
    Document,
    EntryRecord,
    TransformRecord,
    basis_name,
    part_name,
    scalar_table_name,
    vq_table_name,
)
from fibquant_cli.formats.kvdump import Dump, read_layer
from fibquant_cli.ops.compress_report import CompressReport, role_stats, total_stats
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.spec import recent_window
from fibquant_cli.ops.threads import in_order

SEARCH_STEPS = 40  # bisection steps over the allocator's prefix (2**40 >> any step count)


@dataclass
class Matrix:
    """One layer and role of the dump: where it is, its basis and its statistics."""

    entry: int
    layer: int
    lb: codec.LayerBasis
    keep: tuple[int, int]
    rows: int
    stats: codec.LayerStats | None = None
    over: np.ndarray | None = None  # per component: values beyond TAU
    coefficients: np.ndarray | None = None  # from the statistics pass, when memory allows
    encoded: tuple | None = None  # (parts, ErrorAccumulator), when a trial encoded it already


def check_basis(dump: Dump, basis) -> dict[str, int]:
    """The manifest entries to code ({role: entry index}); refuses a basis of other geometry."""
    roles = {entry.shape.role: i for i, entry in enumerate(dump.manifest.entries)}
    if sorted(e.shape.role for e in dump.manifest.entries) != ["key", "value"]:
        raise InvalidInputError(
            "transform coding needs exactly one key and one value entry; the manifest has "
            f"{', '.join(e.shape.role for e in dump.manifest.entries)}", path=str(dump.path))
    for role, i in roles.items():
        shape = dump.manifest.entries[i].shape
        for what, mine, theirs in (("layers", shape.layers, basis.layers),
                                   ("kv_heads", shape.kv_heads, basis.kv_heads),
                                   ("head_dim", shape.head_dim, basis.head_dim)):
            if mine != theirs:
                raise InvalidInputError(f"the {role} entry has {what} {mine}, the basis "
                                        f"{basis.path} has {theirs}", path=str(dump.path))
    key = dump.manifest.entries[roles["key"]]
    if basis.rope is not None:
        if key.shape.rope_state == "post_rope" and key.rope is None:
            raise InvalidInputError(
                "the basis was fitted with RoPE undone, but the key entry has no 'rope' object "
                "to undo it with (docs/manifest.md)", path=str(dump.path))
        if key.rope is not None and (key.rope.theta, key.rope.style) != (basis.rope.theta,
                                                                         basis.rope.style):
            raise InvalidInputError(
                f"the keys' RoPE (theta {key.rope.theta:g}, {key.rope.style}) is not the "
                f"basis's (theta {basis.rope.theta:g}, {basis.rope.style})", path=str(dump.path))
    return roles  # a basis fitted on keys as stored (rope null) codes them as stored


def embeds(spec, own: bool) -> bool:
    """Whether the file stores its basis: asked for (``--embed-basis``), or fitted on the dump."""
    return spec.embed_basis or own


def keep_last(dump: Dump, i: int, spec) -> int:
    """The last tokens of manifest entry ``i`` that ``spec`` keeps exact (``recent_window``:
    "auto" by the entry's tokens and its dtype's bits against the ratio asked for)."""
    entry = dump.manifest.entries[i]
    bits = dtypes.DTYPE_BITS[dump.header.tensors[entry.tensors[0]].dtype]
    return recent_window(spec, entry.shape.tokens, bits)


def matrices(dump: Dump, basis, roles: dict[str, int], spec, tab: T.Tables,
             own: bool = False) -> list[Matrix]:
    """The matrices to code. An embedded basis is stored in fp16 (docs/container.md, format
    5), so its columns are rounded here: the encoder projects with exactly what decoding
    reads, and the statistics and errors it measures are the file's."""
    out = []
    rounded = embeds(spec, own)
    for role in ("key", "value"):
        i = roles[role]
        entry = dump.manifest.entries[i]
        rope = entry.rope if role == "key" and basis.rope is not None and \
            entry.shape.rope_state == "post_rope" else None
        t = entry.shape.tokens
        kf = min(spec.keep_first, t)
        kl = min(keep_last(dump, i, spec), t - kf)
        for layer in range(entry.shape.layers):
            u = np.ascontiguousarray(basis.matrix(layer, role)[1], dtype=np.float32)
            if rounded:
                u = u.astype(np.float16).astype(np.float32)
            out.append(Matrix(i, layer, codec.LayerBasis(u, tab, rope, entry.shape.head_dim),
                              (kf, kl),
                              entry.shape.batch * (t - kf - kl)))
    return out


# Coefficients kept in memory between the statistics and the encoding (float32, all layers):
# below this they are computed once, above it twice (the same arithmetic either way).
KEEP_COEFFICIENTS_BYTES = 512 * 2**20


def gather_stats(dump: Dump, mats: list[Matrix], progress: Progress, jobs: int = 1) -> None:
    progress.start(len(mats), "statistics")
    keep = sum(m.rows * m.lb.u.shape[0] * 4 for m in mats) <= KEEP_COEFFICIENTS_BYTES

    def one(m: Matrix) -> Matrix:
        arr = read_layer(dump, dump.manifest.entries[m.entry], m.layer, check=False)
        m.stats, m.over, c = codec.analyze(arr, m.lb, *m.keep)
        m.coefficients = c if keep else None
        return m

    for m in in_order(one, mats, jobs, "fibquant-transform"):
        progress.advance(f"entry {m.entry} layer {m.layer}")


def query_weight(m: Matrix, basis, dump: Dump) -> np.ndarray | float:
    """Per key column, the calibration queries' energy along it (mean 1): the allocator
    weighs a key coefficient's squared error by how much it moves the logits. Measured on
    SmolLM2 (pydocs cache, GPL-3 basis): 0.8992 -> 0.9025 attention cosine at 16x, 0.9739 ->
    0.9749 at 8x. 1 for values, and without queries in the calibration."""
    if dump.manifest.entries[m.entry].shape.role != "key":
        return 1.0
    g = basis.query_weight(m.layer)
    return 1.0 if g is None else g.astype(np.float64)


def weights(mats: list[Matrix], basis, dump: Dump) -> list[float]:
    """Per matrix: sensitivity (1 without one) per unit of its total coefficient variance."""
    out = []
    for m in mats:
        role = dump.manifest.entries[m.entry].shape.role
        s = basis.sensitivity(m.layer, role)
        total = float((m.stats.scale.astype(np.float64) ** 2).sum())
        out.append((1.0 if s is None else max(s, 1e-6)) / total if total > 0 else 0.0)
    return out


def transform_document(base: Document, dump: Dump, mats, widths, basis, spec,
                       roles: dict[str, int], own: bool = False) -> Document:
    entries: list = [None] * len(dump.manifest.entries)
    for i in roles.values():
        shape = dump.manifest.entries[i].shape
        mine = [(m, w) for m, w in zip(mats, widths) if m.entry == i]
        entries[i] = EntryRecord(
            "transform", None, shape.layers, shape.vector_count // shape.layers,
            spec.keep_first, keep_last(dump, i, spec), False,
            tuple(tuple(tuple(r) for r in codec.compress_widths(w)) for _, w in mine),
            tuple(int(m.over[codec.live_components(w)].sum()) for m, w in mine))
    rope = basis.rope is not None
    embedded = embeds(spec, own)
    return dataclasses.replace(
        base, format_version=(container.COMPACT_BASIS_SINCE if embedded
                              else container.TRANSFORM_SINCE),
        profiles=(), entries=tuple(entries),
        transform=TransformRecord(basis.digest, embedded, rope, own))


def stats_dtypes(mats) -> dict[str, str]:
    """The dtype of each layer's ``stats`` part (F32 only where fp16 cannot hold it)."""
    return {part_name(m.entry, m.layer, "stats"): m.stats.dtype for m in mats}


def file_bytes(doc: Document, chosen: dict[str, str]) -> int:
    """The exact size of the file ``doc`` describes (digests are placeholders of the same
    length as the real ones)."""
    specs = doc.expected_layout(chosen)
    digests = {name: PLACEHOLDER_DIGEST for name, _, _ in specs}
    metadata = container.metadata_for(dataclasses.replace(doc, arrays=digests))
    layout = stfile.plan_layout(specs, "<planned>")
    header = stfile.header_bytes(layout, metadata, "<planned>")
    return len(header) + sum(stfile.tensor_n_bytes(dt, dims) for _, dt, dims in specs)


TABLE_SHARE = 0.02  # tables below this share of the KV bytes are never worth a search
WIDEST_CHOICES = (4, 6, 8, 10, 16)  # the widest widths tried when the tables would cost more


def table_bytes(widest: int) -> int:
    """Bytes of the tables a file whose widest width is ``widest`` stores (float32)."""
    return sum(8 * 2**w if w <= T.VQ_MAX_WIDTH else 4 * 2 ** (w // 2)
               for w in T.WIDTHS[1:] if w <= widest)


def plan(dump: Dump, base: Document, mats, basis, spec, roles, target_bytes: float,
         progress: Progress, own: bool = False):
    """The widths of every matrix for a file of at most ``target_bytes``.

    The allocator's steps are taken while the file fits (a search over their prefix: the size
    grows with every step). The coefficient tables are part of the file, and a wide one is
    not worth its bytes in a small file (1,024 codewords take 8 KB): when the full set would
    cost more than ``TABLE_SHARE`` of the KV bytes, the allocation is also made with narrower
    widest widths and the one of least weighted distortion wins. Refuses a target below the
    file's fixed cost.
    """
    variances = [m.stats.scale.astype(np.float64) ** 2 * query_weight(m, basis, dump)
                 for m in mats]
    w = weights(mats, basis, dump)
    kv_bytes = target_bytes - raw_bytes(dump)
    choices = ([T.WIDTHS[-1]] if table_bytes(T.WIDTHS[-1]) <= TABLE_SHARE * kv_bytes
               else [c for c in WIDEST_CHOICES if table_bytes(c) < kv_bytes])
    progress.start(len(choices), "allocating bits")
    best = None
    for widest in choices or [2]:
        delta = {k: v for k, v in T.tables().delta.items() if k <= widest}
        got = _fit(dump, base, mats, basis, spec, roles, target_bytes, variances, w, delta,
                   own)
        if best is None or got[0] < best[0]:
            best = got
        progress.advance(f"widest width {widest}")
    return best[1:]


def _fit(dump, base, mats, basis, spec, roles, target_bytes, variances, w, delta, own):
    """(weighted distortion, size, document, widths) of the longest prefix that fits.

    The search runs on an estimate (codes, exceptions and tables added to the exact size of
    the empty allocation: what changes with the widths), then checks its answer against the
    exact size, stepping back while it does not fit and forward while the next steps do: a
    few exact sizes instead of one per bisection step (each builds the whole header).
    """
    # an embedded basis stores the two columns of a pair (F16, D each) once it is coded: the
    # allocator prices that when it opens a pair, the estimate below counts it
    column_bytes = 2 * mats[0].lb.u.shape[0] if mats and embeds(spec, own) else 0
    steps = T.greedy_steps(variances, w, delta,
                           [16 * column_bytes / max(m.rows, 1) for m in mats])
    chosen = stats_dtypes(mats)

    def exact(count: int) -> tuple[int, Document, list]:
        widths = steps.widths(count)
        doc = transform_document(base, dump, mats, widths, basis, spec, roles, own)
        return file_bytes(doc, chosen), doc, widths

    # The estimate after each prefix of the steps: code bits, exceptions (a pair's count joins
    # when it is first coded) and tables, without the streams' byte padding; one cumulative sum
    # instead of rebuilding every layout per bisection step.
    pair_rows = np.repeat([m.rows for m in mats], steps.pairs)
    pair_over = np.concatenate([m.over[0::2] + m.over[1::2] for m in mats]) if mats \
        else np.zeros(0, np.int64)
    lo_w, hi_w = steps.hull[steps.step], steps.hull[steps.to]
    bits = np.cumsum(pair_rows[steps.pair] * (hi_w - lo_w), dtype=np.int64)
    exc = np.cumsum(np.where(steps.step == 0, pair_over[steps.pair], 0), dtype=np.int64)
    widest = np.maximum.accumulate(hi_w) if len(steps) else np.zeros(0, np.int64)
    tables = np.array([table_bytes(x) for x in range(int(steps.hull[-1]) + 1)])
    columns = np.cumsum(np.where(steps.step == 0, 2 * column_bytes, 0), dtype=np.int64)
    variable = np.concatenate([[0], (bits + 7) // 8 + 6 * exc + columns + tables[widest]])

    empty = exact(0)
    if empty[0] > target_bytes:
        raise UsageError(f"even coding no coefficient takes {empty[0]:,} bytes, above the "
                         f"{int(target_bytes):,} the target allows: ask for more {{bits}} or "
                         "a smaller {ratio}", path=str(dump.path), options=("bits", "ratio"))
    # The estimate grows with every step, like the file; what it leaves out (padding, the
    # header's digits and runs) is nearly constant near the answer: measure it once there.
    estimate = empty[0] + variable
    lo = max(0, int(np.searchsorted(estimate, target_bytes, side="right")) - 1)
    missed = exact(lo)[0] - int(estimate[lo])
    lo = max(0, int(np.searchsorted(estimate + missed, target_bytes, side="right")) - 1)
    best = exact(lo)
    back = 1
    while best[0] > target_bytes and lo > 0:  # still too big: step back
        lo = max(0, lo - back)
        back *= 2
        best = exact(lo)
    ahead = 1
    while lo + ahead <= len(steps):  # and forward while the next steps fit
        got = exact(lo + ahead)
        if got[0] > target_bytes:
            if ahead == 1:
                break
            ahead = 1
            continue
        lo, best = lo + ahead, got
        ahead *= 2
    widths = best[2]
    distortion = sum(wm * float(np.sum((v[0::2] + v[1::2]) * np.array([delta[x] for x in ws])))
                     for v, wm, ws in zip(variances, w, widths))
    return (distortion, *best)


def encode_all(dump: Dump, mats, widths, writer, digests: dict, progress: Progress,
               array_digest, jobs: int = 1) -> dict[int, ErrorAccumulator]:
    """Encode every layer (``jobs`` threads) and write its parts in order."""
    accs: dict[int, list] = {}
    progress.start(len(mats), "compressing (transform)")

    def one(item):
        m, w = item
        if m.encoded is not None:  # the same call, made by the own basis' trial
            (parts, acc), m.encoded = m.encoded, None
            return m, parts, acc
        arr = read_layer(dump, dump.manifest.entries[m.entry], m.layer, check=False)
        parts, acc = codec.encode_layer(m.lb, arr, m.stats, w, *m.keep, c=m.coefficients)
        m.coefficients = None
        return m, parts, acc

    for m, parts, acc in in_order(one, list(zip(mats, widths)), jobs, "fibquant-transform"):
        for part, a in parts.items():
            name = part_name(m.entry, m.layer, part)
            writer.write(name, a)
            digests[name] = array_digest(a)
        accs.setdefault(m.entry, []).append((acc, sum(a.nbytes for a in parts.values())))
        progress.advance(f"entry {m.entry} layer {m.layer}")
    return accs


def shared_arrays(doc: Document, mats, tab: T.Tables) -> list[tuple[str, np.ndarray]]:
    """The coefficient tables and, when embedded, the basis: of each matrix only the columns
    its pairs code, in ascending component order, fp16 (``matrices`` rounded them already,
    so these are the very values the encoder projected with)."""
    vq, scalar = doc.transform_widths()
    out = [(vq_table_name(w), tab.vq[w]) for w in vq]
    out += [(scalar_table_name(b), tab.scalar[b]) for b in scalar]
    if doc.transform.embedded:
        for m in sorted(mats, key=lambda m: (m.entry, m.layer)):  # the layout's order
            runs = doc.entries[m.entry].widths[m.layer]
            live = codec.live_components(codec.expand_widths(runs))
            role = doc.manifest.entries[m.entry].shape.role
            out.append((basis_name(m.layer, role),
                        np.ascontiguousarray(m.lb.u[:, live].astype(np.float16))))
    return out


def target_bytes(dump: Dump, spec, passthrough: int) -> float:
    """The file size ``spec`` asks for: ``bits`` per KV value all inclusive, or the KV
    values' source bytes over ``ratio``; pass-through tensors are added as they are."""
    values = sum(e.shape.element_count for e in dump.manifest.entries)
    source = sum(dump.header.tensors[n].n_bytes for n in dump.kv_names)
    if spec.ratio is not None:
        return source / spec.ratio + passthrough
    return values * spec.transform_bits / 8 + passthrough


def raw_bytes(dump: Dump) -> int:
    return sum(dump.header.tensors[n].n_bytes for n in dump.passthrough_names)


def report(dump: Dump, out, file_size: int, n_bytes: dict, accs: dict, mats,
           widths) -> CompressReport:
    """Sizes and errors per entry and in total, as ``compress_report`` gives them for the
    per-vector codec; the tables, basis and header are split evenly across the entries."""
    passthrough = sum(b for n, b in n_bytes.items() if n.startswith(container.RAW_PREFIX))
    shared = file_size - passthrough - sum(p for runs in accs.values() for _, p in runs)
    rows, all_accs = [], []
    alloc = describe(mats, widths)
    for i, entry in enumerate(dump.manifest.entries):
        acc = ErrorAccumulator.merge(a for a, _ in accs[i])
        payload = sum(p for _, p in accs[i])
        total = payload + shared / len(dump.manifest.entries)
        stats = role_stats(entry.shape.role, entry.shape, payload, total, acc, None, None)
        rows.append(dataclasses.replace(stats, profile={"codec": "transform", **alloc[i]}))
        all_accs.append(acc)
    return CompressReport(str(dump.path), str(out), file_size, passthrough, rows,
                          total_stats(rows, all_accs, None, file_size - passthrough),
                          dump.passthrough_names)


def describe(mats, widths) -> dict:
    """Allocation summary for the report: bits per value coded, per role, and the tokens
    kept exact at the start and the end (the sink and the recent window)."""
    out = {}
    for role_entry in sorted({m.entry for m in mats}):
        bits = [sum(w) for m, w in zip(mats, widths) if m.entry == role_entry]
        dims = [len(w) * 2 for m, w in zip(mats, widths) if m.entry == role_entry]
        kept = next(m.keep for m in mats if m.entry == role_entry)
        out[role_entry] = {"mean_code_bits_per_value": float(np.sum(bits) / np.sum(dims)),
                           "min_layer": float(min(b / d for b, d in zip(bits, dims))),
                           "max_layer": float(max(b / d for b, d in zip(bits, dims))),
                           "keep_first": int(kept[0]), "keep_last": int(kept[1])}
    return out

