"""decompress: a compressed file -> the dump it was made from, every tensor, and its manifest.

KV tensors are rebuilt by their codecs; every other tensor is copied bit-exactly. Each stored
array is checked against its digest as it is read, anything never read is checked at the end,
and any failure leaves no output (``storage.publish``).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.errors import IntegrityError, UsageError
from fibquant_cli.formats import dtypes, stfile, untrusted
from fibquant_cli.formats.container import raw_name
from fibquant_cli.formats.digest import tensor_digest
from fibquant_cli.formats.kvlayout import entry_layer_views, vectors_axes
from fibquant_cli.formats.manifest import manifest_path_for, save_manifest
from fibquant_cli.ops.process import one_blas_thread
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.reader import Opened, open_verified, restore_layer, verify_unread
from fibquant_cli.storage.publish import output_path, publishing
from fibquant_cli.storage.stwriter import StreamWriter

DECODE_THREADS = 2
# Small tensors go to the decode threads in batches of about this many output bytes: one
# hand-off per batch instead of per tensor (a dump of many small layers scaled poorly).
DECODE_BATCH_BYTES = 1 << 20
LOOKAHEAD_BYTES = 16 << 20


@dataclass(frozen=True)
class DecompressReport:
    source: str
    output: str
    manifest_output: str
    tensors: list[dict]

    def to_json(self) -> dict:
        return asdict(self)


def default_restored_path(compressed: Path) -> Path:
    name = compressed.name
    for suffix in (".fq.safetensors", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return compressed.with_name(name + ".restored.safetensors")


def restored_outputs(path, output) -> tuple[Path, Path, Path]:
    """(compressed file, output dump, its manifest) of a decompress or a slice."""
    path = untrusted.input_path(path)
    out = output_path(output) if output is not None else default_restored_path(path)
    return path, out, manifest_path_for(out)


def inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def restore_tensor(opened: Opened, name: str, where_kv: dict) -> np.ndarray:
    """Rebuild KV tensor ``name`` in its stored layout and dtype."""
    i, views = where_kv[name]
    entry = opened.manifest.entries[i]
    info = opened.doc.source.tensors[name]
    perm = inverse_permutation(vectors_axes(entry.layout, 4))
    if len(views) == 1 and views[0][1] is None and len(info.shape) == 4 and perm == (0, 1, 2, 3):
        return restore_layer(opened, i, views[0][0])  # written in place, no copy
    out = np.empty(info.shape, dtype=dtypes.numpy_dtype_for(info.dtype))
    for layer, index in views:
        x = restore_layer(opened, i, layer)
        if index is None and out.ndim == 5:
            out[:, 0] = x
        elif index is None:
            out[...] = x.transpose(perm)
        else:
            out[:, index] = x
    return out


def kv_views(opened: Opened) -> dict[str, tuple[int, list]]:
    """KV source tensor name -> (entry, [(layer, index in the tensor or None), ...])."""
    where_kv: dict[str, tuple[int, list]] = {}
    for i, entry in enumerate(opened.manifest.entries):
        for layer, (name, index) in enumerate(entry_layer_views(entry)):
            where_kv.setdefault(name, (i, []))[1].append((layer, index))
    return where_kv


def restore_source_tensor(opened: Opened, name: str, where_kv: dict):
    """Source tensor ``name`` as decompress writes it, and how: a KV tensor rebuilt by its
    codec (an array), any other copied (its bytes, checked against both digests)."""
    if name in where_kv:
        return restore_tensor(opened, name, where_kv), "restored"
    raw = stfile.read_raw(opened.comp.header, raw_name(name))
    info = opened.doc.source.tensors[name]
    found = tensor_digest(info.dtype, info.shape, raw)
    # The copy must match both its stored-array digest and the source tensor's digest.
    if found != opened.doc.arrays[raw_name(name)] or found != info.digest:
        raise IntegrityError("digest mismatch (stored bytes were altered)",
                             path=str(opened.path), tensor=raw_name(name))
    opened.verified.add(raw_name(name))
    return raw, "pass-through (bit-exact)"


def basis_input(basis) -> dict:
    """The basis file as an input no output may overwrite (nothing for a loaded basis)."""
    return {Path(basis): "basis file"} if isinstance(basis, (str, Path)) else {}


def decompress(path, *, output=None, force: bool = False, progress: Progress | None = None,
               jobs: int = 0, basis=None) -> DecompressReport:
    """Verify every digest, then restore every tensor (name, shape, dtype) and the manifest.

    ``jobs`` decode threads; 0 picks ``DECODE_THREADS`` (fewer on a one-core machine).
    ``basis``: the basis file a transform-coded file needs (unless it embeds its own).
    """
    if jobs < 0:
        raise UsageError(f"{{jobs}} must be >= 0, got {jobs}", options=("jobs",))
    jobs = jobs or min(DECODE_THREADS, os.cpu_count() or 1)
    progress = progress or Progress()
    path, out, out_manifest = restored_outputs(path, output)
    inputs = {path: "input file", **basis_input(basis)}
    with publishing([out, out_manifest], force=force, inputs=inputs) as (tmp, tmp_manifest), \
            one_blas_thread():  # small matmuls: BLAS threads only add hand-off cost
        # Arrays are verified as the decode threads read them: each is read once, not twice.
        opened = open_verified(path, progress, verify_on_read=True, basis=basis)
        progress.start(len(opened.doc.source.tensor_order), "restoring")
        rows = _restore_into(tmp, opened, progress, jobs)
        save_manifest(opened.manifest, tmp_manifest)
    return DecompressReport(str(path), str(out), str(out_manifest), rows)


def _restore_into(tmp: Path, opened: Opened, progress: Progress, jobs: int) -> list[dict]:
    """Write every original tensor, in the original order, into the file ``tmp``; its rows.

    KV tensors are decoded by ``jobs`` threads (numpy releases the GIL in the decode), at most
    ``2 * jobs`` batches ahead of the writer, so memory stays bounded.
    """
    source = opened.doc.source
    specs = [(n, source.tensors[n].dtype, source.tensors[n].shape) for n in source.tensor_order]
    where_kv = kv_views(opened)
    rows: list[dict] = []

    def produce(name: str):
        return restore_source_tensor(opened, name, where_kv)

    with StreamWriter(tmp, specs, source.metadata, publish=False) as writer, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: deque = deque()

        def write_oldest() -> int:
            names, future, size = pending.popleft()
            for done_name, (data, kind) in zip(names, future.result()):
                writer.write(done_name, data)
                info = source.tensors[done_name]
                rows.append({"name": done_name, "dtype": info.dtype, "shape": list(info.shape),
                             "kind": kind})
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
        verify_unread(opened)
    return rows


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
