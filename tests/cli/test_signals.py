"""Interrupted writes leave nothing (issue 12, item 3).

A real ``python -m fibquant_cli`` process is stopped by a signal as soon as its temporary file
appears: it must exit 128 + signal and leave no file. A later run removes temporaries that a
run killed outright (SIGKILL: no handler can clean up) left behind, and only those.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import listing, make_dump

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A dump whose compress and decompress each take a second or more, and its compressed
    file: (dump path, compressed path)."""
    work = tmp_path_factory.mktemp("big")
    dump = make_dump(work, layers=8, kv_heads=4, tokens=2048, queries=False)
    comp = work / "kv.fq.safetensors"
    subprocess.run(_command("compress", dump.path, "-o", comp, "--no-attention"), check=True,
                   capture_output=True, env=_env(work))
    return dump.path, comp


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "fibquant_cli", *map(str, args)]


def _env(work: Path) -> dict:
    return dict(os.environ, FIBQUANT_CACHE_DIR=str(work / "cache"))


def _stopped_mid_write(args, out_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """Run ``fibquant *args``; send ``signum`` once a temporary appears in ``out_dir``."""
    proc = subprocess.Popen(_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(out_dir.parent))
    deadline = time.monotonic() + 60
    try:
        while not any(p.name.startswith(".fibquant-") for p in out_dir.iterdir()):
            assert proc.poll() is None, "finished before its temporary file was seen"
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.002)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, None, err.decode())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_signal_during_compress_leaves_nothing(big, tmp_path, signum):
    dump_path, _ = big
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = _stopped_mid_write(("compress", dump_path, "-o", out_dir / "kv.fq.safetensors",
                               "--no-attention"), out_dir, signum)
    assert done.returncode == 128 + signum, done.stderr
    assert f"stopped by signal {int(signum)}" in done.stderr
    assert listing(out_dir) == {}


def test_sigterm_during_decompress_leaves_nothing(big, tmp_path):
    _, comp = big
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = _stopped_mid_write(("decompress", comp, "-o", out_dir / "r.safetensors"), out_dir,
                              signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert listing(out_dir) == {}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id (until the system reuses it)


def test_a_later_run_removes_the_stale_temporaries_it_owns(cli, tmp_path):
    dump = make_dump(tmp_path)
    stale = tmp_path / f".fibquant-{_dead_pid()}-0123456789ab.tmp"
    live = tmp_path / f".fibquant-{os.getpid()}-ba9876543210.tmp"  # a running fibquant's
    foreign = tmp_path / ".fibquant-notes.tmp"  # not a name fibquant gives: not ours
    for path in (stale, live, foreign):
        path.write_bytes(b"partial")
    result = cli("compress", dump.path, "-o", tmp_path / "kv.fq.safetensors")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert live.exists() and foreign.exists()


def test_sigkill_leftover_is_removed_by_the_next_run(big, tmp_path):
    """SIGKILL cannot be caught: the temporary stays -- until the next run into that folder."""
    dump_path, comp = big
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = _stopped_mid_write(("decompress", comp, "-o", out_dir / "r.safetensors"), out_dir,
                              signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    left = [p.name for p in out_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith(".fibquant-"), left
    small = make_dump(tmp_path)
    subprocess.run(_command("compress", small.path, "-o", out_dir / "s.fq.safetensors",
                            "--no-attention"), check=True, capture_output=True,
                   env=_env(tmp_path))
    assert sorted(p.name for p in out_dir.iterdir()) == ["s.fq.safetensors"]
