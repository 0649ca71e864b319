"""The compressed file (``*.fq.safetensors``): names, typed document, opening checks.

docs/container.md is the byte-level specification. In brief: an ordinary safetensors file
holding ``fq/p{j}/codebook`` and ``fq/p{j}/rotation`` per profile, the parts of each entry's
layers (``fq/e{i}/l{l}/{part}``, as the entry's codec lays them out), and every other source
tensor bit-exact (``fq/raw/{name}``), in that order; its ``__metadata__`` holds exactly the
format version, the document (``Document``) and the document's digest.

Versions: 1 (no ``codec`` per entry: read as ``fibquant``), 2 (entries name their codec),
3 (``blocks``: per-block digests of codes and norms, so random access checks what it reads),
4 (``transform``: entries of the transform codec, their widths and exceptions per layer, the
coefficient tables ``fq/t/...`` and the basis, by digest or embedded as ``fq/b/...``),
5 (an embedded basis keeps only its coded columns, in fp16; ``transform.own`` says whether it
was fitted on the dump itself).

``open_container`` checks, in order: the metadata keys, the document digest, the version (a
mismatch with the verified document is corruption, not "upgrade"), the document
(``Document.parse``: every key, type and cross-reference), the stored arrays against the
layout the document implies (names, order, dtypes, shapes), the block digests, and the header
bytes against their canonical form. Errors are ``IntegrityError`` naming the field. Digests
detect accidents and edits, not forgeries (docs/container.md, "What the digests protect").
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibquant_cli import codecs
from fibquant_cli.core.params import Profile
from fibquant_cli.core.transform import VQ_MAX_WIDTH, WIDTHS
from fibquant_cli.errors import FibQuantError, IntegrityError, InvalidInputError
from fibquant_cli.formats import stfile, untrusted
from fibquant_cli.formats.digest import (
    BLOCK_SCHEMA,
    CONTAINER_SCHEMA,
    bytes_digest,
    parse_digest,
    profile_digest,
    tensor_digest,
)
from fibquant_cli.formats.kvlayout import check_manifest_against_dump
from fibquant_cli.formats.manifest import Manifest, parse_manifest

FORMAT_VERSION = 5  # the newest this fibquant reads and writes
PER_VECTOR_VERSION = 3  # what files of the per-vector codec alone are written as, so that
# fibquant 0.2 (formats 1-3) reads them; transform files need TRANSFORM_SINCE
OLDEST_VERSION = 1
KEY_FORMAT, KEY_DOC, KEY_DIGEST = "fibquant_format", "fibquant", "fibquant_digest"
METADATA_KEYS = (KEY_FORMAT, KEY_DOC, KEY_DIGEST)
RAW_PREFIX = "fq/raw/"
DOC_KEYS = ("format_version", "tool", "source", "manifest", "profiles", "entries", "arrays",
            "blocks")
BLOCKS_SINCE = 3  # the first format version with ``blocks``
TRANSFORM_SINCE = 4  # the first with ``transform`` (and entries of the transform codec)
TRANSFORM_KEYS = ("basis_digest", "embedded", "rope")
# The first with the compact embedded basis (only the coded columns, F16) and ``transform.own``;
# transform files whose basis is not embedded are still written as TRANSFORM_SINCE.
COMPACT_BASIS_SINCE = 5
TRANSFORM_ENTRY_KEYS = ("widths", "exceptions")
SOURCE_KEYS = ("file", "file_digest", "tensor_order", "metadata", "tensors")
PROFILE_KEYS = ("profile", "profile_digest", "codebook_digest", "rotation_digest")
ENTRY_KEYS = ("codec", "profile", "layers", "vectors_per_layer", "keep_first", "keep_last",
              "center")
# A digest of the right length, for documents whose digests are computed while writing.
PLACEHOLDER_DIGEST = "blake3:" + "0" * 64
MAX_KEEP = 2**32  # protected tokens per layer; far beyond any context, below int overflow


def codebook_name(j: int) -> str:
    return f"fq/p{j}/codebook"


def rotation_name(j: int) -> str:
    return f"fq/p{j}/rotation"


def vq_table_name(width: int) -> str:
    return f"fq/t/vq{width}"


def scalar_table_name(bits: int) -> str:
    return f"fq/t/scalar{bits}"


def basis_name(layer: int, role: str) -> str:
    """An embedded basis matrix (columns) of one layer and role."""
    return f"fq/b/l{layer}/{role}"


def live_columns(runs) -> int:
    """The coded components of a row (two per pair of width > 0) of run-length widths
    ``[[width, pairs], ...]``: the columns of a compact embedded basis."""
    return 2 * sum(int(n) for w, n in runs if w)


def part_name(i: int, layer: int, part: str) -> str:
    """The stored name of one part (``codes``, ``norms`` ...) of entry i, layer."""
    return f"fq/e{i}/l{layer}/{part}"


def split_part_name(name: str) -> tuple[int, int, str] | None:
    """(entry, layer, part) of a ``part_name``; None for any other stored name."""
    if not name.startswith("fq/e"):
        return None
    entry, layer, part = name[len("fq/e"):].split("/", 2)
    return int(entry), int(layer[1:]), part


def raw_name(name: str) -> str:
    return RAW_PREFIX + name


# ------------------------------------------------------------------------- typed document


@dataclass(frozen=True)
class SourceTensor:
    dtype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class Source:
    """The dump the file was made from: enough to restore every tensor's name, dtype, shape."""

    file: str
    file_digest: str
    tensor_order: tuple[str, ...]
    metadata: dict[str, str] | None
    tensors: dict[str, SourceTensor]

    def to_json(self) -> dict:
        return {"file": self.file, "file_digest": self.file_digest,
                "tensor_order": list(self.tensor_order), "metadata": self.metadata,
                "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "digest": t.digest}
                            for n, t in self.tensors.items()}}


