"""compress / decompress / verify: the main job, over files, returning result dataclasses."""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from . import __version__, container, stfile
from .container import (codebook_name, codes_name, kept_name, mean_name, norms_name, raw_name,
                        rotation_name)
from .core import bitpack
from .core.cache import CODEBOOK_SCHEMA, load_or_build
from .core.codec import FibQuantizer, default_rotation
from .core.params import Profile
from .core.scalar import ScalarQuantizer
from .digest import bytes_digest, file_digest, tensor_digest
from .errors import IntegrityError, InvalidInputError, UsageError
from .kvdump import Dump, check_finite, open_dump, read_layer
from .spec import CompressSpec
from .manifest import entry_layer_views, expected_tensor_shape, manifest_path_for, parse_manifest, save_manifest

FP16_MAX = float(np.finfo(np.float16).max)
ROTATION_SCHEMA = "fibquant_rotation_v1"


class Progress:
    """Progress sink: the CLI draws it on stderr; the library default does nothing."""

    def start(self, total: int, label: str) -> None:  # noqa: D102
        pass

    def advance(self, label: str) -> None:  # noqa: D102
        pass


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

    def to_json(self) -> dict:
        out = asdict(self)
        out["attention"] = None if self.attention is None else self.attention.to_json()
        return out


class _ErrorAccumulator:
    """Sums ||x - x_hat||^2, ||x||^2 and per-vector cosines over chunks."""

    def __init__(self) -> None:
        self.err = self.energy = self.cos_sum = 0.0
        self.cos_min = 1.0
        self.cos_count = 0

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        x = x.astype(np.float64)
        x_hat = x_hat.astype(np.float64)
        self.err += float(((x - x_hat) ** 2).sum())
        self.energy += float((x * x).sum())
        nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
        ok = (nx > 0) & (nh > 0)
        cos = (x[ok] * x_hat[ok]).sum(1) / (nx[ok] * nh[ok])
        if cos.size:
            self.cos_sum += float(cos.sum())
            self.cos_min = min(self.cos_min, float(cos.min()))
            self.cos_count += cos.size

    @classmethod
    def merge(cls, parts) -> "_ErrorAccumulator":
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


def to_float32(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32)


