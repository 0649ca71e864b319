"""compress: a KV dump -> one self-contained compressed file, streamed with bounded memory.

Two passes over the dump, one layer in memory at a time:

1. a pre-pass reads every KV layer once: it checks values are finite (before anything is
   written), sizes each layer's norms (fp16, or f32 when a norm would overflow fp16), and
   digests every KV source tensor;
2. the encode pass streams the arrays into the output in header order. The header is written
   first with placeholder digests of the final length, then rewritten in place with the real
   ones (``StreamWriter.replace_metadata``), so nothing but one layer is ever held.

Layers are independent, so ``jobs > 1`` encodes them in threads (numpy releases the GIL in the
heavy parts), while the calling thread writes the results in order.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from fibquant_cli import __version__
from fibquant_cli.formats import container, stfile
from fibquant_cli.formats.container import (codebook_name, codes_name, kept_name, mean_name, norms_name, raw_name, rotation_name)
from fibquant_cli.core import bitpack
from fibquant_cli.storage.codebook_cache import load_or_build
from fibquant_cli.core.codec import DECODE_ROWS, FibQuantizer, default_rotation, row_norms
from fibquant_cli.core.params import Profile
from fibquant_cli.core.scalar import ScalarQuantizer
from fibquant_cli.formats.digest import file_digest, tensor_digest, tensor_digest_of_chunks
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats.kvdump import Dump, check_finite, open_dump, read_layer
from fibquant_cli.formats.manifest import entry_layer_views
from fibquant_cli.ops.decompress import (FP16_MAX, SOURCE_DTYPES, Progress, check_output_paths, commit_outputs, default_compressed_path, from_float32, load_verified, reconstructor, decoded_segments, rotation_digest, round_to_dtype, stored_codebook_digest, temp_sibling)
from fibquant_cli.ops.spec import CompressSpec

PLACEHOLDER_DIGEST = "blake3:" + "0" * 64
# Below this much KV data the encoder threads cost more than they save.
AUTO_JOBS_MIN_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RoleStats:
    """Measured size and error of one manifest entry (or the total)."""

    label: str
    vectors: int
    values: int
    source_bytes: int
    payload_bytes: int
    compressed_bytes: int
    ratio: float
    payload_bits_per_value: float
    bits_per_value: float
    rel_mse: float
    cosine_mean: float
    cosine_min: float
    scalar_rel_mse: float | None = None
    profile: dict | None = None


@dataclass
class CompressReport:
    source: str
    output: str
    file_bytes: int
    passthrough_bytes: int
    entries: list[RoleStats]
    total: RoleStats
    passthrough: list[str] = field(default_factory=list)
    attention: object = None  # a fidelity.FidelityReport, or None when not measured
    spec: dict | None = None
    seconds: float = 0.0
    jobs: int = 1

    def to_json(self) -> dict:
        out = asdict(self)
        out["attention"] = None if self.attention is None else self.attention.to_json()
        return out


class ErrorAccumulator:
    """Sums ||x - x_hat||^2, ||x||^2 and per-vector cosines over chunks."""

    def __init__(self) -> None:
        self.err = self.energy = self.cos_sum = 0.0
        self.cos_min = 1.0
        self.cos_count = 0

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """x, x_hat (n, d): row sums in float32 (d terms each), totals in float64."""
        x = x.astype(np.float32, copy=False)
        x_hat = x_hat.astype(np.float32, copy=False)
        diff = x - x_hat
        ee = np.einsum("ij,ij->i", diff, diff)
        self.err += float(ee.sum(dtype=np.float64))
        xx = np.einsum("ij,ij->i", x, x)
        self.energy += float(xx.sum(dtype=np.float64))
        hh = np.einsum("ij,ij->i", x_hat, x_hat)
        ok = (xx > 0) & (hh > 0)
        xx, hh, ee = (v[ok].astype(np.float64) for v in (xx, hh, ee))
        # x . x_hat = (|x|^2 + |x_hat|^2 - |x - x_hat|^2) / 2: one pass fewer over the vectors.
        cos = np.clip((xx + hh - ee) / (2.0 * np.sqrt(xx * hh)), -1.0, 1.0)
        if cos.size:
            self.cos_sum += float(cos.sum())
            self.cos_min = min(self.cos_min, float(cos.min()))
            self.cos_count += cos.size

    @classmethod
    def merge(cls, parts) -> "ErrorAccumulator":
        out = cls()
        for part in parts:
            out.err += part.err
            out.energy += part.energy
            out.cos_sum += part.cos_sum
            out.cos_count += part.cos_count
            out.cos_min = min(out.cos_min, part.cos_min)
        return out

    @property
    def rel_mse(self) -> float:
        return self.err / self.energy if self.energy > 0 else 0.0

    @property
    def cos_mean(self) -> float:
        return self.cos_sum / self.cos_count if self.cos_count else 1.0


# --------------------------------------------------------------------------- planning


def entry_profiles(dump: Dump, spec: CompressSpec) -> list[Profile]:
    profiles = []
    for entry in dump.manifest.entries:
        k, n = spec.point(entry.shape.role)
        try:
            entry.shape.validate_block_dim(k)
        except InvalidInputError as err:
            raise InvalidInputError(err.reason, path=str(dump.manifest_path),
                                    tensor=entry.tensors[0]) from None
        profiles.append(Profile(entry.shape.head_dim, k, n, spec.seed))
    return profiles


def make_quantizers(profiles, progress: Progress) -> dict[Profile, FibQuantizer]:
    quantizers = {}
    for p in dict.fromkeys(profiles):
        progress.advance(f"codebook d={p.head_dim} k={p.block_dim} N={p.size}")
        codebook, _ = load_or_build(p)
        # Stored as f32: the codec computes in f32, so decode is bit-identical either way.
        quantizers[p] = FibQuantizer(p, codebook.astype(np.float32),
                                     default_rotation(p).astype(np.float32))
    return quantizers


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


@dataclass(frozen=True)
class LayerPlan:
    entry: int
    layer: int
    keep_first: int
    keep_last: int
    center: bool
    norms_dtype: str  # "F16" or "F32"


class LayerRows:
    """The vectors of one layer to encode, handed out in row chunks (bounded memory).

    Rows are the layer's vectors over the tokens not kept, in (batch, head, token) order; the
    source array is never copied whole: a chunk is converted to float32 on its own. ``mean``
    [b, h, d] float32 is each head's mean over those tokens (key centering) or None.
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