@dataclass(frozen=True)
class ProfileRecord:
    profile: Profile
    profile_digest: str
    codebook_digest: str
    rotation_digest: str

    def to_json(self) -> dict:
        return {"profile": self.profile.to_json(), "profile_digest": self.profile_digest,
                "codebook_digest": self.codebook_digest, "rotation_digest": self.rotation_digest}


@dataclass(frozen=True)
class EntryRecord:
    """How manifest entry i was coded. ``keep_first``/``keep_last`` are as asked; ``keep``
    clamps them to the entry's tokens."""

    codec: str
    profile: int | None  # None: a transform entry (no FibQuant profile)
    layers: int
    vectors_per_layer: int
    keep_first: int
    keep_last: int
    center: bool
    # transform entries: per layer, the run-length widths [[width, pairs], ...] and the count
    # of exceptions (codecs/transform.py)
    widths: tuple | None = None
    exceptions: tuple[int, ...] | None = None

    def keep(self, tokens: int) -> tuple[int, int]:
        kf = min(self.keep_first, tokens)
        return kf, min(self.keep_last, tokens - kf)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ENTRY_KEYS}
        if self.widths is not None:
            out["widths"] = [[list(run) for run in runs] for runs in self.widths]
            out["exceptions"] = list(self.exceptions)
        return out


@dataclass(frozen=True)
class TransformRecord:
    """The basis a file's transform entries were coded against (format 4): its digest, whether
    its matrices are stored in the file (``fq/b/...``), and whether keys had RoPE undone."""

    basis_digest: str
    embedded: bool
    rope: bool
    own: bool = False  # format >= 5: the basis was fitted on this dump (compress --own-basis)

    def to_json(self, version: int = TRANSFORM_SINCE) -> dict:
        out = {k: getattr(self, k) for k in TRANSFORM_KEYS}
        if version >= COMPACT_BASIS_SINCE:
            out["own"] = self.own
        return out


