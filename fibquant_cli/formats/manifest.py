"""The sidecar shape manifest that says what the tensors of a KV-cache dump are.

A dump ``X.safetensors`` is described by ``X.manifest.json`` beside it (``manifest_path_for``).
docs/manifest.md is the user's reference: every key, the contract's rules in order, the
layouts, the attention object, the optional ``rope`` object, and the messages for bad input.
In brief: ``{"schema_version": "fibquant_kv_manifest_v1", "entries": [...], "attention":
{...}}``; each entry has a ``shape`` in the fib-quant crate's contract
(``fib_quant_kv_tensor_shape_v1``, ``KvShape``), the ``tensors`` holding it (one 5-D tensor or
one 4-D tensor per layer), their ``layout`` (``bhtd`` or ``bthd``) and, on ``post_rope`` keys,
an optional ``rope`` object (``RopeSpec``, outside the shape so shape digests do not change).

Parsing is strict (``manifest_json``): unknown, missing or duplicated keys, wrong JSON types
and values outside the allowed lists are errors naming the file and the place, e.g.
``kv.manifest.json: entries[1].shape: unknown key 'head_dimm'``. How entries map onto a
dump's tensors is ``kvlayout``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fibquant_cli.errors import FibQuantError, InvalidInputError, ResourceError
from fibquant_cli.formats import stfile, untrusted
from fibquant_cli.formats.digest import KV_SHAPE_SCHEMA, json_digest
from fibquant_cli.formats.manifest_json import (
    check_keys,
    describe,
    expect_choice,
    expect_int,
    expect_names,
    expect_object,
    fail,
    located,
    object_pairs,
    quote,
    reject_constant,
)

MANIFEST_SCHEMA = "fibquant_kv_manifest_v1"
MANIFEST_SUFFIX = ".manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

ROLES = ("key", "value")
ATTENTION_KINDS = ("mha", "mqa", "gqa")
DTYPES = ("f16", "bf16", "f32")
ROPE_STATES = ("pre_rope", "post_rope", "not_applicable")
LAYOUTS = ("bhtd", "bthd")
ROPE_STYLES = ("half", "interleaved")
ROPE_KEYS = ("theta", "style", "first_position")
DEFAULT_LAYOUT = "bhtd"

SIZE_FIELDS = ("batch", "layers", "kv_heads", "query_heads", "tokens", "head_dim")
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


_ENUM_FIELDS = {
    "role": ROLES,
    "attention_kind": ATTENTION_KINDS,
    "dtype": DTYPES,
    "rope_state": ROPE_STATES,
}


@dataclass(frozen=True, kw_only=True)
class KvShape:
    """Logical KV tensor shape (the crate's ``KvTensorShapeV1``); fields in contract order.

    Keyword-only, so ``kv_heads`` and ``query_heads`` cannot be swapped by position.
    Integral non-bool values (e.g. numpy integers) are stored as Python ints.
    """

    schema_version: str = KV_SHAPE_SCHEMA
    role: str
    attention_kind: str
    batch: int
    layers: int
    kv_heads: int
    query_heads: int
    tokens: int
    head_dim: int
    dtype: str
    rope_state: str

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))

    def validate(self) -> None:
        """Apply the contract's rules in order; the first failure is raised.

        Before rules 2-8 (after rule 1) the field types are checked, which the crate gets
        from its type system: enum values must be in their lists, sizes must be ints.

        Raises:
            InvalidInputError: rules 1-7, with the contract's exact message.
            ResourceError: rule 8, ``kv shape size overflow`` (a size beyond u32, or an
                element count beyond u64).
        """
        if self.schema_version != KV_SHAPE_SCHEMA:
            raise InvalidInputError(
                f"kv shape schema_version {self.schema_version}, expected {KV_SHAPE_SCHEMA}"
            )
        self._check_types()
        for name in SIZE_FIELDS:
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"kv shape {name} must be > 0")
        kind = self.attention_kind
        if kind == "mha" and self.query_heads != self.kv_heads:
            raise InvalidInputError("MHA requires query_heads == kv_heads")
        if kind == "mqa" and self.kv_heads != 1:
            raise InvalidInputError("MQA requires kv_heads == 1")
        if kind in ("gqa", "mqa") and self.query_heads % self.kv_heads != 0:
            raise InvalidInputError("query_heads must be divisible by kv_heads")
        if self.role == "key" and self.rope_state == "not_applicable":
            raise InvalidInputError("key tensors must declare pre_rope or post_rope")
        if self.role == "value" and self.rope_state in ("pre_rope", "post_rope"):
            raise InvalidInputError("value tensors must use not_applicable rope state")
        if any(getattr(self, name) > U32_MAX for name in SIZE_FIELDS):
            raise ResourceError("kv shape size overflow")
        _ = self.element_count

    def _check_types(self) -> None:
        for name, allowed in _ENUM_FIELDS.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidInputError(
                    f"kv shape {name} {value!r} is not one of {', '.join(allowed)}"
                )
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if type(value) is not int:
                raise InvalidInputError(
                    f"kv shape {name} must be an integer, found {type(value).__name__}"
                )

    def validate_block_dim(self, block_dim: int) -> None:
        """Validate, then require ``block_dim`` > 0 dividing ``head_dim``."""
        self.validate()
        if (
            isinstance(block_dim, bool)
            or not isinstance(block_dim, numbers.Integral)
            or block_dim <= 0
            or self.head_dim % block_dim != 0
        ):
            raise InvalidInputError(
                f"head_dim {self.head_dim} is not divisible by block_dim {block_dim}"
            )

    @property
    def vector_count(self) -> int:
        """Number of head vectors, batch * layers * kv_heads * tokens (ResourceError past u64)."""
        count = math.prod((self.batch, self.layers, self.kv_heads, self.tokens))
        if count > U64_MAX:
            raise ResourceError("kv shape size overflow")
        return count

    @property
    def element_count(self) -> int:
        """Number of scalars in canonical form, vector_count * head_dim (ResourceError past u64)."""
        count = self.vector_count * self.head_dim
        if count > U64_MAX:
            raise ResourceError("kv shape size overflow")
        return count

    def to_json(self) -> dict[str, Any]:
        """The shape as a JSON object, keys in contract order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def digest(self) -> str:
        """The crate's digest: BLAKE3 over the schema tag, 0x00, compact JSON (after validate)."""
        self.validate()
        return json_digest(KV_SHAPE_SCHEMA, self.to_json())


@dataclass(frozen=True)
class RopeSpec:
    """How post-RoPE keys were rotated: base ``theta``, pair ``style``, first token position."""

    theta: float
    style: str
    first_position: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"theta": self.theta, "style": self.style, "first_position": self.first_position}


