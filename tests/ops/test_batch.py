"""batch on a real LocalCluster (2 worker processes): the same bytes as single compress runs,
layer ranges on several workers still one identical file, a killed worker's task retried, a
corrupt dump reported while the rest succeed, a rerun that does nothing, remote URLs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fibquant_cli.ops.batch import SUMMARY_NAME, run_batch
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.decompress import decompress
from fibquant_cli.ops.spec import resolve_spec

from conftest import invoke, make_dump, ok

pytest.importorskip("distributed")

SPEC = resolve_spec(bits=2, keep_last=2)  # not the defaults: the spec must reach the workers
NAMES = ("a", "b", "c", "sub/d")


def make_folder(root: Path, names=NAMES, **kwargs) -> dict[str, Path]:
    """Small dumps under ``root`` (one in a subfolder), each with its manifest."""
    dumps = {}
    for i, name in enumerate(names):
        folder = root / Path(name).parent
        folder.mkdir(parents=True, exist_ok=True)
        dumps[name] = make_dump(folder, Path(name).name, seed=i, **kwargs).path
    return dumps


def single(dump: Path, folder: Path, spec=SPEC) -> bytes:
    """What 'fibquant compress DUMP' writes (the file name is recorded, so it is kept)."""
    out = folder / dump.name.replace(".safetensors", ".fq.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    compress(dump, output=out, spec=spec, attention=False, jobs=1)
    return out.read_bytes()


def by_name(rep) -> dict:
    return {r.name: r for r in rep.results}


def test_a_folder_compresses_to_the_bytes_of_single_runs_and_a_rerun_does_nothing(
        tmp_path, dask_cluster):
    dumps = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    rep = run_batch("compress", str(tmp_path / "in"), str(out), spec=SPEC, attention=False,
                    client=dask_cluster)
    assert [r.status for r in rep.results] == ["done"] * 4, rep.to_json()
    assert rep.workers == 2
    for name, dump in dumps.items():
        got = out / (name + ".fq.safetensors")
        assert got.read_bytes() == single(dump, tmp_path / "single" / name), name
    ok(invoke("compress", dumps["sub/d"], "--bits", "2", "--keep-last", "2", "--no-attention",
              "-o", tmp_path / "cli.fq.safetensors"))  # the command itself, flags and all
    assert (tmp_path / "cli.fq.safetensors").read_bytes() == \
        (out / "sub" / "d.fq.safetensors").read_bytes()
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["counts"] == {"done": 4, "ok": 0, "skipped": 0, "failed": 0}
    assert [t["name"] for t in summary["tasks"]] == [n + ".safetensors" for n in NAMES]
    assert all(t["ratio"] > 0.5 and 0 < t["rel_mse"] < 0.3 for t in summary["tasks"]), summary
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.fq.safetensors")}

    again = run_batch("compress", str(tmp_path / "in"), str(out), spec=SPEC, attention=False,
                      client=dask_cluster)
    assert [r.status for r in again.results] == ["skipped"] * 4
    assert again.workers == 0  # nothing was sent to the cluster
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.fq.safetensors")} == mtimes
    assert by_name(again)["a.safetensors"].ratio == by_name(rep)["a.safetensors"].ratio

    # Touched with the same bytes: still up to date (the content digest settles it);
    # rewritten: redone; other options: all redone.
    os.utime(dumps["a"], ns=(1, 1))
    make_dump(tmp_path / "in", "b", seed=99)
    third = by_name(run_batch("compress", str(tmp_path / "in"), str(out), spec=SPEC,
                              attention=False, client=dask_cluster))
    assert {n: r.status for n, r in third.items()} == {
        "a.safetensors": "skipped", "b.safetensors": "done", "c.safetensors": "skipped",
        "sub/d.safetensors": "skipped"}
    assert (out / "b.fq.safetensors").read_bytes() == single(dumps["b"], tmp_path / "s2")
    fourth = run_batch("compress", str(tmp_path / "in"), str(out), spec=resolve_spec(bits=3),
                       attention=False, client=dask_cluster)
    assert [r.status for r in fourth.results] == ["done"] * 4


def test_a_large_dump_split_into_layer_ranges_is_one_identical_file(tmp_path, dask_cluster):
    dumps = make_folder(tmp_path / "in", names=("big",), layers=6, tokens=48)
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"), spec=SPEC,
                    attention=True, client=dask_cluster, split_bytes=1)
    (result,) = rep.results
    assert result.status == "done", result
    assert result.ranges == 12  # one range per layer of K and of V
    assert (tmp_path / "out" / "big.fq.safetensors").read_bytes() == \
        single(dumps["big"], tmp_path / "single")


def test_a_killed_workers_task_is_retried(tmp_path, dask_cluster, crash_dir):
    dumps = make_folder(tmp_path / "in", names=("x", "crashy", "y"))
    trigger = crash_dir / "crashy.safetensors.crash-once"
    trigger.touch()
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"), spec=SPEC,
                    attention=False, client=dask_cluster)
    assert not trigger.exists()  # the first attempt wrote a layer and exited its process
    assert [r.status for r in rep.results] == ["done"] * 3, rep.to_json()
    assert (tmp_path / "out" / "crashy.fq.safetensors").read_bytes() == \
        single(dumps["crashy"], tmp_path / "single")
    # Its partial temporary file was removed by the next publish in that folder.
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []


def test_a_corrupt_dump_is_reported_and_the_others_are_done(tmp_path, dask_cluster):
    dumps = make_folder(tmp_path / "in", names=("good1", "bad", "good2", "orphan"))
    raw = dumps["bad"].read_bytes()
    dumps["bad"].write_bytes(raw[: len(raw) // 2])  # truncated
    dumps["orphan"].with_name("orphan.manifest.json").unlink()
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"), spec=SPEC,
                    attention=False, client=dask_cluster)
    results = by_name(rep)
    assert {n: r.status for n, r in results.items()} == {
        "bad.safetensors": "failed", "good1.safetensors": "done", "good2.safetensors": "done",
        "orphan.safetensors": "failed"}
    assert str(dumps["bad"]) in results["bad.safetensors"].message()
    assert "manifest" in results["orphan.safetensors"].message()
    assert not (tmp_path / "out" / "bad.fq.safetensors").exists()
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    failed = [t for t in summary["tasks"] if t["status"] == "failed"]
    assert [t["name"] for t in failed] == ["bad.safetensors", "orphan.safetensors"]
    assert all(str(tmp_path / "in") in t["error"] for t in failed)
    # Once repaired, a rerun does just those two.
    make_dump(tmp_path / "in", "bad", seed=5)
    make_dump(tmp_path / "in", "orphan", seed=6)
    again = by_name(run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"),
                              spec=SPEC, attention=False, client=dask_cluster))
    assert {n: r.status for n, r in again.items()} == {
        "bad.safetensors": "done", "good1.safetensors": "skipped",
        "good2.safetensors": "skipped", "orphan.safetensors": "done"}


def test_an_output_batch_did_not_write_is_kept_without_force(tmp_path, dask_cluster):
    make_folder(tmp_path / "in", names=("a",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.fq.safetensors").write_bytes(b"precious")
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"), spec=SPEC,
                    attention=False, client=dask_cluster)
    assert rep.results[0].status == "failed"
    assert "--force" in rep.results[0].message(lambda o: "--" + o)
    assert (tmp_path / "out" / "a.fq.safetensors").read_bytes() == b"precious"
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "out"), spec=SPEC,
                    attention=False, force=True, client=dask_cluster)
    assert rep.results[0].status == "done"


def test_decompress_and_validate_a_folder(tmp_path, dask_cluster):
    make_folder(tmp_path / "in", names=("a", "sub/b"))
    run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=SPEC,
              attention=False, client=dask_cluster)
    rep = run_batch("decompress", str(tmp_path / "fq"), str(tmp_path / "back"),
                    client=dask_cluster)
    assert [r.status for r in rep.results] == ["done", "done"], rep.to_json()
    (tmp_path / "single").mkdir()
    for name in ("a", "sub/b"):
        decompress(tmp_path / "fq" / f"{name}.fq.safetensors",
                   output=tmp_path / "single" / f"{Path(name).name}.safetensors")
        assert (tmp_path / "back" / f"{name}.safetensors").read_bytes() == \
            (tmp_path / "single" / f"{Path(name).name}.safetensors").read_bytes()
        assert (tmp_path / "back" / f"{name}.manifest.json").exists()
    again = run_batch("decompress", str(tmp_path / "fq"), str(tmp_path / "back"),
                      client=dask_cluster)
    assert [r.status for r in again.results] == ["skipped", "skipped"]

    shutil.copy(tmp_path / "fq" / "a.fq.safetensors", tmp_path / "in" / "a.fq.safetensors")
    (tmp_path / "in" / "truncated.fq.safetensors").write_bytes(
        (tmp_path / "fq" / "sub" / "b.fq.safetensors").read_bytes()[:-64])
    rep = run_batch("validate", str(tmp_path / "in"), None, client=dask_cluster)
    statuses = {r.name: r.status for r in rep.results}
    assert statuses == {"a.fq.safetensors": "ok", "a.safetensors": "ok",
                        "truncated.fq.safetensors": "failed", "sub/b.safetensors": "ok"}
    assert rep.summary is None


def test_file_urls_with_worker_processes(tmp_path, dask_cluster):
    dumps = make_folder(tmp_path / "in", names=("a", "b"))
    rep = run_batch("compress", f"file://{tmp_path / 'in'}", f"file://{tmp_path / 'out'}",
                    spec=SPEC, attention=False, client=dask_cluster)
    assert [r.status for r in rep.results] == ["done", "done"]
    assert (tmp_path / "out" / "a.fq.safetensors").read_bytes() == \
        single(dumps["a"], tmp_path / "single")


@pytest.mark.filterwarnings("ignore:Port .* is already in use")
def test_memory_urls_in_one_process(tmp_path):
    """memory:// lives in one process: a cluster of threads (processes=False)."""
    distributed = pytest.importorskip("distributed")
    fsspec = pytest.importorskip("fsspec")
    dumps = make_folder(tmp_path / "in", names=("a", "sub/b"))
    fs = fsspec.filesystem("memory")
    for path in (tmp_path / "in").rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/kv/{path.relative_to(tmp_path / 'in').as_posix()}",
                         path.read_bytes())
    try:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster, set_as_default=False) as client:
            rep = run_batch("compress", "memory://kv", "memory://out", spec=SPEC,
                            attention=False, client=client)
            assert [r.status for r in rep.results] == ["done", "done"], rep.to_json()
            again = run_batch("compress", "memory://kv", "memory://out", spec=SPEC,
                              attention=False, client=client)
            assert [r.status for r in again.results] == ["skipped", "skipped"]
            fs.pipe_file("/back/a.safetensors", b"foreign")  # not batch's: kept
            back = run_batch("decompress", "memory://out", "memory://back", client=client)
            assert [r.status for r in back.results] == ["failed", "done"], back.to_json()
            assert "memory://back/a.safetensors" in back.results[0].message()
            assert fs.cat_file("/back/a.safetensors") == b"foreign"
            back = run_batch("decompress", "memory://out", "memory://back", client=client,
                             force=True)
            assert [r.status for r in back.results] == ["done", "done"], back.to_json()
        assert fs.cat_file("/out/sub/b.fq.safetensors") == \
            single(dumps["sub/b"], tmp_path / "single")
        assert json.loads(fs.cat_file("/out/" + SUMMARY_NAME))["counts"]["skipped"] == 2
        assert fs.exists("/back/a.manifest.json")
        assert not [p for p in fs.find("/out") if "/.fibquant-" in p and p.endswith(".tmp")]
    finally:
        for folder in ("/kv", "/out", "/back"):
            if fs.exists(folder):
                fs.rm(folder, recursive=True)


