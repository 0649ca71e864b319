"""What compress reports: measured sizes (everything counted) and errors, per entry and total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from fibquant_cli.core.layer import SOURCE_DTYPES
from fibquant_cli.core.metrics import ErrorAccumulator
from fibquant_cli.formats import dtypes
from fibquant_cli.formats.container import RAW_PREFIX, codebook_name, rotation_name
from fibquant_cli.formats.kvdump import Dump


@dataclass(frozen=True)
class RoleStats:
    """Measured size and error of one manifest entry (or the total)."""

    label: str
    vectors: int
    values: int
    source_bytes: int
    payload_bytes: int
    compressed_bytes: int
    ratio: float
    payload_bits_per_value: float
    bits_per_value: float
    rel_mse: float
    cosine_mean: float
    cosine_min: float
    scalar_rel_mse: float | None = None
    profile: dict | None = None


@dataclass
class CompressReport:
    source: str
    output: str
    file_bytes: int
    passthrough_bytes: int
    entries: list[RoleStats]
    total: RoleStats
    passthrough: list[str] = field(default_factory=list)
    attention: object = None  # a fidelity.FidelityReport, or None when not measured
    spec: dict | None = None
    seconds: float = 0.0
    jobs: int = 1
    own_basis: dict | None = None  # compress without --basis: ops/own_basis.OwnBasisDecision

    def to_json(self) -> dict:
        out = asdict(self)
        out["attention"] = None if self.attention is None else self.attention.to_json()
        return out


def compress_report(dump: Dump, out: Path, file_bytes: int, n_bytes: dict, quantizers, profiles,
            runs: dict) -> CompressReport:
    """Sizes and errors per entry and in total; shared bytes are split across their users."""
    passthrough_bytes = sum(b for n, b in n_bytes.items() if n.startswith(RAW_PREFIX))
    header_bytes = file_bytes - sum(n_bytes.values())
    distinct = list(quantizers)
    users = {p: profiles.count(p) for p in distinct}
    rows, accs, scalar_accs = [], [], []
    for i, entry in enumerate(dump.manifest.entries):
        p = profiles[i]
        j = distinct.index(p)
        results = runs.get(i, [])
        acc = ErrorAccumulator.merge(r.acc for r in results)
        scal = [r.scalar_acc for r in results]
        scalar_acc = None if any(s is None for s in scal) else ErrorAccumulator.merge(scal)
        payload = sum(r.payload for r in results)
        shared = (n_bytes[codebook_name(j)] + n_bytes[rotation_name(j)]) / users[p]
        total = payload + shared + header_bytes / len(dump.manifest.entries)
        rows.append(role_stats(entry.shape.role, entry.shape, payload, total, acc, scalar_acc, p))
        accs.append(acc)
        scalar_accs.append(scalar_acc)
    total = total_stats(rows, accs, scalar_accs, file_bytes - passthrough_bytes)
    return CompressReport(str(dump.path), str(out), file_bytes, passthrough_bytes, rows, total,
                          dump.passthrough_names)


def total_stats(rows: list[RoleStats], accs, scalar_accs, kv_bytes: int) -> RoleStats:
    """The total row: every entry's error, and the whole file but the pass-through tensors."""
    overall = ErrorAccumulator.merge(accs)
    scalar = (None if scalar_accs is None or any(s is None for s in scalar_accs)
              else ErrorAccumulator.merge(scalar_accs))
    src = sum(r.source_bytes for r in rows)
    pay = sum(r.payload_bytes for r in rows)
    values = sum(r.values for r in rows)
    return RoleStats(
        label="total", vectors=sum(r.vectors for r in rows), values=values, source_bytes=src,
        payload_bytes=pay, compressed_bytes=kv_bytes, ratio=src / kv_bytes,
        payload_bits_per_value=8 * pay / values, bits_per_value=8 * kv_bytes / values,
        rel_mse=overall.rel_mse, cosine_mean=overall.cos_mean, cosine_min=overall.cos_min,
        scalar_rel_mse=None if scalar is None else scalar.rel_mse,
    )


def role_stats(label, shape, payload, total, acc, scalar_acc, p) -> RoleStats:
    itemsize = dtypes.numpy_dtype_for(SOURCE_DTYPES[shape.dtype]).itemsize
    values = shape.element_count
    return RoleStats(
        label=label, vectors=shape.vector_count, values=values,
        source_bytes=values * itemsize, payload_bytes=payload, compressed_bytes=round(total),
        ratio=values * itemsize / total, payload_bits_per_value=8 * payload / values,
        bits_per_value=8 * total / values, rel_mse=acc.rel_mse, cosine_mean=acc.cos_mean,
        cosine_min=acc.cos_min,
        scalar_rel_mse=None if scalar_acc is None or not scalar_acc.cos_count else scalar_acc.rel_mse,
        profile=None if p is None else {"block_dim": p.block_dim, "size": p.size,
                                        "rate_bits": p.rate_bits, "wire_bits": p.wire_bits,
                                        "seed": p.seed},
    )
