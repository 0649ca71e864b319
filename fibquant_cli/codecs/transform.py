"""The ``transform`` stream codec: a layer as transform-coded token rows (docs/transform.md).

A layer ``[b, h, t, d]`` becomes rows, one per token of each batch row: the ``D = h * d``
values of its heads side by side (keys with RoPE undone when the file's basis says so, so a
token's key no longer depends on its position). The first ``kf`` and last ``kl`` tokens are kept
exactly; the other ``rows = b * (t - kf - kl)`` rows are centred, projected on the layer's basis
(columns ``U``, from ``fibquant calibrate``), divided by each coefficient's standard deviation
and coded by ``core/transform`` at the layer's widths (``entry.widths[layer]``, the allocator's
choice; run-length ``[[width, pairs], ...]`` over the pairs in order).

=========  ============  ========================  ========================================
part       dtype         shape                     content
=========  ============  ========================  ========================================
codes      U8            (code_bytes,)             the width streams (``RowLayout``)
except     U8            (6 * exceptions,)         ``entry.exceptions[layer]`` little-endian
                                                   uint32 positions row * D + component,
                                                   ascending, then as many float16 values
                                                   (the normalised coefficients)
stats      F16 or F32    (2, D)                    the rows' mean (RoPE-undone domain) and
                                                   each coefficient's standard deviation; F32
                                                   only when a mean is beyond fp16's range
kept       source dtype  (b, h, kf + kl, d)        the protected tokens, exactly
=========  ============  ========================  ========================================

Few parts per layer on purpose: each stored array costs about 170 bytes of header and digest,
which at 16x on a 1,024-token cache was 4% of the file. Decoding:
``x = (c * scale)[:, live] @ U[:, live].T + mean``, RoPE re-applied to keys, rounded
to the source dtype. Every part is read and checked whole per layer (``block_bytes`` is None);
a token slice decodes only its rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fibquant_cli.core import bitpack
from fibquant_cli.core import rope as rope_math
from fibquant_cli.core import transform as T
from fibquant_cli.core.layer import SOURCE_DTYPES, cast_to, copy_kept, finite_max, round_to_dtype, widen
from fibquant_cli.core.metrics import ErrorAccumulator
from fibquant_cli.errors import IntegrityError

NAME = "transform"
STATS_DTYPES = {"F16": np.float16, "F32": np.float32}
FP16_MAX = float(np.finfo(np.float16).max)
ENCODE_ROWS = 8192  # rows projected and coded at once: bounds the float32 temporaries
DECODE_ROWS = 4096  # tokens of one batch row decoded at once (``row_blocks``)


@dataclass(frozen=True)
class LayerBasis:
    """What coding one layer needs beyond its parts: the basis columns U (D, D) float32, the
    coefficient tables, the RoPE to undo and re-apply (None: the rows are coded as given),
    and the head_dim.

    Inside the codec a row's channels are in *pair order* when RoPE is turned: each head's
    RoPE pairs side by side (``core/rope.pair_order``), so turning a row is one complex
    multiply. ``u_rows`` is U with its rows in that order; ``to_codec`` moves a vector (the
    mean) there. Files store everything in the heads' own channel order: only the arithmetic
    moves.
    """

    u: np.ndarray
    tables: T.Tables
    rope: object | None  # formats.manifest.RopeSpec
    head_dim: int

    @functools.cached_property
    def order(self) -> np.ndarray | None:
        """(D,) the stored channel of each codec channel, or None (the same order)."""
        if self.rope is None:
            return None
        one = rope_math.pair_order(self.head_dim, self.rope.style)
        heads = self.u.shape[0] // self.head_dim
        return (np.arange(heads)[:, None] * self.head_dim + one[None, :]).reshape(-1)

    @functools.cached_property
    def u_rows(self) -> np.ndarray:
        return self.u if self.order is None else np.ascontiguousarray(self.u[self.order])

    def to_codec(self, v: np.ndarray) -> np.ndarray:
        return v if self.order is None else v[..., self.order]

    def to_stored(self, v: np.ndarray) -> np.ndarray:
        if self.order is None:
            return v
        out = np.empty_like(v)
        out[..., self.order] = v
        return out


def expand_widths(runs) -> tuple[int, ...]:
    """[[width, pairs], ...] -> the width of each pair."""
    return tuple(x for w, n in runs for x in [int(w)] * int(n))


def compress_widths(widths) -> list[list[int]]:
    """The width of each pair -> run-length [[width, pairs], ...] (as the document stores it)."""
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([int(w), 1])
    return runs


def middle_rows(shape, entry) -> int:
    kf, kl = entry.keep(shape.tokens)
    return shape.batch * (shape.tokens - kf - kl)


def row_layout(shape, entry, layer: int) -> T.RowLayout:
    return _row_layout(entry.widths[layer], middle_rows(shape, entry))


@functools.lru_cache(maxsize=1024)
def _row_layout(runs: tuple, rows: int) -> T.RowLayout:
    """One ``RowLayout`` per (runs, rows) in a process, its groups and orders worked out once:
    opening a file asks for every layer's twice (its parts, then its checks), and every read
    of a layer once more."""
    return T.RowLayout(expand_widths(runs), rows)


def layer_parts(shape, profile, entry, chosen_dtype, layer: int) -> list[tuple[str, str, tuple]]:
    """The stored parts of one layer (see the module docstring)."""
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    kf, kl = entry.keep(shape.tokens)
    n_exc = entry.exceptions[layer]
    stats_dtype = chosen_dtype("stats") or "F16"
    if stats_dtype not in STATS_DTYPES:
        stats_dtype = "F16"  # the layout check then names the array and both dtypes
    parts = [("codes", "U8", (row_layout(shape, entry, layer).code_bytes,)),
             ("except", "U8", (6 * n_exc,)), ("stats", stats_dtype, (2, h * d))]
    if kf + kl:
        parts.append(("kept", SOURCE_DTYPES[shape.dtype], (b, h, kf + kl, d)))
    return parts


def block_bytes(part: str, dtype: str, profile) -> int | None:
    return None  # parts are read whole per layer; slices decode only their rows


# --------------------------------------------------------------------------- rows <-> layers


def heads_side_by_side(x: np.ndarray) -> np.ndarray:
    """A layer ``[b, h, t, d]`` as rows ``(b * t, h * d)``: one token's heads side by side,
    head-major (the row every basis and codec of transform coding works on)."""
    b, h, t, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b * t, h * d)


def heads_apart(rows: np.ndarray, batch: int, kv_heads: int) -> np.ndarray:
    """The inverse of ``heads_side_by_side``: rows ``(b * t, h * d)`` -> ``[b, h, t, d]``."""
    n, dim = rows.shape
    return rows.reshape(batch, n // batch, kv_heads, dim // kv_heads).transpose(0, 2, 1, 3)


def codec_rows(x: np.ndarray, lb: LayerBasis, first: int, *, undo_rope: bool = True) -> np.ndarray:
    """[b, h, t, d] (any float dtype) -> rows (b * t, h * d) float32 in the codec's channel
    order, RoPE undone unless ``undo_rope`` is False (positions from ``rope.first_position +
    first``): a cast, a transposing copy and one complex multiply."""
    b, h, t, d = x.shape
    rows = np.empty((b, t, h, d), dtype=np.float32)
    src = widen(x).transpose(0, 2, 1, 3)  # cast first: moving float32 is 5x cheaper than fp16
    if lb.rope is None:
        rows[...] = src
        return rows.reshape(b * t, h * d)
    z = rows.view(np.complex64)  # (b, t, h, d / 2): pair j is a_j + i b_j
    a, b_ = rope_math.pair_halves(src, lb.rope.style)
    z.real[...] = a
    z.imag[...] = b_
    if undo_rope:
        for bi in range(b):
            rope_math.turn_pairs(rows[bi], lb.rope.first_position + first, lb.rope.theta,
                                 inverse=True)
    return rows.reshape(b * t, h * d)


def place(lb: LayerBasis, x: np.ndarray, dest: np.ndarray) -> None:
    """Rows ``x (n, h, d)`` float32 in the codec's order into ``dest (h, n, d)``, a view of an
    output in the heads' order, cast to its dtype (``cast_to`` first, then moved)."""
    x = cast_to(x, dest.dtype)
    if lb.rope is None:
        dest[...] = x.transpose(1, 0, 2)
        return
    a, b = rope_math.pair_halves(dest, lb.rope.style)
    pairs = x.reshape(*x.shape[:2], -1, 2).transpose(1, 0, 2, 3)  # (h, n, d / 2, 2)
    a[...] = pairs[..., 0]
    b[...] = pairs[..., 1]


