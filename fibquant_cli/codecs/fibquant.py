"""The ``fibquant`` stream codec: a layer as packed FibQuant codes, norms, mean and kept tokens.

Parts of one layer ``[b, h, t, d]`` with ``kf``/``kl`` protected tokens, ``t_mid = t - kf - kl``
and profile (d, k, N):

=========  ============  ========================  ========================================
part       dtype         shape                     content
=========  ============  ========================  ========================================
codes      U8            (packed bytes,)           indices of the middle vectors in (b, h,
                                                   token) order, d/k each, ``wire_bits`` bits
                                                   LSB-first: vector v starts at bit
                                                   v * (d/k) * wire_bits (random access)
norms      F16 or F32    (b, h, t_mid)             vector norms; F32 only when fp16 cannot
                                                   hold them: one beyond its maximum, or
                                                   tiny values whose norms fall below its
                                                   smallest normal (``norms_dtype``)
mean       F32           (b, h, d)                 per-head mean of the middle (``center``)
kept       source dtype  (b, h, kf + kl, d)        the protected tokens, exactly
=========  ============  ========================  ========================================

Random access reads codes and norms in blocks of ``DECODE_ROWS`` vectors (``block_bytes``):
format 3 records a digest per block, so a slice checks exactly the blocks it decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fibquant_cli.core import bitpack
from fibquant_cli.core.codec import DECODE_ROWS, FibQuantizer, row_norms
from fibquant_cli.core.layer import (
    SOURCE_DTYPES,
    LayerRows,
    cast_clamped,
    copy_kept,
    decoded_segments,
    restore_into,
    round_to_dtype,
)
from fibquant_cli.core.metrics import ErrorAccumulator
from fibquant_cli.core.params import Profile
from fibquant_cli.core.scalar import ScalarQuantizer
from fibquant_cli.errors import IntegrityError, InvalidInputError

NAME = "fibquant"
NORMS_DTYPES = ("F16", "F32")
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # 2**-14, the smallest normal fp16
F32_MAX = float(np.finfo(np.float32).max)
# Vectors encoded at once: a multiple of the decode block, so a chunk's statistics decode
# exactly as decompress does, and of 8, so packed chunks join on byte boundaries. About 2 MB of
# float32 per array: together with the source layer this bounds compress's memory.
ENCODE_ROWS = 2 * DECODE_ROWS


def layer_parts(shape, profile: Profile, entry, chosen_dtype,
                layer: int = 0) -> list[tuple[str, str, tuple]]:
    """The stored parts of one layer of an entry (see the module docstring)."""
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    kf, kl = entry.keep(shape.tokens)
    t_mid = shape.tokens - kf - kl
    n_codes = b * h * t_mid * profile.blocks_per_vector
    norms_dtype = chosen_dtype("norms") or "F16"
    if norms_dtype not in NORMS_DTYPES:
        norms_dtype = "F16"  # the layout check then names the array and both dtypes
    parts = [("codes", "U8", (bitpack.packed_n_bytes(n_codes, profile.wire_bits),)),
             ("norms", norms_dtype, (b, h, t_mid))]
    if entry.center:
        parts.append(("mean", "F32", (b, h, d)))
    if kf + kl:
        parts.append(("kept", SOURCE_DTYPES[shape.dtype], (b, h, kf + kl, d)))
    return parts


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is encoded (``keep_first``/``keep_last`` clamped to its tokens)."""

    entry: int
    layer: int
    keep_first: int
    keep_last: int
    center: bool
    norms_dtype: str  # "F16" or "F32"


@dataclass
class EncodedLayer:
    plan: LayerPlan
    parts: dict  # part -> array
    acc: ErrorAccumulator
    scalar_acc: ErrorAccumulator | None
    payload: int = 0  # bytes of the parts (kept after the parts are written and released)


def norms_dtype(arr: np.ndarray, center: bool, keep_first: int, keep_last: int) -> str:
    """"F16" when fp16 holds every norm to encode of this layer with its full precision, else
    "F32" (a norm above fp16's maximum, or a non-zero one below its smallest normal value,
    where fp16 keeps fewer bits, down to none: values around 1e-9 would restore as zeros).
    Exact: computes the norms. A norm beyond float32's range raises ``InvalidInputError``
    naming the vector (batch, head, token of the layer).
    """
    rows = LayerRows(arr, center, keep_first, keep_last)
    wide = False
    for c0 in range(0, rows.n, ENCODE_ROWS):
        _, x_in = rows.chunk(c0, min(rows.n, c0 + ENCODE_ROWS))
        norms = row_norms(x_in)
        top = int(np.argmax(norms)) if norms.size else 0
        if norms.size and norms[top] > F32_MAX:
            b, h, t_mid, _ = rows.shape
            r = c0 + top
            raise InvalidInputError(
                f"the vector at batch {r // (h * t_mid)}, head {r // t_mid % h}, token "
                f"{keep_first + r % t_mid} has norm {float(norms[top]):.3g}"
                f"{' after centering' if center else ''}, beyond float32's range "
                f"({F32_MAX:.3g}): its norm cannot be stored")
        nonzero = norms[norms > 0]
        wide = wide or (norms.size and norms[top] > FP16_MAX) or bool(
            nonzero.size and nonzero.min() < FP16_TINY)
    return "F32" if wide else "F16"


