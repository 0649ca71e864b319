"""compress: a KV dump -> one self-contained compressed file, streamed with bounded memory.

Two passes over the dump, one layer in memory at a time:

1. a pre-pass reads every KV layer once: it checks values are finite (before anything is
   written), sizes each layer's norms (fp16, or f32 when a norm would overflow fp16), and
   digests every KV source tensor;
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
from threadpoolctl import threadpool_limits

from fibquant_cli import __version__, codecs
from fibquant_cli.codecs.fibquant import FP16_MAX, FP16_TINY, EncodedLayer, LayerPlan, norms_dtype
from fibquant_cli.core.codec import FibQuantizer
from fibquant_cli.core.params import Profile
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import container, dtypes, stfile, untrusted
from fibquant_cli.formats.container import (
    PLACEHOLDER_DIGEST,
    BlockDigests,
    Document,
    EntryRecord,
    ProfileRecord,
    Source,
    SourceTensor,
    codebook_name,
    part_name,
    raw_name,
    rotation_name,
)
from fibquant_cli.formats.digest import (
    block_digests,
    codebook_digest,
    file_digest,
    profile_digest,
    rotation_digest,
    tensor_digest,
    tensor_digest_of_chunks,
)
from fibquant_cli.formats.kvdump import (
    Dump,
    check_finite,
    default_compressed_path,
    open_dump,
    read_layer,
)
from fibquant_cli.formats.kvlayout import entry_layer_views
from fibquant_cli.ops.compress_report import CompressReport, compress_report
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.reader import open_verified, reconstructor
from fibquant_cli.ops.spec import CompressSpec
from fibquant_cli.ops.threads import in_order
from fibquant_cli.storage.codebook_cache import quantizer_for, training_note
from fibquant_cli.storage.publish import output_path, publishing
from fibquant_cli.storage.stwriter import StreamWriter

# Below this much KV data the encoder threads cost more than they save.
AUTO_JOBS_MIN_BYTES = 16 * 2**20


def compress(source, *, manifest=None, output=None, spec: CompressSpec | None = None,
             compare: bool = False, force: bool = False, attention: bool = True,
             max_queries: int | None = None, jobs: int = 0,
             progress: Progress | None = None, encoder=None,
             own_basis: str = "never") -> CompressReport:
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
    ``always`` does so unmeasured, ``never`` (the default here; ``fibquant compress``'s is
    auto) keeps the per-vector codec (``ops/own_basis``).
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
            threadpool_limits(1):
        jobs = jobs or auto_jobs(dump)
        if attention:
            check_queries_finite(dump, None if max_queries else scored_layers(dump))
        basis = decision = planned = None
        if spec.basis is None and own_basis != "never":
            from fibquant_cli.ops.own_basis import decide

            decision, planned, basis = decide(dump, spec, own_basis, progress, jobs)
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


def per_vector_bytes(dump: Dump, spec: CompressSpec, progress: Progress) -> int:
    """The size of the file ``_write`` makes of ``dump`` with ``spec``, without encoding (norms
    taken as fp16: a file with an f32 norms layer is a few bytes larger)."""
    quantizers = make_quantizers(entry_profiles(dump, spec), progress)
    doc = document(dump, quantizers, {}, spec)
    specs = doc.expected_layout({})
    n_bytes = {name: stfile.tensor_n_bytes(dtype, dims) for name, dtype, dims in specs}
    blocks = {name: BlockDigests(size, (PLACEHOLDER_DIGEST,) * -(-n_bytes[name] // size))
              for name, size in doc.expected_blocks(specs).items()}
    metadata = container.metadata_for(dataclasses.replace(
        doc, arrays={name: PLACEHOLDER_DIGEST for name in n_bytes}, blocks=blocks))
    header = stfile.header_bytes(stfile.plan_layout(specs, "<planned>"), metadata, "<planned>")
    return len(header) + sum(n_bytes.values())


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


@dataclasses.dataclass
class TransformPlan:
    """A transform-coded file planned but not yet written: its document, widths and the
    matrices with their statistics (``prepare_transform``)."""

    doc: Document
    mats: list
    widths: list
    tables: object  # core.transform.Tables


def prepare_transform(dump: Dump, spec: CompressSpec, basis, progress: Progress, jobs: int = 1,
                      *, target: float | None = None, kv_digests: dict | None = None,
                      own: bool = False) -> TransformPlan:
    """Check, gather statistics and allocate for a file of at most ``target`` bytes (default:
    what ``spec`` asks for); ``own``: ``basis`` was fitted on ``dump`` (embedded)."""
    from fibquant_cli.core import transform as T
    from fibquant_cli.ops import transform as tc

    roles = tc.check_basis(dump, basis)
    kv_digests = kv_digests or check_and_digest(dump, progress, jobs=jobs)
    tab = T.tables()
    mats = tc.matrices(dump, basis, roles, spec, tab, own)
    tc.gather_stats(dump, mats, progress, jobs)
    base = Document(container.TRANSFORM_SINCE, f"fibquant {__version__}",
                    source_record(dump, kv_digests), dump.manifest, (), (), {})
    if target is None:
        target = tc.target_bytes(dump, spec, tc.raw_bytes(dump))
    _, doc, widths = tc.plan(dump, base, mats, basis, spec, roles, target, progress, own)
    return TransformPlan(doc, mats, widths, tab)


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


def entry_profiles(dump: Dump, spec: CompressSpec) -> list[Profile]:
    profiles = []
    for entry in dump.manifest.entries:
        k, n = spec.point(entry.shape.role)
        d = entry.shape.head_dim
        if k >= d or d % k:
            option = spec.options(entry.shape.role)[0]
            raise UsageError(f"{{{option}}} gives block_dim {k}, which must divide the head_dim "
                             f"{d} of this tensor and be smaller", path=str(dump.path),
                             tensor=entry.tensors[0], options=(option,))
        profiles.append(Profile(entry.shape.head_dim, k, n, spec.seed))
    return profiles


def make_quantizers(profiles, progress: Progress) -> dict[Profile, FibQuantizer]:
    quantizers = {}
    for p in dict.fromkeys(profiles):
        progress.advance(f"codebook d={p.head_dim} k={p.block_dim} N={p.size}")
        note = training_note(p)
        if note is not None:
            progress.note(note)
        quantizers[p] = quantizer_for(p)
    return quantizers


def check_and_digest(dump: Dump, progress: Progress, also=None, jobs: int = 1) -> dict[str, str]:
    """One read of every KV tensor: its digest and a NaN/Inf check (naming the position);
    ``also(name, info, raw, largest |value|)`` sees each tensor's bytes while they are in
    memory, in the reading thread. ``jobs`` threads read and digest tensors side by side (all
    of it before a single byte is written, so it is wall time); errors come in file order."""
    digests = {}
    progress.start(len(dump.kv_names), "checking")

    def one(name: str):
        info = dump.header.tensors[name]
        raw = stfile.read_raw(dump.header, name)
        top = largest_magnitude(raw, info.dtype)
        if np.isfinite(top) and also is not None:
            also(name, info, raw, top)
        return name, info, raw, tensor_digest(info.dtype, info.shape, raw), top

    names = [name for name in dump.header.tensors if name in dump.kv_names]
    for name, info, raw, digest, top in in_order(one, names, jobs, "fibquant-check"):
        digests[name] = digest
        if not np.isfinite(top):
            arr = np.frombuffer(raw, dtype=info.numpy_dtype.newbyteorder("<"))
            check_finite(dump.header, name, arr.reshape(info.shape))  # names the position
        progress.advance(name)
    return digests


def prepass(dump: Dump, spec: CompressSpec, progress: Progress, jobs: int = 1):
    """One read of every KV tensor: its digest, a NaN/Inf check, and a plan per layer.

    Returns (plans, KV source digests). Nothing is written before this has passed, so bad
    values never leave a partial output. A layer's norms are stored in f32 only when fp16
    cannot hold one (``codecs.fibquant.norms_dtype``); cheap bounds from the tensor's values
    settle it for uncentered layers of ordinary magnitude, the others compute the norms.
    """
    amax, amin_rows = {}, {}

    def bounds(name, info, raw, top):
        amax[name] = top
        amin_rows[name] = smallest_row_magnitude(raw, info.dtype, info.shape[-1])

    digests = check_and_digest(dump, progress, bounds, jobs)
    plans = []
    for i, entry in enumerate(dump.manifest.entries):
        center = spec.center_keys and entry.shape.role == "key"
        views = entry_layer_views(entry)
        kf = min(spec.keep_first, entry.shape.tokens)
        kl = min(spec.keep_last, entry.shape.tokens - kf)
        for layer in range(entry.shape.layers):
            name = views[layer][0]
            bound = amax[name] * np.sqrt(entry.shape.head_dim) * (2.0 if center else 1.0)
            # A norm is >= its row's largest |component|, so when every non-zero row has one
            # >= fp16's smallest normal, fp16 holds the norms at full precision. Centered
            # residuals may still be smaller, but then fp16's absolute error (<= 2^-25) is
            # below the source's own rounding at that magnitude: only tiny values need the
            # exact pass.
            small = amin_rows[name] < FP16_TINY
            dtype = "F16"
            if bound > FP16_MAX or small:
                try:
                    dtype = norms_dtype(read_layer(dump, entry, layer), center, kf, kl)
                except InvalidInputError as err:
                    raise err.at(path=str(dump.path), tensor=name,
                                 field=f"layer {layer}" if views[layer][1] is not None
                                 else None) from None
            plans.append(LayerPlan(i, layer, kf, kl, center, dtype))
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
    value = np.array([top], dtype=view).view(dtypes.numpy_dtype_for(st_dtype).newbyteorder("<"))
    return float(value[0])


def smallest_row_magnitude(raw: bytes, st_dtype: str, head_dim: int) -> float:
    """The smallest non-zero max |x| over the vectors (rows of ``head_dim``) of a float
    tensor's bytes (inf when every row is zero): a lower bound on their non-zero norms."""
    view, mask = _MAGNITUDE_BITS[st_dtype]
    bits = np.bitwise_and(np.frombuffer(raw, dtype=view), mask)
    if not bits.size:
        return float("inf")
    rows = bits.reshape(-1, head_dim).max(axis=1)
    rows = rows[rows > 0]
    if not rows.size:
        return float("inf")
    value = np.array([rows.min()], dtype=view).view(
        dtypes.numpy_dtype_for(st_dtype).newbyteorder("<"))
    return float(value[0])