# Vectors encoded at once: a multiple of the decode block, so a chunk's statistics decode
# exactly as decompress does, and of 8, so packed chunks join on byte boundaries. About 2 MB of
# float32 per array: together with the source layer this bounds compress's memory.
ENCODE_ROWS = 2 * DECODE_ROWS


def prepass(dump: Dump, spec: CompressSpec, progress: Progress):
    """One read of every KV tensor: its digest, a NaN/Inf check, and a plan per layer.

    Returns (plans, KV source digests). Nothing is written before this has passed, so bad
    values never leave a partial output. A layer's norms are stored in f32 only when one
    would overflow fp16; a cheap bound from the tensor's largest value usually settles it.
    """
    digests, amax = {}, {}
    progress.start(len(dump.kv_names), "checking")
    for name in dump.header.tensors:
        if name not in dump.kv_names:
            continue
        info = dump.header.tensors[name]
        raw = stfile.read_raw(dump.header, name)
        digests[name] = tensor_digest(info.dtype, info.shape, raw)
        top = largest_magnitude(raw, info.dtype)
        if not np.isfinite(top):
            arr = np.frombuffer(raw, dtype=info.numpy_dtype.newbyteorder("<"))
            check_finite(dump.header, name, arr.reshape(info.shape))  # names the position
        amax[name] = top
        progress.advance(name)
    plans = []
    for i, entry in enumerate(dump.manifest.entries):
        center = spec.center_keys and entry.shape.role == "key"
        views = entry_layer_views(entry)
        for layer in range(entry.shape.layers):
            bound = amax[views[layer][0]] * np.sqrt(entry.shape.head_dim) * (2.0 if center else 1.0)
            wide = bound > FP16_MAX and needs_wide_norms(read_layer(dump, entry, layer), center,
                                                         spec)
            kf = min(spec.keep_first, entry.shape.tokens)
            kl = min(spec.keep_last, entry.shape.tokens - kf)
            plans.append(LayerPlan(i, layer, kf, kl, center, "F32" if wide else "F16"))
    return plans, digests