@dataclass(frozen=True)
class Document:
    """The ``fibquant`` metadata document, parsed and validated once (``parse``)."""

    format_version: int
    tool: str
    source: Source
    manifest: Manifest
    profiles: tuple[ProfileRecord, ...]
    entries: tuple[EntryRecord, ...]
    arrays: dict[str, str]
    blocks: dict[str, BlockDigests] = dataclasses.field(default_factory=dict)  # format >= 3
    transform: TransformRecord | None = None  # format >= 4

    def to_json(self) -> dict:
        obj = {"format_version": self.format_version, "tool": self.tool,
               "source": self.source.to_json(), "manifest": self.manifest.to_json(),
               "profiles": [p.to_json() for p in self.profiles],
               "entries": [e.to_json() for e in self.entries], "arrays": dict(self.arrays)}
        if self.format_version >= BLOCKS_SINCE:
            obj["blocks"] = {n: b.to_json() for n, b in self.blocks.items()}
        if self.format_version >= TRANSFORM_SINCE:
            obj["transform"] = (None if self.transform is None
                                else self.transform.to_json(self.format_version))
        return obj

    def transform_widths(self) -> tuple[list[int], list[int]]:
        """(VQ widths, scalar bits) of the coefficient tables a transform file stores: every
        table up to the widest width its entries use. Storing the narrower ones even when no
        pair uses them keeps a file's size growing with every bit the allocator adds, which
        its search over sizes relies on (a dropped 4 KB table would shrink it)."""
        used = [int(w) for rec in self.entries if rec.widths is not None
                for runs in rec.widths for w, _ in runs if w]
        top = max(used, default=0)
        return ([w for w in range(1, min(top, VQ_MAX_WIDTH) + 1)],
                [w // 2 for w in WIDTHS if VQ_MAX_WIDTH < w <= top])

    def passthrough_names(self) -> list[str]:
        """Source tensors no entry names, in the source's order (stored under ``fq/raw/``)."""
        kv = {n for e in self.manifest.entries for n in e.tensors}
        return [n for n in self.source.tensor_order if n not in kv]

    @classmethod
    def parse(cls, obj: Any) -> Document:
        """Validate a decoded document; raise ``_Bad`` naming the field and what was found."""
        version = _int(obj.get("format_version") if isinstance(obj, dict) else None,
                       "format_version", low=OLDEST_VERSION)
        keys = (DOC_KEYS + ("transform",) if version >= TRANSFORM_SINCE
                else DOC_KEYS if version >= BLOCKS_SINCE else DOC_KEYS[:-1])
        top = _object(obj, "document", keys)
        tool = _str(top["tool"], "tool")
        source = _parse_source(top["source"])
        try:
            manifest = parse_manifest(top["manifest"], source="manifest")
            check_manifest_against_dump(
                manifest, {n: (t.dtype, t.shape) for n, t in source.tensors.items()},
                source="source")
        except FibQuantError as err:
            raise _Bad("manifest", err.render()) from None
        profiles = tuple(_parse_profile(p, f"profiles[{j}]") for j, p in enumerate(
            _list(top["profiles"], "profiles", min_len=0 if version >= TRANSFORM_SINCE else 1)))
        raw_entries = _list(top["entries"], "entries")
        if len(raw_entries) != len(manifest.entries):
            raise _Bad("entries", f"{len(raw_entries)} entries, the manifest has "
                                  f"{len(manifest.entries)}")
        entries = tuple(_parse_entry(e, f"entries[{i}]", version, manifest.entries[i].shape,
                                     profiles)
                        for i, e in enumerate(raw_entries))
        arrays = _object(top["arrays"], "arrays")
        for name, value in arrays.items():
            _digest(value, f"arrays['{stfile.label(name)}']")
        blocks = {}
        if version >= BLOCKS_SINCE:
            for name, rec in _object(top["blocks"], "blocks").items():
                blocks[name] = _parse_blocks(rec, f"blocks['{stfile.label(name)}']")
        transform = None
        if version >= TRANSFORM_SINCE and top["transform"] is not None:
            compact = version >= COMPACT_BASIS_SINCE
            rec = _object(top["transform"], "transform",
                          TRANSFORM_KEYS + (("own",) if compact else ()))
            _digest(rec["basis_digest"], "transform.basis_digest")
            transform = TransformRecord(rec["basis_digest"],
                                        _bool(rec["embedded"], "transform.embedded"),
                                        _bool(rec["rope"], "transform.rope"),
                                        compact and _bool(rec["own"], "transform.own"))
            if transform.own and not transform.embedded:
                raise _Bad("transform.own", "a basis fitted on the dump itself must be "
                                            "embedded, found embedded false")
        if any(e.codec == "transform" for e in entries) and transform is None:
            raise _Bad("transform", "transform entries need the transform record, found null")
        return cls(version, tool, source, manifest, profiles, entries, dict(arrays), blocks,
                   transform)

    def _basis_layout(self) -> list[tuple[str, str, tuple]]:
        """The embedded basis: format 4 every column (D, D) F32; from 5 the coded columns of
        each layer (D, live) F16, in ascending component order (docs/container.md)."""
        compact = self.format_version >= COMPACT_BASIS_SINCE
        specs = []
        for entry, rec in zip(self.manifest.entries, self.entries):
            if rec.codec == "transform":
                d = entry.shape.kv_heads * entry.shape.head_dim
                specs += [(basis_name(layer, entry.shape.role), "F16" if compact else "F32",
                           (d, live_columns(rec.widths[layer]) if compact else d))
                          for layer in range(entry.shape.layers)]
        return specs

    def expected_blocks(self, layout: list[tuple[str, str, tuple]]) -> dict[str, int]:
        """name -> block bytes of every array that has block digests (format >= 3), given the
        ``expected_layout``."""
        if self.format_version < BLOCKS_SINCE:
            return {}
        out = {}
        for name, dtype, _ in layout:  # one pass: the layout names every part once
            split = split_part_name(name)
            if split is None:
                continue
            rec = self.entries[split[0]]
            profile = None if rec.profile is None else self.profiles[rec.profile].profile
            size = codecs.get(rec.codec).block_bytes(split[2], dtype, profile)
            if size is not None:
                out[name] = size
        return out

    def expected_layout(self, chosen_dtypes: dict[str, str]) -> list[tuple[str, str, tuple]]:
        """(name, dtype, shape) of every stored array, in file order.

        ``chosen_dtypes``: the dtype of each parts array whose codec allows a choice (as the
        header declares it; the codec checks it is one of its choices).
        """
        specs = []
        for j, rec in enumerate(self.profiles):
            p = rec.profile
            specs.append((codebook_name(j), "F32", (p.size, p.block_dim)))
            specs.append((rotation_name(j), "F32", (p.head_dim, p.head_dim)))
        vq, scalar = self.transform_widths()
        specs += [(vq_table_name(w), "F32", (2**w, 2)) for w in vq]
        specs += [(scalar_table_name(b), "F32", (2**b,)) for b in scalar]
        if self.transform is not None and self.transform.embedded:
            specs += self._basis_layout()
        for i, (entry, rec) in enumerate(zip(self.manifest.entries, self.entries)):
            codec = codecs.get(rec.codec)
            profile = None if rec.profile is None else self.profiles[rec.profile].profile
            for layer in range(entry.shape.layers):
                names = functools.partial(part_name, i, layer)
                chosen = lambda part, names=names: chosen_dtypes.get(names(part))  # noqa: E731
                for part, dtype, dims in codec.layer_parts(entry.shape, profile, rec, chosen,
                                                           layer):
                    specs.append((names(part), dtype, dims))
        for name in self.passthrough_names():
            t = self.source.tensors[name]
            specs.append((raw_name(name), t.dtype, t.shape))
        return specs


@dataclass(frozen=True)
class BlockDigests:
    """The digests of an array's consecutive ``block_bytes``-byte blocks (format 3)."""

    block_bytes: int
    digests: tuple[str, ...]

    def to_json(self) -> dict:
        return {"block_bytes": self.block_bytes, "digests": list(self.digests)}

    def count_for(self, n_bytes: int) -> int:
        return -(-n_bytes // self.block_bytes)


class _Bad(Exception):
    """A document field that does not validate: (field, what was found)."""


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return stfile.label(text)


def _object(value: Any, field: str, keys: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise _Bad(field, f"expected an object, found {_show(value)}")
    if keys is not None and set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        extra = sorted(set(value) - set(keys))
        detail = "; ".join(f"{what} {', '.join(stfile.label(k, 30) for k in names)}"
                           for what, names in (("missing", missing), ("unknown", extra)) if names)
        raise _Bad(field, f"wrong keys ({detail})")
    return value


def _list(value: Any, field: str, min_len: int = 0) -> list:
    if not isinstance(value, list) or len(value) < min_len:
        raise _Bad(field, f"expected an array of at least {min_len} items, found {_show(value)}")
    return value


def _int(value: Any, field: str, low: int = 0, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise _Bad(field, f"expected an integer{bound}, found {_show(value)}")
    return value


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, found {_show(value)}")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(field, f"expected true or false, found {_show(value)}")
    return value


def _digest(value: Any, field: str) -> str:
    try:
        parse_digest(value)
    except InvalidInputError as err:
        raise _Bad(field, err.reason) from None
    return value


def _parse_blocks(obj: Any, field: str) -> BlockDigests:
    rec = _object(obj, field, ("block_bytes", "digests"))
    size = _int(rec["block_bytes"], f"{field}.block_bytes", low=1)
    digests = tuple(_digest(d, f"{field}.digests[{k}]")
                    for k, d in enumerate(_list(rec["digests"], f"{field}.digests")))
    return BlockDigests(size, digests)


def _parse_source(obj: Any) -> Source:
    top = _object(obj, "source", SOURCE_KEYS)
    order = tuple(_str(n, f"source.tensor_order[{k}]")
                  for k, n in enumerate(_list(top["tensor_order"], "source.tensor_order")))
    tensors = {}
    for name, rec in _object(top["tensors"], "source.tensors").items():
        where = f"source.tensors['{stfile.label(name)}']"
        rec = _object(rec, where, ("dtype", "shape", "digest"))
        dtype = _str(rec["dtype"], f"{where}.dtype")
        shape = tuple(_int(d, f"{where}.shape") for d in _list(rec["shape"], f"{where}.shape"))
        try:
            stfile.tensor_n_bytes(dtype, shape)
        except FibQuantError as err:
            raise _Bad(where, err.reason) from None
        tensors[name] = SourceTensor(dtype, shape, _digest(rec["digest"], f"{where}.digest"))
    if len(set(order)) != len(order) or set(order) != set(tensors):
        raise _Bad("source.tensor_order", f"must list each of the {len(tensors)} source tensors "
                                          f"once, found {len(order)} names")
    metadata = top["metadata"]
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise _Bad("source.metadata", f"expected null or a str -> str map, found {_show(metadata)}")
    return Source(_str(top["file"], "source.file"), _digest(top["file_digest"], "source.file_digest"),
                  order, metadata, tensors)


def _parse_profile(obj: Any, field: str) -> ProfileRecord:
    rec = _object(obj, field, PROFILE_KEYS)
    try:
        profile = Profile.from_json(rec["profile"])
    except (FibQuantError, TypeError) as err:
        raise _Bad(f"{field}.profile", getattr(err, "reason", str(err))) from None
    if profile_digest(profile) != _digest(rec["profile_digest"], f"{field}.profile_digest"):
        raise _Bad(f"{field}.profile_digest", "does not match the profile")
    return ProfileRecord(profile, rec["profile_digest"],
                         _digest(rec["codebook_digest"], f"{field}.codebook_digest"),
                         _digest(rec["rotation_digest"], f"{field}.rotation_digest"))


def _parse_entry(obj: Any, field: str, version: int, shape, profiles) -> EntryRecord:
    codec = "fibquant"
    if version >= 2:
        codec = _str(_object(obj, field).get("codec"), f"{field}.codec")
    if codec not in codecs.NAMES or (codec != "fibquant" and version < TRANSFORM_SINCE):
        raise _Bad(f"{field}.codec", f"unknown codec {codec!r}; this fibquant knows "
                                     f"{', '.join(codecs.NAMES)}")
    if codec == "transform":
        return _parse_transform_entry(obj, field, shape)
    keys = ENTRY_KEYS if version >= 2 else ENTRY_KEYS[1:]
    rec = _object(obj, field, keys)
    j = _int(rec["profile"], f"{field}.profile", high=len(profiles) - 1)
    if profiles[j].profile.head_dim != shape.head_dim:
        raise _Bad(f"{field}.profile", f"profile {j} has head_dim "
                                       f"{profiles[j].profile.head_dim}, the entry {shape.head_dim}")
    layers, per_layer = _entry_counts(rec, field, shape)
    return EntryRecord(codec, j, layers, per_layer,
                       _int(rec["keep_first"], f"{field}.keep_first", high=MAX_KEEP),
                       _int(rec["keep_last"], f"{field}.keep_last", high=MAX_KEEP),
                       _bool(rec["center"], f"{field}.center"))


def _entry_counts(rec: dict, field: str, shape) -> tuple[int, int]:
    """An entry's ``layers`` and ``vectors_per_layer``, checked against its manifest shape."""
    layers = _int(rec["layers"], f"{field}.layers")
    if layers != shape.layers:
        raise _Bad(f"{field}.layers", f"found {layers}, the manifest says {shape.layers}")
    per_layer = _int(rec["vectors_per_layer"], f"{field}.vectors_per_layer")
    if per_layer != shape.vector_count // shape.layers:
        raise _Bad(f"{field}.vectors_per_layer", f"found {per_layer}, the manifest's shape "
                                                 f"has {shape.vector_count // shape.layers}")
    return layers, per_layer


_WIDTH_SET = frozenset(WIDTHS)


def _runs_if_sound(runs: Any) -> list[tuple[int, int]] | None:
    """One layer's run-length widths as (width, pairs) tuples, or None if any run is not a
    [width in WIDTHS, pairs >= 1] pair of integers (``_runs`` then says which). The checks
    without the field names: naming every run up front was most of opening a file."""
    if type(runs) is not list:
        return None
    out = []
    for run in runs:
        if type(run) is not list or len(run) != 2:
            return None
        w, n = run
        if type(w) is not int or type(n) is not int or w not in _WIDTH_SET or n < 1:
            return None
        out.append((w, n))
    return out


def _runs(runs: Any, where: str) -> list[tuple[int, int]]:
    parsed = []
    for r, run in enumerate(_list(runs, where)):
        pair = _list(run, f"{where}[{r}]")
        if len(pair) != 2:
            raise _Bad(f"{where}[{r}]", f"expected [width, pairs], found {_show(run)}")
        w = _int(pair[0], f"{where}[{r}][0]")
        if w not in WIDTHS:
            raise _Bad(f"{where}[{r}][0]", f"width {w} is not one of {list(WIDTHS)}")
        parsed.append((w, _int(pair[1], f"{where}[{r}][1]", low=1)))
    return parsed


def _parse_transform_entry(obj: Any, field: str, shape) -> EntryRecord:
    rec = _object(obj, field, ENTRY_KEYS + TRANSFORM_ENTRY_KEYS)
    if rec["profile"] is not None:
        raise _Bad(f"{field}.profile", f"a transform entry has no profile, found "
                                       f"{_show(rec['profile'])}")
    layers, per_layer = _entry_counts(rec, field, shape)
    keep_first = _int(rec["keep_first"], f"{field}.keep_first", high=MAX_KEEP)
    keep_last = _int(rec["keep_last"], f"{field}.keep_last", high=MAX_KEEP)
    if _bool(rec["center"], f"{field}.center"):
        raise _Bad(f"{field}.center", "a transform entry is never centred per head, found true")
    pairs = shape.kv_heads * shape.head_dim
    if pairs % 2:
        raise _Bad(field, f"kv_heads * head_dim = {pairs} is odd: no pairs to code")
    pairs //= 2
    raw_widths = _list(rec["widths"], f"{field}.widths")
    if len(raw_widths) != layers:
        raise _Bad(f"{field}.widths", f"{len(raw_widths)} layers, the entry has {layers}")
    widths = []
    for layer, runs in enumerate(raw_widths):
        where = f"{field}.widths[{layer}]"
        parsed = _runs_if_sound(runs)
        if parsed is None:
            parsed = _runs(runs, where)  # raises, naming the run at fault
        if sum(n for _, n in parsed) != pairs:
            raise _Bad(where, f"the runs cover {sum(n for _, n in parsed)} pairs, the layer "
                              f"has {pairs}")
        widths.append(tuple(parsed))
    kf = min(keep_first, shape.tokens)
    rows = shape.batch * (shape.tokens - kf - min(keep_last, shape.tokens - kf))
    exceptions = tuple(_int(n, f"{field}.exceptions[{layer}]", high=rows * 2 * pairs)
                       for layer, n in enumerate(_list(rec["exceptions"], f"{field}.exceptions")))
    if len(exceptions) != layers:
        raise _Bad(f"{field}.exceptions", f"{len(exceptions)} layers, the entry has {layers}")
    return EntryRecord("transform", None, layers, per_layer, keep_first, keep_last, False,
                       tuple(widths), exceptions)


# ------------------------------------------------------------------------- the file


def metadata_for(doc: Document | dict) -> dict[str, str]:
    """The ``__metadata__`` of a file holding ``doc``."""
    obj = doc.to_json() if isinstance(doc, Document) else doc
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return {KEY_FORMAT: str(obj["format_version"]), KEY_DOC: text,
            KEY_DIGEST: bytes_digest(CONTAINER_SCHEMA, text.encode("utf-8"))}


def is_compressed(header: stfile.Header) -> bool:
    return bool(header.metadata) and KEY_FORMAT in header.metadata


@dataclass(frozen=True)
class Container:
    """A compressed file whose header and document verified (its arrays not yet read)."""

    header: stfile.Header
    doc: Document

    @property
    def path(self) -> Path:
        return self.header.path


def open_container(path) -> Container:
    """Read and check a compressed file's header and document (see the module docstring)."""
    header = stfile.read_header(path)
    where = str(header.path)
    meta = header.metadata or {}
    if KEY_FORMAT not in meta:
        raise InvalidInputError("not a fibquant compressed file (no fibquant_format metadata)",
                                path=where)
    if set(meta) != set(METADATA_KEYS):
        extra = sorted(set(meta) - set(METADATA_KEYS)) or sorted(set(METADATA_KEYS) - set(meta))
        raise IntegrityError(f"__metadata__ must hold exactly {', '.join(METADATA_KEYS)}; "
                             f"differs in {', '.join(stfile.label(k, 30) for k in extra)}",
                             path=where)
    text = meta[KEY_DOC]
    if bytes_digest(CONTAINER_SCHEMA, text.encode("utf-8")) != meta[KEY_DIGEST]:
        raise IntegrityError("metadata digest mismatch (the fibquant document was altered)",
                             path=where)
    try:
        obj = json.loads(text, parse_int=untrusted.parse_json_int)
    except untrusted.LongInteger as err:
        raise IntegrityError(f"fibquant document has an integer of {err.args[0]} digits",
                             path=where) from None
    except ValueError as err:  # JSONDecodeError
        raise IntegrityError(f"fibquant document is not JSON ({err})", path=where) from None
    except RecursionError:
        raise IntegrityError("fibquant document is nested too deeply", path=where) from None
    version = meta[KEY_FORMAT]
    found = obj.get("format_version") if isinstance(obj, dict) else None
    if not (version.isascii() and version.isdigit() and len(version) < 10) or found != int(version):
        raise IntegrityError(f"format version {stfile.label(version, 20)!s} differs from the "
                             f"document's {_show(found)} (altered metadata)", path=where)
    if int(version) > FORMAT_VERSION:
        raise InvalidInputError(
            f"written by a newer fibquant (format version {int(version)}); this fibquant reads "
            f"format versions {OLDEST_VERSION} to {FORMAT_VERSION}: upgrade fibquant", path=where)
    try:
        doc = Document.parse(obj)
    except _Bad as bad:
        field, reason = bad.args
        raise IntegrityError(reason, path=where, field=f"document {field}") from None
    _check_layout(header, doc)
    return Container(header, doc)


def _check_layout(header: stfile.Header, doc: Document) -> None:
    """The stored arrays are exactly the expected ones, in order, and the header canonical."""
    where = str(header.path)
    stored = list(header.tensors.values())
    choices = {info.name: info.dtype for info in stored}
    try:
        expected = doc.expected_layout(choices)
    except FibQuantError as err:
        raise IntegrityError(err.reason, path=where, tensor=err.tensor) from None
    names = [name for name, _, _ in expected]
    if [info.name for info in stored] != names:
        missing = [n for n in names if n not in header.tensors]
        extra = [n for n in header.tensors if n not in set(names)]
        detail = (f"missing {stfile.label(missing[0])}" if missing else
                  f"unexpected {stfile.label(extra[0])}" if extra else "in another order")
        raise IntegrityError(f"stored arrays differ from the document's layout ({detail})",
                             path=where)
    if set(doc.arrays) != set(names):
        odd = sorted(set(doc.arrays) ^ set(names))[:1]
        raise IntegrityError(f"document arrays differ from the stored ones ({odd})", path=where)
    for info, (name, dtype, shape) in zip(stored, expected):
        if info.dtype != dtype or info.shape != tuple(shape):
            raise IntegrityError(f"stored as {info.dtype} {list(info.shape)}, the document "
                                 f"implies {dtype} {list(shape)}", path=where, tensor=name)
    _check_blocks(header, doc, expected)
    with untrusted.open_regular(header.path) as fh:
        raw = fh.read(header.data_start)
    canonical = stfile.plan_layout([(n, d, tuple(s)) for n, d, s in expected], where)
    if raw != stfile.header_bytes(canonical, header.metadata, where):
        raise IntegrityError("header bytes are not in canonical form (altered header)",
                             path=where)


def _check_blocks(header: stfile.Header, doc: Document, expected) -> None:
    """Format 3: block digests exist for exactly the arrays the codecs name, sized as they say."""
    where = str(header.path)
    sizes = doc.expected_blocks(expected)
    if set(doc.blocks) != set(sizes):
        odd = sorted(set(doc.blocks) ^ set(sizes))[0]
        raise IntegrityError(f"block digests differ from the stored arrays ({stfile.label(odd)})",
                             path=where, field="document blocks")
    for name, size in sizes.items():
        rec = doc.blocks[name]
        n = rec.count_for(header.tensors[name].n_bytes)
        if rec.block_bytes != size or len(rec.digests) != n:
            raise IntegrityError(f"expected {n} block digests of {size} bytes, found "
                                 f"{len(rec.digests)} of {rec.block_bytes}", path=where,
                                 tensor=name, field="document blocks")


def check_block(comp: Container, name: str, k: int, data) -> None:
    """Check block k of array ``name`` (its bytes ``data``) against its recorded digest."""
    if bytes_digest(BLOCK_SCHEMA, data) != comp.doc.blocks[name].digests[k]:
        raise IntegrityError(f"digest mismatch in block {k} (stored bytes were altered)",
                             path=str(comp.path), tensor=name)


def check_array(comp: Container, name: str, data) -> None:
    """Check an array's stored bytes (bytes or a C-order array) against its digest and, in
    format 3, against each of its block digests."""
    info = comp.header.tensors[name]
    if tensor_digest(info.dtype, info.shape, data) != comp.doc.arrays[name]:
        raise IntegrityError("digest mismatch (stored bytes were altered)",
                             path=str(comp.path), tensor=name)
    rec = comp.doc.blocks.get(name)
    if rec is not None:
        view = memoryview(data if not hasattr(data, "dtype") else
                          data.reshape(-1).view("u1")).cast("B")
        for k in range(len(rec.digests)):
            check_block(comp, name, k, view[k * rec.block_bytes:(k + 1) * rec.block_bytes])


def verify_array(comp: Container, name: str) -> None:
    """Check one stored array against its recorded digests."""
    check_array(comp, name, stfile.read_raw(comp.header, name))
