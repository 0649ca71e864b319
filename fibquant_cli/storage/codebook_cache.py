"""Trained codebooks on disk, keyed and checked by the digest of their full profile.

Lookup order: the codebooks shipped inside the package (``fibquant_cli/codebooks``), then the
per-user cache (``$FIBQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fibquant``, else
``~/.cache/fibquant``), then training (whose result is stored in the user cache).

Each entry is an ``.npz`` holding ``codebook`` (N, k) float64, ``profile`` (the profile's
compact JSON as uint8) and ``digest`` (the profile digest followed by the codebook digest, as
uint8 JSON). A shipped entry that fails its check is an integrity error; a user-cache entry
that fails is rebuilt.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.core.codebook import train_codebook
from fibquant_cli.core.params import Profile, default_train_samples
from fibquant_cli.errors import FibQuantError, IntegrityError, ResourceError
from fibquant_cli.formats.digest import codebook_digest as _digest
from fibquant_cli.formats.digest import profile_digest
from fibquant_cli.storage.publish import publishing

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "codebooks"


@dataclass(frozen=True)
class CodebookOrigin:
    """Where a codebook came from: 'shipped', 'cache' or 'built', its file, and seconds spent."""

    kind: str
    path: Path | None
    seconds: float
    note: str = ""


def cache_dir() -> Path:
    env = os.environ.get("FIBQUANT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fibquant"


def entry_name(profile: Profile) -> str:
    p = profile
    return f"d{p.head_dim}_k{p.block_dim}_n{p.size}_s{p.seed}_{profile_digest(p)[7:23]}.npz"


def codebook_digest(codebook: np.ndarray) -> str:
    """The cache keeps codebooks in float64 and digests them so."""
    return _digest(codebook, "<f8")


def save_entry(path: Path, profile: Profile, codebook: np.ndarray) -> None:
    """Write an entry atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"profile": profile_digest(profile), "codebook": codebook_digest(codebook)})
    with publishing([path], force=True) as (tmp,), open(tmp, "wb") as fh:
        np.savez(
            fh,
            codebook=np.ascontiguousarray(codebook, dtype="<f8"),
            profile=np.frombuffer(json.dumps(profile.to_json()).encode(), dtype=np.uint8),
            digest=np.frombuffer(meta.encode(), dtype=np.uint8),
        )


def load_entry(path: Path, profile: Profile) -> np.ndarray:
    """Load an entry and check it belongs to ``profile``; raises IntegrityError otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            codebook = np.array(z["codebook"], dtype=np.float64)
            stored_profile = json.loads(z["profile"].tobytes().decode())
            meta = json.loads(z["digest"].tobytes().decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as err:
        raise IntegrityError(f"unreadable codebook entry ({err})", path=str(path)) from None
    if stored_profile != profile.to_json() or meta.get("profile") != profile_digest(profile):
        raise IntegrityError("codebook entry belongs to another profile", path=str(path))
    if codebook.shape != (profile.size, profile.block_dim):
        raise IntegrityError(f"codebook shape {codebook.shape} does not match the profile",
                             path=str(path))
    if meta.get("codebook") != codebook_digest(codebook):
        raise IntegrityError("codebook digest mismatch", path=str(path))
    return codebook


# Lloyd training costs about train_samples x size x restarts x iterations distance terms; the
# largest shipped profile (d=64, k=4, N=4096) is 4.4e11. Beyond this bound training would run for
# hours: refused before it starts (a codebook already cached or shipped is still used).
MAX_TRAINING_WORK = 2**40


# Seconds per unit of training work: N = 512, k = 2 (2.6e10 units) trained in 153 s on the
# 2-core development machine. Machines differ: estimates are said to be "about".
SECONDS_PER_WORK = 6e-9
NOTE_TRAINING_SECONDS = 10  # trainings estimated longer than this are announced


def training_work(profile: Profile) -> int:
    return profile.train_samples * profile.size * profile.restarts * max(1, profile.iterations)


def training_note(profile: Profile) -> str | None:
    """A line announcing a long training of ``profile`` with its estimated duration, or None
    (shipped or cached codebook, or a short training)."""
    name = entry_name(profile)
    if (SHIPPED_DIR / name).exists() or (cache_dir() / name).exists():
        return None
    work = training_work(profile)
    if work * SECONDS_PER_WORK < NOTE_TRAINING_SECONDS or work > MAX_TRAINING_WORK:
        return None  # quick, or refused by check_trainable
    return (f"training the codebook d={profile.head_dim} k={profile.block_dim} "
            f"N={profile.size} (not shipped, not cached): about "
            f"{_duration(work * SECONDS_PER_WORK)} on a typical core; cached afterwards")


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def check_trainable(profile: Profile) -> None:
    work = training_work(profile)
    if work > MAX_TRAINING_WORK:
        per_size = profile.restarts * max(1, profile.iterations)
        largest = max(n for n in (2**e for e in range(1, 21))
                      if default_train_samples(n) * n * per_size <= MAX_TRAINING_WORK)
        raise ResourceError(
            f"training a codebook of {{size}} {profile.size} would take ~{work:.1e} distance "
            f"computations (about {_duration(work * SECONDS_PER_WORK)} on a typical core; "
            f"bound {MAX_TRAINING_WORK:.1e}); use a size of at most {largest}",
            options=("size",))


def load_or_build(profile: Profile) -> tuple[np.ndarray, CodebookOrigin]:
    """The trained codebook of ``profile``: shipped, cached, or trained now (and cached)."""
    name = entry_name(profile)
    start = time.perf_counter()
    shipped = SHIPPED_DIR / name
    if shipped.exists():
        codebook = load_entry(shipped, profile)
        return codebook, CodebookOrigin("shipped", shipped, time.perf_counter() - start)
    cached = cache_dir() / name
    note = ""
    if cached.exists():
        try:
            codebook = load_entry(cached, profile)
            return codebook, CodebookOrigin("cache", cached, time.perf_counter() - start)
        except IntegrityError as err:
            note = f"rebuilt: {err}"
    check_trainable(profile)
    codebook = train_codebook(profile)
    try:
        save_entry(cached, profile, codebook)
        path = cached
    except (OSError, FibQuantError) as err:  # a read-only cache only costs time
        note = f"not cached ({getattr(err, 'strerror', None) or err})"
        path = None
    return codebook, CodebookOrigin("built", path, time.perf_counter() - start, note)


def quantizer_for(profile: Profile):
    """The FibQuantizer of ``profile``: its trained codebook and its rotation, as float32.

    Stored and used as float32: the codec computes in float32, so encode and decode are the
    same either way, and a compressed file holds exactly the arrays it was coded with.
    """
    from fibquant_cli.core.codec import FibQuantizer, default_rotation

    codebook, _ = load_or_build(profile)
    return FibQuantizer(profile, codebook.astype(np.float32),
                        default_rotation(profile).astype(np.float32))
