"""compress: a KV dump -> one self-contained compressed file, streamed with bounded memory.

Two passes over the dump, one layer in memory at a time:

1. a pre-pass (``compress_plan.prepass``) reads every KV layer once: it checks values are
   finite (before anything is written), sizes each layer's norms (fp16, or f32 when a norm
   would overflow fp16), and digests every KV source tensor;
2. the encode pass streams the arrays into the output in the container's order. The header is
   written first with placeholder digests of the final length, then rewritten in place with
   the real ones (``StreamWriter.replace_metadata``), so nothing but one layer is ever held.

Layers are independent, so ``jobs > 1`` encodes them in threads (numpy releases the GIL in the
heavy parts), while the calling thread writes the results in order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from fibquant_cli import codecs
from fibquant_cli.codecs.fibquant import EncodedLayer, LayerPlan
from fibquant_cli.errors import UsageError
from fibquant_cli.formats import container, dtypes, stfile, untrusted
from fibquant_cli.formats.container import (
    PLACEHOLDER_DIGEST,
    BlockDigests,
    Source,
    codebook_name,
    part_name,
    raw_name,
    rotation_name,
)
from fibquant_cli.formats.digest import (
    block_digests,
    file_digest,
    tensor_digest,
    tensor_digest_of_chunks,
)
from fibquant_cli.formats.kvdump import (
    Dump,
    default_compressed_path,
    open_dump,
    read_layer,
)
from fibquant_cli.ops.compress_plan import (
    TransformPlan,
    check_queries_finite,
    document,
    entry_profiles,
    make_quantizers,
    prepare_transform,
    prepass,
)
from fibquant_cli.ops.compress_report import CompressReport, compress_report
from fibquant_cli.ops.process import one_blas_thread
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.reader import open_verified, reconstructor
from fibquant_cli.ops.spec import CompressSpec
from fibquant_cli.ops.threads import in_order
from fibquant_cli.storage.publish import output_path, publishing
from fibquant_cli.storage.stwriter import StreamWriter

# Below this much KV data the encoder threads cost more than they save.
AUTO_JOBS_MIN_BYTES = 16 * 2**20


def compress(source, *, manifest=None, output=None, spec: CompressSpec | None = None,
             compare: bool = False, force: bool = False, attention: bool = True,
             max_queries: int | None = None, jobs: int = 0,
             progress: Progress | None = None, encoder=None,
             own_basis: str | None = None) -> CompressReport:
    """Compress a KV dump into one self-contained ``.fq.safetensors`` file.

    ``source`` is a dump's path, or a ``Dump`` already open (``kvdump.dump_of_arrays``: arrays
    held in memory, which need an ``output``; ``manifest`` is then part of the ``Dump``).
    ``jobs`` = 0 picks the number of encoder threads from the dump's size; 1 encodes here.
    BLAS runs single-threaded: the encoder's matmuls are skinny ((m, k) x (k, N)), for which
    OpenBLAS threads cost more than they give (2.3x slower measured on 2 cores); the cores are
    used by the encoder threads instead.

    ``encoder`` replaces ``encoded_layers`` (same arguments, same EncodedLayers in plan order):
    ``ops.batch`` hands the layer ranges of a large dump to other workers with it. Whoever
    encodes, the file is written here, so its bytes are the same.

    ``own_basis`` (without ``spec.basis``): ``auto`` transform-codes the dump against a basis
    fitted on itself and embedded when that measures better at the per-vector file's size,
    ``always`` does so unmeasured, ``never`` keeps the per-vector codec (``ops/own_basis``).
    None (the default here; ``fibquant compress``'s is auto): never, unless ``spec`` sizes the
    transform codec without a basis file (``own_transform``: always, at that size).
    """
    from fibquant_cli.ops.own_basis import check_mode
    start = time.perf_counter()
    progress = progress or Progress()
    spec = spec or CompressSpec()
    if jobs < 0:
        raise UsageError(f"{{jobs}} must be >= 0, got {jobs}", options=("jobs",))
    check_mode(own_basis, spec)
    in_memory = isinstance(source, Dump)
    source = source if in_memory else untrusted.input_path(source)
    out = output_path(output) if output is not None else None
    if in_memory:
        if out is None:
            raise UsageError("arrays held in memory need an {output} path", options=("output",))
        dump, inputs = source, {}
    else:
        dump = open_dump(source, manifest)
        out = out or default_compressed_path(source)
        inputs = {source: "input file", dump.manifest_path: "manifest file"}
        if spec.basis is not None:
            inputs[Path(spec.basis)] = "basis file"
    with publishing([out], force=force, inputs=inputs) as (tmp,), \
            one_blas_thread():
        jobs = jobs or auto_jobs(dump)
        if attention:
            check_queries_finite(dump, None if max_queries else scored_layers(dump))
        basis = decision = planned = None
        mode = "always" if spec.own_transform else own_basis or "never"  # a size was asked
        if spec.basis is None and mode != "never":
            from fibquant_cli.ops.own_basis import decide

            decision, planned, basis = decide(dump, spec, mode, progress, jobs)
        if spec.basis is not None:
            from fibquant_cli.formats.basis import load_basis

            basis = load_basis(spec.basis)
            rep = _write_transform(dump, tmp, out, spec, basis, progress, jobs)
        elif planned is not None:
            rep = _write_transform(dump, tmp, out, spec, basis, progress, jobs, planned)
        else:
            rep = _write(dump, tmp, out, spec, compare, jobs, progress, encoder or encoded_layers)
        rep.spec, rep.jobs = spec.to_json(), jobs
        rep.own_basis = None if decision is None else decision.to_json()
        if attention:
            from fibquant_cli.ops.fidelity import DEFAULT_LAYER_SAMPLE, DEFAULT_QUERY_SAMPLE, measure

            progress.start(1, "attention fidelity")
            # Decoded from the file just written; its array digests were computed moments ago
            # from the same bytes, so hashing them again would only repeat that work.
            written = open_verified(tmp, verify_arrays=False,
                                    basis=None if spec.embed_basis or planned else basis)
            # Default: a sample of query positions over the whole context (bounded cost);
            # max_queries: the last N positions (N >= tokens scores every one).
            if max_queries:
                rep.attention = measure(dump, reconstructor(written), max_queries=max_queries)
            else:
                rep.attention = measure(dump, reconstructor(written),
                                        sample=DEFAULT_QUERY_SAMPLE, layers=DEFAULT_LAYER_SAMPLE)
    rep.seconds = time.perf_counter() - start
    return rep


def _write(dump: Dump, tmp: Path, out: Path, spec: CompressSpec, compare: bool, jobs: int,
           progress: Progress, encoder) -> CompressReport:
    """Encode ``dump`` into the file ``tmp``; the report (sizes and errors)."""
    profiles = entry_profiles(dump, spec)
    quantizers = make_quantizers(profiles, progress)
    plans, kv_digests = prepass(dump, spec, progress, jobs)
    doc = document(dump, quantizers, kv_digests, spec)
    norms_dtypes = {part_name(p.entry, p.layer, "norms"): p.norms_dtype for p in plans}
    specs = doc.expected_layout(norms_dtypes)
    digests = {name: PLACEHOLDER_DIGEST for name, _, _ in specs}
    n_bytes = {name: stfile.tensor_n_bytes(dtype, dims) for name, dtype, dims in specs}
    blocks = {name: BlockDigests(size, (PLACEHOLDER_DIGEST,) * -(-n_bytes[name] // size))
              for name, size in doc.expected_blocks(specs).items()}
    runs: dict[int, list[EncodedLayer]] = {}
    metadata = container.metadata_for(dataclasses.replace(doc, arrays=digests, blocks=blocks))
    with StreamWriter(tmp, specs, metadata, publish=False) as w:
        for j, q in enumerate(quantizers.values()):
            for name, arr in ((codebook_name(j), q.codebook), (rotation_name(j), q.rotation)):
                w.write(name, arr)
                digests[name] = _array_digest(arr)
        progress.start(len(plans), f"compressing ({jobs} job{'s' if jobs > 1 else ''})")
        for result in encoder(dump, quantizers, profiles, plans, compare, jobs):
            plan = result.plan
            for part, arr in result.parts.items():
                name = part_name(plan.entry, plan.layer, part)
                w.write(name, arr)
                digests[name] = _array_digest(arr)
                if name in blocks:
                    blocks[name] = BlockDigests(blocks[name].block_bytes, tuple(block_digests(
                        np.ascontiguousarray(arr).reshape(-1).view(np.uint8),
                        blocks[name].block_bytes)))
            result.parts = {}  # written: keep only the statistics
            runs.setdefault(plan.entry, []).append(result)
            progress.advance(f"entry {plan.entry} layer {plan.layer}")
        final_source = copy_passthrough(w, dump, doc.source, digests)
        w.replace_metadata(container.metadata_for(
            dataclasses.replace(doc, source=final_source, arrays=digests, blocks=blocks)))
        n_bytes = {info.name: info.n_bytes for info in w.layout}
    return compress_report(dump, out, tmp.stat().st_size, n_bytes, quantizers, profiles, runs)


def copy_passthrough(w: StreamWriter, dump: Dump, source: Source, digests: dict) -> Source:
    """Stream every tensor no entry compresses, bit-exact, hashing it as it is written; the
    source record with their digests and the file digest filled in."""
    source_tensors = dict(source.tensors)
    for name in dump.passthrough_names:
        info = dump.header.tensors[name]

        def copied(name=name):
            for piece in stfile.iter_raw(dump.header, name):
                w.write(raw_name(name), piece)
                yield piece

        digests[raw_name(name)] = tensor_digest_of_chunks(info.dtype, info.shape, copied())
        source_tensors[name] = dataclasses.replace(source_tensors[name],
                                                   digest=digests[raw_name(name)])
    return dataclasses.replace(
        source, tensors=source_tensors,
        file_digest=file_digest({n: t.digest for n, t in source_tensors.items()}))


def _write_transform(dump: Dump, tmp: Path, out: Path, spec: CompressSpec, basis,
                     progress: Progress, jobs: int = 1,
                     planned: TransformPlan | None = None) -> CompressReport:
    """Transform-code ``dump`` against ``basis`` into ``tmp`` (ops/transform has the passes)."""
    from fibquant_cli.ops import transform as tc

    p = planned or prepare_transform(dump, spec, basis, progress, jobs)
    specs = p.doc.expected_layout(tc.stats_dtypes(p.mats))
    digests = {name: PLACEHOLDER_DIGEST for name, _, _ in specs}
    metadata = container.metadata_for(dataclasses.replace(p.doc, arrays=digests))
    with StreamWriter(tmp, specs, metadata, publish=False) as w:
        for name, arr in tc.shared_arrays(p.doc, p.mats, p.tables):
            w.write(name, arr)
            digests[name] = _array_digest(arr)
        accs = tc.encode_all(dump, p.mats, p.widths, w, digests, progress, _array_digest, jobs)
        final_source = copy_passthrough(w, dump, p.doc.source, digests)
        w.replace_metadata(container.metadata_for(
            dataclasses.replace(p.doc, source=final_source, arrays=digests)))
        n_bytes = {info.name: info.n_bytes for info in w.layout}
    return tc.report(dump, out, tmp.stat().st_size, n_bytes, accs, p.mats, p.widths)


# --------------------------------------------------------------------------- planning


# --------------------------------------------------------------------------- encoding


def encoded_layers(dump: Dump, quantizers, profiles, plans, compare: bool, jobs: int):
    """Yield EncodedLayers in plan order, computed here or by ``jobs`` threads
    (``ops/threads.in_order``: at most 2 * jobs layers in flight)."""
    codec = codecs.get("fibquant")

    def encode(plan: LayerPlan) -> EncodedLayer:
        entry = dump.manifest.entries[plan.entry]
        arr = read_layer(dump, entry, plan.layer, check=False)  # the pre-pass checked it
        return codec.encode_layer(quantizers[profiles[plan.entry]], arr, plan, compare)

    yield from in_order(encode, plans, jobs if len(plans) >= 2 else 1, "fibquant-encode")


def auto_jobs(dump: Dump) -> int:
    kv_bytes = sum(dump.header.tensors[n].n_bytes for n in dump.kv_names)
    return min(os.cpu_count() or 1, 4) if kv_bytes >= AUTO_JOBS_MIN_BYTES else 1


def scored_layers(dump: Dump) -> list[int] | None:
    """The layers compress's default attention scoring reads (``fidelity.sample_layers``)."""
    from fibquant_cli.ops.fidelity import DEFAULT_LAYER_SAMPLE, kv_entries, sample_layers

    pair = kv_entries(dump)
    if pair is None:
        return None
    return sample_layers(dump.manifest.entries[pair[0]].shape.layers, DEFAULT_LAYER_SAMPLE)


def _array_digest(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return tensor_digest(dtypes.st_dtype_for(arr.dtype), arr.shape, arr)

