"""A source KV dump: a safetensors file plus its shape manifest, read layer by layer.

A dump may also be arrays held in memory (``dump_of_arrays``): its header serves their bytes
(``stfile.header_for_arrays``), so everything that reads a dump reads them the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats import stfile, untrusted
from fibquant_cli.formats.container import is_compressed
from fibquant_cli.formats.kvlayout import check_manifest_against_dump, entry_layer_views, vectors_axes
from fibquant_cli.formats.manifest import Manifest, ManifestEntry, load_manifest, manifest_path_for


@dataclass(frozen=True)
class Dump:
    path: Path
    header: stfile.Header
    manifest: Manifest
    manifest_path: Path | None  # None: the manifest was given as an object, not a file

    @property
    def in_memory(self) -> bool:
        return self.header.data is not None

    @property
    def kv_names(self) -> set[str]:
        return {name for entry in self.manifest.entries for name in entry.tensors}

    @property
    def passthrough_names(self) -> list[str]:
        """Tensors no entry compresses (queries included), in file order."""
        kv = self.kv_names
        return [name for name in self.header.tensors if name not in kv]


def open_dump(path, manifest_path=None) -> Dump:
    """Read a dump's header and manifest and check them against each other."""
    path = untrusted.input_path(path)
    header = stfile.read_header(path)
    if is_compressed(header):
        raise InvalidInputError("this is a compressed fibquant file, not a KV dump "
                                "(use 'fibquant decompress' or 'fibquant validate')",
                                path=str(path))
    mpath = (untrusted.input_path(manifest_path) if manifest_path is not None
             else manifest_path_for(path))
    if not os.path.lexists(mpath):  # a dangling link or a FIFO is named by load_manifest
        raise InvalidInputError(f"no manifest at {mpath} (give one with {{manifest}})",
                                path=str(path), options=("manifest",))
    manifest = load_manifest(mpath)
    infos = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
    check_manifest_against_dump(manifest, infos, source=str(path))
    return Dump(path, header, manifest, mpath)


def dump_of_arrays(tensors, manifest: Manifest, where: str = "<memory>",
                   metadata: dict[str, str] | None = None) -> Dump:
    """A dump whose tensors are the numpy arrays ``tensors`` (name -> C-contiguous array, in
    file order), checked against ``manifest`` as a file's would be; ``where`` names it in
    errors, ``metadata`` is the safetensors ``__metadata__`` a file would carry."""
    header = stfile.header_for_arrays(tensors, metadata, where)
    infos = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
    check_manifest_against_dump(manifest, infos, source=where)
    return Dump(Path(where), header, manifest, None)


def default_compressed_path(source: Path) -> Path:
    """``X.safetensors`` -> ``X.fq.safetensors`` beside it."""
    name = source.name.removesuffix(".safetensors")
    return source.with_name(name + ".fq.safetensors")


def check_finite(header: stfile.Header, name: str, arr: np.ndarray, origin=None) -> None:
    """Raise naming the tensor and the position (in its stored axes) of the first NaN/Inf.

    ``origin`` is where ``arr`` starts inside the stored tensor (for a slice of it).
    """
    finite = np.isfinite(arr)
    if not finite.all():
        pos = tuple(int(i) for i in np.argwhere(~finite)[0])
        where = [p + o for p, o in zip(pos, origin or (0,) * arr.ndim)]
        raise InvalidInputError(f"non-finite value {arr[pos]} at position {where}",
                                path=str(header.path), tensor=name)


def read_layer(dump: Dump, entry: ManifestEntry, layer: int, *, check: bool = True) -> np.ndarray:
    """Layer ``layer`` of ``entry`` as [batch, kv_heads, tokens, head_dim] in the source dtype.

    ``check`` refuses NaN/Inf (naming the tensor and position); pass False only for data
    already checked.
    """
    name, index = entry_layer_views(entry)[layer]
    if index is None:
        arr = stfile.read_tensor(dump.header, name)
        origin = None
    else:
        arr = stfile.read_tensor(dump.header, name, index=(slice(None), slice(index, index + 1)))
        origin = (0, index, 0, 0, 0)
    if check:
        check_finite(dump.header, name, arr, origin)
    if arr.ndim == 5:  # the canonical [batch, layers, kv_heads, tokens, head_dim] form
        return arr[:, 0]
    return arr.transpose(vectors_axes(entry.layout, 4))
