"""Profile validation: every error, derived quantities, and checks before allocation."""

import math

import pytest

from fibquant_cli.core.params import Profile
from fibquant_cli.errors import ProfileError, ResourceError
from fibquant_cli.formats.digest import profile_digest


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=0, block_dim=2, size=4), "head_dim must be > 0, got 0"),
    (dict(head_dim=-8, block_dim=2, size=4), "head_dim must be > 0, got -8"),
    (dict(head_dim=64, block_dim=1, size=4), "block_dim must satisfy 2 <= block_dim < head_dim (64), got 1"),
    (dict(head_dim=64, block_dim=64, size=4),
     "block_dim must satisfy 2 <= block_dim < head_dim (64), got 64"),
    (dict(head_dim=64, block_dim=3, size=64), "head_dim 64 is not divisible by block_dim 3"),
    (dict(head_dim=64, block_dim=2, size=1), "size must satisfy 2 <= size <= 1048576, got 1"),
    (dict(head_dim=64, block_dim=2, size=2**20 + 1), "size must satisfy 2 <= size <= 1048576, got 1048577"),
    (dict(head_dim=64, block_dim=2, size=4, seed=-1), "seed must be in [0, 2**63), got -1"),
    (dict(head_dim=64, block_dim=2, size=4, restarts=0), "restarts must be >= 1"),
    (dict(head_dim=64, block_dim=2, size=16, train_samples=8), "train_samples (8) must be >= size (16)"),
    (dict(head_dim=64, block_dim=2, size=4, algorithm="x"), "unknown codebook algorithm 'x'"),
    (dict(head_dim=64.0, block_dim=2, size=4), "head_dim must be an integer, got 64.0"),
    (dict(head_dim=64, block_dim=True, size=4), "block_dim must be an integer, got True"),
])
def test_profile_errors(kwargs, message):
    with pytest.raises(ProfileError) as err:
        Profile(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=9000, block_dim=2, size=4), "head_dim 9000 exceeds the limit 8192"),
    (dict(head_dim=8192, block_dim=2, size=4), "a 8192x8192 rotation exceeds"),
    (dict(head_dim=4096, block_dim=2048, size=2**20), "codebook exceeds"),
    (dict(head_dim=64, block_dim=32, size=4, train_samples=2**30), "training samples"),
])
def test_memory_bounds_checked_before_allocation(kwargs, message):
    with pytest.raises(ResourceError) as err:
        Profile(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("k,n,rate,wire,bpv", [
    (2, 4, 1.0, 2, 32 * 2 + 16), (2, 64, 3.0, 6, 32 * 6 + 16), (4, 256, 2.0, 8, 16 * 8 + 16),
    (8, 256, 1.0, 8, 8 * 8 + 16), (8, 16, 0.5, 4, 8 * 4 + 16), (32, 128, 7 / 32, 7, 2 * 7 + 16),
    (2, 100, math.log2(100) / 2, 7, 32 * 7 + 16), (2, 2, 0.5, 1, 32 + 16),
])
def test_derived_rates(k, n, rate, wire, bpv):
    p = Profile(64, k, n)
    assert p.rate_bits == pytest.approx(rate, rel=1e-15)
    assert p.wire_bits == wire
    assert p.bits_per_vector == bpv


@pytest.mark.parametrize("b,ratio", [(4, 3.76), (3, 4.92), (2, 7.11), (1, 12.8)])
def test_compression_vs_fp16_matches_spec(b, ratio):
    k, n = {4: (2, 256), 3: (2, 64), 2: (4, 256), 1: (8, 256)}[b]
    p = Profile(64, k, n)
    assert 16 * 64 / p.bits_per_vector == pytest.approx(ratio, abs=0.006)


def test_default_training_set_is_recorded_and_digest_covers_it():
    p = Profile(64, 2, 64)
    assert p.train_samples == 64_000
    assert Profile.from_json(p.to_json()) == p
    assert profile_digest(Profile(64, 2, 64, train_samples=64_001)) != profile_digest(p)
    assert profile_digest(Profile(64, 2, 64, seed=1)) != profile_digest(p)


def test_from_json_rejects_unknown_and_missing_keys():
    obj = Profile(64, 2, 64).to_json()
    with pytest.raises(ProfileError, match="profile keys must be"):
        Profile.from_json({**obj, "extra": 1})
    obj.pop("seed")
    with pytest.raises(ProfileError, match="profile keys must be"):
        Profile.from_json(obj)
