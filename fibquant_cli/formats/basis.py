"""The model-level basis file ``MODEL.basis.safetensors``: per layer and role, a PCA basis
learned once per model from calibration dumps (``fibquant calibrate``), read by transform
coding to decorrelate a cache before quantizing it (docs/transform.md).

Glossary
--------
row         one token of one layer and role: the concatenation over KV heads ``h`` of
            ``k[b, h, t, :]`` (head-major), ``D = kv_heads * head_dim`` values; keys with RoPE
            undone when the file's ``rope`` is not null.
mean        ``(D,) float32``, the calibration mean of the rows (tokens after ``keep_first``).
basis       ``(D, D) float32``, orthonormal columns: the principal directions of the rows,
            by decreasing variance; each column's largest-magnitude entry is positive.
variance    ``(D,) float32``, the rows' variance along each column (population variance,
            decreasing, >= 0).
sensitivity ``(layers, 2) float32``, optional: per layer, column 0 keys and 1 values, the drop
            of the mean attention-output cosine per unit of relative MSE, or with
            ``calibrate --model`` the model's next-token KL per unit (docs/transform.md).
query_weight ``(layers, D) float32``, optional: per layer, the calibration queries' energy
            along each key column, relative to the mean column (docs/transform.md).

Layout
------
Tensors, in this order: for each layer ``l``, for ``r`` in (key, value):
``layer.{l}.{r}.mean``, ``layer.{l}.{r}.basis``, ``layer.{l}.{r}.variance``; then
``sensitivity`` and ``query_weight`` when present. All F32. The safetensors metadata holds one key,
``fibquant_basis``, whose value is compact JSON with exactly these keys::

    {"schema": "fibquant_basis_v1", "layers", "kv_heads", "head_dim",
     "rope": {"theta", "style"} | null, "keep_first", "tokens",
     "sources": [{"file", "digest"}], "digest"}

``rope`` null means the keys were fitted as stored. ``tokens`` is the number of rows fitted
per matrix. ``sources`` name the calibration dumps (file name and ``file_digest``), sorted by
digest. ``digest`` content-addresses the basis: ``json_digest(BASIS_SCHEMA, {...})`` over the
metadata keys ``schema`` to ``tokens`` (in that order) plus ``"tensors": [[name, tensor
digest], ...]`` in sorted name order. ``sources`` are not hashed: the same basis learned from
the same numbers is the same basis, and a file name says nothing about the content.

Writing goes through ``storage/basis.write_basis`` (the one publish path lives in storage/);
this module lays out the bytes (``encode_basis``) and reads them back (``load_basis``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fibquant_cli.errors import FibQuantError, IntegrityError, InvalidInputError
from fibquant_cli.formats import stfile
from fibquant_cli.formats.digest import BASIS_SCHEMA, json_digest, parse_digest, tensor_digest
from fibquant_cli.formats.untrusted import (
    DuplicateKey,
    LongInteger,
    label,
    no_duplicates,
    parse_json_int,
)

METADATA_KEY = "fibquant_basis"
ROLES = ("key", "value")
ROPE_STYLES = ("half", "interleaved")
SENSITIVITY = "sensitivity"
QUERY_WEIGHT = "query_weight"
META_KEYS = ("schema", "layers", "kv_heads", "head_dim", "rope", "keep_first", "tokens",
             "sources", "digest")
# The hashed part of the metadata (sources and the digest itself are not).
HASHED_KEYS = META_KEYS[:7]
# Columns must be orthonormal to this (float32 storage leaves ~1e-7; a corrupted or
# hand-made file is far off).
ORTHONORMAL_TOLERANCE = 1e-3
# Bounds on the geometry read from an untrusted file, so a hostile header cannot ask for a
# matrix of 2**64 elements before any tensor is looked at.
MAX_LAYERS = 1 << 16
MAX_DIM = 1 << 15


@dataclass(frozen=True)
class BasisRope:
    """The RoPE undone on the keys before fitting (base ``theta``, pair ``style``)."""

    theta: float
    style: str

    def to_json(self) -> dict[str, Any]:
        return {"theta": self.theta, "style": self.style}


@dataclass(frozen=True)
class BasisSource:
    """One calibration dump: its file name and ``file_digest``."""

    file: str
    digest: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "digest": self.digest}


def tensor_names(layer: int, role: str) -> tuple[str, str, str]:
    """Names of the mean, basis and variance of one matrix."""
    return tuple(f"layer.{layer}.{role}.{part}" for part in ("mean", "basis", "variance"))


def _expected_shapes(layers: int, dim: int, sensitivity: bool,
                     query_weight: bool = False) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for role in ROLES:
            mean, basis, variance = tensor_names(layer, role)
            shapes[mean], shapes[basis], shapes[variance] = (dim,), (dim, dim), (dim,)
    if sensitivity:
        shapes[SENSITIVITY] = (layers, len(ROLES))
    if query_weight:
        shapes[QUERY_WEIGHT] = (layers, dim)
    return shapes


def value_problem(name: str, arr: np.ndarray) -> str | None:
    """Why the values of tensor ``name`` are not a valid basis part, or None."""
    if not np.isfinite(arr).all():
        pos = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        return f"non-finite value {arr[pos]} at position {list(pos)}"
    if name.endswith(".basis"):
        # float32 products err by ~1e-5 here (D terms of 2^-24), far below the tolerance
        a32 = np.asarray(arr, dtype=np.float32)
        gram = (a32.T @ a32).astype(np.float64)
        gram[np.diag_indices_from(gram)] -= 1.0
        worst = float(np.abs(gram).max()) if gram.size else 0.0
        if worst > ORTHONORMAL_TOLERANCE:
            return (f"columns are not orthonormal: |B^T B - I| reaches {worst:.3g} "
                    f"(at most {ORTHONORMAL_TOLERANCE:g})")
    if (name.endswith(".variance") or name in (SENSITIVITY, QUERY_WEIGHT)) and arr.size \
            and arr.min() < 0:
        pos = int(np.argmin(arr.reshape(-1)))
        what = {SENSITIVITY: "sensitivity", QUERY_WEIGHT: "query weight"}.get(name, "variance")
        return f"negative {what} {float(arr.reshape(-1)[pos])} at flat index {pos}"
    return None


def basis_digest(meta: Mapping[str, Any], tensor_digests: Mapping[str, str]) -> str:
    """The content address of a basis: hashed metadata keys plus tensor digests by name."""
    obj = {key: meta[key] for key in HASHED_KEYS}
    obj["tensors"] = [[name, tensor_digests[name]] for name in sorted(tensor_digests)]
    return json_digest(BASIS_SCHEMA, obj)


def _meta(layers: int, kv_heads: int, head_dim: int, rope: BasisRope | None, keep_first: int,
          tokens: int) -> dict[str, Any]:
    return {"schema": BASIS_SCHEMA, "layers": layers, "kv_heads": kv_heads,
            "head_dim": head_dim, "rope": None if rope is None else rope.to_json(),
            "keep_first": keep_first, "tokens": tokens}


def encode_basis(*, layers: int, kv_heads: int, head_dim: int, rope: BasisRope | None,
                 keep_first: int, tokens: int, sources: Sequence[BasisSource],
                 matrices: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
                 sensitivity: np.ndarray | None = None,
                 query_weight: np.ndarray | None = None,
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (in file order, float32) and metadata of a basis file.

    ``matrices[(layer, role)]`` is ``(mean (D,), basis (D, D), variance (D,))``. Values are
    checked as ``load_basis`` checks them, so no file that would be refused is written.
    Sources are sorted by digest, so the bytes do not depend on the order dumps were given.

    Raises:
        InvalidInputError: a missing matrix, a wrong shape, or values ``load_basis`` refuses.
    """
    dim = kv_heads * head_dim
    shapes = _expected_shapes(layers, dim, sensitivity is not None, query_weight is not None)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for role in ROLES:
            if (layer, role) not in matrices:
                raise InvalidInputError(f"no matrix for layer {layer} {role}")
            for name, arr in zip(tensor_names(layer, role), matrices[(layer, role)]):
                tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
    if sensitivity is not None:
        tensors[SENSITIVITY] = np.ascontiguousarray(sensitivity, dtype=np.float32)
    if query_weight is not None:
        tensors[QUERY_WEIGHT] = np.ascontiguousarray(query_weight, dtype=np.float32)
    for name, arr in tensors.items():
        if arr.shape != shapes[name]:
            raise InvalidInputError(f"shape {list(arr.shape)}, expected {list(shapes[name])}",
                                    tensor=name)
        problem = value_problem(name, arr)
        if problem:
            raise InvalidInputError(problem, tensor=name)
    meta = _meta(layers, kv_heads, head_dim, rope, keep_first, tokens)
    digests = {name: tensor_digest("F32", arr.shape, arr) for name, arr in tensors.items()}
    meta["sources"] = [s.to_json() for s in sorted(sources, key=lambda s: (s.digest, s.file))]
    meta["digest"] = basis_digest(meta, digests)
    text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return tensors, {METADATA_KEY: text}