def from_float32(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """Cast a reconstruction back to the source dtype (F16, BF16 or F32).

    A reconstruction can overshoot a finite source value near the dtype's maximum; it is
    clamped to the largest finite value rather than turned into inf.
    """
    dtype = stfile.numpy_dtype_for(st_dtype)
    if dtype != np.float32:
        top = float(ml_dtypes.finfo(dtype).max)
        x = np.clip(x, -top, top)
    return x.astype(dtype)


def store_norms(norms: np.ndarray) -> np.ndarray:
    """fp16 norms (the paper's 2 bytes) unless one would overflow fp16; then f32, never inf."""
    if norms.size and float(norms.max()) > FP16_MAX:
        return norms.astype(np.float32)
    return norms.astype(np.float16)


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name in the same folder, so the final os.replace is atomic."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def commit_outputs(pairs: list[tuple[Path, Path]], force: bool) -> None:
    """Rename finished temporary files over their outputs, refusing late conflicts."""
    for _, out in pairs:
        if out.exists() and not force:
            raise UsageError("output exists (use --force to overwrite)", path=str(out))
    for tmp, out in pairs:
        os.replace(tmp, out)


def check_output_paths(source: Path, outputs: list[Path], force: bool) -> None:
    for out in outputs:
        if out.is_dir():
            raise UsageError("output path is a directory", path=str(out))
        if not out.parent.is_dir():
            raise UsageError(f"output directory {out.parent} does not exist", path=str(out))
        if out.exists() and source.exists() and os.path.samefile(out, source):
            raise UsageError("output is the input file", path=str(out))
        if out.resolve() == source.resolve():
            raise UsageError("output is the input file", path=str(out))
        if out.exists() and not force:
            raise UsageError("output exists (use --force to overwrite)", path=str(out))


def default_compressed_path(source: Path) -> Path:
    name = source.name[: -len(".safetensors")] if source.name.endswith(".safetensors") else source.name
    return source.with_name(name + ".fq.safetensors")


def default_restored_path(compressed: Path) -> Path:
    name = compressed.name
    for suffix in (".fq.safetensors", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return compressed.with_name(name + ".restored.safetensors")


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
    return middle.astype(np.float64).mean(axis=2).astype(np.float32)


def compress(source, *, manifest=None, output=None, spec: CompressSpec | None = None,
             compare: bool = False, force: bool = False, attention: bool = True,
             max_queries: int | None = None,
             progress: Progress | None = None) -> CompressReport:
    """Compress a KV dump into one self-contained ``.fq.safetensors`` file."""
    progress = progress or Progress()
    spec = spec or CompressSpec()
    source = Path(source)
    out = Path(output) if output is not None else default_compressed_path(source)
    dump = open_dump(source, manifest)
    check_output_paths(source, [out], force)
    if out.resolve() == dump.manifest_path.resolve():
        raise UsageError("output is the manifest file", path=str(out))
    if attention:
        check_queries_finite(dump)
    tensors, doc, runs, distinct = encode_dump(dump, spec, compare, progress)
    tmp = temp_sibling(out)
    try:
        stfile.write_file(tmp, tensors, container.metadata_for(doc))
        rep = _compress_report(dump, out, tmp.stat().st_size, tensors, distinct, runs)
        rep.spec = spec.to_json()
        if attention:
            from .fidelity import DEFAULT_MAX_QUERIES, measure

            progress.start(1, "attention fidelity")
            rep.attention = measure(dump, reconstructor(load_verified(tmp)),
                                    max_queries=max_queries or DEFAULT_MAX_QUERIES)
        commit_outputs([(tmp, out)], force)
    finally:
        tmp.unlink(missing_ok=True)
    return rep


def check_queries_finite(dump: Dump) -> None:
    """Queries are passed through, but attention fidelity reads them: refuse NaN/Inf early."""
    if dump.manifest.attention is not None:
        for name in dump.manifest.attention.query_tensors:
            check_finite(dump.header, name, stfile.read_tensor(dump.header, name))


def encode_dump(dump: Dump, spec: CompressSpec, compare: bool, progress: Progress):
    """Every stored array and the metadata document of the compressed form of ``dump``."""
    profiles = entry_profiles(dump, spec)
    quantizers = make_quantizers(profiles, progress)
    distinct = list(quantizers)
    tensors: dict[str, object] = {}
    for j, p in enumerate(distinct):
        tensors[codebook_name(j)] = quantizers[p].codebook
        tensors[rotation_name(j)] = quantizers[p].rotation

    progress.start(sum(e.shape.layers for e in dump.manifest.entries), "compressing")
    runs, doc_entries = [], []
    for i, (entry, p) in enumerate(zip(dump.manifest.entries, profiles)):
        q = quantizers[p]
        acc = _ErrorAccumulator()
        scalar = _scalar_for(p, q.rotation) if compare else None
        scalar_acc = _ErrorAccumulator() if scalar is not None else None
        st_dtype = SOURCE_DTYPES[entry.shape.dtype]
        center = spec.center_keys and entry.shape.role == "key"
        payload = 0
        for layer in range(entry.shape.layers):
            arr = read_layer(dump, entry, layer)
            kept, middle, kf, kl = split_kept(arr, spec.keep_first, spec.keep_last)
            b, h, t, d = middle.shape
            x = to_float32(middle.reshape(-1, d))
            mean = None
            if center:
                mean = token_mean(middle)
                tensors[mean_name(i, layer)] = mean
                payload += mean.nbytes
                x_in = (middle.astype(np.float32) - mean[:, :, None, :]).reshape(-1, d)
            else:
                x_in = x
            codes, norms = q.encode(x_in)
            stored_norms = store_norms(norms)
            x_hat = q.decode(codes, stored_norms.astype(np.float32))
            if mean is not None:
                x_hat = (x_hat.reshape(b, h, t, d) + mean[:, :, None, :]).reshape(-1, d)
            x_hat = from_float32(x_hat, st_dtype)
            acc.add(x, x_hat)
            if scalar is not None:
                scalar_acc.add(x, from_float32(scalar.decode(*scalar.encode(x)), st_dtype))
            packed = bitpack.pack(codes, p.wire_bits)
            tensors[codes_name(i, layer)] = packed
            tensors[norms_name(i, layer)] = stored_norms.reshape(b, h, t)
            payload += packed.nbytes + stored_norms.nbytes
            if kf + kl:
                kept_x = to_float32(kept.reshape(-1, d))
                acc.add(kept_x, kept_x)  # stored exactly: counted, with zero error
                if scalar_acc is not None:
                    scalar_acc.add(kept_x, kept_x)
                tensors[kept_name(i, layer)] = np.ascontiguousarray(kept)
                payload += kept.nbytes
            progress.advance(f"{entry.shape.role} layer {layer}")
        runs.append((entry, p, acc, scalar_acc, payload))
        doc_entries.append({"profile": distinct.index(p), "layers": entry.shape.layers,
                            "vectors_per_layer": entry.shape.vector_count // entry.shape.layers,
                            "keep_first": spec.keep_first, "keep_last": spec.keep_last,
                            "center": center})

    source_tensors = {}
    for name, info in dump.header.tensors.items():
        raw = stfile.read_raw(dump.header, name)
        source_tensors[name] = {"dtype": info.dtype, "shape": list(info.shape),
                                "digest": tensor_digest(info.dtype, info.shape, raw)}
        if name not in dump.kv_names:
            tensors[raw_name(name)] = stfile.RawTensor(info.dtype, info.shape, raw)

    doc = {
        "format_version": container.FORMAT_VERSION,
        "tool": f"fibquant {__version__}",
        "source": {
            "file": dump.path.name,
            "file_digest": file_digest({n: v["digest"] for n, v in source_tensors.items()}),
            "tensor_order": list(dump.header.tensors),
            "metadata": dump.header.metadata,
            "tensors": source_tensors,
        },
        "manifest": dump.manifest.to_json(),
        "profiles": [{"profile": p.to_json(), "profile_digest": p.digest,
                      "codebook_digest": stored_codebook_digest(quantizers[p].codebook),
                      "rotation_digest": rotation_digest(quantizers[p].rotation)}
                     for p in distinct],
        "entries": doc_entries,
        "arrays": {name: _digest_of(t) for name, t in tensors.items()},
    }
    return tensors, doc, runs, distinct


SOURCE_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def _np_source_dtype(dtype: str):
    return {"f16": np.float16, "bf16": stfile.numpy_dtype_for("BF16"), "f32": np.float32}[dtype]


def _scalar_for(p: Profile, rotation: np.ndarray):
    b = p.rate_bits
    return ScalarQuantizer(p.head_dim, round(b), rotation) if abs(b - round(b)) < 1e-12 and 1 <= b <= 8 else None


def rotation_digest(rotation: np.ndarray) -> str:
    return bytes_digest(ROTATION_SCHEMA, np.ascontiguousarray(rotation, dtype="<f4").tobytes())


def stored_codebook_digest(codebook: np.ndarray) -> str:
    return bytes_digest(CODEBOOK_SCHEMA, np.ascontiguousarray(codebook, dtype="<f4").tobytes())


def _digest_of(t) -> str:
    if isinstance(t, stfile.RawTensor):
        return tensor_digest(t.dtype, t.shape, t.data)
    arr = np.ascontiguousarray(t)
    return tensor_digest(stfile.st_dtype_for(arr.dtype), arr.shape, arr)


def _nbytes(t) -> int:
    return len(t.data) if isinstance(t, stfile.RawTensor) else np.asarray(t).nbytes


def _compress_report(dump, out: Path, file_bytes: int, tensors, distinct, runs) -> CompressReport:
    """Sizes and errors per entry and in total; shared bytes are split across their users."""
    passthrough_bytes = sum(_nbytes(t) for n, t in tensors.items() if n.startswith(container.RAW_PREFIX))
    header_bytes = file_bytes - sum(_nbytes(t) for t in tensors.values())
    users = {p: sum(1 for run in runs if run[1] == p) for p in distinct}
    rows = []
    for entry, p, acc, scalar_acc, payload in runs:
        j = distinct.index(p)
        shared = (_nbytes(tensors[codebook_name(j)]) + _nbytes(tensors[rotation_name(j)])) / users[p]
        total = payload + shared + header_bytes / len(runs)
        rows.append(_stats(entry.shape.role, entry.shape, payload, total, acc, scalar_acc, p))
    overall = _ErrorAccumulator.merge([run[2] for run in runs])
    scalars = [run[3] for run in runs]
    scalar = None if any(s is None or not s.cos_count for s in scalars) else _ErrorAccumulator.merge(scalars)
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
    itemsize = np.dtype(_np_source_dtype(shape.dtype)).itemsize
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


# --------------------------------------------------------------------------- decompress


@dataclass(frozen=True)
class Loaded:
    """A compressed file whose header, document and every stored array verified."""

    comp: container.Compressed
    manifest: object
    quantizers: list  # one FibQuantizer per entry
    keeps: list  # (keep_first, keep_last) per entry, clamped to the token count
    centers: list  # per entry: were the vectors centered (a stored per-head token mean)?

    @property
    def doc(self) -> dict:
        return self.comp.doc


def load_verified(path, progress: Progress | None = None, checks: list | None = None) -> Loaded:
    """Open a compressed file and verify every digest; raise on the first failure."""
    progress = progress or Progress()
    note = (lambda name, detail: checks.append((name, True, detail))) if checks is not None \
        else (lambda name, detail: None)
    comp = container.open_compressed(path)
    note("structure and format version", f"format {comp.doc['format_version']}, "
         f"{len(comp.header.tensors)} stored arrays")
    note("metadata digest", "fibquant document verified")
    where = str(comp.path)
    progress.start(len(comp.header.tensors), "verifying digests")
    for name in comp.header.tensors:
        container.verify_array(comp, name)
        progress.advance(name)
    note("array digests", f"{len(comp.header.tensors)} arrays match their BLAKE3 digests")
    try:
        manifest = parse_manifest(comp.doc["manifest"], source=f"{where} (recorded manifest)")
        quantizers = [_quantizer_for(comp, e) for e in comp.doc["entries"]]
        if len(quantizers) != len(manifest.entries):
            raise IntegrityError("entries do not match the recorded manifest", path=where)
        keeps = [_keep_for(e, m.shape.tokens, where)
                 for e, m in zip(comp.doc["entries"], manifest.entries)]
        centers = [e["center"] is True for e in comp.doc["entries"]]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise IntegrityError(f"malformed fibquant document ({type(err).__name__}: {err})",
                             path=where) from None
    except InvalidInputError as err:
        raise IntegrityError(err.reason, path=where) from None
    note("codebooks and rotations", f"{len(comp.doc['profiles'])} profile(s) match their digests")
    return Loaded(comp, manifest, quantizers, keeps, centers)


def _keep_for(entry_doc: dict, tokens: int, where: str) -> tuple[int, int]:
    kf, kl = entry_doc["keep_first"], entry_doc["keep_last"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (kf, kl)):
        raise IntegrityError("keep_first / keep_last must be integers >= 0", path=where)
    kf = min(kf, tokens)
    return kf, min(kl, tokens - kf)


def _quantizer_for(comp: container.Compressed, entry_doc: dict) -> FibQuantizer:
    where = str(comp.path)
    j = entry_doc["profile"]
    rec = comp.doc["profiles"][j]
    profile = Profile.from_json(rec["profile"])
    if profile.digest != rec["profile_digest"]:
        raise IntegrityError(f"profile {j} does not match its digest", path=where)
    codebook = stfile.read_tensor(comp.header, codebook_name(j))
    rotation = stfile.read_tensor(comp.header, rotation_name(j))
    if codebook.shape != (profile.size, profile.block_dim) or stored_codebook_digest(codebook) != rec["codebook_digest"]:
        raise IntegrityError("codebook does not match its profile", path=where, tensor=codebook_name(j))
    d = profile.head_dim
    if rotation.shape != (d, d) or rotation_digest(rotation) != rec["rotation_digest"]:
        raise IntegrityError("rotation does not match its profile", path=where, tensor=rotation_name(j))
    return FibQuantizer(profile, codebook, rotation)


def read_layer_codes(loaded: Loaded, i: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpacked codes (n, d/k) and norms (n,) float32 of entry i, layer; checks ranges."""
    comp, q = loaded.comp, loaded.quantizers[i]
    shape = loaded.manifest.entries[i].shape
    p = q.profile
    kf, kl = loaded.keeps[i]
    t_mid = shape.tokens - kf - kl
    n = shape.batch * shape.kv_heads * t_mid
    where = str(comp.path)
    cname, nname = codes_name(i, layer), norms_name(i, layer)
    if cname not in comp.header.tensors or nname not in comp.header.tensors:
        raise IntegrityError(f"missing stored arrays for entry {i} layer {layer}", path=where)
    packed = stfile.read_tensor(comp.header, cname)
    try:
        codes = bitpack.unpack(packed, n * p.blocks_per_vector, p.wire_bits)
    except IntegrityError as err:
        raise IntegrityError(err.reason, path=where, tensor=cname) from None
    if codes.size and int(codes.max()) >= p.size:
        bad = int(np.argmax(codes >= p.size))
        raise IntegrityError(f"index {int(codes[bad])} at position {bad} is >= N = {p.size}",
                             path=where, tensor=cname)
    norms = stfile.read_tensor(comp.header, nname)
    if norms.dtype not in (np.float16, np.float32) or norms.shape != (shape.batch, shape.kv_heads, t_mid):
        raise IntegrityError(f"norms have dtype {norms.dtype} and shape {list(norms.shape)}",
                             path=where, tensor=nname)
    norms = norms.reshape(-1).astype(np.float32)
    if not np.all(np.isfinite(norms)) or float(norms.min(initial=0.0)) < 0:
        raise IntegrityError("norms must be finite and >= 0", path=where, tensor=nname)
    return codes.reshape(n, p.blocks_per_vector), norms


def _stored(loaded: Loaded, name: str, shape: tuple, dtype) -> np.ndarray:
    """A stored side array (kept tokens, key means), checked for presence and shape."""
    where = str(loaded.comp.path)
    if name not in loaded.comp.header.tensors:
        raise IntegrityError("missing stored array", path=where, tensor=name)
    arr = stfile.read_tensor(loaded.comp.header, name)
    if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
        raise IntegrityError(f"has shape {list(arr.shape)} and dtype {arr.dtype}, expected "
                             f"{list(shape)}", path=where, tensor=name)
    if not np.all(np.isfinite(arr)):
        raise IntegrityError("holds non-finite values", path=where, tensor=name)
    return arr


def decode_layer(loaded: Loaded, i: int, layer: int) -> np.ndarray:
    """Entry i, layer as [batch, kv_heads, tokens, head_dim] float32 (kept tokens exact)."""
    shape = loaded.manifest.entries[i].shape
    b, h, t, d = shape.batch, shape.kv_heads, shape.tokens, shape.head_dim
    kf, kl = loaded.keeps[i]
    codes, norms = read_layer_codes(loaded, i, layer)
    middle = loaded.quantizers[i].decode(codes, norms).reshape(b, h, t - kf - kl, d)
    if loaded.centers[i]:
        middle += _stored(loaded, mean_name(i, layer), (b, h, d), np.float32)[:, :, None, :]
    if not kf + kl:
        return middle
    kept = _stored(loaded, kept_name(i, layer), (b, h, kf + kl, d), None)
    out = np.empty((b, h, t, d), dtype=np.float32)
    out[:, :, :kf] = kept[:, :, :kf]
    out[:, :, kf:t - kl] = middle
    out[:, :, t - kl:] = kept[:, :, kf:]
    return out


@dataclass(frozen=True)
class DecompressReport:
    source: str
    output: str
    manifest_output: str
    tensors: list[dict]

    def to_json(self) -> dict:
        return asdict(self)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def restore_tensor(loaded: Loaded, name: str, where_kv: dict) -> np.ndarray:
    """Rebuild KV tensor ``name`` in its stored layout and dtype."""
    from .manifest import vectors_axes

    i, views = where_kv[name]
    entry = loaded.manifest.entries[i]
    info = loaded.doc["source"]["tensors"][name]
    st_dtype = info["dtype"]
    out = np.empty(tuple(info["shape"]), dtype=stfile.numpy_dtype_for(st_dtype))
    for layer, index in views:
        x = from_float32(decode_layer(loaded, i, layer), st_dtype)
        if index is None and out.ndim == 5:
            out[:, 0] = x
        elif index is None:
            out[...] = x.transpose(_inverse(vectors_axes(entry.layout, 4)))
        else:
            out[:, index] = x
    return out


def decompress(path, *, output=None, force: bool = False,
               progress: Progress | None = None) -> DecompressReport:
    """Verify every digest, then restore every tensor (name, shape, dtype) and the manifest."""
    progress = progress or Progress()
    path = Path(path)
    out = Path(output) if output is not None else default_restored_path(path)
    out_manifest = manifest_path_for(out)
    check_output_paths(path, [out, out_manifest], force)
    loaded = load_verified(path, progress)
    doc = loaded.doc
    where_kv: dict[str, tuple[int, list]] = {}
    for i, entry in enumerate(loaded.manifest.entries):
        for layer, (name, index) in enumerate(entry_layer_views(entry)):
            where_kv.setdefault(name, (i, []))[1].append((layer, index))
    try:
        order = doc["source"]["tensor_order"]
        infos = doc["source"]["tensors"]
        specs = [(n, infos[n]["dtype"], tuple(infos[n]["shape"])) for n in order]
        metadata = doc["source"]["metadata"]
    except (KeyError, TypeError) as err:
        raise IntegrityError(f"malformed fibquant document ({err})", path=str(path)) from None
    progress.start(len(order), "restoring")
    rows = []
    tmp, tmp_manifest = temp_sibling(out), temp_sibling(out_manifest)
    try:
        _restore_into(tmp, loaded, specs, metadata, where_kv, rows, progress)
        save_manifest(loaded.manifest, tmp_manifest)
        commit_outputs([(tmp, out), (tmp_manifest, out_manifest)], force)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return DecompressReport(str(path), str(out), str(out_manifest), rows)


def _restore_into(tmp: Path, loaded: Loaded, specs, metadata, where_kv, rows, progress) -> None:
    """Write every original tensor, in the original order, into the file ``tmp``."""
    path = loaded.comp.path
    infos = loaded.doc["source"]["tensors"]
    with stfile.StreamWriter(tmp, specs, metadata) as writer:
        for name, _, _ in specs:
            if name in where_kv:
                writer.write(name, restore_tensor(loaded, name, where_kv))
                kind = "restored"
            else:
                raw = stfile.read_raw(loaded.comp.header, raw_name(name))
                if tensor_digest(infos[name]["dtype"], tuple(infos[name]["shape"]), raw) != infos[name]["digest"]:
                    raise IntegrityError("pass-through tensor does not match the source digest",
                                         path=str(path), tensor=name)
                writer.write(name, raw)
                kind = "pass-through (bit-exact)"
            rows.append({"name": name, "dtype": infos[name]["dtype"],
                         "shape": infos[name]["shape"], "kind": kind})
            progress.advance(name)


def verify(path, checks: list | None = None) -> list[tuple[str, bool, str]]:
    """Every check of a compressed file, in order; stops at the first failure (re-raised)."""
    checks = [] if checks is None else checks
    loaded = load_verified(path, checks=checks)
    n = 0
    for i, entry in enumerate(loaded.manifest.entries):
        for layer in range(entry.shape.layers):
            read_layer_codes(loaded, i, layer)
            n += 1
    checks.append(("indices < N, norms finite", True, f"{n} layer streams checked"))
    return checks


def reconstructor(loaded: Loaded):
    """(entry, layer) -> the restored layer exactly as decompress writes it, as float32."""

    def reconstruct(i: int, layer: int) -> np.ndarray:
        st_dtype = SOURCE_DTYPES[loaded.manifest.entries[i].shape.dtype]
        return from_float32(decode_layer(loaded, i, layer), st_dtype).astype(np.float32)

    return reconstruct
