"""The quantizer profile: every number that determines a FibQuant codebook and rotation.

A ``Profile`` is validated once, at construction, before anything large is allocated; the
rest of the core assumes a valid profile. Its digest (``formats.digest.profile_digest``) keys
the codebook cache and is recorded in every compressed file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fibquant_cli.errors import ProfileError, ResourceError

MAX_SIZE = 2**20
MAX_HEAD_DIM = 8192
# Memory bounds checked before allocation (bytes, float64 arrays).
MAX_ROTATION_BYTES = 256 * 2**20
MAX_CODEBOOK_BYTES = 256 * 2**20
MAX_TRAINING_BYTES = 2 * 2**30

# Training-set size (docs/method.md §3): the paper's 30*N overfits for k = 2 and large N; 1000*N
# trains codebooks that beat the initial one on fresh samples at every shipped point. Past
# 2**20 samples the cost of Lloyd grows faster than the gain, so the default is capped.
SAMPLES_PER_CODEWORD = 1000
MAX_DEFAULT_SAMPLES = 2**20
DEFAULT_RESTARTS = 4
DEFAULT_ITERATIONS = 25
ALGORITHM = "fibquant_lloyd_v1"


def default_train_samples(size: int) -> int:
    return min(SAMPLES_PER_CODEWORD * size, max(MAX_DEFAULT_SAMPLES, 30 * size))


@dataclass(frozen=True)
class Profile:
    """A FibQuant operating point.

    Parameters
    ----------
    head_dim : int
        d, the length of each vector (one attention head).
    block_dim : int
        k, the block length; 2 <= k < d and k divides d.
    size : int
        N, the number of codewords; 2 <= N <= 2**20.
    seed : int
        Seeds the rotation, the training samples and the Lloyd restarts.
    restarts, iterations, train_samples : int
        Lloyd-Max settings; ``train_samples`` defaults to ``default_train_samples(size)``.
    """

    head_dim: int
    block_dim: int
    size: int
    seed: int = 0
    restarts: int = DEFAULT_RESTARTS
    iterations: int = DEFAULT_ITERATIONS
    train_samples: int = field(default=0)
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        d, k, n = self.head_dim, self.block_dim, self.size
        for name in ("head_dim", "block_dim", "size", "seed", "restarts", "iterations",
                     "train_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProfileError(f"{name} must be an integer, got {value!r}")
        if d <= 0:
            raise ProfileError(f"head_dim must be > 0, got {d}")
        if d > MAX_HEAD_DIM:
            raise ResourceError(f"head_dim {d} exceeds the limit {MAX_HEAD_DIM}")
        if not 2 <= k < d:
            raise ProfileError(f"block_dim must satisfy 2 <= block_dim < head_dim ({d}), got {k}")
        if d % k:
            raise ProfileError(f"head_dim {d} is not divisible by block_dim {k}")
        if not 2 <= n <= MAX_SIZE:
            raise ProfileError(f"size must satisfy 2 <= size <= {MAX_SIZE}, got {n}")
        if not 0 <= self.seed < 2**63:
            raise ProfileError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.restarts < 1 or self.iterations < 0:
            raise ProfileError(
                f"restarts must be >= 1 and iterations >= 0, got {self.restarts}, {self.iterations}"
            )
        if self.train_samples == 0:
            object.__setattr__(self, "train_samples", default_train_samples(n))
        if self.train_samples < n:
            raise ProfileError(f"train_samples ({self.train_samples}) must be >= size ({n})")
        if self.algorithm != ALGORITHM:
            raise ProfileError(f"unknown codebook algorithm {self.algorithm!r}, expected {ALGORITHM!r}")
        if d * d * 8 > MAX_ROTATION_BYTES:
            raise ResourceError(f"a {d}x{d} rotation exceeds the {MAX_ROTATION_BYTES} byte bound")
        if n * k * 8 > MAX_CODEBOOK_BYTES:
            raise ResourceError(f"a {n}x{k} codebook exceeds the {MAX_CODEBOOK_BYTES} byte bound")
        if self.train_samples * k * 8 > MAX_TRAINING_BYTES:
            raise ResourceError(
                f"{self.train_samples} training samples of dim {k} exceed the "
                f"{MAX_TRAINING_BYTES} byte bound"
            )

    @property
    def rate_bits(self) -> float:
        """b = log2(N) / k, bits per coordinate."""
        return math.log2(self.size) / self.block_dim

    @property
    def whole_bits(self) -> int | None:
        """b when it is a whole number of bits the scalar baseline supports (1..8), else None."""
        b = round(self.rate_bits)
        return b if abs(self.rate_bits - b) < 1e-12 and 1 <= b <= 8 else None

    @property
    def wire_bits(self) -> int:
        """Stored width of one index: ceil(log2 N)."""
        return max(1, (self.size - 1).bit_length())

    @property
    def blocks_per_vector(self) -> int:
        return self.head_dim // self.block_dim

    @property
    def bits_per_vector(self) -> int:
        """Index bits plus a 16-bit norm."""
        return self.blocks_per_vector * self.wire_bits + 16

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Profile:
        expected = set(cls.__dataclass_fields__)
        if not isinstance(obj, dict) or set(obj) != expected:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ProfileError(f"profile keys must be {sorted(expected)}, found {found}")
        return cls(**obj)