def test_transform_coding_a_folder_against_a_basis(tmp_path, dask_cluster):
    """--basis reaches the workers: the same bytes as a single run; decompress and validate
    take the basis; a changed basis file redoes the outputs."""
    dumps = make_folder(tmp_path / "in", names=("a", "b"), tokens=160, head_dim=16)
    basis = tmp_path / "m.basis.safetensors"
    ok(invoke("calibrate", dumps["a"], "-o", basis, "--no-rope-undo"))
    spec = resolve_spec(basis=str(basis), ratio=4.0)
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=spec,
                    attention=False, client=dask_cluster)
    assert [r.status for r in rep.results] == ["done", "done"], rep.to_json()
    for name, dump in dumps.items():
        assert (tmp_path / "fq" / f"{name}.fq.safetensors").read_bytes() == \
            single(dump, tmp_path / "single", spec), name
    back = run_batch("decompress", str(tmp_path / "fq"), str(tmp_path / "back"),
                     basis=str(basis), client=dask_cluster)
    assert [r.status for r in back.results] == ["done", "done"], back.to_json()
    checked = run_batch("validate", str(tmp_path / "fq"), None, basis=str(basis),
                        client=dask_cluster)
    assert [r.status for r in checked.results] == ["ok", "ok"], checked.to_json()
    missing = run_batch("validate", str(tmp_path / "fq"), None, client=dask_cluster)
    assert all(r.status == "failed" and "basis" in r.error for r in missing.results)
    ok(invoke("calibrate", dumps["b"], "-o", basis, "--force", "--no-rope-undo"))  # same path
    again = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=spec,
                      attention=False, client=dask_cluster)
    assert [r.status for r in again.results] == ["done", "done"], again.to_json()