def synthesis_matrix(lb: LayerBasis, layout: T.RowLayout, scale) -> np.ndarray:
    """(live, D) float32: the live columns of U, transposed and scaled by their standard
    deviations, so that rows = live coefficients @ this + mean (one matrix product), in the
    codec's channel order."""
    live = layout.live_order
    return np.ascontiguousarray((lb.u_rows[:, live] * scale[live]).T, dtype=np.float32)


# --------------------------------------------------------------------------- encoding


@dataclass
class LayerStats:
    """The pre-pass's view of one layer: mean and scale of its middle rows' coefficients, as
    stored (rounded to ``dtype``: the encoder codes with exactly what the decoder will read)."""

    mean: np.ndarray
    scale: np.ndarray
    dtype: str = "F16"

    def stored(self) -> np.ndarray:
        return np.stack([self.mean, self.scale]).astype(STATS_DTYPES[self.dtype])


def analyze(arr: np.ndarray, lb: LayerBasis, kf: int, kl: int):
    """(LayerStats, exceedances per component, normalised coefficients (rows, D) float32) of
    one layer [b, h, t, d], from one read and one projection.

    The statistics are rounded as stored (fp16 unless a mean is beyond its range) and the
    coefficients are those of the rounded mean, ``(rows - mean) @ U / scale`` computed as the
    exact projection plus the rank-one shift ``(mean - stored mean) @ U``; the exceedances count
    |c| > ``TAU`` per component: a layer's exceptions for any widths are the sum over its coded
    components. ``encode_layer`` codes exactly these coefficients.
    """
    b, h, t, d = arr.shape
    rows = codec_rows(arr[:, :, kf:t - kl], lb, kf)
    n = len(rows)
    mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32) if n else \
        np.zeros(h * d, np.float32)
    c = np.empty((n, h * d), dtype=np.float32)
    var = np.zeros(h * d, dtype=np.float64)
    for r0 in range(0, n, ENCODE_ROWS):
        block = c[r0:r0 + ENCODE_ROWS]
        np.matmul(rows[r0:r0 + ENCODE_ROWS] - mean, lb.u_rows, out=block)
        var += np.einsum("ij,ij->j", block, block, dtype=np.float64)
    scale = np.sqrt(var / max(n, 1))
    dtype = "F16" if max(float(np.abs(mean).max(initial=0)), float(scale.max(initial=0))) \
        < FP16_MAX else "F32"
    as_stored = STATS_DTYPES[dtype]
    stats = LayerStats(lb.to_stored(mean).astype(as_stored).astype(np.float32),
                       scale.astype(as_stored).astype(np.float32), dtype)
    shift = (mean - lb.to_codec(stats.mean)) @ lb.u_rows
    inv = np.where(stats.scale > 0, 1.0 / np.where(stats.scale > 0, stats.scale, 1.0),
                   0.0).astype(np.float32)
    c += shift
    c *= inv
    over = np.count_nonzero(np.abs(c) > T.TAU, axis=0).astype(np.int64)
    return stats, over, c