@dataclass(frozen=True)
class ManifestEntry:
    """One KV tensor group: its logical shape, its safetensors tensors and their layout."""

    shape: KvShape
    tensors: tuple[str, ...]
    layout: str = DEFAULT_LAYOUT
    rope: RopeSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))

    def to_json(self) -> dict[str, Any]:
        out = {"shape": self.shape.to_json(), "tensors": list(self.tensors), "layout": self.layout}
        if self.rope is not None:
            out["rope"] = self.rope.to_json()
        return out


@dataclass(frozen=True)
class AttentionSpec:
    """Query tensors (per layer, or one 5-D) and whether attention is causal."""

    query_tensors: tuple[str, ...]
    causal: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_tensors", tuple(self.query_tensors))

    def to_json(self) -> dict[str, Any]:
        return {"query_tensors": list(self.query_tensors), "causal": self.causal}


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated sidecar manifest."""

    entries: tuple[ManifestEntry, ...]
    attention: AttentionSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON; ``parse_manifest(m.to_json(), ...) == m``."""
        out: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA,
            "entries": [entry.to_json() for entry in self.entries],
        }
        if self.attention is not None:
            out["attention"] = self.attention.to_json()
        return out


def _parse_shape(obj: Any, where: str) -> KvShape:
    obj = expect_object(obj, where)
    version = obj.get("schema_version")
    if isinstance(version, str) and version != KV_SHAPE_SCHEMA:
        raise fail(where, f"kv shape schema_version {version}, expected {KV_SHAPE_SCHEMA}")
    keys = tuple(f.name for f in fields(KvShape))
    check_keys(obj, where, keys)
    values: dict[str, Any] = {}
    for key in keys:
        if key == "schema_version":
            values[key] = expect_choice(obj[key], f"{where}.{key}", (KV_SHAPE_SCHEMA,))
        elif key in _ENUM_FIELDS:
            values[key] = expect_choice(obj[key], f"{where}.{key}", _ENUM_FIELDS[key])
        else:
            values[key] = expect_int(obj[key], f"{where}.{key}")
    shape = KvShape(**values)
    try:
        shape.validate()
    except FibQuantError as err:
        raise located(err, where) from None
    return shape


