"""The Python API: compress KV caches held in memory, and read compressed files back.

Example::

    from fibquant_cli import api as fq

    kv = {"layer.0.key": k0, "layer.0.value": v0, "layer.1.key": k1, "layer.1.value": v1}
    report = fq.compress(kv, "cache.fq.safetensors", bits=3)      # arrays [b, h, t, d]
    with fq.open_compressed("cache.fq.safetensors") as reader:
        first = reader.read("layer.1.key", tokens=slice(0, 16))   # decodes 16 tokens only
    everything = fq.decompress("cache.fq.safetensors")             # name -> array

One code path: these functions drive the very operations the command line runs
(``ops.compress``, ``ops.decompress``, ``ops.slice``), and the CLI's ``compress`` and
``decompress`` call ``compress_file``/``decompress_file`` below. Arrays held in memory enter
``ops.compress`` as an in-memory dump (``formats.kvdump.dump_of_arrays``): its header serves
the arrays' own bytes to the readers a file goes through, so nothing is written but the
output, and the output is byte for byte what compressing the same tensors from a file writes.

Glossary
--------
kv          the tensors to compress: a mapping ``name -> array`` or a pair ``(keys, values)``
            of per-layer sequences. A name ``<prefix><layer>.key`` / ``.value`` is a layer's
            keys or values, ``[batch, kv_heads, tokens, head_dim]`` float16, bfloat16 or
            float32; ``<prefix><layer>.query`` (``[batch, query_heads, tokens, head_dim]``,
            post-RoPE) enables attention fidelity; any other array is stored bit-exactly.
            numpy arrays, or torch tensors when torch is in use (converted on the CPU).
manifest    which tensors are keys and values and their shape (docs/manifest.md); built from
            the names and shapes unless one is given.
reader      an opened compressed file (``open_compressed``): it decodes only what is asked
            for and checks every byte it reads against the file's digests.

Importing this module is cheap: numpy-heavy modules are imported by the functions that need
them, and torch never.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fibquant_cli.errors import InvalidInputError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from fibquant_cli.formats.kvdump import Dump
    from fibquant_cli.formats.manifest import Manifest, RopeSpec
    from fibquant_cli.ops.compress_report import CompressReport
    from fibquant_cli.ops.decompress import DecompressReport
    from fibquant_cli.ops.progress import Progress
    from fibquant_cli.ops.reader import Opened
    from fibquant_cli.ops.spec import CompressSpec

__all__ = ["Reader", "compress", "compress_file", "decompress", "decompress_file",
           "make_manifest", "open_compressed", "save_dump", "to_arrays"]

# <prefix><layer>.<role>: "layer.3.key", "model.layers.3.value", "3.query".
_KV_NAME = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<role>key|value|query)$")
_KV_DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
MEMORY = "<memory>"  # how arrays held in memory are named in errors


# --------------------------------------------------------------------------- compress


def compress(kv, path, *, bits: float | None = None, block_dim: int | None = None,
             size: int | None = None, key_bits: float | None = None,
             value_bits: float | None = None, key_block_dim: int | None = None,
             key_size: int | None = None, value_block_dim: int | None = None,
             value_size: int | None = None, keep_first: int | None = None,
             keep_last: int | str = "auto", center_keys: bool = True, seed: int = 0,
             basis=None, embed_basis: bool = False, ratio: float | None = None,
             spec: CompressSpec | None = None, manifest: Manifest | Mapping | None = None,
             rope: RopeSpec | Mapping | None = None,
             query_heads: int | None = None, attention: bool = True,
             max_queries: int | None = None, jobs: int = 0, force: bool = False,
             progress: Progress | None = None) -> CompressReport:
    """Compress KV tensors held in memory into the file ``path`` (``.fq.safetensors``).

    Args:
        kv: ``{name: array}`` or ``(keys, values)`` (see the module's glossary).
        path: the output file; an existing one is replaced only with ``force``.
        bits, block_dim, size, key_*, value_*, keep_first, keep_last, center_keys, seed:
            the options of ``fibquant compress`` (README, "Commands"); defaults: 3 bits,
            the first token kept exactly (and against a ``basis`` file, on long caches at
            high ratios, the last ones: ``keep_last="auto"``), keys centered. Or ``spec``, a
            ``CompressSpec``.
        basis, embed_basis, ratio: the transform codec (``compress --basis``): a basis file
            from ``fibquant calibrate``; ``bits`` is then all-inclusive bits per value.
        manifest: a ``Manifest`` (or its JSON object) describing ``kv``; by default built
            from the names and shapes (``make_manifest``).
        rope: the keys' RoPE (``{"theta": 10000.0, "style": "half"}``), recorded in the
            manifest; keys are taken as post-RoPE either way.
        query_heads: the model's query heads (default: from the queries, else kv_heads).
        attention: measure attention fidelity on the file written (needs queries for the
            exact measure, else a key proxy), as the CLI does.

    Returns:
        The ``CompressReport`` the CLI prints (sizes, ratio, errors, ``attention``).

    Raises:
        InvalidInputError: an array of the wrong rank, dtype or shape (naming its key),
            NaN/Inf (naming the position). UsageError: bad options or output path.
    """
    from fibquant_cli.ops.compress import compress as run

    spec = _spec(spec, bits=bits, block_dim=block_dim, size=size, key_bits=key_bits,
                 value_bits=value_bits, key_block_dim=key_block_dim, key_size=key_size,
                 value_block_dim=value_block_dim, value_size=value_size, seed=seed,
                 keep_first=keep_first, keep_last=keep_last, center_keys=center_keys,
                 basis=basis, embed_basis=embed_basis or None, ratio=ratio)
    dump = to_dump(kv, manifest=manifest, rope=rope, query_heads=query_heads)
    return run(dump, output=path, spec=spec, force=force, attention=attention,
               max_queries=max_queries, jobs=jobs, progress=progress)


def compress_file(path, output=None, *, manifest=None, bits: float | None = None,
                  block_dim: int | None = None, size: int | None = None,
                  key_bits: float | None = None, value_bits: float | None = None,
                  key_block_dim: int | None = None, key_size: int | None = None,
                  value_block_dim: int | None = None, value_size: int | None = None,
                  keep_first: int | None = None, keep_last: int | str = "auto",
                  center_keys: bool = True, seed: int = 0, basis=None, embed_basis: bool = False,
                  ratio: float | None = None, spec: CompressSpec | None = None,
                  compare: bool = False,
                  attention: bool = True, max_queries: int | None = None, jobs: int = 0,
                  own_basis: str | None = "auto",
                  force: bool = False, progress: Progress | None = None) -> CompressReport:
    """Compress the dump file ``path`` (with its manifest) into ``output`` (default: beside it,
    ``X.fq.safetensors``): ``fibquant compress``. Options as in ``compress``; ``compare``
    also measures the scalar baseline at the same rate; ``own_basis`` (auto, always, never)
    as ``--own-basis``."""
    from fibquant_cli.ops.compress import compress as run

    spec = _spec(spec, bits=bits, block_dim=block_dim, size=size, key_bits=key_bits,
                 value_bits=value_bits, key_block_dim=key_block_dim, key_size=key_size,
                 value_block_dim=value_block_dim, value_size=value_size, seed=seed,
                 keep_first=keep_first, keep_last=keep_last, center_keys=center_keys,
                 basis=basis, embed_basis=embed_basis or None, ratio=ratio)
    return run(path, manifest=manifest, output=output, spec=spec, compare=compare, force=force,
               attention=attention, max_queries=max_queries, jobs=jobs, progress=progress,
               own_basis=own_basis)


def _spec(spec: CompressSpec | None, **options) -> CompressSpec:
    """``spec``, or the one the options give (``ops.spec.resolve_spec``, as the CLI's)."""
    from fibquant_cli.ops.spec import DEFAULT_KEEP_FIRST, resolve_spec

    if spec is not None:
        given = [name for name, value in options.items()
                 if value is not None and (name, value) not in (
                     ("keep_last", "auto"), ("center_keys", True), ("seed", 0))]
        if given:
            raise UsageError("give either {spec} or the rate options ("
                             + ", ".join(f"{{{n}}}" for n in given) + "), not both",
                             options=("spec", *given))
        return spec
    if options["keep_first"] is None:
        options["keep_first"] = DEFAULT_KEEP_FIRST
    options["embed_basis"] = bool(options["embed_basis"])
    return resolve_spec(**options)


# --------------------------------------------------------------------------- arrays in


def to_arrays(kv) -> dict[str, np.ndarray]:
    """``kv`` as ``{name: C-contiguous numpy array}``, in order: a ``(keys, values)`` pair
    becomes ``layer.{i}.key`` / ``layer.{i}.value``; torch tensors are copied to the CPU
    (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if isinstance(kv, Mapping):
        items = list(kv.items())
    elif isinstance(kv, (tuple, list)) and len(kv) == 2 and all(
            isinstance(side, Sequence) for side in kv):
        keys, values = kv
        if len(keys) != len(values):
            raise InvalidInputError(f"{len(keys)} key layers but {len(values)} value layers",
                                    path=MEMORY)
        items = []
        for i, (k, v) in enumerate(zip(keys, values)):
            items += [(f"layer.{i}.key", k), (f"layer.{i}.value", v)]
    else:
        raise UsageError(f"kv must be a mapping name -> array or a (keys, values) pair of "
                         f"per-layer sequences, found {type(kv).__name__}")
    out = {}
    for name, x in items:
        if not isinstance(name, str):
            raise UsageError(f"tensor names must be strings, found {name!r}", path=MEMORY)
        out[name] = _as_numpy(x, name)
    return out


def _as_numpy(x: Any, name: str) -> np.ndarray:
    import numpy as np

    if type(x).__module__.split(".")[0] == "torch":  # torch is in use: no import needed
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen (exact), narrow
            import ml_dtypes

            return np.ascontiguousarray(x.float().numpy().astype(ml_dtypes.bfloat16))
        return np.array(x.numpy())  # a copy: the cache may change in place later
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"expected a numpy array or a torch tensor, found "
                                f"{type(x).__name__}", path=MEMORY, tensor=name)
    return np.ascontiguousarray(x)


def make_manifest(arrays: Mapping[str, np.ndarray], *, rope: RopeSpec | Mapping | None = None,
                  query_heads: int | None = None) -> Manifest:
    """The manifest of ``arrays`` named as in the glossary: one key and one value entry
    (``bhtd`` layout) over layers 0..L-1, and the queries when every layer has one.

    Raises InvalidInputError naming the offending key: a missing layer, a KV array that is
    not 4-D float16/bfloat16/float32, or shapes that differ between layers.
    """
    from fibquant_cli.formats.manifest import (
        AttentionSpec,
        KvShape,
        Manifest,
        ManifestEntry,
        RopeSpec,
    )

    layers: dict[str, dict[int, str]] = {"key": {}, "value": {}, "query": {}}
    for name in arrays:
        found = _KV_NAME.match(name)
        if found:
            layers[found["role"]][int(found["layer"])] = name
    if not layers["key"] or not layers["value"]:
        raise InvalidInputError("no keys or no values: name them '<prefix><layer>.key' and "
                                "'<prefix><layer>.value' (e.g. 'layer.0.key'), or give a "
                                "manifest", path=MEMORY)
    for role, found in layers.items():
        if found and sorted(found) != list(range(len(found))):
            missing = min(set(range(max(found) + 1)) - set(found))
            raise InvalidInputError(f"layers of role {role} must be 0..{len(found) - 1}: no "
                                    f"layer {missing} (found {sorted(found)[:8]})", path=MEMORY)
    n = len(layers["key"])
    if len(layers["value"]) != n or layers["query"] and len(layers["query"]) != n:
        raise InvalidInputError(f"{n} key layers, {len(layers['value'])} value layers, "
                                f"{len(layers['query'])} query layers", path=MEMORY)
    geometry = {role: _geometry(arrays, [names[i] for i in range(n)])
                for role, names in layers.items() if names}
    (b, kv_heads, t, _), dtype = geometry["key"]
    for role in ("value", "query"):
        if role in geometry:
            (vb, vh, vt, _), _dt = geometry[role]
            if (vb, vt) != (b, t) or role == "value" and vh != kv_heads:
                raise InvalidInputError(
                    f"shape {geometry[role][0]} does not match the keys' {geometry['key'][0]}",
                    path=MEMORY, tensor=layers[role][0])
    if "query" in geometry:
        query_heads = query_heads or geometry["query"][0][1]
    query_heads = query_heads or kv_heads
    kind = "mha" if query_heads == kv_heads else "mqa" if kv_heads == 1 else "gqa"
    if isinstance(rope, Mapping):
        rope = RopeSpec(theta=float(rope["theta"]), style=rope.get("style", "half"),
                        first_position=int(rope.get("first_position", 0)))
    entries = []
    for role in ("key", "value"):
        (_, _, _, head_dim), dtype = geometry[role]
        shape = KvShape(role=role, attention_kind=kind, batch=b, layers=n, kv_heads=kv_heads,
                        query_heads=query_heads, tokens=t, head_dim=head_dim, dtype=dtype,
                        rope_state="post_rope" if role == "key" else "not_applicable")
        entries.append(ManifestEntry(shape, [layers[role][i] for i in range(n)], "bhtd",
                                     rope if role == "key" else None))
    attention = (AttentionSpec([layers["query"][i] for i in range(n)], True)
                 if layers["query"] else None)
    return Manifest(entries, attention)


def _geometry(arrays, names: list[str]) -> tuple[tuple[int, ...], str]:
    """(shape, manifest dtype) shared by the arrays ``names``; InvalidInputError otherwise."""
    first = arrays[names[0]]
    for name in names:
        x = arrays[name]
        if x.ndim != 4:
            raise InvalidInputError(f"expected [batch, heads, tokens, head_dim], found shape "
                                    f"{tuple(x.shape)}", path=MEMORY, tensor=name)
        if x.dtype.name not in _KV_DTYPES:
            raise InvalidInputError(f"dtype {x.dtype.name}: keys, values and queries must be "
                                    "float16, bfloat16 or float32", path=MEMORY, tensor=name)
        if x.shape != first.shape or x.dtype != first.dtype:
            raise InvalidInputError(f"shape {tuple(x.shape)} {x.dtype.name} differs from "
                                    f"'{names[0]}' ({tuple(first.shape)} {first.dtype.name})",
                                    path=MEMORY, tensor=name)
    return tuple(first.shape), _KV_DTYPES[first.dtype.name]


def to_dump(kv, *, manifest: Manifest | Mapping | None = None,
            rope: RopeSpec | Mapping | None = None, query_heads: int | None = None) -> Dump:
    """``kv`` as an in-memory dump (``formats.kvdump.Dump``) that ``ops`` reads like a file."""
    from fibquant_cli.formats.kvdump import dump_of_arrays
    from fibquant_cli.formats.manifest import Manifest, parse_manifest

    arrays = to_arrays(kv)
    if manifest is None:
        manifest = make_manifest(arrays, rope=rope, query_heads=query_heads)
    elif not isinstance(manifest, Manifest):
        manifest = parse_manifest(dict(manifest), source=MEMORY)
    return dump_of_arrays(arrays, manifest, MEMORY)


def save_dump(kv, path, *, manifest: Manifest | Mapping | None = None,
              rope: RopeSpec | Mapping | None = None, query_heads: int | None = None,
              force: bool = False) -> tuple[Path, Path]:
    """Write ``kv`` uncompressed as a dump ``path`` (``.safetensors``) and its manifest
    beside it, the input of ``fibquant compress``; returns both paths."""
    from fibquant_cli.formats import stfile
    from fibquant_cli.formats.manifest import manifest_path_for, save_manifest
    from fibquant_cli.storage.publish import publishing
    from fibquant_cli.storage.stwriter import StreamWriter

    dump = to_dump(kv, manifest=manifest, rope=rope, query_heads=query_heads)
    path = Path(path)
    mpath = manifest_path_for(path)
    specs = [(n, i.dtype, i.shape) for n, i in dump.header.tensors.items()]
    with publishing([path, mpath], force=force) as (tmp, tmp_manifest):
        with StreamWriter(tmp, specs, None, publish=False) as writer:
            for name in dump.header.tensors:
                writer.write(name, stfile.read_tensor(dump.header, name))
        save_manifest(dump.manifest, tmp_manifest)
    return path, mpath


# --------------------------------------------------------------------------- reading


def decompress(path, *, basis=None, jobs: int = 0) -> dict[str, np.ndarray]:
    """Every source tensor of the compressed file ``path``, ``{name: array}`` in the source's
    order, names, shapes and dtypes as compressed (``Reader.read_all``; ``basis``: the basis
    file a transform-coded file was coded against, unless it embeds its own)."""
    with open_compressed(path, basis) as reader:
        return reader.read_all(jobs)


def decompress_file(path, output=None, *, layers=None, tokens=None, force: bool = False,
                    jobs: int = 0, basis=None,
                    progress: Progress | None = None) -> DecompressReport:
    """Restore the compressed file ``path`` as a dump ``output`` and its manifest (default:
    ``X.restored.safetensors`` beside it): ``fibquant decompress``. ``layers``/``tokens``
    (``"A:B"``) decode only that range of every KV entry, reading only its bytes. ``basis``:
    the basis file a transform-coded file was coded against (unless it embeds it)."""
    if layers is None and tokens is None:
        from fibquant_cli.ops.decompress import decompress as run

        return run(path, output=output, force=force, progress=progress, jobs=jobs, basis=basis)
    from fibquant_cli.ops.slice import decompress_slice

    return decompress_slice(path, layers=layers, tokens=tokens, output=output, force=force,
                            progress=progress, basis=basis)


def open_compressed(path, basis=None) -> Reader:
    """Open the compressed file ``path`` for random access (named so as not to shadow the
    built-in ``open``). The header, document, codebooks and rotations are verified now;
    every other byte when it is read. ``basis``: as for ``decompress_file``."""
    from fibquant_cli.ops.process import one_blas_thread
    from fibquant_cli.ops.reader import open_verified

    with one_blas_thread():  # the basis checks' products: see ops/process, "BLAS"
        return Reader(open_verified(path, verify_arrays=False, verify_on_read=True, basis=basis))


class Reader:
    """A compressed file opened for reading; decodes only what is asked for.

    Attributes:
        path: the file. manifest: the source dump's ``Manifest``.
        names: every source tensor, in the source's order. kv_names: the compressed ones.

    Every read is checked against the file's digests before it is returned: a whole tensor
    array by array, a range of tokens block by block (``ops.reader.StoredPart``). Values are
    bit-identical to what ``decompress`` restores.
    """

    def __init__(self, opened: Opened):
        from fibquant_cli.ops.decompress import kv_views

        self._opened = opened
        self._where_kv = kv_views(opened)
        self.path: Path = opened.path
        self.manifest: Manifest = opened.manifest
        self.names: tuple[str, ...] = tuple(opened.doc.source.tensor_order)
        self.kv_names: tuple[str, ...] = tuple(n for n in self.names if n in self._where_kv)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:  # nothing held open: every read opens the file anew
        return None

    def __repr__(self) -> str:
        return f"Reader({str(self.path)!r}, {len(self.names)} tensors)"

    def read(self, name: str, *, layers=None, tokens=None) -> np.ndarray:
        """Source tensor ``name``, in its stored layout and dtype.

        ``tokens`` (and, for a 5-D ``[batch, layers, heads, tokens, head_dim]`` tensor,
        ``layers``) select a range -- a ``slice``, ``range``, ``"A:B"`` or an index (the axis
        is kept) -- of a compressed tensor; only the bytes around it are read and decoded.
        """
        import numpy as np

        from fibquant_cli.ops.decompress import restore_source_tensor
        from fibquant_cli.ops.process import one_blas_thread

        if name not in self.names:
            raise UsageError(f"no tensor {name!r} (the file has {len(self.names)}: "
                             f"{', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''})",
                             path=str(self.path))
        info = self._opened.doc.source.tensors[name]
        if name not in self._where_kv:
            if layers is not None or tokens is not None:
                raise UsageError("{layers} and {tokens} select ranges of compressed tensors "
                                 "only", path=str(self.path), tensor=name,
                                 options=("layers", "tokens"))
        elif layers is not None and len(info.shape) != 5:
            raise UsageError("{layers} selects layers of a 5-D tensor; this one is one layer",
                             path=str(self.path), tensor=name, options=("layers",))
        with one_blas_thread():  # as decompress: the same rounding, bit for bit
            if layers is None and tokens is None:
                data, _ = restore_source_tensor(self._opened, name, self._where_kv)
                if isinstance(data, np.ndarray):
                    return data
                return _from_bytes(data, info.dtype, info.shape)
            from fibquant_cli.ops.slice import tensor_slice

            i, views = self._where_kv[name]
            shape = self.manifest.entries[i].shape
            return tensor_slice(self._opened, i, name,
                                _range(layers, len(views), "layers"),
                                _range(tokens, shape.tokens, "tokens"))

    def layer(self, role: str, layer: int, *, tokens=None) -> np.ndarray:
        """Layer ``layer`` of the ``role`` ("key" or "value") entry as ``[batch, kv_heads,
        tokens, head_dim]`` in the source dtype (whatever the stored layout)."""
        from fibquant_cli.core.layer import SOURCE_DTYPES, cast_clamped
        from fibquant_cli.formats.dtypes import numpy_dtype_for
        from fibquant_cli.ops.process import one_blas_thread
        from fibquant_cli.ops.reader import restore_layer
        from fibquant_cli.ops.slice import decode_slice

        found = [i for i, e in enumerate(self.manifest.entries) if e.shape.role == role]
        if len(found) != 1:
            raise UsageError(f"the file has {len(found)} entries of role {role!r}, not one",
                             path=str(self.path))
        i = found[0]
        shape = self.manifest.entries[i].shape
        if not 0 <= layer < shape.layers:
            raise UsageError(f"layer {layer} is outside 0:{shape.layers}", path=str(self.path))
        with one_blas_thread():
            if tokens is None:
                return restore_layer(self._opened, i, layer)
            sel = _range(tokens, shape.tokens, "tokens")
            return cast_clamped(decode_slice(self._opened, i, layer, sel.start, sel.stop),
                                numpy_dtype_for(SOURCE_DTYPES[shape.dtype]))

    def read_all(self, jobs: int = 0) -> dict[str, np.ndarray]:
        """Every source tensor, ``{name: array}`` in the source's order, decoded by ``jobs``
        threads (0: as many as ``decompress`` uses); then every stored array not read on the
        way is verified too, as ``decompress`` does."""
        import os

        from fibquant_cli.ops.decompress import DECODE_THREADS
        from fibquant_cli.ops.process import one_blas_thread
        from fibquant_cli.ops.reader import verify_unread
        from fibquant_cli.ops.threads import in_order

        if jobs < 0:
            raise UsageError(f"jobs must be >= 0, got {jobs}", path=str(self.path))
        jobs = jobs or min(DECODE_THREADS, os.cpu_count() or 1)
        with one_blas_thread():  # set once here: the threads' own limits then agree
            out = dict(zip(self.names, in_order(self.read, self.names, jobs, "fibquant-read")))
        verify_unread(self._opened)
        return out


def _from_bytes(data: bytes, st_dtype: str, shape) -> np.ndarray:
    """A pass-through tensor's bytes as an array (uint8 bytes for dtypes numpy lacks)."""
    import numpy as np

    from fibquant_cli.formats import dtypes

    if st_dtype not in dtypes.NUMPY_DTYPES:
        return np.frombuffer(data, dtype=np.uint8).copy()
    arr = np.frombuffer(data, dtype=dtypes.little_endian(st_dtype)).reshape(shape)
    return arr.astype(dtypes.numpy_dtype_for(st_dtype))


def _range(selection, n: int, option: str) -> range:
    """A slice, range, "A:B" text, (start, stop) or index as a non-empty range in [0, n)."""
    from fibquant_cli.ops.slice import parse_range

    if selection is None or isinstance(selection, str):
        return parse_range(selection, n, option)
    if isinstance(selection, int) and not isinstance(selection, bool):
        return parse_range(str(selection), n, option)
    if isinstance(selection, tuple) and len(selection) == 2:
        selection = slice(*selection)
    if isinstance(selection, range):
        selection = slice(selection.start, selection.stop, selection.step)
    if isinstance(selection, slice) and selection.step in (None, 1):
        start = 0 if selection.start is None else selection.start
        stop = n if selection.stop is None else selection.stop
        if isinstance(start, int) and isinstance(stop, int):
            return parse_range(f"{start}:{stop}", n, option)
    raise UsageError(f"{{{option}}} must be a slice with step 1, a range, 'A:B' or an index, "
                     f"found {selection!r}", options=(option,))