def source_record(dump: Dump, kv_digests: dict) -> Source:
    """The dump as the document records it; pass-through digests are filled in as they are
    copied (``copy_passthrough``)."""
    return Source(
        file=dump.path.name, file_digest=PLACEHOLDER_DIGEST,
        tensor_order=tuple(dump.header.tensors), metadata=dump.header.metadata,
        tensors={name: SourceTensor(info.dtype, info.shape,
                                    kv_digests.get(name, PLACEHOLDER_DIGEST))
                 for name, info in dump.header.tensors.items()})


def document(dump: Dump, quantizers, kv_digests: dict, spec: CompressSpec) -> Document:
    """The document, with placeholders for the digests computed while writing."""
    distinct = list(quantizers)
    source = source_record(dump, kv_digests)
    entries = tuple(
        EntryRecord(codec="fibquant",
                    profile=distinct.index(Profile(entry.shape.head_dim,
                                                   *spec.point(entry.shape.role), spec.seed)),
                    layers=entry.shape.layers,
                    vectors_per_layer=entry.shape.vector_count // entry.shape.layers,
                    keep_first=spec.keep_first, keep_last=spec.keep_last,
                    center=spec.center_keys and entry.shape.role == "key")
        for entry in dump.manifest.entries)
    profiles = tuple(ProfileRecord(p, profile_digest(p), codebook_digest(q.codebook),
                                   rotation_digest(q.rotation)) for p, q in quantizers.items())
    return Document(container.PER_VECTOR_VERSION, f"fibquant {__version__}", source, dump.manifest,
                    profiles, entries, {})


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


def check_queries_finite(dump: Dump, layers: list[int] | None = None) -> None:
    """Queries are passed through, but attention fidelity reads them: refuse NaN/Inf early,
    in the query tensors of ``layers`` (all when None), the ones the scoring will read.

    The bit-pattern maximum (``largest_magnitude``) settles it without float16 arithmetic,
    which numpy emulates slowly (it cost a sixth of compress on a 236 MB dump); only a tensor
    that fails it is read as floats, to name the position.
    """
    if dump.manifest.attention is not None:
        names = dump.manifest.attention.query_tensors
        if layers is not None and len(names) > 1:  # per-layer tensors: only the scored ones
            names = [names[i] for i in layers]
        for name in names:
            info = dump.header.tensors[name]
            if not np.isfinite(largest_magnitude(stfile.read_raw(dump.header, name), info.dtype)):
                check_finite(dump.header, name, stfile.read_tensor(dump.header, name))


def _array_digest(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return tensor_digest(dtypes.st_dtype_for(arr.dtype), arr.shape, arr)