def _parse_rope(obj: Any, where: str) -> RopeSpec:
    obj = expect_object(obj, where)
    check_keys(obj, where, ROPE_KEYS)
    theta = obj["theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise fail(f"{where}.theta", f"expected a number, found {describe(theta)}")
    style = expect_choice(obj["style"], f"{where}.style", ROPE_STYLES)
    first = expect_int(obj["first_position"], f"{where}.first_position")
    return RopeSpec(theta=float(theta), style=style, first_position=first)


def _check_rope(entry: ManifestEntry, where: str) -> None:
    rope = entry.rope
    if rope is None:
        return
    if entry.shape.rope_state != "post_rope":
        raise fail(f"{where}.rope", "only an entry whose rope_state is post_rope may carry "
                    f"rope, found rope_state {entry.shape.rope_state}")
    if not (math.isfinite(rope.theta) and rope.theta > 1.0):
        raise fail(f"{where}.rope.theta", f"expected a finite number > 1, found {rope.theta!r}")
    if rope.style not in ROPE_STYLES:
        raise fail(f"{where}.rope.style",
                    f"{quote(str(rope.style))} is not one of {', '.join(ROPE_STYLES)}")
    if type(rope.first_position) is not int or not 0 <= rope.first_position <= U32_MAX:
        raise fail(f"{where}.rope.first_position",
                    f"expected an integer in [0, {U32_MAX}], found {rope.first_position!r}")
    if entry.shape.head_dim % 2:
        raise fail(f"{where}.rope", f"RoPE needs an even head_dim, found {entry.shape.head_dim}")


def _parse_entry(obj: Any, where: str) -> ManifestEntry:
    obj = expect_object(obj, where)
    check_keys(obj, where, ("shape", "tensors"), ("layout", "rope"))
    shape = _parse_shape(obj["shape"], f"{where}.shape")
    tensors = expect_names(obj["tensors"], f"{where}.tensors")
    layout = expect_choice(obj.get("layout", DEFAULT_LAYOUT), f"{where}.layout", LAYOUTS)
    rope = _parse_rope(obj["rope"], f"{where}.rope") if "rope" in obj else None
    return ManifestEntry(shape=shape, tensors=tensors, layout=layout, rope=rope)


def _parse_attention(obj: Any) -> AttentionSpec:
    where = "attention"
    obj = expect_object(obj, where)
    check_keys(obj, where, ("query_tensors", "causal"))
    queries = expect_names(obj["query_tensors"], f"{where}.query_tensors")
    causal = obj["causal"]
    if not isinstance(causal, bool):
        raise fail(f"{where}.causal", f"expected true or false, found {describe(causal)}")
    return AttentionSpec(query_tensors=queries, causal=causal)


def parse_manifest(obj: Any, *, source: str) -> Manifest:
    """Build a validated ``Manifest`` from parsed JSON.

    Args:
        obj: the decoded JSON document.
        source: file name used in error messages.

    Raises:
        InvalidInputError: any violation of the format or the shape contract.
        ResourceError: a shape whose sizes overflow (contract rule 8).

    Example:
        >>> m = load_manifest("kv.manifest.json")            # doctest: +SKIP
        >>> parse_manifest(m.to_json(), source="copy") == m   # doctest: +SKIP
        True
    """
    try:
        top = expect_object(obj, "top level")
        version = top.get("schema_version", None)
        if "schema_version" in top and version != MANIFEST_SCHEMA:
            shown = quote(version) if isinstance(version, str) else describe(version)
            raise fail("schema_version", f"found {shown}, expected {MANIFEST_SCHEMA}")
        check_keys(top, "top level", ("schema_version", "entries"), ("attention",))
        raw_entries = top["entries"]
        if not isinstance(raw_entries, list) or not raw_entries:
            raise fail("entries", f"expected a non-empty array, found {describe(raw_entries)}")
        entries = tuple(_parse_entry(e, f"entries[{i}]") for i, e in enumerate(raw_entries))
        attention = _parse_attention(top["attention"]) if "attention" in top else None
    except FibQuantError as err:
        raise err.at(path=source) from None
    manifest = Manifest(entries=entries, attention=attention)
    validate_manifest(manifest, source=source)
    return manifest


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, parse and validate a manifest file (UTF-8 JSON; a leading BOM is allowed).

    Raises:
        InvalidInputError: unreadable file, bad UTF-8, JSON syntax (with line and column),
            or any ``parse_manifest`` error.
        ResourceError: a file larger than ``MAX_MANIFEST_BYTES``.
    """
    source = str(path)
    try:
        with untrusted.open_regular(path, "a JSON file") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except InvalidInputError as err:
        reason = f"cannot read manifest ({err.reason.removeprefix('cannot read: ')})"
        raise InvalidInputError(reason, path=source) from None
    except OSError as err:
        reason = f"cannot read manifest ({err.strerror or err})"
        raise InvalidInputError(reason, path=source) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ResourceError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes", path=source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"invalid UTF-8 at byte {err.start}", path=source) from None
    try:
        obj = json.loads(text, object_pairs_hook=object_pairs, parse_constant=reject_constant,
                         parse_int=untrusted.parse_json_int)
    except untrusted.LongInteger as err:
        raise InvalidInputError(f"invalid JSON: an integer of {err.args[0]} digits (at most "
                                f"{stfile.MAX_INT_DIGITS})", path=source) from None
    except json.JSONDecodeError as err:
        raise InvalidInputError(
            f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}", path=source
        ) from None
    except RecursionError:
        raise InvalidInputError("invalid JSON: nested too deeply", path=source) from None
    except FibQuantError as err:
        raise err.at(path=source) from None
    return parse_manifest(obj, source=source)


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write ``manifest`` as indented JSON to ``path`` (inside ``storage.publish.publishing``,
    which makes it appear whole or not at all)."""
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")


def manifest_path_for(dump_path: str | os.PathLike) -> Path:
    """``X.safetensors`` -> ``X.manifest.json``; any other name gets ``.manifest.json`` appended."""
    path = Path(dump_path)
    if path.suffix == ".safetensors":
        return path.with_suffix(MANIFEST_SUFFIX)
    return path.with_name(path.name + MANIFEST_SUFFIX)


# ---------------------------------------------------------------- structure


def _count_rule(count: int, layers: int, what: str) -> str | None:
    if count == 1 or count == layers:
        return None
    if layers == 1:
        return f"expected 1 tensor (layers is 1), found {count}"
    return f"expected 1 tensor (5-D) or {layers} tensors (one {what} per layer), found {count}"


def _check_attention(manifest: Manifest) -> None:
    attention = manifest.attention
    keys = [e for e in manifest.entries if e.shape.role == "key"]
    values = [e for e in manifest.entries if e.shape.role == "value"]
    if len(keys) != 1 or len(values) != 1:
        raise fail(
            "attention",
            f"needs exactly one key entry and one value entry, found {len(keys)} key "
            f"and {len(values)} value entries",
        )
    key, value = keys[0].shape, values[0].shape
    for name in SIZE_FIELDS:
        if getattr(key, name) != getattr(value, name):
            pair = f"{getattr(key, name)} vs {getattr(value, name)}"
            raise fail("attention", f"key and value entries differ in {name} ({pair})")
    problem = _count_rule(len(attention.query_tensors), key.layers, "4-D tensor")
    if problem:
        raise fail("attention.query_tensors", problem)


def validate_manifest(manifest: Manifest, *, source: str) -> None:
    """Check a ``Manifest`` built in code the way ``parse_manifest`` checks a file.

    Shapes against the contract, tensor counts, layouts, unique tensor names and the
    attention consistency rules.
    """
    first_seen: dict[str, str] = {}

    def claim(name: str, where: str) -> None:
        if name in first_seen:
            raise InvalidInputError(
                f"listed twice in the manifest ({first_seen[name]} and {where})",
                path=source, tensor=name,
            )
        first_seen[name] = where

    try:
        if not manifest.entries:
            raise fail("entries", "expected a non-empty array, found none")
        for i, entry in enumerate(manifest.entries):
            where = f"entries[{i}]"
            try:
                entry.shape.validate()
            except FibQuantError as err:
                raise located(err, f"{where}.shape") from None
            if entry.layout not in LAYOUTS:
                shown = quote(str(entry.layout))
                raise fail(f"{where}.layout", f"{shown} is not one of {', '.join(LAYOUTS)}")
            _check_rope(entry, where)
            if not entry.tensors:
                raise fail(f"{where}.tensors", "expected a non-empty array of tensor names")
            problem = _count_rule(len(entry.tensors), entry.shape.layers, "4-D tensor")
            if problem:
                raise fail(f"{where}.tensors", problem)
            for j, name in enumerate(entry.tensors):
                claim(name, f"{where}.tensors[{j}]")
        if manifest.attention is not None:
            for j, name in enumerate(manifest.attention.query_tensors):
                claim(name, f"attention.query_tensors[{j}]")
            if not isinstance(manifest.attention.causal, bool):
                found = describe(manifest.attention.causal)
                raise fail("attention.causal", f"expected true or false, found {found}")
            _check_attention(manifest)
    except FibQuantError as err:
        raise err.at(path=source) from None