def encode_layer(q: FibQuantizer, arr: np.ndarray, plan: LayerPlan,
                 compare: bool, restored: np.ndarray | None = None) -> EncodedLayer:
    """Encode one layer [b, h, t, d] (source dtype), ``ENCODE_ROWS`` vectors at a time.

    The error statistics are those of the restored values, decoded exactly as decompress
    does; with ``compare``, also those of the scalar baseline at the same whole-bit rate.
    ``restored`` ([b, h, t, d], C-contiguous float32 or the source dtype) receives those
    values: the layer as decompress will restore it, without decoding it again.
    """
    out_dtype = arr.dtype
    rows = LayerRows(arr, plan.center, plan.keep_first, plan.keep_last)
    b, h, t, d = rows.shape
    p = q.profile
    bpv, width = p.blocks_per_vector, p.wire_bits
    packed = np.empty(bitpack.packed_n_bytes(rows.n * bpv, width), dtype=np.uint8)
    stored_norms = np.empty(rows.n, dtype=np.float16 if plan.norms_dtype == "F16" else np.float32)
    acc = ErrorAccumulator()
    scalar = (ScalarQuantizer(p.head_dim, p.whole_bits, q.rotation)
              if compare and p.whole_bits is not None else None)
    scalar_acc = None if scalar is None else ErrorAccumulator()
    for c0 in range(0, rows.n, ENCODE_ROWS):
        c1 = min(rows.n, c0 + ENCODE_ROWS)
        x, x_in = rows.chunk(c0, c1)
        codes, norms = q.encode(x_in)
        stored = stored_norms[c0:c1]
        stored[...] = norms
        chunk = bitpack.pack(codes, width)
        packed[c0 * bpv * width // 8:][:chunk.size] = chunk
        for g, r0, r1, seg in decoded_segments(q, codes, stored.astype(np.float32), rows.mean, t,
                                               out_dtype, offset=c0):
            seg = round_to_dtype(seg, out_dtype)
            acc.add(x[r0 - c0:r1 - c0], seg)
            if restored is not None:
                heads = restored.reshape(b * h, -1, d)
                heads[g, plan.keep_first + r0 - g * t:plan.keep_first + r1 - g * t] = seg
        if scalar is not None:
            scalar_acc.add(x, cast_clamped(scalar.decode(*scalar.encode(x)), out_dtype))
    parts = {"codes": packed, "norms": stored_norms.reshape(b, h, t)}
    if rows.mean is not None:
        parts["mean"] = rows.mean
    if plan.keep_first + plan.keep_last:
        kept_x = rows.kept.reshape(-1, d).astype(np.float32)
        acc.add(kept_x, kept_x)  # stored exactly: counted, with zero error
        if scalar_acc is not None:
            scalar_acc.add(kept_x, kept_x)
        parts["kept"] = np.ascontiguousarray(rows.kept)
        if restored is not None:
            end = restored.shape[2] - plan.keep_last
            restored[:, :, :plan.keep_first] = rows.kept[:, :, :plan.keep_first]
            restored[:, :, end:] = rows.kept[:, :, plan.keep_first:]
    return EncodedLayer(plan, parts, acc, scalar_acc, sum(a.nbytes for a in parts.values()))


class PackedCodes:
    """A layer's code stream (length and padding checked), unpacked rows at a time.

    ``FibQuantizer.decode_blocks`` asks for one decode block of rows at a time, so a layer's
    indices never exist whole (as intp, the gather's fastest index type, they would take 8
    bytes per block: more than the restored layer itself). An index >= N raises.
    """

    def __init__(self, packed: np.ndarray, n: int, profile: Profile, tensor: str):
        try:
            self.packed = bitpack.check_stream(packed, n * profile.blocks_per_vector,
                                               profile.wire_bits)
        except IntegrityError as err:
            raise IntegrityError(err.reason, tensor=tensor) from None
        self.profile, self.tensor = profile, tensor
        self.shape = (n, profile.blocks_per_vector)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Codes of vectors start:stop, (stop - start, d/k) intp."""
        p, bpv = self.profile, self.shape[1]
        codes = bitpack.unpack_range(self.packed, start * bpv, stop * bpv, p.wire_bits, np.intp)
        if p.size < 2**p.wire_bits and codes.size and int(codes.max()) >= p.size:
            bad = int(np.argmax(codes >= p.size))
            raise IntegrityError(f"index {int(codes[bad])} at position {start * bpv + bad} is "
                                 f">= N = {p.size}", tensor=self.tensor)
        return codes.reshape(stop - start, bpv)

    def check_all(self) -> None:
        """Every index < N (what decoding would find), without decoding."""
        for start in range(0, self.shape[0], DECODE_ROWS):
            self.rows(start, min(self.shape[0], start + DECODE_ROWS))


def check_norms(norms: np.ndarray, tensor: str) -> np.ndarray:
    """Norms as float32, refusing non-finite or negative values."""
    norms = np.asarray(norms, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(norms)) or float(norms.min(initial=0.0)) < 0:
        raise IntegrityError("norms must be finite and >= 0", tensor=tensor)
    return norms


def check_finite_part(arr: np.ndarray, tensor: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise IntegrityError("holds non-finite values", tensor=tensor)
    return arr


def layer_codes(q: FibQuantizer, parts: dict, shape, entry, name_of) -> tuple:
    """(PackedCodes, norms float32, mean or None, kept or None) of one layer, all checked."""
    kf, kl = entry.keep(shape.tokens)
    n = shape.batch * shape.kv_heads * (shape.tokens - kf - kl)
    codes = PackedCodes(parts["codes"], n, q.profile, name_of("codes"))
    norms = check_norms(parts["norms"], name_of("norms"))
    mean = check_finite_part(parts["mean"], name_of("mean")) if entry.center else None
    kept = check_finite_part(parts["kept"], name_of("kept")) if kf + kl else None
    return codes, norms, mean, kept


def restore_layer(q: FibQuantizer, parts: dict, shape, entry, out: np.ndarray, name_of,
                  layer: int = 0) -> None:
    """Decode one layer into ``out`` [b, h, t, d] in the source dtype."""
    codes, norms, mean, kept = layer_codes(q, parts, shape, entry, name_of)
    restore_into(q, codes, norms, mean, kept, entry.keep(shape.tokens), out)


def check_layer(q: FibQuantizer, parts: dict, shape, entry, name_of, layer: int = 0) -> None:
    """Everything decoding would check, without decoding."""
    layer_codes(q, parts, shape, entry, name_of)[0].check_all()


def block_bytes(part: str, dtype: str, profile: Profile) -> int | None:
    """Bytes per digested block of a part random access reads in pieces, or None (read whole).

    Blocks hold ``DECODE_ROWS`` vectors, the unit ``decode_tokens`` decodes, so a random read
    checks exactly the blocks it decodes. ``DECODE_ROWS`` is a multiple of 8: code blocks end
    on byte boundaries.
    """
    if part == "codes":
        return DECODE_ROWS * profile.blocks_per_vector * profile.wire_bits // 8
    if part == "norms":
        return DECODE_ROWS * (2 if dtype == "F16" else 4)
    return None


def decode_tokens(q: FibQuantizer, parts: dict, shape, entry, t0: int, t1: int,
                  name_of, layer: int = 0) -> np.ndarray:
    """Tokens [t0, t1) of one layer as [b, h, t1 - t0, d] float32, touching only the decode
    blocks around them.

    ``parts`` maps each part to a reader: ``whole()`` returns the array, ``span(lo, hi)``
    its flat elements [lo, hi) (``lo`` at a block boundary); each checks what it read before
    returning it. The blocks are aligned as the full decode aligns them, so the values are
    bit-identical.
    """
    b, h, t, d = shape.batch, shape.kv_heads, shape.tokens, shape.head_dim
    p = q.profile
    kf, kl = entry.keep(t)
    t_mid = t - kf - kl
    out = np.empty((b, h, t1 - t0, d), dtype=np.float32)
    if kf + kl:
        copy_kept(out, check_finite_part(parts["kept"].whole(), name_of("kept")), t0, t1, t,
                  kf, kl)
    lo, hi = max(t0, kf), min(t1, t - kl)
    if lo >= hi:
        return out
    n_vectors = b * h * t_mid
    stream, norms = parts["codes"], parts["norms"]
    expected = bitpack.packed_n_bytes(n_vectors * p.blocks_per_vector, p.wire_bits)
    if stream.size != expected:
        raise IntegrityError(f"packed stream has {stream.size} bytes, expected {expected}",
                             tensor=name_of("codes"))
    mean = check_finite_part(parts["mean"].whole(), name_of("mean")) if entry.center else None
    bpv, rows, width = p.blocks_per_vector, DECODE_ROWS, p.wire_bits
    for bi in range(b):
        for hi_ in range(h):
            v0 = (bi * h + hi_) * t_mid + (lo - kf)
            v1 = v0 + hi - lo
            # Decode the aligned blocks around [v0, v1), as the full decode does.
            a0, a1 = v0 // rows * rows, min(-(-v1 // rows) * rows, n_vectors)
            # The blocks' bytes (a0 is a block boundary: they start on a byte), checked as
            # the full decode checks a stream (length, padding of the last, indices < N).
            packed = stream.span(a0 * bpv * width // 8, -(-a1 * bpv * width // 8))
            codes = PackedCodes(packed, a1 - a0, p, name_of("codes"))
            nrm = check_norms(norms.span(a0, a1), name_of("norms"))
            x = q.decode(codes.rows(0, a1 - a0), nrm)[v0 - a0:v1 - a0]
            if mean is not None:
                x += mean[bi, hi_]
            out[bi, hi_, lo - t0:hi - t0] = x
    return out
