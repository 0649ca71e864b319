"""Peer KV-cache formats, to set beside FibQuant at equal bits (docs/method.md §6).

Every peer takes a KV tensor ``x (batch, kv_heads, tokens, head_dim) float32`` and returns
its reconstruction, the same shape in float32, through one protocol (``PeerCodec``).

Glossary
--------
role        ``"key"`` or ``"value"``; only KIVI treats them differently.
group       the values that share one scale (and zero point): 32 contiguous values along
            ``head_dim`` for llama.cpp blocks and KIVI values, 32 consecutive tokens of one
            channel for KIVI keys, the whole tensor for fp8.
payload     the bits of the per-value codes alone.
metadata    every other stored bit: fp16 scales and zero points, the fp32 per-tensor scale.
bits_per_value
            (payload + metadata) / number of values, exactly, for the given shape.

Peers
-----
==========  ===========================================================  =================
name        scheme                                                       bits per value
==========  ===========================================================  =================
fp16        identity at half precision, the reference                    16
fp8_e4m3    e4m3fn codes, one fp32 per-tensor scale amax / 448           8 + 32 / values
q8_0 ...    llama.cpp q8_0, q5_1, q5_0, q4_1, q4_0 through gguf-py's     8.5, 6, 5.5, 5,
            numpy quantizers (optional ``gguf`` package)                 4.5
kivi_int4   KIVI (Liu et al. 2024, section 3): asymmetric min/max        b + 32 * groups
kivi_int2   integers, keys per channel, values per token, fp16 scale       / values
            and zero per group of 32 (a short last group is kept)
==========  ===========================================================  =================

Inputs are validated once at the boundary: a 4-D finite float array whose magnitudes fit in
float16 (every peer but fp8 stores float16 scales; a KV cache that was float16 always fits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import ml_dtypes
import numpy as np

from fibquant_cli.errors import FibQuantError, InvalidInputError, UsageError

ROLES = ("key", "value")
GROUP_SIZE = 32
FP16_BITS = 16
FP32_BITS = 32
FP8_BITS = 8
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
_F16_MAX = float(np.finfo(np.float16).max)
# Largest float32 temporary of the KIVI wrapper, in bytes (a few copies of one chunk of rows).
KIVI_BUDGET_BYTES = 32 * 2**20
KIVI_TEMPORARIES = 4

# llama.cpp KV cache types: name -> (GGMLQuantizationType member, metadata bytes per block).
# The metadata is the fp16 scale d, plus the fp16 minimum m of the _1 types; q5's fifth bits
# (qh) are payload. The block and byte sizes themselves come from gguf.
GGML_PEERS = {
    "q8_0": ("Q8_0", 2),
    "q5_1": ("Q5_1", 4),
    "q5_0": ("Q5_0", 2),
    "q4_1": ("Q4_1", 4),
    "q4_0": ("Q4_0", 2),
}
KIVI_PEERS = {"kivi_int4": 4, "kivi_int2": 2}
GGUF_HINT = "needs the optional 'gguf' package (pip install gguf)"


@runtime_checkable
class PeerCodec(Protocol):
    """A KV codec that can be swept beside FibQuant."""

    name: str

    def roundtrip(self, x: np.ndarray, role: str) -> np.ndarray:
        """Reconstruction of x (batch, kv_heads, tokens, head_dim), float32, same shape."""
        ...

    def payload_bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        """Code bits per value, without any metadata."""
        ...

    def bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        """All stored bits (codes, scales, zero points, tensor scale) per value."""
        ...


# --------------------------------------------------------------------------- boundary checks


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def check_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The shape as 4 positive Python ints (batch, kv_heads, tokens, head_dim)."""
    dims = tuple(shape)
    if len(dims) != 4 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in dims):
        raise InvalidInputError(
            f"expected a shape (batch, kv_heads, tokens, head_dim) of positive ints, got {dims}"
        )
    return tuple(int(n) for n in dims)