# IEEE layouts: (unsigned view, mask without the sign bit) per float dtype.
_MAGNITUDE_BITS = {"F16": (np.dtype("<u2"), 0x7FFF), "BF16": (np.dtype("<u2"), 0x7FFF),
                   "F32": (np.dtype("<u4"), 0x7FFFFFFF)}


def largest_magnitude(raw: bytes, st_dtype: str) -> float:
    """max |x| of a float tensor's bytes (inf or nan when any value is not finite).

    For IEEE floats |x| orders like the bit pattern without its sign, so this is one integer
    max instead of float16 arithmetic, which numpy emulates slowly.
    """
    if not raw:
        return 0.0
    view, mask = _MAGNITUDE_BITS[st_dtype]
    bits = np.frombuffer(raw, dtype=view)
    top = int(np.bitwise_and(bits, mask).max())
    value = np.array([top], dtype=view).view(stfile.numpy_dtype_for(st_dtype).newbyteorder("<"))
    return float(value[0])


def needs_wide_norms(arr: np.ndarray, center: bool, spec: CompressSpec) -> bool:
    """Would a norm to encode of this layer overflow fp16? (Exact: computes the norms.)"""
    rows = LayerRows(arr, center, spec.keep_first, spec.keep_last)
    for c0 in range(0, rows.n, ENCODE_ROWS):
        _, x_in = rows.chunk(c0, min(rows.n, c0 + ENCODE_ROWS))
        if float(row_norms(x_in).max()) > FP16_MAX:
            return True
    return False