def live_components(widths) -> np.ndarray:
    return T.RowLayout(tuple(widths), 0).live


def encode_layer(lb: LayerBasis, arr: np.ndarray, stats: LayerStats, widths, kf: int, kl: int,
                 c: np.ndarray | None = None, restored: np.ndarray | None = None):
    """(parts, ErrorAccumulator of the restored values) of one layer [b, h, t, d].

    ``c``: the layer's coefficients from ``analyze`` when kept; otherwise computed again by
    it (the same arithmetic, so the same exceptions the document counted). The error is of
    the values decompress restores: the same blocks through ``synthesize``, clipped, and
    rounded as the cast to the source dtype rounds them (``round_to_dtype``). ``restored``
    ([b, h, t, d], float32 or the source dtype) receives those values: the layer as
    decompress will restore it, without decoding it again."""
    b, h, t, d = arr.shape
    if c is None:
        c = analyze(arr, lb, kf, kl)[2]
    layout = T.RowLayout(tuple(widths), len(c))
    codes, pos, val = T.encode_rows(c, layout, lb.tables)
    parts = {"codes": codes, "except": pack_exceptions(pos, val), "stats": stats.stored()}
    acc = ErrorAccumulator()
    top = finite_max(arr.dtype)
    t_mid = t - kf - kl
    s = synthesis_matrix(lb, layout, stats.scale)
    for bi, s0, s1 in row_blocks(t_mid, b):
        x_hat = synthesize(lb, codes, pos, val, layout, stats.mean, stats.scale, h, d, kf + s0,
                           bi * t_mid + s0, bi * t_mid + s1, s)
        np.clip(x_hat, -top, top, out=x_hat)
        x = codec_rows(arr[bi:bi + 1, :, kf + s0:kf + s1], lb, kf + s0, undo_rope=False)
        x_hat = round_to_dtype(x_hat, arr.dtype)
        acc.add(x.reshape(-1, d), x_hat.reshape(-1, d))
        if restored is not None:
            place(lb, x_hat, restored[bi, :, kf + s0:kf + s1])
    if kf + kl:
        if restored is not None:
            restored[:, :, :kf] = arr[:, :, :kf]
            restored[:, :, t - kl:] = arr[:, :, t - kl:]
        kept = np.ascontiguousarray(np.concatenate([arr[:, :, :kf], arr[:, :, t - kl:]], axis=2))
        kx = widen(kept).reshape(-1, d)
        acc.add(kx, kx)
        parts["kept"] = kept
    return parts, acc


