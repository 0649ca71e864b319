"""An opened compressed file: verified document and codebooks, and the arrays read from it.

``open_verified`` checks the header and document (``container.open_container``), then the
codebooks and rotations (every decode needs them), then -- unless told otherwise -- every
other stored array. Decompress instead verifies each array as it reads it
(``verify_on_read``: one read instead of two) and the rest at the end (``verify_unread``);
random access (``StoredPart``) verifies exactly what it reads: each block of a part with block
digests (format 3) right after reading it, any other part whole.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np

from fibquant_cli import codecs
from fibquant_cli.core.codec import FibQuantizer
from fibquant_cli.core.layer import SOURCE_DTYPES
from fibquant_cli.errors import IntegrityError, InvalidInputError, UsageError
from fibquant_cli.formats import container, dtypes, stfile
from fibquant_cli.formats.container import codebook_name, part_name, rotation_name, split_part_name
from fibquant_cli.formats.digest import codebook_digest, rotation_digest
from fibquant_cli.ops.progress import Progress


@dataclass
class Opened:
    """A compressed file whose header, document, codebooks and rotations verified."""

    comp: container.Container
    quantizers: list  # one FibQuantizer per profile
    verify_on_read: bool = False
    verified: set = field(default_factory=set)
    transform: TransformState | None = None  # files with transform entries

    @property
    def doc(self) -> container.Document:
        return self.comp.doc

    @property
    def manifest(self):
        return self.comp.doc.manifest

    @property
    def path(self):
        return self.comp.path

    def quantizer(self, i: int) -> FibQuantizer:
        return self.quantizers[self.doc.entries[i].profile]

    def context(self, i: int, layer: int):
        """What entry i's codec needs to decode ``layer`` beyond its parts (codecs/__init__)."""
        if self.doc.entries[i].codec == "transform":
            return self.transform.layer_basis(self.manifest.entries[i], layer)
        return self.quantizer(i)

    def codec(self, i: int):
        return codecs.get(self.doc.entries[i].codec)

    @functools.cached_property
    def stored_parts(self) -> dict[tuple[int, int], dict[str, str]]:
        """(entry, layer) -> {part: stored name}, from one pass over the header (looking each
        layer's parts up by prefix would scan every stored array once per layer)."""
        parts: dict[tuple[int, int], dict[str, str]] = {}
        for name in self.comp.header.tensors:
            split = split_part_name(name)
            if split is not None:
                parts.setdefault(split[:2], {})[split[2]] = name
        return parts

    def names(self, i: int, layer: int):
        """part -> stored name, for one layer (what codecs call ``name_of``)."""
        return lambda part: part_name(i, layer, part)


def open_verified(path, progress: Progress | None = None, checks: list | None = None, *,
                  verify_arrays: bool = True, verify_on_read: bool = False,
                  basis=None) -> Opened:
    """Open a compressed file and verify it (see the module docstring); raise on a failure.

    ``basis``: the basis file a transform-coded file was coded against (unless it embeds its
    own); refused unless its digest is the one the file records.
    """
    progress = progress or Progress()
    note = (lambda name, detail: checks.append((name, True, detail))) if checks is not None \
        else (lambda name, detail: None)
    comp = container.open_container(path)
    note("structure and format version", f"format {comp.doc.format_version}, "
         f"{len(comp.header.tensors)} stored arrays")
    note("metadata digest", "fibquant document verified")
    # Codebooks and rotations are read once, and checked as they are read (``_quantizer``).
    shared = [n for n in comp.header.tensors
              if n.endswith(("/codebook", "/rotation")) or n.startswith(("fq/t/", "fq/b/"))]
    names = [n for n in comp.header.tensors
             if verify_arrays and not verify_on_read and n not in shared]
    progress.start(len(names), "verifying digests")
    for name in names:
        container.verify_array(comp, name)
        progress.advance(name)
    quantizers = [_quantizer(comp, j) for j in range(len(comp.doc.profiles))]
    note("array digests", f"{len(names) + len(shared)} arrays match their BLAKE3 digests")
    note("codebooks and rotations", f"{len(quantizers)} profile(s) match their digests")
    transform = None
    if comp.doc.transform is not None:
        transform = TransformState.load(comp, basis)
        note("transform basis", f"basis {comp.doc.transform.basis_digest[:16]}... "
             f"({_basis_kind(comp.doc.transform)}) and coefficient "
             "tables match their digests")
    return Opened(comp, quantizers, verify_on_read,
                  set(names + shared) if verify_on_read else set(), transform)


def _basis_kind(rec: container.TransformRecord) -> str:
    """How a transform file's basis is held, for validate's checks."""
    if rec.own:
        return "fitted on the dump, embedded"
    return "embedded" if rec.embedded else "given"