def layout(dump: Dump, profiles, quantizers, plans) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of every stored array, in file order."""
    specs = []
    for j, q in enumerate(quantizers.values()):
        specs.append((codebook_name(j), "F32", q.codebook.shape))
        specs.append((rotation_name(j), "F32", q.rotation.shape))
    for plan in plans:
        shape = dump.manifest.entries[plan.entry].shape
        p = profiles[plan.entry]
        t_mid = shape.tokens - plan.keep_first - plan.keep_last
        n = shape.batch * shape.kv_heads * t_mid * p.blocks_per_vector
        specs.append((codes_name(plan.entry, plan.layer), "U8",
                      (bitpack.packed_n_bytes(n, p.wire_bits),)))
        specs.append((norms_name(plan.entry, plan.layer), plan.norms_dtype,
                      (shape.batch, shape.kv_heads, t_mid)))
        if plan.center:
            specs.append((mean_name(plan.entry, plan.layer), "F32",
                          (shape.batch, shape.kv_heads, shape.head_dim)))
        if plan.keep_first + plan.keep_last:
            specs.append((kept_name(plan.entry, plan.layer), SOURCE_DTYPES[shape.dtype],
                          (shape.batch, shape.kv_heads, plan.keep_first + plan.keep_last,
                           shape.head_dim)))
    for name in dump.passthrough_names:
        info = dump.header.tensors[name]
        specs.append((raw_name(name), info.dtype, info.shape))
    return specs


# --------------------------------------------------------------------------- encoding


@dataclass
class LayerResult:
    plan: LayerPlan
    arrays: dict  # stored name -> array
    digests: dict  # stored name -> digest (computed by the encoder thread, not the writer)
    acc: ErrorAccumulator
    scalar_acc: ErrorAccumulator | None
    payload: int


def encode_layer(dump: Dump, q: FibQuantizer, plan: LayerPlan, compare: bool) -> LayerResult:
    """Encode one layer, ``ENCODE_ROWS`` vectors at a time, with its error statistics."""
    entry = dump.manifest.entries[plan.entry]
    st_dtype = SOURCE_DTYPES[entry.shape.dtype]
    out_dtype = stfile.numpy_dtype_for(st_dtype)
    arr = read_layer(dump, entry, plan.layer, check=False)  # the pre-pass checked it
    rows = LayerRows(arr, plan.center, plan.keep_first, plan.keep_last)
    b, h, t, d = rows.shape
    p = q.profile
    bpv, width = p.blocks_per_vector, p.wire_bits
    packed = np.empty(bitpack.packed_n_bytes(rows.n * bpv, width), dtype=np.uint8)
    stored_norms = np.empty(rows.n, dtype=np.float16 if plan.norms_dtype == "F16" else np.float32)
    acc = ErrorAccumulator()
    scalar = _scalar_for(p, q.rotation) if compare else None
    scalar_acc = None if scalar is None else ErrorAccumulator()
    for c0 in range(0, rows.n, ENCODE_ROWS):
        c1 = min(rows.n, c0 + ENCODE_ROWS)
        x, x_in = rows.chunk(c0, c1)
        codes, norms = q.encode(x_in)
        stored = stored_norms[c0:c1]
        stored[...] = norms
        chunk = bitpack.pack(codes, width)
        packed[c0 * bpv * width // 8:][:chunk.size] = chunk
        # The statistics are those of the restored values, decoded exactly as decompress does.
        for _, r0, r1, seg in decoded_segments(q, codes, stored.astype(np.float32), rows.mean, t,
                                                out_dtype, offset=c0):
            acc.add(x[r0 - c0:r1 - c0], round_to_dtype(seg, out_dtype))
        if scalar is not None:
            scalar_acc.add(x, from_float32(scalar.decode(*scalar.encode(x)), st_dtype))
    arrays = {codes_name(plan.entry, plan.layer): packed,
              norms_name(plan.entry, plan.layer): stored_norms.reshape(b, h, t)}
    if rows.mean is not None:
        arrays[mean_name(plan.entry, plan.layer)] = rows.mean
    if plan.keep_first + plan.keep_last:
        kept_x = rows.kept.reshape(-1, d).astype(np.float32)
        acc.add(kept_x, kept_x)  # stored exactly: counted, with zero error
        if scalar_acc is not None:
            scalar_acc.add(kept_x, kept_x)
        arrays[kept_name(plan.entry, plan.layer)] = np.ascontiguousarray(rows.kept)
    payload = sum(a.nbytes for a in arrays.values())
    digests = {name: _array_digest(a) for name, a in arrays.items()}
    return LayerResult(plan, arrays, digests, acc, scalar_acc, payload)


def _scalar_for(p: Profile, rotation: np.ndarray):
    return None if p.whole_bits is None else ScalarQuantizer(p.head_dim, p.whole_bits, rotation)


def encoded_layers(dump: Dump, quantizers, profiles, plans, compare: bool, jobs: int):
    """Yield LayerResults in plan order, computed here or by ``jobs`` threads.

    numpy releases the GIL in the heavy parts (matmuls, gathers, casts), so threads use the
    cores without the start-up and hand-off costs of processes (measured equal to a fork pool,
    1.3-1.4x a single job on 2 cores). At most 2 * jobs layers are in flight, so memory stays
    bounded.
    """
    if jobs <= 1 or len(plans) < 2:
        for plan in plans:
            yield encode_layer(dump, quantizers[profiles[plan.entry]], plan, compare)
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fibquant-encode") as pool:
        pending: deque = deque()
        for plan in plans:
            pending.append(pool.submit(encode_layer, dump, quantizers[profiles[plan.entry]],
                                       plan, compare))
            if len(pending) >= 2 * jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def auto_jobs(dump: Dump) -> int:
    kv_bytes = sum(dump.header.tensors[n].n_bytes for n in dump.kv_names)
    return min(os.cpu_count() or 1, 4) if kv_bytes >= AUTO_JOBS_MIN_BYTES else 1


# --------------------------------------------------------------------------- compress


def compress(source, *, manifest=None, output=None, spec: CompressSpec | None = None,
             compare: bool = False, force: bool = False, attention: bool = True,
             max_queries: int | None = None, jobs: int = 0,
             progress: Progress | None = None) -> CompressReport:
    """Compress a KV dump into one self-contained ``.fq.safetensors`` file.

    ``jobs`` = 0 picks the number of encoder threads from the dump's size; 1 encodes here.
    BLAS runs single-threaded: the encoder's matmuls are skinny ((m, k) x (k, N)), for which
    OpenBLAS threads cost more than they give (2.3x slower measured on 2 cores); the cores are
    used by the encoder threads instead.
    """
    with threadpool_limits(1):
        return _compress(source, manifest=manifest, output=output, spec=spec, compare=compare,
                         force=force, attention=attention, max_queries=max_queries, jobs=jobs,
                         progress=progress)


def _compress(source, *, manifest, output, spec, compare, force, attention, max_queries, jobs,
              progress) -> CompressReport:
    start = time.perf_counter()
    progress = progress or Progress()
    spec = spec or CompressSpec()
    source = Path(source)
    out = Path(output) if output is not None else default_compressed_path(source)
    dump = open_dump(source, manifest)
    check_output_paths(source, [out], force)
    if out.resolve() == dump.manifest_path.resolve():
        raise UsageError("output is the manifest file", path=str(out))
    if jobs < 0:
        raise UsageError(f"--jobs must be >= 0, got {jobs}")
    jobs = jobs or auto_jobs(dump)
    if attention:
        check_queries_finite(dump)
    profiles = entry_profiles(dump, spec)
    quantizers = make_quantizers(profiles, progress)
    plans, kv_digests = prepass(dump, spec, progress)
    specs = layout(dump, profiles, quantizers, plans)
    doc = document(dump, quantizers, kv_digests, spec)
    digests = {name: PLACEHOLDER_DIGEST for name, _, _ in specs}
    tmp = temp_sibling(out)
    runs: dict[int, list[LayerResult]] = {}
    try:
        with stfile.StreamWriter(tmp, specs, container.metadata_for({**doc, "arrays": digests})) as w:
            for j, q in enumerate(quantizers.values()):
                for name, arr in ((codebook_name(j), q.codebook), (rotation_name(j), q.rotation)):
                    w.write(name, arr)
                    digests[name] = _array_digest(arr)
            progress.start(len(plans), f"compressing ({jobs} job{'s' if jobs > 1 else ''})")
            for result in encoded_layers(dump, quantizers, profiles, plans, compare, jobs):
                for name, arr in result.arrays.items():
                    w.write(name, arr)
                digests.update(result.digests)
                result.arrays = result.digests = {}  # written: keep only the statistics
                runs.setdefault(result.plan.entry, []).append(result)
                progress.advance(f"entry {result.plan.entry} layer {result.plan.layer}")
            source_digests = doc["source"]["tensors"]
            for name in dump.passthrough_names:
                info = dump.header.tensors[name]

                def copied(name=name):  # streamed, and hashed as it is written
                    for piece in stfile.iter_raw(dump.header, name):
                        w.write(raw_name(name), piece)
                        yield piece

                digests[raw_name(name)] = tensor_digest_of_chunks(info.dtype, info.shape,
                                                                  copied())
                source_digests[name]["digest"] = digests[raw_name(name)]
            doc["source"]["file_digest"] = file_digest(
                {n: v["digest"] for n, v in source_digests.items()})
            w.replace_metadata(container.metadata_for({**doc, "arrays": digests}))
            n_bytes = {info.name: info.n_bytes for info in w.layout}
        rep = _report(dump, out, tmp.stat().st_size, n_bytes, quantizers, profiles, runs)
        rep.spec, rep.jobs = spec.to_json(), jobs
        if attention:
            from fibquant_cli.ops.fidelity import DEFAULT_MAX_QUERIES, measure

            progress.start(1, "attention fidelity")
            # Decoded from the file just written; its array digests were computed moments ago
            # from the same bytes, so hashing them again would only repeat that work.
            written = load_verified(tmp, verify_arrays=False)
            rep.attention = measure(dump, reconstructor(written),
                                    max_queries=max_queries or DEFAULT_MAX_QUERIES)
        commit_outputs([(tmp, out)], force)
    finally:
        tmp.unlink(missing_ok=True)
    rep.seconds = time.perf_counter() - start
    return rep


def check_queries_finite(dump: Dump) -> None:
    """Queries are passed through, but attention fidelity reads them: refuse NaN/Inf early."""
    if dump.manifest.attention is not None:
        for name in dump.manifest.attention.query_tensors:
            check_finite(dump.header, name, stfile.read_tensor(dump.header, name))


def _array_digest(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return tensor_digest(stfile.st_dtype_for(arr.dtype), arr.shape, arr)


def document(dump: Dump, quantizers, kv_digests: dict, spec: CompressSpec) -> dict:
    """The metadata document; pass-through digests and array digests are filled in later."""
    source_tensors = {}
    for name, info in dump.header.tensors.items():
        source_tensors[name] = {"dtype": info.dtype, "shape": list(info.shape),
                                "digest": kv_digests.get(name, PLACEHOLDER_DIGEST)}
    entries = []
    distinct = list(quantizers)
    for i, entry in enumerate(dump.manifest.entries):
        p = Profile(entry.shape.head_dim, *spec.point(entry.shape.role), spec.seed)
        entries.append({"profile": distinct.index(p), "layers": entry.shape.layers,
                        "vectors_per_layer": entry.shape.vector_count // entry.shape.layers,
                        "keep_first": spec.keep_first, "keep_last": spec.keep_last,
                        "center": spec.center_keys and entry.shape.role == "key"})
    return {
        "format_version": container.FORMAT_VERSION,
        "tool": f"fibquant {__version__}",
        "source": {"file": dump.path.name, "file_digest": PLACEHOLDER_DIGEST,
                   "tensor_order": list(dump.header.tensors), "metadata": dump.header.metadata,
                   "tensors": source_tensors},
        "manifest": dump.manifest.to_json(),
        "profiles": [{"profile": p.to_json(), "profile_digest": p.digest,
                      "codebook_digest": stored_codebook_digest(q.codebook),
                      "rotation_digest": rotation_digest(q.rotation)}
                     for p, q in quantizers.items()],
        "entries": entries,
        "arrays": {},
    }


# --------------------------------------------------------------------------- report


def _report(dump: Dump, out: Path, file_bytes: int, n_bytes: dict, quantizers, profiles,
            runs: dict) -> CompressReport:
    """Sizes and errors per entry and in total; shared bytes are split across their users."""
    passthrough_bytes = sum(b for n, b in n_bytes.items() if n.startswith(container.RAW_PREFIX))
    header_bytes = file_bytes - sum(n_bytes.values())
    distinct = list(quantizers)
    users = {p: profiles.count(p) for p in distinct}
    rows, accs, scalar_accs = [], [], []
    for i, entry in enumerate(dump.manifest.entries):
        p = profiles[i]
        j = distinct.index(p)
        results = runs.get(i, [])
        acc = ErrorAccumulator.merge(r.acc for r in results)
        scal = [r.scalar_acc for r in results]
        scalar_acc = None if any(s is None for s in scal) else ErrorAccumulator.merge(scal)
        payload = sum(r.payload for r in results)
        shared = (n_bytes[codebook_name(j)] + n_bytes[rotation_name(j)]) / users[p]
        total = payload + shared + header_bytes / len(dump.manifest.entries)
        rows.append(_stats(entry.shape.role, entry.shape, payload, total, acc, scalar_acc, p))
        accs.append(acc)
        scalar_accs.append(scalar_acc)
    overall = ErrorAccumulator.merge(accs)
    scalar = None if any(s is None for s in scalar_accs) else ErrorAccumulator.merge(scalar_accs)
    kv_bytes = file_bytes - passthrough_bytes
    src = sum(r.source_bytes for r in rows)
    pay = sum(r.payload_bytes for r in rows)
    values = sum(r.values for r in rows)
    total = RoleStats(
        label="total", vectors=sum(r.vectors for r in rows), values=values, source_bytes=src,
        payload_bytes=pay, compressed_bytes=kv_bytes, ratio=src / kv_bytes,
        payload_bits_per_value=8 * pay / values, bits_per_value=8 * kv_bytes / values,
        rel_mse=overall.rel_mse, cosine_mean=overall.cos_mean, cosine_min=overall.cos_min,
        scalar_rel_mse=None if scalar is None else scalar.rel_mse,
    )
    return CompressReport(str(dump.path), str(out), file_bytes, passthrough_bytes, rows, total,
                          dump.passthrough_names)


def _stats(label, shape, payload, total, acc, scalar_acc, p) -> RoleStats:
    itemsize = stfile.numpy_dtype_for(SOURCE_DTYPES[shape.dtype]).itemsize
    values = shape.element_count
    return RoleStats(
        label=label, vectors=shape.vector_count, values=values,
        source_bytes=values * itemsize, payload_bytes=payload, compressed_bytes=round(total),
        ratio=values * itemsize / total, payload_bits_per_value=8 * payload / values,
        bits_per_value=8 * total / values, rel_mse=acc.rel_mse, cosine_mean=acc.cos_mean,
        cosine_min=acc.cos_min,
        scalar_rel_mse=None if scalar_acc is None or not scalar_acc.cos_count else scalar_acc.rel_mse,
        profile={"block_dim": p.block_dim, "size": p.size, "rate_bits": p.rate_bits,
                 "wire_bits": p.wire_bits, "seed": p.seed},
    )