def synthesize(lb: LayerBasis, codes, pos, val, layout: T.RowLayout, mean, scale, h: int,
               d: int, first: int, r0: int, r1: int, s: np.ndarray | None = None) -> np.ndarray:
    """Middle rows [r0, r1), all of one batch row starting at token ``first``, as restored
    before rounding: (r1 - r0, h, d) float32 in the codec's channel order (``place`` puts
    them in an output). ``s``: ``synthesis_matrix``, when the caller made it for the layer."""
    c = T.decode_live(codes, pos, val, layout, h * d, r0, r1, lb.tables)
    rows = c @ (synthesis_matrix(lb, layout, scale) if s is None else s)
    rows += lb.to_codec(mean)
    x = rows.reshape(r1 - r0, h, d)
    if lb.rope is not None:
        rope_math.turn_pairs(x, lb.rope.first_position + first, lb.rope.theta)
    return x


# --------------------------------------------------------------------------- decoding


def pack_exceptions(pos: np.ndarray, val: np.ndarray) -> np.ndarray:
    """The ``except`` part: uint32 positions then float16 values, little-endian, as bytes."""
    return np.concatenate([np.asarray(pos, "<u4").view(np.uint8),
                           np.asarray(val, "<f2").view(np.uint8)])


def unpack_exceptions(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    n = raw.size // 6
    return raw[:4 * n].view("<u4"), raw[4 * n:].view("<f2")


def _checked(parts: dict, shape, entry, layer: int, name_of):
    layout = row_layout(shape, entry, layer)
    d_all = shape.kv_heads * shape.head_dim
    pos, val = unpack_exceptions(parts["except"])
    stats = np.asarray(parts["stats"], dtype=np.float32)
    mean, scale = stats[0], stats[1]
    if not np.all(np.isfinite(stats)):
        raise IntegrityError("holds non-finite values", tensor=name_of("stats"))
    if not np.all(np.isfinite(val.astype(np.float32))):
        raise IntegrityError("holds non-finite exception values", tensor=name_of("except"))
    if float(scale.min(initial=0.0)) < 0:
        raise IntegrityError("standard deviations must be >= 0", tensor=name_of("stats"))
    if pos.size and (np.any(np.diff(pos.astype(np.int64)) <= 0)
                     or int(pos[-1]) >= layout.rows * d_all):
        raise IntegrityError("exception positions must ascend and lie inside the layer",
                             tensor=name_of("except"))
    codes = np.asarray(parts["codes"]).reshape(-1)
    for width, idx, offset, n in layout.groups:
        try:
            bitpack.check_stream(codes[offset:offset + n], layout.rows * len(idx), width)
        except IntegrityError as err:
            raise IntegrityError(err.reason, tensor=name_of("codes")) from None
    return layout, codes, pos, val, mean, scale


def row_blocks(t_mid: int, b: int, lo: int = 0, hi: int | None = None):
    """The blocks rows are decoded in: ``DECODE_ROWS`` tokens of one batch row at a time
    (bi, token start, token stop within the middle), only those meeting [lo, hi). A slice
    decodes the very blocks the full decode does: a matrix product's rounding can depend on
    how many rows it is given, and slices must equal the full decode bit for bit."""
    hi = t_mid if hi is None else hi
    for bi in range(b):
        for s0 in range(lo // DECODE_ROWS * DECODE_ROWS, hi, DECODE_ROWS):
            yield bi, s0, min(s0 + DECODE_ROWS, t_mid)


def restore_layer(lb: LayerBasis, parts: dict, shape, entry, out: np.ndarray, name_of,
                  layer: int) -> None:
    """Decode one layer into ``out`` [b, h, t, d] in the source dtype."""
    b, h, t, d = out.shape
    kf, kl = entry.keep(t)
    layout, codes, pos, val, mean, scale = _checked(parts, shape, entry, layer, name_of)
    if kf + kl:
        kept = parts["kept"]
        if not np.all(np.isfinite(kept.astype(np.float32))):
            raise IntegrityError("holds non-finite values", tensor=name_of("kept"))
        out[:, :, :kf] = kept[:, :, :kf]
        out[:, :, t - kl:] = kept[:, :, kf:]
    restore_middle(lb, layout, codes, pos, val, mean, scale, out, kf, t - kf - kl)


def restore_middle(lb: LayerBasis, layout: T.RowLayout, codes, pos, val, mean, scale,
                   out: np.ndarray, kf: int, t_mid: int) -> None:
    """The middle tokens of ``out`` [b, h, t, d] (source dtype), block by block."""
    b, h, _, d = out.shape
    top = finite_max(out.dtype)
    s = synthesis_matrix(lb, layout, scale)
    for bi, s0, s1 in row_blocks(t_mid, b):
        x = synthesize(lb, codes, pos, val, layout, mean, scale, h, d, kf + s0,
                       bi * t_mid + s0, bi * t_mid + s1, s)
        np.clip(x, -top, top, out=x)
        place(lb, x, out[bi, :, kf + s0:kf + s1])


def check_layer(lb: LayerBasis, parts: dict, shape, entry, name_of, layer: int) -> None:
    """Everything decoding would check, without decoding."""
    _checked(parts, shape, entry, layer, name_of)


def decode_tokens(lb: LayerBasis, parts: dict, shape, entry, t0: int, t1: int, name_of,
                  layer: int) -> np.ndarray:
    """Tokens [t0, t1) of one layer as [b, h, t1 - t0, d] float32, decoding only their rows;
    bit-identical to the full decode (the same rows through the same arithmetic)."""
    b, h, t, d = shape.batch, shape.kv_heads, shape.tokens, shape.head_dim
    kf, kl = entry.keep(t)
    whole = {part: reader.whole() for part, reader in parts.items()}
    layout, codes, pos, val, mean, scale = _checked(whole, shape, entry, layer, name_of)
    out = np.empty((b, h, t1 - t0, d), dtype=np.float32)
    if kf + kl:
        copy_kept(out, whole["kept"].astype(np.float32), t0, t1, t, kf, kl)
    lo, hi = max(t0, kf), min(t1, t - kl)
    t_mid = t - kf - kl
    if lo < hi:
        for bi, s0, s1 in row_blocks(t_mid, b, lo - kf, hi - kf):
            # float32, unrounded: the caller casts (clamped) to the source dtype, which rounds
            # exactly as the full decode's round_to_dtype does
            x = synthesize(lb, codes, pos, val, layout, mean, scale, h, d, kf + s0,
                           bi * t_mid + s0, bi * t_mid + s1)
            a0, a1 = max(lo, kf + s0), min(hi, kf + s1)
            place(lb, x[a0 - kf - s0:a1 - kf - s0], out[bi, :, a0 - t0:a1 - t0])
    return out
