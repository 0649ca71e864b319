"""Random access: decode a range of layers and tokens, reading only the bytes around them.

Codes are fixed-width, so vector (b, h, t) of a layer starts at bit
((b * kv_heads + h) * t_mid + t - keep_first) * (d/k) * wire_bits of that layer's stream; the
stream is memory-mapped and only the decode blocks (``DECODE_ROWS`` vectors, aligned as the
full decode aligns them, so the values are bit-identical) around the selected runs are touched. Norms and kept
tokens are read through slices as well. The document, the codebooks and the rotations are
verified; the code streams cannot be verified without reading them whole (`fibquant validate`
does that).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

from fibquant_cli.formats import stfile
from fibquant_cli.formats.container import codes_name, kept_name, mean_name, norms_name, raw_name
from fibquant_cli.core import bitpack
from fibquant_cli.core.codec import DECODE_ROWS
from fibquant_cli.errors import IntegrityError, UsageError
from fibquant_cli.formats.manifest import AttentionSpec, Manifest, ManifestEntry, vectors_axes
from fibquant_cli.ops.decompress import (SOURCE_DTYPES, DecompressReport, Loaded, Progress, commit_restored, from_float32, inverse_permutation, load_verified, restore_targets, stored_array)


def parse_range(text: str | None, n: int, flag: str) -> range:
    """'3:5', '3', ':5', '100:' -> a non-empty range within [0, n)."""
    if text is None:
        return range(n)
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            start = int(lo) if lo.strip() else 0
            stop = int(hi) if hi.strip() else n
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not START:STOP or an index") from None
    if not 0 <= start < stop <= n:
        raise UsageError(f"{flag} {text!r} is outside 0:{n} or empty")
    return range(start, stop)


def decode_slice(loaded: Loaded, i: int, layer: int, t0: int, t1: int) -> np.ndarray:
    """Tokens [t0, t1) of entry i, layer, as [batch, kv_heads, t1 - t0, head_dim] float32."""
    shape = loaded.manifest.entries[i].shape
    q = loaded.quantizers[i]
    p = q.profile
    b, h, t, d = shape.batch, shape.kv_heads, shape.tokens, shape.head_dim
    kf, kl = loaded.keeps[i]
    t_mid = t - kf - kl
    out = np.empty((b, h, t1 - t0, d), dtype=np.float32)
    if kf + kl:
        kept = stored_array(loaded, kept_name(i, layer), (b, h, kf + kl, d), None)
        lo, hi = t0, min(t1, kf)
        if lo < hi:
            out[:, :, lo - t0:hi - t0] = kept[:, :, lo:hi]
        lo, hi = max(t0, t - kl), t1
        if lo < hi:
            out[:, :, lo - t0:hi - t0] = kept[:, :, kf + lo - (t - kl):kf + hi - (t - kl)]
    lo, hi = max(t0, kf), min(t1, t - kl)
    if lo >= hi:
        return out
    cname, nname = codes_name(i, layer), norms_name(i, layer)
    stream = _region(loaded, cname, np.uint8)
    n_vectors = b * h * t_mid
    expected = bitpack.packed_n_bytes(n_vectors * p.blocks_per_vector, p.wire_bits)
    if stream.size != expected:
        raise IntegrityError(f"packed stream has {stream.size} bytes, expected {expected}",
                             path=str(loaded.comp.path), tensor=cname)
    norms = _region(loaded, nname, None)
    if norms.dtype not in (np.float16, np.float32) or norms.size != n_vectors:
        raise IntegrityError(f"norms have dtype {norms.dtype} and {norms.size} values",
                             path=str(loaded.comp.path), tensor=nname)
    mean = stored_array(loaded, mean_name(i, layer), (b, h, d), np.float32) if loaded.centers[i] else None
    bpv = p.blocks_per_vector
    rows = DECODE_ROWS
    for bi in range(b):
        for hi_ in range(h):
            v0 = (bi * h + hi_) * t_mid + (lo - kf)
            v1 = v0 + hi - lo
            # Decode the aligned blocks around [v0, v1), as the full decode does, so the
            # values are bit-identical to it; only those blocks' bytes are read.
            a0, a1 = v0 // rows * rows, min(-(-v1 // rows) * rows, n_vectors)
            codes = bitpack.unpack_range(stream, a0 * bpv, a1 * bpv, p.wire_bits)
            if codes.size and int(codes.max()) >= p.size:
                raise IntegrityError(f"an index is >= N = {p.size}", path=str(loaded.comp.path),
                                     tensor=cname)
            nrm = np.asarray(norms[a0:a1], dtype=np.float32)
            if not np.all(np.isfinite(nrm)) or float(nrm.min(initial=0.0)) < 0:
                raise IntegrityError("norms must be finite and >= 0", path=str(loaded.comp.path),
                                     tensor=nname)
            x = q.decode(codes.reshape(a1 - a0, bpv), nrm)[v0 - a0:v1 - a0]
            if mean is not None:
                x += mean[bi, hi_]
            out[bi, hi_, lo - t0:hi - t0] = x
    return out


def _region(loaded: Loaded, name: str, dtype) -> np.ndarray:
    """A stored array as a flat read-only memory map (only the touched pages are read)."""
    header = loaded.comp.header
    if name not in header.tensors:
        raise IntegrityError("missing stored array", path=str(loaded.comp.path), tensor=name)
    info = header.tensors[name]
    dt = np.dtype(dtype) if dtype is not None else stfile.numpy_dtype_for(info.dtype)
    if info.n_bytes % dt.itemsize:
        raise IntegrityError(f"{info.n_bytes} bytes is not a whole number of {dt} values",
                             path=str(loaded.comp.path), tensor=name)
    return np.memmap(header.path, dtype=dt.newbyteorder("<"), mode="r",
                     offset=header.data_start + info.begin, shape=(info.n_bytes // dt.itemsize,))


def decompress_slice(path, *, layers: str | None, tokens: str | None, output=None,
                     force: bool = False, progress: Progress | None = None) -> DecompressReport:
    """Write layers x tokens of every KV entry (and the matching queries) with a manifest.

    BLAS runs single-threaded, as in the full decode: a multi-threaded sgemm splits the rows
    differently and rounds differently, and the slice must equal the full decode bit for bit.
    """
    with threadpool_limits(1):
        return _decompress_slice(path, layers=layers, tokens=tokens, output=output,
                                 force=force, progress=progress)


def _decompress_slice(path, *, layers, tokens, output, force, progress) -> DecompressReport:
    progress = progress or Progress()
    path, out, out_manifest = restore_targets(path, output, force)
    loaded = load_verified(path, progress, verify_arrays=False)
    entries = loaded.manifest.entries
    n_layers = min(e.shape.layers for e in entries)
    n_tokens = min(e.shape.tokens for e in entries)
    lsel = parse_range(layers, n_layers, "--layers")
    tsel = parse_range(tokens, n_tokens, "--tokens")
    infos = loaded.doc["source"]["tensors"]
    plan = []  # (name, dtype, shape, producer)
    new_entries = []
    for i, entry in enumerate(entries):
        shape = replace(entry.shape, layers=len(lsel), tokens=len(tsel))
        st = SOURCE_DTYPES[entry.shape.dtype]
        if len(entry.tensors) == 1 and len(infos[entry.tensors[0]]["shape"]) == 5:
            name = entry.tensors[0]
            dims = (shape.batch, len(lsel), shape.kv_heads, len(tsel), shape.head_dim)
            plan.append((name, st, dims, _five_d(loaded, i, lsel, tsel, st)))
            names = (name,)
        else:
            names = tuple(entry.tensors[layer] for layer in lsel)
            perm = inverse_permutation(vectors_axes(entry.layout, 4))
            for layer, name in zip(lsel, names):
                dims = tuple(np.empty((shape.batch, shape.kv_heads, len(tsel), shape.head_dim),
                                      dtype=np.bool_).transpose(perm).shape)
                plan.append((name, st, dims, _four_d(loaded, i, layer, tsel, st, perm)))
        new_entries.append(ManifestEntry(shape=shape, tensors=names, layout=entry.layout))
    attention = loaded.manifest.attention
    if attention is not None:
        attention, query_plan = _query_slice(loaded, attention, lsel, tsel)
        plan += query_plan
    manifest = Manifest(entries=tuple(new_entries), attention=attention)
    specs = [(n, dt, dims) for n, dt, dims, _ in plan]
    progress.start(len(plan), "decoding the slice")

    def write_dump(tmp) -> list[dict]:
        rows = []
        with stfile.StreamWriter(tmp, specs, loaded.doc["source"]["metadata"]) as writer:
            for name, dt, dims, produce in plan:
                writer.write(name, produce())
                rows.append({"name": name, "dtype": dt, "shape": list(dims),
                             "kind": f"layers {lsel.start}:{lsel.stop}, tokens "
                                     f"{tsel.start}:{tsel.stop}"})
                progress.advance(name)
        return rows

    rows = commit_restored(out, out_manifest, manifest, force, write_dump)
    return DecompressReport(str(path), str(out), str(out_manifest), rows)


def _four_d(loaded, i, layer, tsel, st, perm):
    return lambda: from_float32(decode_slice(loaded, i, layer, tsel.start, tsel.stop),
                                st).transpose(perm)


def _five_d(loaded, i, lsel, tsel, st):
    def produce():
        parts = [from_float32(decode_slice(loaded, i, layer, tsel.start, tsel.stop), st)
                 for layer in lsel]
        return np.stack(parts, axis=1)
    return produce


def _query_slice(loaded: Loaded, attention: AttentionSpec, lsel: range, tsel: range):
    """The query tensors of the selected layers, cut to the selected tokens."""
    header = loaded.comp.header
    layout = loaded.manifest.entries[0].layout
    names = attention.query_tensors
    plan = []
    if len(names) == 1 and len(header.tensors[raw_name(names[0])].shape) == 5:
        info = header.tensors[raw_name(names[0])]
        dims = (info.shape[0], len(lsel), info.shape[2], len(tsel), info.shape[4])
        index = (slice(None), slice(lsel.start, lsel.stop), slice(None),
                 slice(tsel.start, tsel.stop))
        plan.append((names[0], info.dtype, dims,
                     lambda: stfile.read_tensor(header, raw_name(names[0]), index=index)))
        return attention, plan
    token_axis = 2 if layout == "bhtd" else 1
    kept = []
    for layer in lsel:
        name = names[layer]
        info = header.tensors[raw_name(name)]
        dims = list(info.shape)
        dims[token_axis] = len(tsel)
        index = tuple(slice(tsel.start, tsel.stop) if a == token_axis else slice(None)
                      for a in range(4))
        plan.append((name, info.dtype, tuple(dims),
                     lambda name=name, index=index: stfile.read_tensor(header, raw_name(name),
                                                                       index=index)))
        kept.append(name)
    return AttentionSpec(query_tensors=tuple(kept), causal=attention.causal), plan