@dataclass(frozen=True, eq=False)
class Basis:
    """A loaded, verified basis file. Matrices are read on demand (``matrix``) and checked
    against the digests verified at load, so memory stays one matrix however large the model
    and a file changed since loading is refused rather than silently used; or, loaded with
    ``keep`` (a decoder reads them all), held as verified."""

    path: Path
    layers: int
    kv_heads: int
    head_dim: int
    rope: BasisRope | None
    keep_first: int
    tokens: int
    sources: tuple[BasisSource, ...]
    digest: str
    _header: stfile.Header | None  # None: held in memory (``_arrays``)
    _tensor_digests: Mapping[str, str]
    _sensitivity: np.ndarray | None
    _query_weight: np.ndarray | None = None
    _arrays: Mapping[str, np.ndarray] | None = None  # held in memory (``basis_of``, ``keep``)

    @property
    def dim(self) -> int:
        """D = kv_heads * head_dim, the length of a row."""
        return self.kv_heads * self.head_dim

    def matrix(self, layer: int, role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean (D,), basis (D, D), variance (D,))`` float32 of ``layer`` and ``role``.

        Example::

            mean, basis, variance = load_basis("smollm2.basis.safetensors").matrix(3, "key")
            coefficients = (rows - mean) @ basis   # decorrelated, variance ~ ``variance``
        """
        self._check_index(layer, role)
        return tuple(self._read(name) for name in tensor_names(layer, role))

    def sensitivity(self, layer: int, role: str) -> float | None:
        """Mean attention-cosine drop per unit of relative MSE of this matrix, or None when
        the calibration dumps had no queries."""
        self._check_index(layer, role)
        if self._sensitivity is None:
            return None
        return float(self._sensitivity[layer, ROLES.index(role)])

    def query_weight(self, layer: int) -> np.ndarray | None:
        """(D,) float32: how much a unit of squared error along each key column moves the
        attention logits, relative to the mean column (mean 1), or None without queries."""
        self._check_index(layer, "key")
        return None if self._query_weight is None else self._query_weight[layer]

    def _check_index(self, layer: int, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} is outside [0, {self.layers})")

    def _read(self, name: str) -> np.ndarray:
        if self._arrays is not None:
            return self._arrays[name].copy()
        info = self._header.tensors[name]
        raw = stfile.read_raw(self._header, name)
        if tensor_digest(info.dtype, info.shape, raw) != self._tensor_digests[name]:
            raise IntegrityError("the tensor changed since the basis was loaded",
                                 path=str(self.path), tensor=name)
        return np.frombuffer(raw, dtype="<f4").reshape(info.shape).astype(np.float32)


def basis_of(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
             path: str | os.PathLike) -> Basis:
    """A basis held in memory, from ``encode_basis``'s tensors and metadata (checked there):
    what ``compress`` fits on a dump itself and embeds instead of writing a file. ``path``
    names it in messages (the dump it was fitted on)."""
    meta = json.loads(metadata[METADATA_KEY])
    arrays = {name: np.asarray(arr, dtype=np.float32) for name, arr in tensors.items()}
    return Basis(Path(path), meta["layers"], meta["kv_heads"], meta["head_dim"],
                 _rope(meta["rope"]), meta["keep_first"], meta["tokens"],
                 _sources(meta["sources"]), meta["digest"], None, {},
                 arrays.get(SENSITIVITY), arrays.get(QUERY_WEIGHT), arrays)


def _fail(reason: str, field: str | None = None) -> InvalidInputError:
    return InvalidInputError(reason, field=field)


def _int(obj: dict, key: str, low: int, high: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"expected an integer in [{low}, {high}], found {label(value)}",
                    f"{METADATA_KEY}.{key}")
    return value


def _rope(value: Any) -> BasisRope | None:
    where = f"{METADATA_KEY}.rope"
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"theta", "style"}:
        raise _fail(f"expected null or an object with keys theta, style, found {label(value)}",
                    where)
    theta, style = value["theta"], value["style"]
    if (isinstance(theta, bool) or not isinstance(theta, (int, float))
            or not math.isfinite(theta) or theta <= 1):
        raise _fail(f"expected a finite number > 1, found {label(theta)}", f"{where}.theta")
    if style not in ROPE_STYLES:
        raise _fail(f"{label(style)} is not one of {', '.join(ROPE_STYLES)}", f"{where}.style")
    return BasisRope(float(theta), style)


def _sources(value: Any) -> tuple[BasisSource, ...]:
    where = f"{METADATA_KEY}.sources"
    if not isinstance(value, list):
        raise _fail(f"expected an array, found {label(value)}", where)
    out = []
    for i, item in enumerate(value):
        if (not isinstance(item, dict) or set(item) != {"file", "digest"}
                or not isinstance(item["file"], str)):
            raise _fail(f"expected an object with keys file (a string), digest, found "
                        f"{label(item)}", f"{where}[{i}]")
        parse_digest(item["digest"])
        out.append(BasisSource(item["file"], item["digest"]))
    return tuple(out)


def _parse_meta(header: stfile.Header) -> dict[str, Any]:
    metadata = header.metadata or {}
    if METADATA_KEY not in metadata:
        raise InvalidInputError(f"not a fibquant basis file (no '{METADATA_KEY}' metadata)")
    try:
        obj = json.loads(metadata[METADATA_KEY], object_pairs_hook=no_duplicates,
                         parse_int=parse_json_int)
    except (json.JSONDecodeError, DuplicateKey, LongInteger, RecursionError) as err:
        raise _fail(f"not valid JSON ({type(err).__name__}: {label(str(err))})",
                    METADATA_KEY) from None
    if not isinstance(obj, dict):
        raise _fail(f"expected a JSON object, found {label(obj)}", METADATA_KEY)
    if set(obj) != set(META_KEYS):
        missing = [k for k in META_KEYS if k not in obj]
        extra = sorted(k for k in obj if k not in META_KEYS)
        raise _fail(f"keys differ from {', '.join(META_KEYS)}: missing {missing or 'none'}, "
                    f"unknown {[label(k) for k in extra] or 'none'}", METADATA_KEY)
    if obj["schema"] != BASIS_SCHEMA:
        raise _fail(f"found {label(obj['schema'])}, expected {BASIS_SCHEMA}",
                    f"{METADATA_KEY}.schema")
    _int(obj, "layers", 1, MAX_LAYERS)
    _int(obj, "kv_heads", 1, MAX_DIM)
    _int(obj, "head_dim", 1, MAX_DIM)
    if obj["kv_heads"] * obj["head_dim"] > MAX_DIM:
        raise _fail(f"kv_heads * head_dim = {obj['kv_heads'] * obj['head_dim']} exceeds "
                    f"{MAX_DIM}", METADATA_KEY)
    _int(obj, "keep_first", 0, 2**32 - 1)
    _int(obj, "tokens", 1, 2**63 - 1)
    parse_digest(obj["digest"])
    return obj


def _check_layout(header: stfile.Header, layers: int, dim: int) -> None:
    shapes = _expected_shapes(layers, dim, SENSITIVITY in header.tensors,
                              QUERY_WEIGHT in header.tensors)
    for name, shape in shapes.items():
        info = header.tensors.get(name)
        if info is None:
            raise InvalidInputError("missing tensor", tensor=name)
        if info.dtype != "F32" or info.shape != shape:
            raise InvalidInputError(f"expected F32 {list(shape)}, found {info.dtype} "
                                    f"{list(info.shape)}", tensor=name)
    extra = [name for name in header.tensors if name not in shapes]
    if extra:
        raise InvalidInputError("unexpected tensor in a basis file", tensor=label(extra[0]))


def load_basis(path: str | os.PathLike, *, keep: bool = False) -> Basis:
    """Open and verify a basis file: metadata, every tensor's name, dtype, shape and values,
    and the content digest.

    Every tensor is read once (to hash it); only the small sensitivity table is kept, unless
    ``keep``: then every tensor is, for a caller about to read them all (a decoder), which
    saves reading and hashing each a second time. Values already found sound in this process
    (the same tensor digest) are not checked again (``_SOUND``).

    Raises:
        InvalidInputError: not a basis file, bad metadata, a missing, unexpected or misshapen
            tensor, non-finite values, columns not orthonormal, negative variance.
        IntegrityError: the content does not match the recorded digest.

    Example::

        basis = load_basis("smollm2.basis.safetensors")
        mean, columns, variance = basis.matrix(0, "key")
    """
    header = stfile.read_header(path)
    where = str(header.path)
    try:
        meta = _parse_meta(header)
        rope = _rope(meta["rope"])
        sources = _sources(meta["sources"])
        dim = meta["kv_heads"] * meta["head_dim"]
        _check_layout(header, meta["layers"], dim)
        digests, problem, sensitivity, query_weight = {}, None, None, None
        kept: dict[str, np.ndarray] | None = {} if keep else None
        # a decoder keeps every tensor: one read for all of them (each opening of the file
        # costs its checks, 26 of them were 2 ms of opening a file against a 4-layer basis)
        together = stfile.read_tensors(header, list(header.tensors)) if keep else {}
        for name, info in header.tensors.items():
            arr = together.get(name)
            if arr is None:
                arr = np.frombuffer(stfile.read_raw(header, name), dtype="<f4").reshape(info.shape)
            digests[name] = tensor_digest(info.dtype, info.shape, arr)
            if problem is None:  # reported after the digest: a flipped byte is an integrity error
                problem = _value_problem_once(name, digests[name], arr)
            if kept is not None:
                kept[name] = arr.astype(np.float32)
            if name == SENSITIVITY:
                sensitivity = arr.astype(np.float32)
            if name == QUERY_WEIGHT:
                query_weight = arr.astype(np.float32)
        if basis_digest(meta, digests) != meta["digest"]:
            raise IntegrityError("content does not match its digest (the file was changed or "
                                 "damaged after it was written)")
        if problem is not None:
            raise problem
    except FibQuantError as err:
        raise err.at(path=where) from None
    return Basis(header.path, meta["layers"], meta["kv_heads"], meta["head_dim"], rope,
                 meta["keep_first"], meta["tokens"], sources, meta["digest"], header, digests,
                 sensitivity, query_weight, kept)


# (name, tensor digest) of basis tensors whose values passed ``value_problem`` in this process:
# the digest hashes every byte, so the same digest is the same values and the same verdict.
# Checking a (D, D) basis' orthonormality is most of a basis load (3 of 6 ms for 8 layers at
# D = 192), paid again by every file a library user opens against the same basis.
_SOUND: set[tuple[str, str]] = set()
_SOUND_MAX = 1 << 16


def _value_problem_once(name: str, digest: str, arr: np.ndarray) -> InvalidInputError | None:
    if (name, digest) in _SOUND:
        return None
    reason = value_problem(name, arr)
    if reason is not None:
        return InvalidInputError(reason, tensor=name)
    if len(_SOUND) >= _SOUND_MAX:
        _SOUND.clear()
    _SOUND.add((name, digest))
    return None
