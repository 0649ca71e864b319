"""What compress will write, before it writes a byte: the checks of the pre-pass (finite
values, source digests), the per-vector codec's profiles, quantizers, document and exact file
size, and the transform codec's plan (statistics and one allocation for the whole file).

``ops/compress`` writes files from these; ``ops/own_basis`` sizes and plans the candidates it
compares with them, without writing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fibquant_cli import __version__
from fibquant_cli.codecs.fibquant import FP16_MAX, FP16_TINY, LayerPlan, norms_dtype
from fibquant_cli.core.codec import FibQuantizer
from fibquant_cli.core.params import Profile
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import container, dtypes, stfile
from fibquant_cli.formats.container import (
    PLACEHOLDER_DIGEST,
    BlockDigests,
    Document,
    EntryRecord,
    ProfileRecord,
    Source,
    SourceTensor,
)
from fibquant_cli.formats.digest import (
    codebook_digest,
    profile_digest,
    rotation_digest,
    tensor_digest,
)
from fibquant_cli.formats.kvdump import (
    Dump,
    check_finite,
    read_layer,
)
from fibquant_cli.formats.kvlayout import entry_layer_views
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.spec import CompressSpec
from fibquant_cli.ops.threads import in_order
from fibquant_cli.storage.codebook_cache import quantizer_for, training_note


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


def entry_profiles(dump: Dump, spec: CompressSpec) -> list[Profile]:
    profiles = []
    for entry in dump.manifest.entries:
        check_block_dim(spec, entry.shape.role, entry.shape.head_dim, str(dump.path),
                        "this tensor", entry.tensors[0])
        k, n = spec.point(entry.shape.role)
        profiles.append(Profile(entry.shape.head_dim, k, n, spec.seed))
    return profiles


def check_block_dim(spec: CompressSpec, role: str, head_dim: int, where: str, owner: str,
                    tensor: str | None = None) -> None:
    """Refuse a per-vector block length for ``role`` that does not divide ``head_dim`` (of
    ``owner``: a tensor, a model) or is not smaller."""
    k = spec.point(role)[0]
    if k >= head_dim or head_dim % k:
        option = spec.options(role)[0]
        raise UsageError(f"{{{option}}} gives block_dim {k}, which must divide the head_dim "
                         f"{head_dim} of {owner} and be smaller", path=where, tensor=tensor,
                         options=(option,))


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
