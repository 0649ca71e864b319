"""One layer of K or V around the codec: protected tokens, key centering, rounding, blocks.

A layer is ``[batch, kv_heads, tokens, head_dim]``. The first ``keep_first`` and last
``keep_last`` tokens of every head are stored exactly (attention sinks, docs/method.md §8);
the others -- the *middle*, ``t_mid`` tokens per head -- are coded. With centering each head's
mean over its middle tokens is stored and subtracted first (docs/method.md §7). Rows of the
middle are counted in (batch, head, token) order, ``t_mid`` rows per head.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the manifest's dtype table below must stay light
    from fibquant_cli.core.codec import FibQuantizer

# The manifest's dtype names and the safetensors dtype of the tensors they describe.
SOURCE_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}
# The largest finite bfloat16 (numpy has no finfo for ml_dtypes' bfloat16): (2 - 2^-7) 2^127.
BF16_MAX = float.fromhex("0x1.fep127")


def finite_max(dtype) -> float:
    """The largest finite value of a float dtype (F16, BF16, F32)."""
    dtype = np.dtype(dtype)
    return BF16_MAX if dtype.name == "bfloat16" else float(np.finfo(dtype).max)


def cast_clamped(x: np.ndarray, dtype) -> np.ndarray:
    """float32 ``x`` cast to ``dtype``; values beyond its finite range are clamped, not inf.

    A reconstruction can overshoot a finite source value near the dtype's maximum.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return x
    top = finite_max(dtype)
    if x.size and max(float(x.max()), -float(x.min())) > top:  # no |x| temporary
        x = np.clip(x, -top, top)
    return cast_to(x, dtype)


def cast_to(x: np.ndarray, dtype) -> np.ndarray:
    """float32 ``x`` (finite, within ``dtype``'s range) cast to ``dtype`` as numpy casts it:
    fp16 through ``narrow``, bit for bit the same and faster; float32 without a copy."""
    dtype = np.dtype(dtype)
    return narrow(x) if dtype == np.float16 else x.astype(dtype, copy=False)


@functools.cache
def _f16_table() -> np.ndarray:
    table = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    table.flags.writeable = False
    return table


