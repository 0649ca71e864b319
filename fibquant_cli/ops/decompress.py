"""decompress / verify, and what compress shares with them (paths, dtypes, digests)."""

from __future__ import annotations

import os
import secrets
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from threadpoolctl import threadpool_limits

from fibquant_cli.formats import container, stfile
from fibquant_cli.formats.container import (codebook_name, codes_name, kept_name, mean_name, norms_name, raw_name, rotation_name)
from fibquant_cli.core import bitpack
from fibquant_cli.storage.codebook_cache import CODEBOOK_SCHEMA
from fibquant_cli.core.codec import DECODE_ROWS, FibQuantizer
from fibquant_cli.core.params import Profile
from fibquant_cli.formats.digest import bytes_digest, tensor_digest
from fibquant_cli.errors import IntegrityError, InvalidInputError, UsageError
from fibquant_cli.formats.manifest import (entry_layer_views, manifest_path_for, parse_manifest, save_manifest)

FP16_MAX = float(np.finfo(np.float16).max)
ROTATION_SCHEMA = "fibquant_rotation_v1"


class Progress:
    """Progress sink: the CLI draws it on stderr; the library default does nothing."""

    def start(self, total: int, label: str) -> None:  # noqa: D102
        pass

    def advance(self, label: str) -> None:  # noqa: D102
        pass