@dataclass
class TransformState:
    """A transform-coded file's shared arrays: its coefficient tables (always in the file) and
    the basis, from the file (embedded) or from the basis file it was coded against."""

    tables: object  # core.transform.Tables
    matrices: dict  # (layer, role) -> U (D, D) float32
    rope: bool

    @classmethod
    def load(cls, comp: container.Container, basis) -> TransformState:
        from fibquant_cli.core.transform import Tables

        rec = comp.doc.transform
        vq, scalar = comp.doc.transform_widths()
        arrays = {}
        for name in ([container.vq_table_name(w) for w in vq]
                     + [container.scalar_table_name(b) for b in scalar]):
            arrays[name] = _checked_read(comp, name)
        tables = Tables({w: arrays[container.vq_table_name(w)] for w in vq},
                        {b: arrays[container.scalar_table_name(b)] for b in scalar}, {})
        matrices = {}
        roles = [(e.shape.role, e.shape.layers) for e, r in
                 zip(comp.doc.manifest.entries, comp.doc.entries) if r.codec == "transform"]
        if rec.embedded:
            if basis is not None:
                raise UsageError("this file embeds its basis: drop {basis}", path=str(comp.path),
                                 options=("basis",))
            compact = comp.doc.format_version >= container.COMPACT_BASIS_SINCE
            for (role, layers), rec_i in zip(roles, [r for r in comp.doc.entries
                                                     if r.codec == "transform"]):
                for layer in range(layers):
                    u = _checked_read(comp, container.basis_name(layer, role))
                    matrices[layer, role] = (_expand_columns(comp, container.basis_name(
                        layer, role), u, rec_i.widths[layer]) if compact else u)
        else:
            if basis is None:
                raise UsageError(f"this file was coded against the basis {rec.basis_digest}: "
                                 "give that basis file with {basis}", path=str(comp.path),
                                 options=("basis",))
            from fibquant_cli.formats.basis import load_basis

            model = (load_basis(basis, keep=True) if isinstance(basis, (str, os.PathLike))
                     else basis)
            if model.digest != rec.basis_digest:
                raise InvalidInputError(f"the basis {model.path} has digest {model.digest}; this "
                                        f"file was coded against {rec.basis_digest}",
                                        path=str(comp.path))
            for role, layers in roles:
                for layer in range(layers):
                    matrices[layer, role] = np.ascontiguousarray(
                        model.matrix(layer, role)[1], dtype=np.float32)
        return cls(tables, matrices, rec.rope)

    def layer_basis(self, entry, layer: int):
        from fibquant_cli.codecs.transform import LayerBasis

        rope = entry.rope if self.rope and entry.shape.role == "key" else None
        return LayerBasis(self.matrices[layer, entry.shape.role], self.tables, rope,
                          entry.shape.head_dim)


# An embedded basis' stored columns, rounded to fp16 from orthonormal ones, have |U^T U - I|
# below about 2 * 2**-11; a forged or damaged one beyond this is refused.
EMBEDDED_ORTHONORMAL_TOLERANCE = 1e-2


def _expand_columns(comp: container.Container, name: str, stored: np.ndarray,
                    runs) -> np.ndarray:
    """The (D, D) float32 basis of a compact embedded layer (format >= 5): the stored coded
    columns (D, live) in place, zeros in the columns no pair codes (decoding never reads them)."""
    from fibquant_cli.codecs.transform import expand_widths, live_components

    live = live_components(expand_widths(runs))
    u = stored.astype(np.float32)
    gram = u.T @ u  # float32: its ~1e-5 error is far below the tolerance
    gram[np.diag_indices_from(gram)] -= 1.0
    if gram.size and float(np.abs(gram).max()) > EMBEDDED_ORTHONORMAL_TOLERANCE:
        raise IntegrityError(f"embedded basis columns are not orthonormal: |U^T U - I| reaches "
                             f"{float(np.abs(gram).max()):.3g} (at most "
                             f"{EMBEDDED_ORTHONORMAL_TOLERANCE:g})", path=str(comp.path),
                             tensor=name)
    out = np.zeros((u.shape[0], u.shape[0]), dtype=np.float32)
    out[:, live] = u
    return out


def _checked_read(comp: container.Container, name: str) -> np.ndarray:
    """A shared transform array, checked against its digest and for finite values (a table
    or basis with NaN would restore NaN everywhere it is used)."""
    arr = stfile.read_tensor(comp.header, name)
    container.check_array(comp, name, arr)
    if not np.all(np.isfinite(arr)):
        raise IntegrityError("holds non-finite values", path=str(comp.path), tensor=name)
    return arr


def _quantizer(comp: container.Container, j: int) -> FibQuantizer:
    rec = comp.doc.profiles[j]
    where = str(comp.path)
    codebook = stfile.read_tensor(comp.header, codebook_name(j))
    container.check_array(comp, codebook_name(j), codebook)
    rotation = stfile.read_tensor(comp.header, rotation_name(j))
    container.check_array(comp, rotation_name(j), rotation)
    if codebook_digest(codebook) != rec.codebook_digest:
        raise IntegrityError("codebook does not match its profile", path=where,
                             tensor=codebook_name(j))
    if rotation_digest(rotation) != rec.rotation_digest:
        raise IntegrityError("rotation does not match its profile", path=where,
                             tensor=rotation_name(j))
    return FibQuantizer(rec.profile, codebook, rotation)


