"""What the subcommands do, as functions returning result dataclasses (no printing here)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fibquant_cli.formats import container, stfile
from fibquant_cli.ops import decompress as pipeline
from fibquant_cli.storage.codebook_cache import load_or_build
from fibquant_cli.core.codebook import STREAM_EVALUATION, d_unit, stream
from fibquant_cli.core.codec import default_rotation
from fibquant_cli.core.params import Profile
from fibquant_cli.core.scalar import ScalarQuantizer
from fibquant_cli.formats.digest import file_digest, tensor_digest
from fibquant_cli.errors import FibQuantError, InvalidInputError
from fibquant_cli.formats.kvdump import check_finite, open_dump, read_layer
from fibquant_cli.formats.manifest import load_manifest

EVAL_VECTORS = 100_000


@dataclass(frozen=True)
class CodebookReport:
    head_dim: int
    block_dim: int
    size: int
    seed: int
    rate_bits: float
    wire_bits: int
    bits_per_vector: int
    train_samples: int
    eval_vectors: int
    d_unit: float
    scalar_d_unit: float | None
    gain_db: float | None
    shannon_bound: float
    shannon_gap_db: float
    origin: str
    seconds: float
    cache_path: str | None
    profile_digest: str

    def to_json(self) -> dict:
        return asdict(self)


def codebook_report(profile: Profile, eval_vectors: int = EVAL_VECTORS) -> CodebookReport:
    """Build or load the codebook of ``profile`` and measure it on fresh unit vectors."""
    codebook, origin = load_or_build(profile)
    d, b = profile.head_dim, profile.rate_bits
    fib = d_unit(codebook, d, eval_vectors, stream(profile.seed, STREAM_EVALUATION))
    scalar = None
    bits = profile.whole_bits
    if bits is not None:
        rng = stream(profile.seed, STREAM_EVALUATION)
        sq = ScalarQuantizer(d, bits, default_rotation(profile))
        total = 0.0
        for start in range(0, eval_vectors, 8192):
            m = min(8192, eval_vectors - start)
            u = rng.standard_normal((m, d))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            total += float(((u - sq.decode(*sq.encode(u))) ** 2).sum())
        scalar = total / eval_vectors
    bound = 2.0 ** (-2.0 * b)
    return CodebookReport(
        head_dim=d, block_dim=profile.block_dim, size=profile.size, seed=profile.seed,
        rate_bits=b, wire_bits=profile.wire_bits, bits_per_vector=profile.bits_per_vector,
        train_samples=profile.train_samples, eval_vectors=eval_vectors, d_unit=fib,
        scalar_d_unit=scalar,
        gain_db=None if scalar is None else 10.0 * math.log10(scalar / fib),
        shannon_bound=bound, shannon_gap_db=10.0 * math.log10(fib / bound),
        origin=origin.kind + (f" ({origin.note})" if origin.note else ""),
        seconds=origin.seconds, cache_path=None if origin.path is None else str(origin.path),
        profile_digest=profile.digest,
    )


# --------------------------------------------------------------------------- validate


@dataclass
class ValidateReport:
    path: str
    kind: str  # "dump" or "compressed"
    checks: list = field(default_factory=list)  # (name, ok, detail)
    error: FibQuantError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok,
                "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                "error": None if self.error is None else str(self.error)}


def validate(path, manifest=None) -> ValidateReport:
    """Run every check of a dump (against its manifest) or of a compressed file."""
    path = Path(path)
    rep = ValidateReport(str(path), "dump")
    try:
        header = stfile.read_header(path)
    except FibQuantError as err:
        rep.checks.append(("safetensors header", False, err.reason))
        rep.error = err
        return rep
    if container.is_compressed(header):
        rep.kind = "compressed"
        try:
            pipeline.verify(path, rep.checks)
        except FibQuantError as err:
            rep.checks.append(("integrity", False, err.reason))
            rep.error = err
        return rep
    rep.checks.append(("safetensors header", True, f"{len(header.tensors)} tensors"))
    step = "manifest and shape contract"
    try:
        dump = open_dump(path, manifest)
        rep.checks.append((step, True, f"{dump.manifest_path.name}: {len(dump.manifest.entries)} entries"))
        rep.checks.append(("tensors vs manifest", True, "names, shapes and dtypes agree"))
        step = "values finite"
        n = 0
        for entry in dump.manifest.entries:
            for layer in range(entry.shape.layers):
                read_layer(dump, entry, layer)
                n += 1
        if dump.manifest.attention is not None:
            for name in dump.manifest.attention.query_tensors:
                check_finite(dump.header, name, stfile.read_tensor(dump.header, name))
                n += 1
        rep.checks.append((step, True, f"{n} layer tensors scanned"))
        rep.checks.append(("pass-through tensors", True,
                           ", ".join(dump.passthrough_names) or "none"))
    except FibQuantError as err:
        if step == "manifest and shape contract" and err.path and err.path == str(path):
            rep.checks.append((step, True, "manifest parses"))
            step = "tensors vs manifest"
        rep.checks.append((step, False, err.reason))
        rep.error = err
    return rep


# --------------------------------------------------------------------------- digest


@dataclass
class DigestReport:
    path: str
    kind: str  # "manifest", "dump" or "compressed"
    rows: list = field(default_factory=list)  # dicts: name, digest, [status]
    summary: dict = field(default_factory=dict)
    error: FibQuantError | None = None

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "digests": self.rows, **self.summary,
                "ok": self.error is None,
                "error": None if self.error is None else str(self.error)}


def digest(path) -> DigestReport:
    """Digests of a manifest (per entry shape), a dump (per tensor + file) or a compressed file."""
    path = Path(path)
    if path.suffix == ".json":
        manifest = load_manifest(path)
        rows = [{"name": f"entries[{i}] ({e.shape.role})", "tensors": list(e.tensors),
                 "digest": e.shape.digest()} for i, e in enumerate(manifest.entries)]
        return DigestReport(str(path), "manifest", rows)
    header = stfile.read_header(path)
    if not container.is_compressed(header):
        rows = []
        for name, info in header.tensors.items():
            rows.append({"name": name, "dtype": info.dtype, "shape": list(info.shape),
                         "digest": tensor_digest(info.dtype, info.shape,
                                                 stfile.read_raw(header, name))})
        whole = file_digest({r["name"]: r["digest"] for r in rows})
        return DigestReport(str(path), "dump", rows, {"file_digest": whole})
    comp = container.open_compressed(path)
    rep = DigestReport(str(path), "compressed", summary={
        "source_file_digest": comp.doc["source"]["file_digest"],
        "document_digest": comp.header.metadata[container.KEY_DIGEST]})
    for name, recorded in comp.doc["arrays"].items():
        try:
            container.verify_array(comp, name)
            status = "ok"
        except FibQuantError as err:
            status = "MISMATCH"
            rep.error = rep.error or err
        rep.rows.append({"name": name, "digest": recorded, "status": status})
    return rep


# --------------------------------------------------------------------------- eval


def evaluate(original, other, *, manifest=None, max_queries: int = 2048):
    """Attention fidelity of ``other`` (compressed file or restored dump) against ``original``."""
    from fibquant_cli.ops.fidelity import measure, require_kv_pair

    dump = open_dump(original, manifest)
    require_kv_pair(dump, "attention fidelity")
    header = stfile.read_header(other)
    if container.is_compressed(header):
        loaded = pipeline.load_verified(other)
        if loaded.manifest.to_json() != dump.manifest.to_json():
            raise InvalidInputError("was compressed from a dump with another manifest",
                                    path=str(other))
        reconstruct = pipeline.reconstructor(loaded)
    else:
        restored = open_dump(other, manifest if manifest is not None else dump.manifest_path)

        def reconstruct(i: int, layer: int) -> np.ndarray:
            return read_layer(restored, restored.manifest.entries[i], layer).astype(np.float32)

    return measure(dump, reconstruct, max_queries=max_queries)