def widen(x: np.ndarray) -> np.ndarray:
    """``x`` (float16, bfloat16 or float32, any strides) as a new C-contiguous float32 array,
    bit for bit what ``x.astype(np.float32)`` gives (tested for every fp16 bit pattern).

    fp16 by bits: an fp16's bits shifted left by 13 are a float32 whose exponent field is
    fp16's, so scaling by 2^112 (exact) moves fp16's exponent bias to float32's; fp16's
    subnormals land as float32 subnormals and come out normal. The sign (bit 15, at bit 28
    after the shift) is moved to bit 31, and infinities and NaNs (exponent 31) get float32's
    exponent 255, payload kept. 1.2 ns a value against 2.4 for a lookup in a table of all
    65,536 values and 2.9 for numpy's cast, which converts one value at a time; the table
    serves where the CPU treats subnormals as zero. bf16 by a 16-bit shift (it is float32's
    upper half).
    """
    x = np.asarray(x)
    if x.dtype == np.float16:
        if not _keeps_subnormals():
            return np.take(_f16_table(), x.view(np.uint16))
        return _widen_f16(x)
    if x.dtype.name == "bfloat16":
        return (x.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.array(x, dtype=np.float32, order="C")


_F32_EXPONENT = np.uint32(0x7F800000)
_F16_MIN_EXPONENT = np.uint32(113 << 23)  # 2^-14, fp16's smallest normal
_F16_MAGIC = np.uint32((13 << 23) + (1 << 22))  # 1.5 * 2^13 times a value's power of two
_F16_REBIAS = np.float32(2.0 ** -112)  # 2^(15 - 127): float32's exponent bias to fp16's
NARROW_CHUNK = 1 << 18  # values per pass: see narrow
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # a float32's uint16 holding its sign


def _keeps_subnormals() -> bool:
    """Whether float32 arithmetic keeps subnormal results and operands here (a library
    loaded into the process may have set the CPU to flush them to zero, or to read them as
    zero, which ``narrow``'s and ``widen``'s rescaling rely on not happening)."""
    tiny = np.array([2.0 ** -126, 2.0 ** -149], dtype=np.float32)
    out = np.multiply(tiny, np.float32(0.5)), np.multiply(tiny, np.float32(2.0 ** 24))
    return bool(out[0][0] != 0 and out[1][1] != 0)


_F16_SIGN_SHIFTED = np.uint32(1 << 28)  # fp16's sign bit after the shift by 13
_F32_BIG = np.uint32((31 + 112) << 23)  # fp16's exponent 31 (inf, NaN) after the rescaling


def _widen_f16(x: np.ndarray) -> np.ndarray:
    bits = np.empty(x.shape, dtype=np.uint32)  # C order whatever x's strides
    np.left_shift(x.view(np.uint16), np.uint32(13), out=bits, casting="unsafe")
    sign = np.bitwise_and(bits, _F16_SIGN_SHIFTED)
    bits ^= sign
    out = bits.view(np.float32)
    out *= np.float32(2.0 ** 112)
    if bits.size and bits.max() >= _F32_BIG:  # infinities or NaNs
        np.bitwise_or(bits, _F32_EXPONENT, out=bits, where=bits >= _F32_BIG)
    sign <<= np.uint32(3)
    bits |= sign
    return out


def narrow(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` (finite, within +-65504: callers clamp) as a new C-contiguous float16
    array, bit for bit what ``x.astype(np.float16)`` gives (tested over every exponent).

    numpy converts to fp16 one value at a time, with branches the data decides: 5-6 ns a
    value, a third of a transform decode's time. This is eight vectorized passes over
    cache-sized chunks (about 2.5 ns): adding and subtracting c = 1.5 * 2^(e + 13), with e
    the value's exponent (at least -14), rounds it to nearest-even at fp16's spacing there
    (2^(e - 10), 2^-24 below 2^-14), in float32 and exactly. Scaling the rounded value by
    2^-112, also exact, moves float32's exponent bias to fp16's, so its bits shifted right
    by 13 are fp16's bits but for the sign, which is copied from the input (so -0.0 and
    values rounding to zero keep it). fp16's subnormals need nothing of their own: below
    2^-14 the scaled value is a float32 subnormal, whose bits count 2^-149 as fp16's count
    2^-24 (shifted by 13). Where the CPU flushes subnormals to zero, numpy's cast is used.

    Passes go over ``NARROW_CHUNK`` values at a time: 2^18 rather than a 2^16 that fits a
    core's L2 cache, because each numpy call releases and takes back the GIL, and two
    decoding threads making many short calls wait on each other (on 2 cores, a 64K-value
    add ran 1.3x faster on two threads than on one, a 1M-value add 2.1x). Measured on the
    bench file (8 layers of 6,144 tokens, paired runs): two threads 7% faster, one thread
    the same.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not _keeps_subnormals():
        return x.astype(np.float16)
    flat = x.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint16)
    m = min(NARROW_CHUNK, flat.size)
    scratch = np.empty(m, np.uint32), np.empty(m, np.float32), np.empty(m, np.uint16)
    for i in range(0, flat.size, NARROW_CHUNK):
        y = flat[i:i + NARROW_CHUNK]
        h = out[i:i + y.size]
        e, r, sign = (a[:y.size] for a in scratch)
        np.bitwise_and(y.view(np.uint16)[_HIGH_HALF::2], np.uint16(0x8000), out=sign)
        np.bitwise_and(y.view(np.uint32), _F32_EXPONENT, out=e)
        np.maximum(e, _F16_MIN_EXPONENT, out=e)
        e += _F16_MAGIC
        c = e.view(np.float32)
        np.add(y, c, out=r)
        r -= c
        r *= _F16_REBIAS
        np.right_shift(r.view(np.uint32), np.uint32(13), out=h, casting="unsafe")
        h |= sign
    return out.view(np.float16).reshape(x.shape)


def round_to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """float32 ``x`` rounded as a cast to ``dtype`` (F16, BF16, F32) and back would round it.

    ``x`` must be finite and within the dtype's range (``decoded_segments`` clamps). For fp16,
    3x faster than numpy's two casts and bit-identical to them (tested): round-to-nearest-even
    at the spacing of fp16 around each value, 2^(e - 10) in [2^e, 2^(e+1)) and 2^-24 below
    2^-14 (the subnormals); every step is exact in float32 (powers of two, rint).
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return x
    if dtype != np.float16:
        return x.astype(dtype).astype(np.float32)
    ulp = np.bitwise_and(x.view(np.uint32), _F32_EXPONENT).view(np.float32)
    ulp *= np.float32(2.0 ** -10)
    np.maximum(ulp, np.float32(2.0 ** -24), out=ulp)
    out = np.divide(x, ulp)
    np.rint(out, out=out)
    out *= ulp
    return out


def split_kept(arr: np.ndarray, keep_first: int, keep_last: int):
    """[b, h, t, d] -> (kept [b, h, kf + kl, d], middle [b, h, t - kf - kl, d], kf, kl)."""
    t = arr.shape[2]
    kf = min(keep_first, t)
    kl = min(keep_last, t - kf)
    kept = np.concatenate([arr[:, :, :kf], arr[:, :, t - kl:]], axis=2)
    return kept, arr[:, :, kf:t - kl], kf, kl


def token_mean(middle: np.ndarray) -> np.ndarray:
    """Mean over tokens of [b, h, t, d] -> [b, h, d] float32 (zeros when t == 0)."""
    if middle.shape[2] == 0:
        return np.zeros(middle.shape[:2] + middle.shape[3:], dtype=np.float32)
    return middle.mean(axis=2, dtype=np.float64).astype(np.float32)  # float64 sums, no copy


class LayerRows:
    """The vectors of one layer to encode, handed out in row chunks (bounded memory).

    Rows are the layer's middle vectors in (batch, head, token) order; the source array is
    never copied whole: a chunk is converted to float32 on its own. ``mean`` [b, h, d]
    float32 is each head's mean over those tokens (key centering) or None.
    """

    def __init__(self, arr: np.ndarray, center: bool, keep_first: int, keep_last: int):
        self.kept, middle, _, _ = split_kept(arr, keep_first, keep_last)
        b, h, t, d = middle.shape
        self.shape = (b, h, t, d)
        self.n = b * h * t
        self.heads = middle.reshape(b * h, t, d)  # a view: b and h merge without a copy
        self.mean = token_mean(middle) if center else None
        self._mean2 = None if self.mean is None else self.mean.reshape(b * h, d)

    def segments(self, r0: int, r1: int):
        """(head g, first row, stop row) of the pieces of rows r0:r1 within one head each."""
        t = self.shape[2]
        for g in range(r0 // t, (r1 - 1) // t + 1):
            yield g, max(r0, g * t), min(r1, (g + 1) * t)

    def chunk(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, x_in): rows r0:r1 as float32, and minus their head's mean when centering."""
        t, d = self.shape[2], self.shape[3]
        x = np.empty((r1 - r0, d), dtype=np.float32)
        for g, a, z in self.segments(r0, r1):
            x[a - r0:z - r0] = self.heads[g, a - g * t:z - g * t]
        if self._mean2 is None:
            return x, x
        x_in = x.copy()
        for g, a, z in self.segments(r0, r1):
            x_in[a - r0:z - r0] -= self._mean2[g]
        return x, x_in


def decoded_segments(q: FibQuantizer, codes, norms: np.ndarray, mean, t_mid: int, dtype,
                     offset: int = 0):
    """Yield (head g, r0, r1, rows r0:r1 decoded, float32) for one layer's ``codes``.

    ``codes`` may be the rows from ``offset`` on (a multiple of ``DECODE_ROWS``); r0 and r1
    count from the layer's first row.

    Rows are decoded in the blocks of ``FibQuantizer.decode`` (so every path gets the same
    values) and split at head boundaries (``t_mid`` rows per head); each head's mean
    (``mean`` [b, h, d] or None) is added and the values are clamped to the finite range of
    ``dtype``, the output dtype (a reconstruction may overshoot a value near its maximum).
    The rows are a view of a scratch block: use them before asking for the next segment.
    """
    d = q.profile.head_dim
    mean2 = None if mean is None else mean.reshape(-1, d)
    top = None if np.dtype(dtype) == np.float32 else finite_max(dtype)
    if top is not None and codes.shape[0]:
        # |x_hat_i| <= nu * ||y_hat|| + |mean_i|: clamp only when that bound could reach top.
        bound = float(norms.max()) * q.max_decoded_norm * (1 + 1e-3)
        bound += 0.0 if mean2 is None else float(np.abs(mean2).max())
        top = top if bound >= top else None
    for start, stop, block in q.decode_blocks(codes, norms):
        start, stop = start + offset, stop + offset
        for g in range(start // t_mid, (stop - 1) // t_mid + 1):
            r0, r1 = max(start, g * t_mid), min(stop, (g + 1) * t_mid)
            seg = block[r0 - start:r1 - start]
            if mean2 is not None:
                seg += mean2[g]
            if top is not None:
                np.clip(seg, -top, top, out=seg)
            yield g, r0, r1, seg


def restore_into(q: FibQuantizer, codes, norms: np.ndarray, mean, kept,
                 keep: tuple[int, int], out: np.ndarray) -> None:
    """Write one layer, as restored, into ``out`` [b, h, t, d] (C-contiguous, source dtype).

    Kept tokens are copied as stored; the others come from ``decoded_segments`` and are cast
    while the block is still in cache.
    """
    b, h, t, d = out.shape
    kf, kl = keep
    out3 = out.reshape(b * h, t, d)
    if kf + kl:
        out3[:, :kf] = kept[:, :, :kf].reshape(b * h, kf, d)
        out3[:, t - kl:] = kept[:, :, kf:].reshape(b * h, kl, d)
    t_mid = t - kf - kl
    for g, r0, r1, seg in decoded_segments(q, codes, norms, mean, t_mid, out.dtype):
        dest = out3[g, kf + r0 - g * t_mid:kf + r1 - g * t_mid]
        dest[...] = cast_to(seg, out.dtype)


def copy_kept(out: np.ndarray, kept: np.ndarray, t0: int, t1: int, t: int, kf: int,
              kl: int) -> None:
    """Into ``out`` [b, h, t1 - t0, d] (tokens [t0, t1) of a layer of ``t`` tokens), the kept
    tokens it covers: ``kept`` holds the first ``kf`` and the last ``kl``, in that order."""
    lo, hi = t0, min(t1, kf)
    if lo < hi:
        out[:, :, lo - t0:hi - t0] = kept[:, :, lo:hi]
    lo, hi = max(t0, t - kl), t1
    if lo < hi:
        out[:, :, lo - t0:hi - t0] = kept[:, :, kf + lo - (t - kl):kf + hi - (t - kl)]