def read_stored(opened: Opened, name: str, arrays: dict | None = None) -> np.ndarray:
    """Stored array ``name``, checked against its digest first if ``opened.verify_on_read``.

    ``arrays``: arrays already read (``stfile.read_tensors``); ``name`` is taken from it.
    """
    arr = arrays.pop(name) if arrays and name in arrays else stfile.read_tensor(
        opened.comp.header, name)
    if opened.verify_on_read and name not in opened.verified:
        container.check_array(opened.comp, name, arr)
        opened.verified.add(name)  # set.add is atomic: decode threads share it
    return arr


def verify_unread(opened: Opened) -> None:
    """With ``verify_on_read``: check every stored array that was never read."""
    if opened.verify_on_read:
        for name in opened.comp.header.tensors:
            if name not in opened.verified:
                container.verify_array(opened.comp, name)
                opened.verified.add(name)


def layer_parts(opened: Opened, i: int, layer: int) -> dict[str, np.ndarray]:
    """part -> array of entry i, layer (one read for all of them; verified as configured)."""
    names = opened.stored_parts.get((i, layer), {})
    arrays = stfile.read_tensors(opened.comp.header, list(names.values()))
    return {part: read_stored(opened, name, arrays) for part, name in names.items()}


def restore_layer(opened: Opened, i: int, layer: int) -> np.ndarray:
    """Entry i, layer as restored: [batch, kv_heads, tokens, head_dim] in the source dtype."""
    shape = opened.manifest.entries[i].shape
    out = np.empty((shape.batch, shape.kv_heads, shape.tokens, shape.head_dim),
                   dtype=dtypes.numpy_dtype_for(SOURCE_DTYPES[shape.dtype]))
    parts = layer_parts(opened, i, layer)
    try:
        opened.codec(i).restore_layer(opened.context(i, layer), parts, shape,
                                      opened.doc.entries[i], out, opened.names(i, layer), layer)
    except IntegrityError as err:
        raise err.at(path=str(opened.path)) from None
    return out


def reconstructor(opened: Opened):
    """(entry, layer) -> the restored layer exactly as decompress writes it, as float32."""

    def reconstruct(i: int, layer: int) -> np.ndarray:
        return restore_layer(opened, i, layer).astype(np.float32)

    return reconstruct


class StoredPart:
    """One stored array, read on demand by random access; nothing is returned unchecked.

    ``span(lo, hi)`` reads the digested blocks (format 3) around flat elements [lo, hi) and
    checks each before decoding; an array without block digests (``mean``, ``kept``, files of
    format 1 and 2) is read and checked whole, once (``whole``).
    """

    def __init__(self, opened: Opened, name: str):
        self.opened, self.name = opened, name
        self.info = opened.comp.header.tensors[name]
        self.dtype = dtypes.numpy_dtype_for(self.info.dtype)
        self.shape = self.info.shape
        self.size = math.prod(self.shape)
        self.blocks = opened.doc.blocks.get(name)
        self._whole = None
        self._recent: dict[int, np.ndarray] = {}  # the checked blocks of the last span

    def whole(self) -> np.ndarray:
        if self._whole is None:
            arr = stfile.read_tensor(self.opened.comp.header, self.name)
            container.check_array(self.opened.comp, self.name, arr)
            self._whole = arr
        return self._whole

    def span(self, lo: int, hi: int) -> np.ndarray:
        """Flat elements [lo, hi), every block they touch checked."""
        if self.blocks is None:
            return self.whole().reshape(-1)[lo:hi]
        item, size = self.dtype.itemsize, self.blocks.block_bytes
        k0, k1 = lo * item // size, -(-hi * item // size)
        # Heads of one block ask for it in turn: blocks of the previous span are reused, the
        # others (a suffix, as spans advance) read and checked.
        m = k0
        while m < k1 and m in self._recent:
            m += 1
        if any(k in self._recent for k in range(m, k1)):
            m = k0
        blocks = {k: self._recent[k] for k in range(k0, m)}
        if m < k1:
            raw = stfile.read_bytes(self.opened.comp.header, self.name, m * size,
                                    min(k1 * size, self.info.n_bytes))
            raw.flags.writeable = False  # kept for the next span: nobody may change it
            for k in range(m, k1):
                blocks[k] = raw[(k - m) * size:(k - m + 1) * size]
                container.check_block(self.opened.comp, self.name, k, blocks[k])
        self._recent = blocks
        raw = blocks[k0] if k1 - k0 == 1 else np.concatenate([blocks[k] for k in range(k0, k1)])
        flat = raw.view(dtypes.little_endian(self.info.dtype)).astype(self.dtype, copy=False)
        return flat[lo - k0 * size // item:hi - k0 * size // item]
