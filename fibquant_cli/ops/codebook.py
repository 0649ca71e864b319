"""codebook: build or load a FibQuant codebook and measure its distortion."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fibquant_cli.core.codebook import STREAM_EVALUATION, d_unit, stream
from fibquant_cli.core.codec import default_rotation
from fibquant_cli.core.params import Profile
from fibquant_cli.core.scalar import ScalarQuantizer
from fibquant_cli.errors import UsageError
from fibquant_cli.formats.digest import profile_digest
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.spec import check_head_dim, check_point, check_seed
from fibquant_cli.storage.codebook_cache import load_or_build, training_note

EVAL_VECTORS = 100_000
# Beyond this the measurement takes minutes and its estimate does not change any more.
MAX_EVAL_VECTORS = 10_000_000


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


def profile_from_options(head_dim: int, block_dim: int, size: int, seed: int) -> Profile:
    """The profile of the ``codebook`` command's options; a bad one is a ``UsageError``
    naming the option."""
    check_head_dim(head_dim)
    check_point(block_dim, size, ("block_dim", "size"), head_dim=head_dim)
    check_seed(seed)
    return Profile(head_dim, block_dim, size, seed)


def codebook_report(profile: Profile, eval_vectors: int = EVAL_VECTORS,
                    progress: Progress | None = None) -> CodebookReport:
    """Build or load the codebook of ``profile`` and measure it on fresh unit vectors."""
    if not 1 <= eval_vectors <= MAX_EVAL_VECTORS:
        raise UsageError(f"{{eval_vectors}} must be in [1, {MAX_EVAL_VECTORS}], got "
                         f"{eval_vectors}", options=("eval_vectors",))
    note = training_note(profile)
    if note is not None and progress is not None:
        progress.note(note)
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
        profile_digest=profile_digest(profile),
    )


