"""`fibquant batch` as users see it: the table, the JSON summary, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from fibquant_cli.ops import batch

from conftest import assert_error, make_dump, ok

pytest.importorskip("distributed")


def test_help_says_what_the_exit_codes_mean(cli):
    out = ok(cli("batch", "--help")).stdout
    assert all(cmd in out for cmd in ("compress", "decompress", "validate"))
    text = " ".join(ok(cli("batch", "compress", "--help")).stdout.split())
    assert "3 when any failed" in text and "--scheduler" in text and "--workers" in text
    assert "--key-bits" in text and "--keep-first" in text  # compress's own options


def test_a_failed_dump_exits_3_after_the_others_are_done(cli, tmp_path, dask_cluster):
    (tmp_path / "in").mkdir()
    make_dump(tmp_path / "in", "good")
    (tmp_path / "in" / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    address = dask_cluster.scheduler.address
    res = cli("batch", "compress", tmp_path / "in", tmp_path / "out", "--bits", "2",
              "--no-attention", "--scheduler", address)
    line = assert_error(res, 3, "1 of 2 failed", "bad.safetensors")
    assert "fibquant-batch.json" in line
    table = res.stdout
    assert "good.safetensors" in table and "done" in table and "failed" in table
    assert (tmp_path / "out" / "good.fq.safetensors").exists()

    (tmp_path / "in" / "bad.safetensors").unlink()
    res = ok(cli("batch", "compress", tmp_path / "in", tmp_path / "out", "--bits", "2",
                 "--no-attention", "--scheduler", address, "--json"))
    summary = json.loads(res.stdout)
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["failed"] == 0
    assert summary == json.loads((tmp_path / "out" / "fibquant-batch.json").read_text())


def test_validate_a_folder_on_the_cluster(cli, tmp_path, dask_cluster):
    (tmp_path / "in").mkdir()
    make_dump(tmp_path / "in", "a")
    res = ok(cli("batch", "validate", tmp_path / "in", "--scheduler",
                 dask_cluster.scheduler.address, "--json"))
    assert json.loads(res.stdout)["tasks"][0]["status"] == "ok"


def test_bad_folders_and_flags_are_one_line_errors(cli, tmp_path, monkeypatch):
    assert_error(cli("batch", "compress", tmp_path / "missing", tmp_path / "out"), 3,
                 "missing", "no such folder")
    (tmp_path / "in").mkdir()
    make_dump(tmp_path / "in", "a")
    (tmp_path / "file").write_text("x")
    assert_error(cli("batch", "compress", tmp_path / "in", tmp_path / "file"), 2,
                 "output folder is a file")
    assert_error(cli("batch", "compress", tmp_path / "in" / "a.safetensors", tmp_path / "o"), 3,
                 "not a folder")
    assert_error(cli("batch", "compress", tmp_path / "in", tmp_path / "o", "--bits", "2.5"), 2,
                 "--bits")
    (tmp_path / "empty").mkdir()
    assert_error(cli("batch", "decompress", tmp_path / "empty", tmp_path / "o"), 3,
                 "no *.fq.safetensors files")
    monkeypatch.setattr(batch, "SCHEDULER_TIMEOUT", "1s")
    assert_error(cli("batch", "compress", tmp_path / "in", tmp_path / "o2", "--scheduler",
                     "tcp://127.0.0.1:9"), 2, "cannot reach the scheduler")
