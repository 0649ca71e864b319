"""Random access: decode a range of layers and tokens, reading only the bytes around them.

Codes are fixed-width, so vector (b, h, t) of a layer starts at a fixed bit of that layer's
stream (``codecs.fibquant``); only the decode blocks around the selected runs are read (aligned
as the full decode aligns them, so the values are bit-identical to it). Everything read is
verified before it is used: the header and document, the codebooks and rotations, each block
of codes and norms against its block digest (format 3; older files: the whole arrays), the
means, protected tokens and queries against their array digests (``reader.StoredPart``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fibquant_cli.core.layer import SOURCE_DTYPES, cast_clamped
from fibquant_cli.errors import IntegrityError, UsageError
from fibquant_cli.formats import dtypes
from fibquant_cli.formats.container import raw_name
from fibquant_cli.formats.kvlayout import vectors_axes
from fibquant_cli.formats.manifest import AttentionSpec, Manifest, ManifestEntry, save_manifest
from fibquant_cli.formats.stfile import label
from fibquant_cli.ops.decompress import (
    DecompressReport,
    basis_input,
    inverse_permutation,
    restored_outputs,
)
from fibquant_cli.ops.process import one_blas_thread
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.reader import Opened, StoredPart, open_verified
from fibquant_cli.storage.publish import publishing
from fibquant_cli.storage.stwriter import StreamWriter


def parse_range(text: str | None, n: int, option: str) -> range:
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
        raise UsageError(f"{{{option}}} {label(text, 40)!r} is not START:STOP or an index",
                         options=(option,)) from None
    if not 0 <= start < stop <= n:
        raise UsageError(f"{{{option}}} {label(text, 40)!r} is outside 0:{n} or empty", options=(option,))
    return range(start, stop)


def decode_slice(opened: Opened, i: int, layer: int, t0: int, t1: int) -> np.ndarray:
    """Tokens [t0, t1) of entry i, layer, as [batch, kv_heads, t1 - t0, head_dim] float32."""
    parts = {part: StoredPart(opened, name)
             for part, name in opened.stored_parts.get((i, layer), {}).items()}
    try:
        return opened.codec(i).decode_tokens(opened.context(i, layer), parts,
                                             opened.manifest.entries[i].shape,
                                             opened.doc.entries[i], t0, t1, opened.names(i, layer),
                                             layer)
    except IntegrityError as err:
        raise err.at(path=str(opened.path)) from None


def decompress_slice(path, *, layers: str | None, tokens: str | None, output=None,
                     force: bool = False, progress: Progress | None = None,
                     basis=None) -> DecompressReport:
    """Write layers x tokens of every KV entry (and the matching queries) with a manifest.

    BLAS runs single-threaded, as in the full decode: a multi-threaded sgemm splits the rows
    differently and rounds differently, and the slice must equal the full decode bit for bit.
    """
    progress = progress or Progress()
    path, out, out_manifest = restored_outputs(path, output)
    inputs = {path: "input file", **basis_input(basis)}
    with publishing([out, out_manifest], force=force, inputs=inputs) as (tmp, tmp_manifest), \
            one_blas_thread():
        loaded = open_verified(path, progress, verify_arrays=False, basis=basis)
        manifest, plan, lsel, tsel = _plan(loaded, layers, tokens)
        specs = [(n, dt, dims) for n, dt, dims, _ in plan]
        progress.start(len(plan), "decoding the slice")
        rows = []
        with StreamWriter(tmp, specs, loaded.doc.source.metadata, publish=False) as writer:
            for name, dt, dims, produce in plan:
                writer.write(name, produce())
                rows.append({"name": name, "dtype": dt, "shape": list(dims),
                             "kind": f"layers {lsel.start}:{lsel.stop}, tokens "
                                     f"{tsel.start}:{tsel.stop}"})
                progress.advance(name)
        save_manifest(manifest, tmp_manifest)
    return DecompressReport(str(path), str(out), str(out_manifest), rows)


def _plan(loaded: Opened, layers, tokens):
    """(sliced manifest, [(name, dtype, dims, produce)], layer range, token range)."""
    entries = loaded.manifest.entries
    n_layers = min(e.shape.layers for e in entries)
    n_tokens = min(e.shape.tokens for e in entries)
    lsel = parse_range(layers, n_layers, "layers")
    tsel = parse_range(tokens, n_tokens, "tokens")
    infos = loaded.doc.source.tensors
    plan = []  # (name, dtype, shape, producer)
    new_entries = []
    for i, entry in enumerate(entries):
        shape = replace(entry.shape, layers=len(lsel), tokens=len(tsel))
        st = SOURCE_DTYPES[entry.shape.dtype]
        if len(entry.tensors) == 1 and len(infos[entry.tensors[0]].shape) == 5:
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
    return manifest, plan, lsel, tsel


def _four_d(loaded, i, layer, tsel, st, perm):
    return lambda: cast_clamped(decode_slice(loaded, i, layer, tsel.start, tsel.stop),
                                numpy_dtype(st)).transpose(perm)


def _five_d(loaded, i, lsel, tsel, st):
    def produce():
        parts = [cast_clamped(decode_slice(loaded, i, layer, tsel.start, tsel.stop),
                              numpy_dtype(st))
                 for layer in lsel]
        return np.stack(parts, axis=1)
    return produce


def _query_slice(loaded: Opened, attention: AttentionSpec, lsel: range, tsel: range):
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
                     lambda: _query(loaded, names[0], index)))
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
                     lambda name=name, index=index: _query(loaded, name, index)))
        kept.append(name)
    return AttentionSpec(query_tensors=tuple(kept), causal=attention.causal), plan


def _query(loaded: Opened, name: str, index: tuple) -> np.ndarray:
    """A query tensor cut to ``index``, read and checked whole against its digest."""
    try:
        return np.ascontiguousarray(StoredPart(loaded, raw_name(name)).whole()[index])
    except IntegrityError as err:
        raise err.at(path=str(loaded.path)) from None


def numpy_dtype(st_dtype: str):
    return dtypes.numpy_dtype_for(st_dtype)


def tensor_slice(opened: Opened, i: int, name: str, layers: range, tokens: range) -> np.ndarray:
    """KV source tensor ``name`` of entry ``i`` cut to ``tokens`` (a 5-D tensor also to its
    ``layers``), in its stored layout and dtype: what the sliced decompress writes for it."""
    entry = opened.manifest.entries[i]
    st = SOURCE_DTYPES[entry.shape.dtype]
    if len(opened.doc.source.tensors[name].shape) == 5:
        return _five_d(opened, i, layers, tokens, st)()
    perm = inverse_permutation(vectors_axes(entry.layout, 4))
    return _four_d(opened, i, entry.tensors.index(name), tokens, st, perm)()
