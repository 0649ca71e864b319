"""The README's commands work as printed: each `$ fibquant ...` line runs, in a folder holding
the sample data, with the exit code and error line the README shows (0 when it shows none)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE_DIR, invoke

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples():
    """(command args, expected exit code, expected stderr line or None), in README order."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("$ fibquant "):
            continue
        error = lines[i + 1] if lines[i + 1].startswith("fibquant: error: ") else None
        after = lines[i + 2] if error else lines[i + 1]
        code = int(after.split()[1]) if after.startswith("exit ") else 0
        yield shlex.split(line[2:])[1:], code, error


EXAMPLES = list(_examples())


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 8 and any(code for _, code, _ in EXAMPLES)


def test_readme_commands_run_as_shown(tmp_path, monkeypatch):
    shutil.copytree(SAMPLE_DIR, tmp_path / "sample_data")
    monkeypatch.chdir(tmp_path)
    for args, code, error in EXAMPLES:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        if error is not None:
            assert result.stderr.strip() == error, args


@pytest.mark.parametrize("target", ["demo", "test", "lint", "bench"])
def test_make_targets_the_readme_names_exist(target):
    makefile = (README.parent / "Makefile").read_text()
    assert f"\n{target}:" in makefile
