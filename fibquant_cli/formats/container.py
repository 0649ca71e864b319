"""The compressed file (``*.fq.safetensors``), format version 1.

A compressed file is an ordinary safetensors file (any safetensors loader opens it) that holds
everything needed to restore the dump, so decoding never retrains and never depends on a
random generator:

=================================  =====  ===============================================
tensor                             dtype  content
=================================  =====  ===============================================
``fq/p{j}/codebook``               F32    (N, k) codebook of profile j
``fq/p{j}/rotation``               F32    (d, d) rotation Pi of profile j (the codec
                                          computes in f32, so this is exactly what it used)
``fq/e{i}/l{l}/codes``             U8     packed indices of entry i, layer l: the vectors in
                                          [batch, kv_head, token] order, d/k indices each,
                                          ``wire_bits`` bits per index, LSB-first (vector v
                                          starts at bit v * (d/k) * wire_bits: random access)
``fq/e{i}/l{l}/norms``             F16    [batch, kv_heads, tokens] vector norms; F32 when a
                                   /F32   norm would overflow fp16 (f32 sources)
``fq/e{i}/l{l}/kept``              src    [batch, kv_heads, keep_first + keep_last,
                                          head_dim]: the protected token positions, stored
                                          uncompressed in the source dtype (only when kept)
``fq/e{i}/l{l}/mean``              F32    [batch, kv_heads, head_dim] per-head mean over the
                                          compressed tokens, subtracted before encoding and
                                          added back after decoding (only when ``center``)
``fq/raw/{name}``                  any    a tensor of the dump no entry names, bit-exact
=================================  =====  ===============================================

``__metadata__`` has three keys:

* ``fibquant_format``: the format version as a decimal string. A reader refuses a version
  newer than its own before looking at anything else.
* ``fibquant``: a JSON document (``doc`` below).
* ``fibquant_digest``: ``bytes_digest("fibquant_container_v1", <the fibquant string>)``.

``doc`` = ``{"format_version", "tool", "source", "manifest", "profiles", "entries",
"arrays"}``: ``source`` has the source file name, its whole-file digest, its tensor order,
its ``__metadata__`` and per tensor ``{dtype, shape, digest}``; ``profiles`` a list of
``{profile, profile_digest, codebook_digest, rotation_digest}``; ``entries`` one
``{profile, layers, vectors_per_layer, keep_first, keep_last, center}`` per manifest entry (codes and
norms then cover tokens [keep_first, tokens - keep_last) only); ``arrays`` maps every stored
tensor name to its ``tensor_digest``.

Integrity: the header must be byte-identical to its canonical serialization (so no byte of it
can change unnoticed), the document digest must match, and every stored array must match its
digest; then indices must be < N and norms finite and >= 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fibquant_cli.formats import stfile
from fibquant_cli.formats.digest import bytes_digest, tensor_digest
from fibquant_cli.errors import IntegrityError, InvalidInputError

FORMAT_VERSION = 1
DOC_SCHEMA = "fibquant_container_v1"
KEY_FORMAT, KEY_DOC, KEY_DIGEST = "fibquant_format", "fibquant", "fibquant_digest"
RAW_PREFIX = "fq/raw/"
DOC_KEYS = {"format_version", "tool", "source", "manifest", "profiles", "entries", "arrays"}


def codebook_name(j: int) -> str:
    return f"fq/p{j}/codebook"


def rotation_name(j: int) -> str:
    return f"fq/p{j}/rotation"


def codes_name(i: int, layer: int) -> str:
    return f"fq/e{i}/l{layer}/codes"


def norms_name(i: int, layer: int) -> str:
    return f"fq/e{i}/l{layer}/norms"


def mean_name(i: int, layer: int) -> str:
    return f"fq/e{i}/l{layer}/mean"


def kept_name(i: int, layer: int) -> str:
    return f"fq/e{i}/l{layer}/kept"


def raw_name(name: str) -> str:
    return RAW_PREFIX + name


def metadata_for(doc: dict) -> dict[str, str]:
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return {KEY_FORMAT: str(FORMAT_VERSION), KEY_DOC: text,
            KEY_DIGEST: bytes_digest(DOC_SCHEMA, text.encode("utf-8"))}


def is_compressed(header: stfile.Header) -> bool:
    return bool(header.metadata) and KEY_FORMAT in header.metadata


@dataclass(frozen=True)
class Compressed:
    """A compressed file whose header and document verified."""

    header: stfile.Header
    doc: dict

    @property
    def path(self) -> Path:
        return self.header.path


def open_compressed(path) -> Compressed:
    """Read and check a compressed file's header and document (not yet its arrays)."""
    header = stfile.read_header(path)
    where = str(header.path)
    meta = header.metadata or {}
    if KEY_FORMAT not in meta:
        raise InvalidInputError("not a fibquant compressed file (no fibquant_format metadata)",
                                path=where)
    version = meta[KEY_FORMAT]
    if not version.isdigit():
        raise IntegrityError(f"format version {version!r} is not a number", path=where)
    if int(version) > FORMAT_VERSION:
        raise InvalidInputError(
            f"written by a newer fibquant (format version {int(version)}); this fibquant reads "
            f"format version {FORMAT_VERSION} and older: upgrade fibquant", path=where)
    _check_canonical_header(header)
    if KEY_DOC not in meta or KEY_DIGEST not in meta:
        raise IntegrityError("metadata lacks the fibquant document or its digest", path=where)
    text = meta[KEY_DOC]
    if bytes_digest(DOC_SCHEMA, text.encode("utf-8")) != meta[KEY_DIGEST]:
        raise IntegrityError("metadata digest mismatch (the fibquant document was altered)",
                             path=where)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"fibquant document is not JSON ({err.msg})", path=where) from None
    if not isinstance(doc, dict) or set(doc) != DOC_KEYS:
        raise IntegrityError("fibquant document has the wrong keys", path=where)
    if str(doc["format_version"]) != version:
        raise IntegrityError(f"format version {version} differs from the document's "
                             f"{doc['format_version']!r} (altered metadata)", path=where)
    stored = set(header.tensors)
    recorded = set(doc["arrays"]) if isinstance(doc["arrays"], dict) else set()
    if stored != recorded:
        extra = sorted(stored ^ recorded)[:3]
        raise IntegrityError(f"stored tensors differ from the recorded ones ({extra})", path=where)
    return Compressed(header, doc)


def _check_canonical_header(header: stfile.Header) -> None:
    """The header bytes must equal our serialization of what they parse to."""
    with open(header.path, "rb") as fh:
        raw = fh.read(header.data_start)
    expected = stfile.header_bytes(list(header.tensors.values()), header.metadata,
                                    str(header.path))
    if raw != expected:
        raise IntegrityError("header bytes are not in canonical form (altered header)",
                             path=str(header.path))


def verify_array(comp: Compressed, name: str) -> None:
    """Check one stored array against its recorded digest."""
    info = comp.header.tensors[name]
    found = tensor_digest(info.dtype, info.shape, stfile.read_raw(comp.header, name))
    if found != comp.doc["arrays"][name]:
        raise IntegrityError("digest mismatch (stored bytes were altered)",
                             path=str(comp.path), tensor=name)