def check_kv(x: np.ndarray, role: str, *, fp16_range: bool = True) -> np.ndarray:
    """Validate a KV tensor and return it as a C-contiguous float32 array."""
    check_role(role)
    x = np.asarray(x)
    if x.ndim != 4:
        raise InvalidInputError(
            f"expected a 4-D tensor (batch, kv_heads, tokens, head_dim), got shape {x.shape}"
        )
    check_shape(x.shape)
    if x.dtype.kind != "f":
        raise InvalidInputError(f"expected a float tensor, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(f"value at index {where} is not finite ({x[where]})")
    if fp16_range:
        amax = float(np.abs(x).max())
        if amax > _F16_MAX:
            raise InvalidInputError(
                f"magnitude {amax:g} exceeds the float16 range {_F16_MAX:g} of the scales"
            )
    return x


# --------------------------------------------------------------------------- fp16, fp8


@dataclass(frozen=True)
class Fp16Codec:
    """Round to float16 and back: the uncompressed reference."""

    name: str = "fp16"

    def roundtrip(self, x: np.ndarray, role: str) -> np.ndarray:
        return check_kv(x, role).astype(np.float16).astype(np.float32)

    def payload_bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        check_shape(shape)
        check_role(role)
        return float(FP16_BITS)

    def bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        return self.payload_bits_per_value(shape, role)


@dataclass(frozen=True)
class Fp8Codec:
    """float8 e4m3fn codes of x / s, with one fp32 scale s = amax / 448 per tensor."""

    name: str = "fp8_e4m3"

    def roundtrip(self, x: np.ndarray, role: str) -> np.ndarray:
        x = check_kv(x, role, fp16_range=False)
        amax = np.float32(np.abs(x).max())
        if amax == 0:
            return np.zeros_like(x)
        scale = amax / np.float32(FP8_MAX)
        # x / scale may land a rounding step above 448, and e4m3fn overflows to NaN: clip.
        y = np.clip(x / scale, -FP8_MAX, FP8_MAX)
        return y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale

    def payload_bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        check_shape(shape)
        check_role(role)
        return float(FP8_BITS)

    def bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        values = math.prod(check_shape(shape))
        return self.payload_bits_per_value(shape, role) + FP32_BITS / values


# --------------------------------------------------------------------------- KIVI


def kivi_quantize_groups(groups: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
    """Asymmetric min/max integer quantization of each row.

    Parameters
    ----------
    groups : (n, g) float32
        One group per row.
    bits : int
        Code width b; codes lie in 0 .. 2**b - 1.

    Returns
    -------
    codes : (n, g) uint8
    scale : (n, 1) float16, (max - min) / (2**b - 1)
    zero : (n, 1) float16, min

    The codes are the nearest levels (ties to even, as torch.round) of the grid the decoder
    sees, i.e. the one built from the float16-rounded scale and zero.
    """
    top = (1 << bits) - 1
    lo = groups.min(axis=-1, keepdims=True)
    hi = groups.max(axis=-1, keepdims=True)
    scale = ((hi - lo) / np.float32(top)).astype(np.float16)
    zero = lo.astype(np.float16)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s32 > 0, np.float32(1) / s32, np.float32(0))
    codes = np.clip(np.rint((groups - zero.astype(np.float32)) * inv), 0, top)
    return codes.astype(np.uint8), scale, zero


def kivi_dequantize_groups(codes: np.ndarray, scale: np.ndarray,
                           zero: np.ndarray) -> np.ndarray:
    """codes (n, g) uint8, scale and zero (n, 1) float16 -> (n, g) float32."""
    return codes.astype(np.float32) * scale.astype(np.float32) + zero.astype(np.float32)


def _kivi_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    """Round-trip each row of rows (n, L) float32 in groups of 32, the last one shorter."""
    n, length = rows.shape
    full = length // GROUP_SIZE * GROUP_SIZE
    out = np.empty_like(rows)
    if full:
        head = rows[:, :full].reshape(-1, GROUP_SIZE)
        out[:, :full] = kivi_dequantize_groups(*kivi_quantize_groups(head, bits)).reshape(n, full)
    if full < length:
        out[:, full:] = kivi_dequantize_groups(*kivi_quantize_groups(rows[:, full:], bits))
    return out


@dataclass(frozen=True)
class KiviCodec:
    """KIVI: keys grouped per channel along tokens, values per token along head_dim.

    Per-channel key groups follow KIVI's observation (section 3) that key outliers sit in
    fixed channels, so a channel's own scale confines an outlier to that channel.
    """

    name: str
    bits: int

    def roundtrip(self, x: np.ndarray, role: str) -> np.ndarray:
        x = check_kv(x, role)
        b, h, t, d = x.shape
        # Both roles become rows whose groups are contiguous: (b*h*t, d) or (b*h*d, t).
        rows = x.reshape(-1, d) if role == "value" else x.transpose(0, 1, 3, 2).reshape(-1, t)
        out = np.empty_like(rows)
        step = max(1, KIVI_BUDGET_BYTES // (KIVI_TEMPORARIES * 4 * rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            out[start:start + step] = _kivi_rows(rows[start:start + step], self.bits)
        if role == "value":
            return out.reshape(b, h, t, d)
        return np.ascontiguousarray(out.reshape(b, h, d, t).transpose(0, 1, 3, 2))

    def n_groups(self, shape: tuple[int, ...], role: str) -> int:
        """Number of (scale, zero) pairs stored for a tensor of this shape."""
        b, h, t, d = check_shape(shape)
        if check_role(role) == "key":
            return b * h * d * math.ceil(t / GROUP_SIZE)
        return b * h * t * math.ceil(d / GROUP_SIZE)

    def payload_bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        check_shape(shape)
        check_role(role)
        return float(self.bits)

    def bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        metadata_bits = 2 * FP16_BITS * self.n_groups(shape, role)
        return self.bits + metadata_bits / math.prod(check_shape(shape))


# --------------------------------------------------------------------------- llama.cpp (gguf)


def _import_gguf():
    """The gguf package, or UsageError saying why it cannot be used."""
    try:
        import gguf
    except ImportError as exc:
        raise UsageError(f"{GGUF_HINT}: {exc}") from None
    return gguf


@dataclass(frozen=True)
class GgmlCodec:
    """A llama.cpp block type, quantized and dequantized by gguf-py's own numpy code."""

    name: str
    qtype_name: str
    metadata_bytes_per_block: int

    def _qtype(self):
        return _import_gguf().GGMLQuantizationType[self.qtype_name]

    def _block(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(block_size, type_size) of gguf, after checking head_dim is a block multiple."""
        gguf = _import_gguf()
        block_size, type_size = gguf.GGML_QUANT_SIZES[self._qtype()]
        d = check_shape(shape)[-1]
        if d % block_size:
            raise InvalidInputError(
                f"head_dim {d} is not a multiple of the {self.name} block size {block_size}"
            )
        return block_size, type_size

    def roundtrip(self, x: np.ndarray, role: str) -> np.ndarray:
        x = check_kv(x, role)
        self._block(x.shape)
        quants, qtype = _import_gguf().quants, self._qtype()
        packed = quants.quantize(x, qtype)
        expected = quants.quant_shape_to_byte_shape(x.shape, qtype)
        if packed.dtype != np.uint8 or packed.shape != tuple(expected):
            # Not the user's fault: gguf broke its own contract (an incompatible version).
            raise FibQuantError(
                f"gguf {self.name}: quantize returned {packed.dtype} {packed.shape}, "
                f"expected uint8 {tuple(expected)}"
            )
        return quants.dequantize(packed, qtype).astype(np.float32, copy=False)

    def payload_bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        block_size, type_size = self._block(shape)
        check_role(role)
        return (type_size - self.metadata_bytes_per_block) * 8 / block_size

    def bits_per_value(self, shape: tuple[int, ...], role: str) -> float:
        self._block(shape)
        check_role(role)
        n_bytes = math.prod(_import_gguf().quants.quant_shape_to_byte_shape(shape, self._qtype()))
        return n_bytes * 8 / math.prod(check_shape(shape))


def _ggml_reason(qtype_name: str) -> str:
    """Why gguf cannot run this block type ('' when it can)."""
    try:
        gguf = _import_gguf()
    except UsageError as exc:
        return exc.reason
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name, None)
    if qtype is None:
        return f"the installed gguf has no quantization type {qtype_name}"
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), np.float32), qtype)
    except NotImplementedError:
        return f"the installed gguf has no numpy quantizer for {qtype_name}"
    return ""


# --------------------------------------------------------------------------- registry


class PeerAvailability(NamedTuple):
    """Peers that can run, by name, and the reason each other peer cannot."""

    runnable: dict[str, PeerCodec]
    unavailable: dict[str, str]


def peer_names() -> tuple[str, ...]:
    """Every peer this module knows, roughly by decreasing bits per value."""
    return ("fp16", "fp8_e4m3", *GGML_PEERS, *KIVI_PEERS)


def available_peers() -> PeerAvailability:
    """Build every peer that can run here.

    Returns
    -------
    PeerAvailability
        ``runnable`` maps name -> codec in ``peer_names()`` order; ``unavailable`` maps
        name -> one-line reason (e.g. the llama.cpp types when gguf is not installed).

    Example
    -------
    >>> peers = available_peers()
    >>> x_hat = peers.runnable["kivi_int2"].roundtrip(x, "key")
    """
    runnable: dict[str, PeerCodec] = {"fp16": Fp16Codec(), "fp8_e4m3": Fp8Codec()}
    unavailable: dict[str, str] = {}
    for name, (qtype_name, metadata_bytes) in GGML_PEERS.items():
        reason = _ggml_reason(qtype_name)
        if reason:
            unavailable[name] = reason
        else:
            runnable[name] = GgmlCodec(name, qtype_name, metadata_bytes)
    for name, bits in KIVI_PEERS.items():
        runnable[name] = KiviCodec(name, bits)
    return PeerAvailability(runnable, unavailable)


def get_peer(name: str) -> PeerCodec:
    """The peer called ``name``; UsageError if it is unknown or cannot run here."""
    peers = available_peers()
    if name in peers.runnable:
        return peers.runnable[name]
    if name in peers.unavailable:
        raise UsageError(f"peer {name!r} is unavailable: {peers.unavailable[name]}")
    raise UsageError(f"unknown peer {name!r}; expected one of {', '.join(peer_names())}")