def test_own_basis_reaches_the_workers(tmp_path, dask_cluster):
    """--own-basis auto (the command line's default) as 'fibquant compress' has it: every
    dump byte for byte as a single run, the long one with its own basis; the mode is in the
    stamp, so another mode redoes the outputs; a bad mode is refused before any work."""
    from ops.test_own_basis import LONG, MID
    from ops.test_transform_codec import structured_dump

    from fibquant_cli.errors import UsageError

    (tmp_path / "in").mkdir()
    dumps = {name: structured_dump(tmp_path / "in", name, tokens=tokens, seed=seed)[0]
             for name, tokens, seed in (("long", LONG, 3), ("mid", MID, 4))}
    spec = resolve_spec()
    rep = run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=spec,
                    attention=False, own_basis="auto", client=dask_cluster)
    assert [r.status for r in rep.results] == ["done", "done"], rep.to_json()
    for name, dump in dumps.items():
        out = tmp_path / "single" / f"{name}.fq.safetensors"
        out.parent.mkdir(exist_ok=True)
        single_rep = compress(dump, output=out, spec=spec, attention=False, jobs=1,
                              own_basis="auto")
        assert name != "long" or single_rep.own_basis["choice"] == "own basis"
        assert (tmp_path / "fq" / out.name).read_bytes() == out.read_bytes(), name
    again = by_name(run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=spec,
                              attention=False, own_basis="never", client=dask_cluster))
    assert again["long.safetensors"].status == again["mid.safetensors"].status == "done"
    assert (tmp_path / "fq" / "long.fq.safetensors").read_bytes() != \
        (tmp_path / "single" / "long.fq.safetensors").read_bytes()
    with pytest.raises(UsageError, match="own_basis"):
        run_batch("compress", str(tmp_path / "in"), str(tmp_path / "fq"), spec=spec,
                  own_basis="sometimes", client=dask_cluster)