def from_float32(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """Cast a reconstruction back to the source dtype (F16, BF16 or F32).

    A reconstruction can overshoot a finite source value near the dtype's maximum; it is
    clamped to the largest finite value rather than turned into inf.
    """
    dtype = stfile.numpy_dtype_for(st_dtype)
    if dtype == np.float32:
        return x
    top = float(ml_dtypes.finfo(dtype).max)
    if x.size and max(float(x.max()), -float(x.min())) > top:  # no |x| temporary
        x = np.clip(x, -top, top)
    return x.astype(dtype)


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
        same = out.resolve() == source.resolve() or (
            out.exists() and source.exists() and os.path.samefile(out, source))  # hard links
        if same:
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


SOURCE_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def rotation_digest(rotation: np.ndarray) -> str:
    return bytes_digest(ROTATION_SCHEMA, np.ascontiguousarray(rotation, dtype="<f4").tobytes())


def stored_codebook_digest(codebook: np.ndarray) -> str:
    return bytes_digest(CODEBOOK_SCHEMA, np.ascontiguousarray(codebook, dtype="<f4").tobytes())


# --------------------------------------------------------------------------- decompress


@dataclass(frozen=True)
class Loaded:
    """A compressed file whose header, document, codebooks and rotations verified.

    The other stored arrays verified too, unless ``verify_on_read``: then ``read_stored``
    checks each against its digest as it reads it (one read instead of two), records it in
    ``verified``, and ``verify_unread`` checks whatever was never read.
    """

    comp: container.Compressed
    manifest: object
    quantizers: list  # one FibQuantizer per entry
    keeps: list  # (keep_first, keep_last) per entry, clamped to the token count
    centers: list  # per entry: were the vectors centered (a stored per-head token mean)?
    verify_on_read: bool = False
    verified: set = field(default_factory=set)

    @property
    def doc(self) -> dict:
        return self.comp.doc


def load_verified(path, progress: Progress | None = None, checks: list | None = None,
                  *, verify_arrays: bool = True, verify_on_read: bool = False) -> Loaded:
    """Open a compressed file and verify every digest; raise on the first failure.

    ``verify_arrays=False`` (random access) still verifies the header, the document and the
    codebooks and rotations, but not the other arrays, which it would have to read whole.
    ``verify_on_read=True`` defers those to ``read_stored`` (see ``Loaded``).
    """
    progress = progress or Progress()
    note = (lambda name, detail: checks.append((name, True, detail))) if checks is not None \
        else (lambda name, detail: None)
    comp = container.open_compressed(path)
    note("structure and format version", f"format {comp.doc['format_version']}, "
         f"{len(comp.header.tensors)} stored arrays")
    note("metadata digest", "fibquant document verified")
    where = str(comp.path)
    names = [n for n in comp.header.tensors
             if (verify_arrays and not verify_on_read) or _is_profile_array(n)]
    progress.start(len(names), "verifying digests")
    for name in names:
        container.verify_array(comp, name)
        progress.advance(name)
    note("array digests", f"{len(names)} arrays match their BLAKE3 digests")
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
    return Loaded(comp, manifest, quantizers, keeps, centers, verify_on_read,
                  set(names) if verify_on_read else set())


def _is_profile_array(name: str) -> bool:
    return name.endswith(("/codebook", "/rotation"))


def read_stored(loaded: Loaded, name: str, arrays: dict | None = None) -> np.ndarray:
    """Stored array ``name``, checked against its digest first if ``loaded.verify_on_read``.

    ``arrays``: arrays already read (``stfile.read_tensors``); ``name`` is taken from it.
    """
    arr = arrays.pop(name) if arrays and name in arrays else stfile.read_tensor(
        loaded.comp.header, name)
    if loaded.verify_on_read and name not in loaded.verified:
        info = loaded.comp.header.tensors[name]
        if tensor_digest(info.dtype, info.shape, arr) != loaded.doc["arrays"][name]:
            raise IntegrityError("digest mismatch (stored bytes were altered)",
                                 path=str(loaded.comp.path), tensor=name)
        loaded.verified.add(name)  # set.add is atomic: decode threads share it
    return arr


def verify_unread(loaded: Loaded) -> None:
    """With ``verify_on_read``: check every stored array that was never read."""
    if loaded.verify_on_read:
        for name in loaded.comp.header.tensors:
            if name not in loaded.verified:
                container.verify_array(loaded.comp, name)
                loaded.verified.add(name)


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


def read_layer_codes(loaded: Loaded, i: int, layer: int,
                     arrays: dict | None = None) -> tuple["PackedCodes", np.ndarray]:
    """Codes (a checked ``PackedCodes`` stream) and norms (n,) float32 of entry i, layer."""
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
    packed = read_stored(loaded, cname, arrays)
    try:
        packed = bitpack.check_stream(packed, n * p.blocks_per_vector, p.wire_bits)
    except IntegrityError as err:
        raise IntegrityError(err.reason, path=where, tensor=cname) from None
    codes = PackedCodes(packed, n, p, where, cname)
    norms = read_stored(loaded, nname, arrays)
    if norms.dtype not in (np.float16, np.float32) or norms.shape != (shape.batch, shape.kv_heads, t_mid):
        raise IntegrityError(f"norms have dtype {norms.dtype} and shape {list(norms.shape)}",
                             path=where, tensor=nname)
    norms = norms.reshape(-1).astype(np.float32)
    if not np.all(np.isfinite(norms)) or float(norms.min(initial=0.0)) < 0:
        raise IntegrityError("norms must be finite and >= 0", path=where, tensor=nname)
    return codes, norms


class PackedCodes:
    """A layer's code stream (length and padding checked), unpacked rows at a time.

    ``FibQuantizer.decode_blocks`` asks for one decode block of rows at a time, so a layer's
    indices never exist whole (as intp, the gather's fastest index type, they would take 8
    bytes per block: more than the restored layer itself). An index >= N raises.
    """

    def __init__(self, packed: np.ndarray, n: int, profile: Profile, where: str, tensor: str):
        self.packed, self.profile, self.where, self.tensor = packed, profile, where, tensor
        self.shape = (n, profile.blocks_per_vector)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Codes of vectors start:stop, (stop - start, d/k) intp."""
        p, bpv = self.profile, self.shape[1]
        codes = bitpack.unpack_range(self.packed, start * bpv, stop * bpv, p.wire_bits, np.intp)
        if p.size < 2**p.wire_bits and codes.size and int(codes.max()) >= p.size:
            bad = int(np.argmax(codes >= p.size))
            raise IntegrityError(f"index {int(codes[bad])} at position {start * bpv + bad} is "
                                 f">= N = {p.size}", path=self.where, tensor=self.tensor)
        return codes.reshape(stop - start, bpv)

    def check_all(self) -> None:
        """Every index < N (what decoding would find), without decoding."""
        for start in range(0, self.shape[0], DECODE_ROWS):
            self.rows(start, min(self.shape[0], start + DECODE_ROWS))


def stored_array(loaded: Loaded, name: str, shape: tuple, dtype,
                 arrays: dict | None = None) -> np.ndarray:
    """A stored side array (kept tokens, key means), checked for presence and shape."""
    where = str(loaded.comp.path)
    if name not in loaded.comp.header.tensors:
        raise IntegrityError("missing stored array", path=where, tensor=name)
    arr = read_stored(loaded, name, arrays)
    if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
        raise IntegrityError(f"has shape {list(arr.shape)} and dtype {arr.dtype}, expected "
                             f"{list(shape)}", path=where, tensor=name)
    if not np.all(np.isfinite(arr)):
        raise IntegrityError("holds non-finite values", path=where, tensor=name)
    return arr


def restore_into(q: FibQuantizer, codes: np.ndarray, norms: np.ndarray, mean, kept,
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
        np.copyto(out3[g, kf + r0 - g * t_mid:kf + r1 - g * t_mid], seg, casting="unsafe")


def decoded_segments(q: FibQuantizer, codes: np.ndarray, norms: np.ndarray, mean, t_mid: int,
                     dtype, offset: int = 0):
    """Yield (head g, r0, r1, rows r0:r1 decoded, float32) for one layer's ``codes``.

    ``codes`` may be the rows from ``offset`` on (a multiple of ``DECODE_ROWS``), r0 and r1
    count from the layer's first row.

    Rows are decoded in the blocks of ``FibQuantizer.decode`` (so every path gets the same
    values) and split at head boundaries (``t_mid`` rows per head); each head's mean key
    (``mean`` [b, h, d] or None) is added and the values are clamped to the finite range of
    ``dtype``, the output dtype (a reconstruction may overshoot a value near its maximum).
    The rows are a view of a scratch block: use them before asking for the next segment.
    """
    d = q.profile.head_dim
    mean2 = None if mean is None else mean.reshape(-1, d)
    top = None if np.dtype(dtype) == np.float32 else float(ml_dtypes.finfo(dtype).max)
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


_F32_EXPONENT = np.uint32(0x7F800000)


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


def restore_layer(loaded: Loaded, i: int, layer: int) -> np.ndarray:
    """Entry i, layer as restored: [batch, kv_heads, tokens, head_dim] in the source dtype."""
    shape = loaded.manifest.entries[i].shape
    b, h, t, d = shape.batch, shape.kv_heads, shape.tokens, shape.head_dim
    kf, kl = loaded.keeps[i]
    out = np.empty((b, h, t, d), dtype=stfile.numpy_dtype_for(SOURCE_DTYPES[shape.dtype]))
    names = [codes_name(i, layer), norms_name(i, layer), mean_name(i, layer), kept_name(i, layer)]
    arrays = stfile.read_tensors(loaded.comp.header,
                                 [n for n in names if n in loaded.comp.header.tensors])
    codes, norms = read_layer_codes(loaded, i, layer, arrays)
    mean = (stored_array(loaded, names[2], (b, h, d), np.float32, arrays)
            if loaded.centers[i] else None)
    kept = stored_array(loaded, names[3], (b, h, kf + kl, d), None, arrays) if kf + kl else None
    restore_into(loaded.quantizers[i], codes, norms, mean, kept, (kf, kl), out)
    return out


@dataclass(frozen=True)
class DecompressReport:
    source: str
    output: str
    manifest_output: str
    tensors: list[dict]

    def to_json(self) -> dict:
        return asdict(self)


def inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def restore_tensor(loaded: Loaded, name: str, where_kv: dict) -> np.ndarray:
    """Rebuild KV tensor ``name`` in its stored layout and dtype."""
    from fibquant_cli.formats.manifest import vectors_axes

    i, views = where_kv[name]
    entry = loaded.manifest.entries[i]
    info = loaded.doc["source"]["tensors"][name]
    perm = inverse_permutation(vectors_axes(entry.layout, 4))
    if len(views) == 1 and views[0][1] is None and len(info["shape"]) == 4 and perm == (0, 1, 2, 3):
        return restore_layer(loaded, i, views[0][0])  # written in place, no copy
    out = np.empty(tuple(info["shape"]), dtype=stfile.numpy_dtype_for(info["dtype"]))
    for layer, index in views:
        x = restore_layer(loaded, i, layer)
        if index is None and out.ndim == 5:
            out[:, 0] = x
        elif index is None:
            out[...] = x.transpose(perm)
        else:
            out[:, index] = x
    return out


def decompress(path, *, output=None, force: bool = False, progress: Progress | None = None,
               jobs: int = 0) -> DecompressReport:
    """Verify every digest, then restore every tensor (name, shape, dtype) and the manifest.

    ``jobs`` decode threads; 0 picks ``DECODE_THREADS`` (fewer on a one-core machine).
    """
    if jobs < 0:
        raise UsageError(f"--jobs must be >= 0, got {jobs}")
    jobs = jobs or min(DECODE_THREADS, os.cpu_count() or 1)
    with threadpool_limits(1):  # small matmuls: BLAS threads only add hand-off cost
        return _decompress(path, output=output, force=force, progress=progress, jobs=jobs)


def restore_targets(path, output, force: bool) -> tuple[Path, Path, Path]:
    """(compressed file, output dump, its manifest) of a decompress, the outputs checked."""
    path = Path(path)
    out = Path(output) if output is not None else default_restored_path(path)
    out_manifest = manifest_path_for(out)
    check_output_paths(path, [out, out_manifest], force)
    return path, out, out_manifest


def _decompress(path, *, output, force, progress, jobs) -> DecompressReport:
    progress = progress or Progress()
    path, out, out_manifest = restore_targets(path, output, force)
    # Arrays are verified as the decode threads read them: each is read once, not twice.
    loaded = load_verified(path, progress, verify_on_read=True)
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
    rows = commit_restored(
        out, out_manifest, loaded.manifest, force,
        lambda tmp: _restore_into(tmp, loaded, specs, metadata, where_kv, progress, jobs))
    return DecompressReport(str(path), str(out), str(out_manifest), rows)


def commit_restored(out: Path, out_manifest: Path, manifest, force: bool, write_dump) -> list:
    """Write a dump (``write_dump(tmp)``, which returns its report rows) and ``manifest`` to
    temporary siblings, then rename both over ``out`` and ``out_manifest``; on any failure
    neither output is touched and the temporary files are removed. Returns the rows."""
    tmp, tmp_manifest = temp_sibling(out), temp_sibling(out_manifest)
    try:
        rows = write_dump(tmp)
        save_manifest(manifest, tmp_manifest)
        commit_outputs([(tmp, out), (tmp_manifest, out_manifest)], force)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return rows


def _restore_into(tmp: Path, loaded: Loaded, specs, metadata, where_kv, progress,
                  jobs: int) -> list[dict]:
    """Write every original tensor, in the original order, into the file ``tmp``; its rows.

    KV tensors are decoded by ``jobs`` threads (numpy releases the GIL in the decode), at most
    ``2 * jobs`` batches ahead of the writer, so memory stays bounded.
    """
    path = loaded.comp.path
    infos = loaded.doc["source"]["tensors"]
    rows: list[dict] = []

    def produce(name: str):
        if name in where_kv:
            return restore_tensor(loaded, name, where_kv), "restored"
        raw = stfile.read_raw(loaded.comp.header, raw_name(name))
        found = tensor_digest(infos[name]["dtype"], tuple(infos[name]["shape"]), raw)
        # The copy must match both its stored-array digest and the source tensor's digest.
        if found != loaded.doc["arrays"].get(raw_name(name)) or found != infos[name]["digest"]:
            raise IntegrityError("digest mismatch (stored bytes were altered)",
                                 path=str(path), tensor=raw_name(name))
        loaded.verified.add(raw_name(name))
        return raw, "pass-through (bit-exact)"

    with stfile.StreamWriter(tmp, specs, metadata) as writer, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: deque = deque()

        def write_oldest() -> int:
            names, future, size = pending.popleft()
            for done_name, (data, kind) in zip(names, future.result()):
                writer.write(done_name, data)
                rows.append({"name": done_name, "dtype": infos[done_name]["dtype"],
                             "shape": infos[done_name]["shape"], "kind": kind})
                progress.advance(done_name)
            return size

        in_flight = 0  # output bytes of the batches submitted and not yet written
        for batch, size in batches(specs, DECODE_BATCH_BYTES):
            # Bounded look-ahead: at most 2 * jobs batches, and past LOOKAHEAD_BYTES only one
            # per thread, so large tensors cost about jobs x the largest one in memory.
            while pending and (len(pending) >= 2 * jobs or
                               (len(pending) >= jobs and in_flight + size > LOOKAHEAD_BYTES)):
                in_flight -= write_oldest()
            names = [name for name, _, _ in batch]
            future = pool.submit(lambda names: [produce(name) for name in names], names)
            pending.append((names, future, size))
            in_flight += size
        while pending:
            write_oldest()
        verify_unread(loaded)
    return rows


DECODE_THREADS = 2
# Small tensors go to the decode threads in batches of about this many output bytes: one
# hand-off per batch instead of per tensor (a dump of many small layers scaled poorly).
DECODE_BATCH_BYTES = 1 << 20
LOOKAHEAD_BYTES = 16 << 20


def batches(specs, min_bytes: int):
    """Split (name, dtype, shape) specs, in order, into (run, its bytes) of >= ``min_bytes``."""
    run, size = [], 0
    for spec in specs:
        run.append(spec)
        size += stfile.tensor_n_bytes(spec[1], spec[2])
        if size >= min_bytes:
            yield run, size
            run, size = [], 0
    if run:
        yield run, size


def verify(path, checks: list | None = None) -> list[tuple[str, bool, str]]:
    """Every check of a compressed file, in order; stops at the first failure (re-raised)."""
    checks = [] if checks is None else checks
    loaded = load_verified(path, checks=checks)
    n = 0
    for i, entry in enumerate(loaded.manifest.entries):
        for layer in range(entry.shape.layers):
            read_layer_codes(loaded, i, layer)[0].check_all()
            n += 1
    checks.append(("indices < N, norms finite", True, f"{n} layer streams checked"))
    return checks


def reconstructor(loaded: Loaded):
    """(entry, layer) -> the restored layer exactly as decompress writes it, as float32."""

    def reconstruct(i: int, layer: int) -> np.ndarray:
        return restore_layer(loaded, i, layer).astype(np.float32)

    return reconstruct
