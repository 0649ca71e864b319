"""End-to-end tests of the ``fibquant`` command line, run through typer's CliRunner.

They assert what a user sees: exit codes (usage 2, invalid input 3, integrity 4, resource 5),
one-line error messages on stderr naming the file / tensor and the reason, no traceback, and
no output (or temporary) file left behind by a failed command.

Synthetic dumps are small (see conftest.make_dump); the sample dump is used for two round trips.
"""

from __future__ import annotations

import json
import os
import re
import struct

import blake3
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from typer.testing import CliRunner

from conftest import (SAMPLE_DUMP, SAMPLE_MANIFEST, header_order, listing, make_dump,
                      read_st_header, write_safetensors)
from fibquant_cli.formats import stfile
from fibquant_cli.storage.stwriter import write_file
from fibquant_cli.errors import InvalidInputError


@pytest.fixture(autouse=True)
def _private_codebook_cache(tmp_path_factory, monkeypatch):
    """Codebooks trained by a test (non-shipped profiles) go to a throwaway cache."""
    monkeypatch.setenv("FIBQUANT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fq-cache"))


# ----------------------------------------------------------------------------- helpers


def assert_error(result, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one 'fibquant: error:' line on stderr, no traceback."""
    detail = f"exit={result.exit_code} exc={result.exception!r}\n{result.output}"
    assert result.exit_code == code, detail
    assert isinstance(result.exception, SystemExit), detail  # nothing escaped the handler
    assert "Traceback" not in result.output, detail
    err = result.stderr
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    line = err.rstrip("\n")
    assert line.startswith("fibquant: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_ok(result):
    detail = f"exit={result.exit_code} exc={result.exception!r}\n{result.output}"
    assert result.exit_code == 0, detail
    assert result.exception is None, detail
    return result


def rel_mse(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(((x - y) ** 2).sum() / (x * x).sum())


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def load(path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def st_dtype_of(path) -> dict[str, tuple[str, list[int]]]:
    header, _ = read_st_header(path)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def roundtrip(cli, dump, tmp_path, *extra: str) -> tuple[dict, dict, dict]:
    """compress --json + decompress; returns (compress JSON, restored tensors, compressed header)."""
    comp = tmp_path / "out.fq.safetensors"
    restored = tmp_path / "out.restored.safetensors"
    res = assert_ok(cli("compress", dump.path, "-o", comp, "--json", *extra))
    report = json.loads(res.stdout)
    assert_ok(cli("decompress", comp, "-o", restored))
    return report, load(restored), st_dtype_of(comp)


# ----------------------------------------------------------------------------- sample round trips


@pytest.fixture(scope="module", params=[3, 2], ids=["bits3", "bits2"])
def sample_rt(request, tmp_path_factory):
    """The sample dump compressed with --bits {3,2} --json, then decompressed (once per module)."""
    from fibquant_cli.cli import app as the_app

    bits = request.param
    out = tmp_path_factory.mktemp(f"sample{bits}")
    runner = CliRunner()
    comp = out / "kv_sample.fq.safetensors"
    restored = out / "kv_sample.restored.safetensors"
    res = runner.invoke(the_app, ["compress", str(SAMPLE_DUMP), "--bits", str(bits),
                                  "-o", str(comp), "--json"])
    assert_ok(res)
    res2 = runner.invoke(the_app, ["decompress", str(comp), "-o", str(restored)])
    assert_ok(res2)
    return {"bits": bits, "dir": out, "comp": comp, "restored": restored,
            "report": json.loads(res.stdout), "decompress_stdout": res2.stdout}


SAMPLE_KV = [f"layer.{i}.{r}" for i in range(4) for r in ("key", "value")]
SAMPLE_PASSTHROUGH = ["input_ids"] + [f"layer.{i}.query" for i in range(4)]


def test_sample_restores_every_tensor_in_order(sample_rt):
    assert header_order(sample_rt["restored"]) == header_order(SAMPLE_DUMP)
    assert st_dtype_of(sample_rt["restored"]) == st_dtype_of(SAMPLE_DUMP)
    original, restored = load(SAMPLE_DUMP), load(sample_rt["restored"])
    assert set(restored) == set(original)
    for name in original:
        assert restored[name].dtype == original[name].dtype, name
        assert restored[name].shape == original[name].shape, name
    # the source's __metadata__ (absent here) is restored as it was
    assert read_st_header(sample_rt["restored"])[0].get("__metadata__") == \
        read_st_header(SAMPLE_DUMP)[0].get("__metadata__")


def test_sample_passthrough_is_bit_exact(sample_rt):
    original, restored = load(SAMPLE_DUMP), load(sample_rt["restored"])
    for name in SAMPLE_PASSTHROUGH:
        assert bits_equal(restored[name], original[name]), name
    assert restored["input_ids"].dtype == np.int64


def test_sample_kv_error_is_small(sample_rt):
    bound = {3: 0.05, 2: 0.15}[sample_rt["bits"]]
    original, restored = load(SAMPLE_DUMP), load(sample_rt["restored"])
    for name in SAMPLE_KV:
        assert restored[name].dtype == np.float16
        assert np.isfinite(restored[name]).all(), name
        err = rel_mse(original[name], restored[name])
        assert 0 < err < bound, (name, err)


def test_sample_compressed_file_is_plain_safetensors(sample_rt):
    tensors = load(sample_rt["comp"])
    original = load(SAMPLE_DUMP)
    for name in SAMPLE_PASSTHROUGH:
        assert bits_equal(tensors["fq/raw/" + name], original[name])
    for name in SAMPLE_KV:
        assert "fq/raw/" + name not in tensors
    assert tensors["fq/p0/rotation"].shape == (64, 64)
    assert os.path.getsize(sample_rt["comp"]) < os.path.getsize(SAMPLE_DUMP)


def test_sample_manifest_sidecar_restored(sample_rt):
    sidecar = sample_rt["dir"] / "kv_sample.restored.manifest.json"
    assert json.loads(sidecar.read_text()) == json.loads(SAMPLE_MANIFEST.read_text())
    assert sorted(os.listdir(sample_rt["dir"])) == sorted(
        ["kv_sample.fq.safetensors", "kv_sample.restored.safetensors",
         "kv_sample.restored.manifest.json"])


def test_sample_compress_json_agrees_with_restored_file(sample_rt):
    rep = sample_rt["report"]
    original, restored = load(SAMPLE_DUMP), load(sample_rt["restored"])
    comp_header = stfile.read_header(sample_rt["comp"])
    assert rep["source"] == str(SAMPLE_DUMP) and rep["output"] == str(sample_rt["comp"])
    assert rep["file_bytes"] == os.path.getsize(sample_rt["comp"])
    assert rep["passthrough"] == SAMPLE_PASSTHROUGH
    assert rep["passthrough_bytes"] == sum(original[n].nbytes for n in SAMPLE_PASSTHROUGH)
    payload_bits = {3: 3.25, 2: 2.25}[sample_rt["bits"]]  # index bits + a 16-bit norm per 64
    errs, energies = [], []
    for i, (entry, role) in enumerate(zip(rep["entries"], ("key", "value"))):
        names = [f"layer.{layer}.{role}" for layer in range(4)]
        x = np.concatenate([original[n].astype(np.float64).reshape(-1, 64) for n in names])
        y = np.concatenate([restored[n].astype(np.float64).reshape(-1, 64) for n in names])
        err, energy = float(((x - y) ** 2).sum()), float((x * x).sum())
        errs.append(err)
        energies.append(energy)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert entry["label"] == role
        assert entry["vectors"] == 4 * 3 * 384 and entry["values"] == 4 * 3 * 384 * 64
        assert entry["source_bytes"] == 2 * entry["values"]
        assert entry["rel_mse"] == pytest.approx(err / energy, rel=1e-6)
        assert entry["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-6)
        assert entry["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
        payload = sum(info.n_bytes for name, info in comp_header.tensors.items()
                      if name.startswith(f"fq/e{i}/"))  # codes, norms (+ key means, if any)
        assert entry["payload_bytes"] == payload
        assert entry["payload_bits_per_value"] == pytest.approx(8 * payload / entry["values"])
        # index bits + a 16-bit norm per 64 values (+ keys: one f32 mean per head and layer)
        extra = 32 / 384 if f"fq/e{i}/l0/mean" in comp_header.tensors else 0.0
        assert entry["payload_bits_per_value"] == pytest.approx(payload_bits + extra, rel=1e-12)
        assert entry["bits_per_value"] > entry["payload_bits_per_value"]
        assert entry["profile"]["rate_bits"] == pytest.approx(sample_rt["bits"])
    total = rep["total"]
    assert total["rel_mse"] == pytest.approx(sum(errs) / sum(energies), rel=1e-6)
    assert total["values"] == 2 * 4 * 3 * 384 * 64
    assert total["compressed_bytes"] == rep["file_bytes"] - rep["passthrough_bytes"]
    assert total["ratio"] == pytest.approx(total["source_bytes"] / total["compressed_bytes"])


def test_sample_validate_and_digest_compressed(sample_rt, cli):
    res = assert_ok(cli("validate", sample_rt["comp"], "--json"))
    rep = json.loads(res.stdout)
    assert rep["ok"] is True and rep["kind"] == "compressed" and rep["error"] is None
    assert all(check["ok"] for check in rep["checks"])
    res = assert_ok(cli("digest", sample_rt["comp"], "--json"))
    rep = json.loads(res.stdout)
    assert rep["kind"] == "compressed" and rep["ok"] is True
    stored = list(stfile.read_header(sample_rt["comp"]).tensors)
    assert sorted(row["name"] for row in rep["digests"]) == sorted(stored)
    assert all(row["status"] == "ok" for row in rep["digests"])
    # the restored dump validates against its restored manifest
    assert_ok(cli("validate", sample_rt["restored"]))


# ----------------------------------------------------------------------------- synthetic round trips


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_dtype_round_trip(cli, tmp_path, dtype):
    dump = make_dump(tmp_path, dtype=dtype)
    report, restored, _ = roundtrip(cli, dump, tmp_path)
    np_dtype = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype(np.float32)}[dtype]
    st = {"bf16": "BF16", "f32": "F32"}[dtype]
    assert header_order(tmp_path / "out.restored.safetensors") == header_order(dump.path)
    for name in dump.kv_names:
        assert restored[name].dtype == np_dtype
        assert st_dtype_of(tmp_path / "out.restored.safetensors")[name][0] == st
        assert restored[name].shape == dump.tensors[name].shape
        assert rel_mse(dump.tensors[name].astype(np.float32), restored[name].astype(np.float32)) < 0.05
    for name in ("input_ids", "layer.0.query", "layer.1.query"):
        assert bits_equal(restored[name], dump.tensors[name])
    assert report["total"]["source_bytes"] == sum(dump.tensors[n].nbytes for n in dump.kv_names)


def test_five_d_and_bthd_entries_restore_the_same_vectors(cli, tmp_path):
    """Keys as one 5-D tensor, values as per-layer bthd; same data as a plain bhtd dump."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    odd = make_dump(tmp_path / "a", five_d=True, value_layout="bthd", seed=5)
    plain = make_dump(tmp_path / "b", seed=5)
    assert odd.tensors["cache.key"].shape == (1, 2, 2, 32, 64)
    assert odd.tensors["layer.0.value"].shape == (1, 32, 2, 64)
    for layer in range(2):  # the fixture really stores the same values
        assert bits_equal(odd.tensors["cache.key"][:, layer], plain.tensors[f"layer.{layer}.key"])
    _, r_odd, _ = roundtrip(cli, odd, tmp_path / "a")
    _, r_plain, _ = roundtrip(cli, plain, tmp_path / "b")
    assert r_odd["cache.key"].shape == (1, 2, 2, 32, 64)
    assert r_odd["layer.1.value"].shape == (1, 32, 2, 64)
    for layer in range(2):
        key = np.ascontiguousarray(r_odd["cache.key"][:, layer])
        value = np.ascontiguousarray(r_odd["layer.%d.value" % layer].transpose(0, 2, 1, 3))
        assert bits_equal(key, r_plain[f"layer.{layer}.key"])
        assert bits_equal(value, r_plain[f"layer.{layer}.value"])
        assert rel_mse(plain.tensors[f"layer.{layer}.key"], key) < 0.05
        assert rel_mse(plain.tensors[f"layer.{layer}.value"], value) < 0.05
    sidecar = json.loads((tmp_path / "a" / "out.restored.manifest.json").read_text())
    assert sidecar == odd.manifest


def test_f32_norms_beyond_fp16_range(cli, tmp_path):
    dump = make_dump(tmp_path, dtype="f32", scale=1e5)
    assert max(float(np.linalg.norm(dump.tensors[n], axis=-1).max()) for n in dump.kv_names) > 65504
    report, restored, comp = roundtrip(cli, dump, tmp_path)
    norms = {n: d for n, (d, _) in comp.items() if n.endswith("/norms")}
    assert norms and set(norms.values()) == {"F32"}
    for name in dump.kv_names:
        assert np.isfinite(restored[name]).all(), name
        assert rel_mse(dump.tensors[name], restored[name]) < 0.05
    assert np.isfinite(report["total"]["rel_mse"]) and report["total"]["rel_mse"] < 0.05


def test_small_f16_dump_keeps_fp16_norms(cli, tmp_path):
    dump = make_dump(tmp_path)
    report, restored, comp = roundtrip(cli, dump, tmp_path)
    assert {d for n, (d, _) in comp.items() if n.endswith("/norms")} == {"F16"}
    assert comp["fq/e0/l0/norms"][1] == [1, 2, 32]
    assert report["entries"][1]["label"] == "value"  # values are never centered
    assert report["entries"][1]["payload_bits_per_value"] == pytest.approx(3.25)
    sidecar = json.loads((tmp_path / "out.restored.manifest.json").read_text())
    assert sidecar == dump.manifest


def _f16_near_max(tmp_path):
    dump = make_dump(tmp_path)
    tensors = dict(dump.tensors)
    for name in dump.kv_names:
        x = dump.tensors[name].astype(np.float32) * 15000
        tensors[name] = np.clip(x, -65000, 65000).astype(np.float16)
    assert all(np.isfinite(tensors[n]).all() for n in dump.kv_names)
    safetensors.numpy.save_file(tensors, str(dump.path))
    dump.tensors = tensors
    return dump


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_f16_values_near_fp16_max_round_trip(cli, tmp_path):
    dump = _f16_near_max(tmp_path)
    res = assert_ok(cli("compress", dump.path, "-o", tmp_path / "o.fq.safetensors", "--json"))
    assert np.isfinite(json.loads(res.stdout)["total"]["rel_mse"])
    assert_ok(cli("decompress", tmp_path / "o.fq.safetensors", "-o", tmp_path / "r.safetensors"))
    restored = load(tmp_path / "r.safetensors")
    for name in dump.kv_names:
        assert np.isfinite(restored[name]).all(), name
        assert rel_mse(dump.tensors[name], restored[name]) < 0.05


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_f16_values_near_fp16_max_leave_nothing_behind_on_failure(cli, tmp_path):
    dump = _f16_near_max(tmp_path)
    before = listing(tmp_path)
    res = cli("compress", dump.path)
    if res.exit_code != 0:
        assert listing(tmp_path) == before
        assert_error(res, res.exit_code, str(dump.path))


def test_non_finite_query_is_reported_like_kv(cli, dump):
    t = dict(dump.tensors)
    t["layer.1.query"] = t["layer.1.query"].copy()
    t["layer.1.query"][0, 2, 3, 4] = np.nan
    safetensors.numpy.save_file(t, str(dump.path))
    before = listing(dump.path.parent)
    assert_error(cli("validate", dump.path), 3, str(dump.path), "tensor 'layer.1.query'",
                 "non-finite value nan at position [0, 2, 3, 4]")
    assert_error(cli("compress", dump.path), 3, str(dump.path), "tensor 'layer.1.query'",
                 "position [0, 2, 3, 4]")
    assert listing(dump.path.parent) == before


def test_block_dim_and_size(cli, tmp_path):
    dump = make_dump(tmp_path)
    report, restored, comp = roundtrip(cli, dump, tmp_path, "--block-dim", "4", "--size", "256")
    for entry in report["entries"]:
        assert entry["profile"]["block_dim"] == 4 and entry["profile"]["size"] == 256
    assert report["entries"][1]["payload_bits_per_value"] == pytest.approx(2.25)
    assert comp["fq/p0/codebook"] == ("F32", [256, 4])
    for name in dump.kv_names:
        assert rel_mse(dump.tensors[name], restored[name]) < 0.15


def test_bits_two_preset_equals_explicit_profile(cli, tmp_path):
    dump = make_dump(tmp_path)
    assert_ok(cli("compress", dump.path, "--bits", "2", "-o", tmp_path / "a.fq.safetensors"))
    assert_ok(cli("compress", dump.path, "--block-dim", "4", "--size", "256",
                  "-o", tmp_path / "b.fq.safetensors"))
    a, b = load(tmp_path / "a.fq.safetensors"), load(tmp_path / "b.fq.safetensors")
    assert set(a) == set(b) and all(bits_equal(a[n], b[n]) for n in a)


def test_seed(cli, tmp_path):
    dump = make_dump(tmp_path)
    common = ("--block-dim", "2", "--size", "16")  # N=16 trains in a fraction of a second
    res7 = assert_ok(cli("compress", dump.path, *common, "--seed", "7", "--json",
                         "-o", tmp_path / "s7.fq.safetensors"))
    assert_ok(cli("compress", dump.path, *common, "-o", tmp_path / "s0.fq.safetensors"))
    assert {e["profile"]["seed"] for e in json.loads(res7.stdout)["entries"]} == {7}
    s7, s0 = load(tmp_path / "s7.fq.safetensors"), load(tmp_path / "s0.fq.safetensors")
    assert not np.array_equal(s7["fq/p0/rotation"], s0["fq/p0/rotation"])
    assert_ok(cli("decompress", tmp_path / "s7.fq.safetensors", "-o", tmp_path / "r.safetensors"))
    restored = load(tmp_path / "r.safetensors")
    for name in dump.kv_names:
        assert rel_mse(dump.tensors[name], restored[name]) < 0.15


def test_default_output_names(cli, tmp_path):
    dump = make_dump(tmp_path)
    assert_ok(cli("compress", dump.path))
    assert_ok(cli("decompress", tmp_path / "kv.fq.safetensors"))
    assert sorted(os.listdir(tmp_path)) == sorted([
        "kv.safetensors", "kv.manifest.json", "kv.fq.safetensors",
        "kv.restored.safetensors", "kv.restored.manifest.json"])
    res = assert_ok(cli("validate", tmp_path / "kv.restored.safetensors", "--json"))
    assert json.loads(res.stdout)["ok"] is True


def test_explicit_manifest_option(cli, tmp_path):
    dump = make_dump(tmp_path)
    other = tmp_path / "elsewhere.json"
    dump.manifest_path.rename(other)
    assert_ok(cli("compress", dump.path, "--manifest", other, "-o", tmp_path / "o.fq.safetensors"))
    assert_ok(cli("validate", dump.path, "-m", other))


# ----------------------------------------------------------------------------- flag errors


def test_bits_without_preset_is_usage_error(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--bits", "2.5"), 2,
                 "--bits 2.5 has no preset", "0.5, 1, 2, 3, 4")
    assert listing(dump.path.parent) == before


@pytest.mark.parametrize("args", [["--block-dim", "4"], ["--size", "256"]])
def test_block_dim_and_size_go_together(cli, dump, args):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, *args), 2, "--block-dim and --size together")
    assert listing(dump.path.parent) == before


def test_bits_and_block_dim_exclusive(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--bits", "2", "--block-dim", "4", "--size", "256"),
                 2, "either --bits or --block-dim/--size")
    assert listing(dump.path.parent) == before


def test_block_dim_not_dividing_head_dim(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--block-dim", "3", "--size", "64"), 3,
                 str(dump.manifest_path), "head_dim 64 is not divisible by block_dim 3",
                 "tensor 'layer.0.key'")
    assert listing(dump.path.parent) == before


# ----------------------------------------------------------------------------- validate and digest


def test_validate_good_dump(cli, dump):
    res = assert_ok(cli("validate", dump.path))
    assert "FAIL" not in res.stdout and "pass" in res.stdout
    rep = json.loads(assert_ok(cli("validate", dump.path, "--json")).stdout)
    assert rep["ok"] is True and rep["kind"] == "dump" and rep["error"] is None
    assert all(check["ok"] for check in rep["checks"])


def test_validate_good_compressed(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    res = assert_ok(cli("validate", tmp_path / "kv.fq.safetensors"))
    assert "FAIL" not in res.stdout and "pass" in res.stdout


def _blake3(tag: bytes, payload: bytes) -> str:
    return "blake3:" + blake3.blake3(tag + b"\x00" + payload).hexdigest()


def test_digest_of_manifest_matches_independent_blake3(cli, dump):
    key = ('{"schema_version":"fib_quant_kv_tensor_shape_v1","role":"key","attention_kind":"gqa",'
           '"batch":1,"layers":2,"kv_heads":2,"query_heads":4,"tokens":32,"head_dim":64,'
           '"dtype":"f16","rope_state":"post_rope"}')
    value = ('{"schema_version":"fib_quant_kv_tensor_shape_v1","role":"value",'
             '"attention_kind":"gqa","batch":1,"layers":2,"kv_heads":2,"query_heads":4,'
             '"tokens":32,"head_dim":64,"dtype":"f16","rope_state":"not_applicable"}')
    expected = [_blake3(b"fib_quant_kv_tensor_shape_v1", s.encode()) for s in (key, value)]
    rep = json.loads(assert_ok(cli("digest", dump.manifest_path, "--json")).stdout)
    assert rep["kind"] == "manifest"
    assert [row["digest"] for row in rep["digests"]] == expected
    text = assert_ok(cli("digest", dump.manifest_path)).stdout
    assert re.findall(r"blake3:[0-9a-f]{64}", text) == expected


def test_digest_of_dump_is_independent_of_tensor_order(cli, dump, tmp_path):
    names = list(dump.tensors)
    forward = tmp_path / "forward.safetensors"
    backward = tmp_path / "backward.safetensors"
    write_safetensors(forward, {n: dump.tensors[n] for n in names})
    write_safetensors(backward, {n: dump.tensors[n] for n in reversed(names)})
    assert header_order(forward) == list(reversed(header_order(backward)))
    a = json.loads(assert_ok(cli("digest", forward, "--json")).stdout)
    b = json.loads(assert_ok(cli("digest", backward, "--json")).stdout)
    assert a["kind"] == b["kind"] == "dump"
    assert a["file_digest"] == b["file_digest"]
    rows_a = {r["name"]: r["digest"] for r in a["digests"]}
    assert rows_a == {r["name"]: r["digest"] for r in b["digests"]}
    # the per-tensor and whole-file digests, computed independently
    x = dump.tensors["layer.0.key"]
    assert rows_a["layer.0.key"] == _blake3(
        b"fibquant_tensor_v1", b'{"dtype":"F16","shape":[1,2,32,64]}\x00' + x.tobytes())
    pairs = json.dumps([[n, rows_a[n]] for n in sorted(rows_a)], separators=(",", ":"))
    assert a["file_digest"] == _blake3(b"fibquant_file_v1", pairs.encode())


def test_digest_of_compressed_lists_every_array(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    rep = json.loads(assert_ok(cli("digest", comp, "--json")).stdout)
    assert rep["kind"] == "compressed" and rep["ok"] is True
    assert sorted(r["name"] for r in rep["digests"]) == sorted(header_order(comp))
    assert {r["status"] for r in rep["digests"]} == {"ok"}
    assert all(re.fullmatch(r"blake3:[0-9a-f]{64}", r["digest"]) for r in rep["digests"])


# ----------------------------------------------------------------------------- bad safetensors input


def _random_bytes(p):
    p.write_bytes(np.random.default_rng(1).bytes(4096))


def _text(p):
    p.write_text("This is not a safetensors file, just some text.\n" * 10)


def _tiny(p):
    p.write_bytes(b"abc")


def _truncated_header(p, dump_bytes):
    (n,) = struct.unpack("<Q", dump_bytes[:8])
    p.write_bytes(dump_bytes[: 8 + n // 2])


def _absurd_header(p):
    p.write_bytes(struct.pack("<Q", 2**40) + b"junk" * 64)


BAD_FILES = {
    "random-bytes": (lambda p, raw: _random_bytes(p), "absurd header length"),
    "text-file": (lambda p, raw: _text(p), "absurd header length"),
    "three-bytes": (lambda p, raw: _tiny(p), "too short"),
    "truncated-100": (lambda p, raw: p.write_bytes(raw[:-100]), "truncated file?"),
    "truncated-header": (_truncated_header, "absurd header length"),
    "absurd-header-length": (lambda p, raw: _absurd_header(p), "absurd header length 1099511627776"),
}


@pytest.mark.parametrize("command", ["compress", "validate", "decompress", "digest"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors_files(cli, dump, case, command):
    make, reason = BAD_FILES[case]
    raw = dump.path.read_bytes()
    make(dump.path, raw)
    before = listing(dump.path.parent)
    line = assert_error(cli(command, dump.path), 3, str(dump.path), reason)
    assert listing(dump.path.parent) == before, line


@pytest.mark.parametrize("command", ["compress", "validate", "decompress", "digest"])
def test_missing_input_file(cli, tmp_path, command):
    missing = tmp_path / "nope.safetensors"
    assert_error(cli(command, missing), 3, f"{missing}: no such file")
    assert os.listdir(tmp_path) == []


def test_directory_as_input(cli, tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    assert_error(cli("compress", tmp_path / "d.safetensors"), 3, "is a directory")
    assert os.listdir(tmp_path) == ["d.safetensors"]


# ----------------------------------------------------------------------------- bad manifests


def _shape(manifest, i=0):
    return manifest["entries"][i]["shape"]


def _missing_manifest(dump):
    dump.manifest_path.unlink()
    return 3, [str(dump.path), f"no manifest at {dump.manifest_path}", "--manifest"]


def _syntax_error(dump):
    dump.write_manifest(text='{\n  "schema_version": "fibquant_kv_manifest_v1",\n  "entries": [}\n')
    return 3, [str(dump.manifest_path), "invalid JSON at line 3, column 15"]


def _unknown_key(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m)["head_dimm"] = _shape(m).pop("head_dim")
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[0].shape: unknown key 'head_dimm'"]


def _missing_key(dump):
    m = json.loads(json.dumps(dump.manifest))
    del _shape(m, 1)["tokens"]
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[1].shape: missing key 'tokens'"]


def _value_post_rope(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m, 1)["rope_state"] = "post_rope"
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[1].shape: value tensors must use not_applicable rope state"]


def _string_integer(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m)["tokens"] = "32"
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[0].shape.tokens: expected an integer"]


def _short_tensor(dump):
    t = dict(dump.tensors)
    t["layer.1.key"] = np.ascontiguousarray(t["layer.1.key"][:, :, :31])
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.1.key'", "expected shape [1, 2, 32, 64]",
               "found [1, 2, 31, 64]"]


def _wrong_dtype(dump):
    t = dict(dump.tensors)
    t["layer.0.value"] = t["layer.0.value"].astype(np.float32)
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.0.value'", "expected dtype F16", "found F32"]


def _absent_tensor(dump):
    t = dict(dump.tensors)
    del t["layer.1.value"]
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.1.value'", "not present in the file"]


BAD_MANIFESTS = {
    "missing-manifest": _missing_manifest,
    "json-syntax": _syntax_error,
    "unknown-key": _unknown_key,
    "missing-key": _missing_key,
    "value-post-rope": _value_post_rope,
    "string-integer": _string_integer,
    "shape-mismatch": _short_tensor,
    "dtype-mismatch": _wrong_dtype,
    "absent-tensor": _absent_tensor,
}


@pytest.mark.parametrize("command", ["compress", "validate"])
@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_or_contract(cli, dump, case, command):
    code, fragments = BAD_MANIFESTS[case](dump)
    before = listing(dump.path.parent)
    assert_error(cli(command, dump.path), code, *fragments)
    assert listing(dump.path.parent) == before


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_in_per_layer_tensor(cli, dump, value, shown):
    t = dict(dump.tensors)
    t["layer.1.value"] = t["layer.1.value"].copy()
    t["layer.1.value"][0, 1, 17, 42] = value
    safetensors.numpy.save_file(t, str(dump.path))
    before = listing(dump.path.parent)
    for command in ("compress", "validate"):
        assert_error(cli(command, dump.path), 3, str(dump.path), "tensor 'layer.1.value'",
                     f"non-finite value {shown} at position [0, 1, 17, 42]")
    assert listing(dump.path.parent) == before


def test_non_finite_position_in_5d_and_bthd_tensors(cli, tmp_path):
    dump = make_dump(tmp_path, dtype="f32", five_d=True, value_layout="bthd")
    t = dict(dump.tensors)
    t["cache.key"] = t["cache.key"].copy()
    t["cache.key"][0, 1, 0, 5, 9] = np.nan  # layer 1: reported in the stored (5-D) axes
    safetensors.numpy.save_file(t, str(dump.path))
    before = sorted(os.listdir(tmp_path))
    assert_error(cli("compress", dump.path), 3, "tensor 'cache.key'",
                 "non-finite value nan at position [0, 1, 0, 5, 9]")
    t["cache.key"][0, 1, 0, 5, 9] = 0.0
    t["layer.0.value"] = t["layer.0.value"].copy()
    t["layer.0.value"][0, 20, 1, 3] = np.inf  # bthd: [batch, token, head, dim]
    safetensors.numpy.save_file(t, str(dump.path))
    assert_error(cli("compress", dump.path), 3, "tensor 'layer.0.value'",
                 "non-finite value inf at position [0, 20, 1, 3]")
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- corrupted compressed files


@pytest.fixture
def compressed(cli, tmp_path):
    """A compressed file (in tmp_path/c) whose header ends in padding spaces."""
    work = tmp_path / "c"
    work.mkdir()
    for pad in range(8):  # the source __metadata__ is recorded in the header: vary its length
        dump = make_dump(tmp_path, metadata={"note": "x" * pad}, extras=True)
        out = work / "kv.fq.safetensors"
        if out.exists():
            out.unlink()
        assert_ok(cli("compress", dump.path, "-o", out))
        header, start = read_st_header(out)
        if out.read_bytes()[start - 1:start] == b" ":
            return out
    raise AssertionError("could not produce a padded header")


def _tensor_offset(path, name):
    h = stfile.read_header(path)
    info = h.tensors[name]
    return h.data_start + info.begin + info.n_bytes // 2 + 1


def _header_offset(path, needle: bytes, delta: int):
    start = stfile.read_header(path).data_start
    raw = path.read_bytes()[:start]
    assert raw.count(needle) >= 1, needle
    return raw.index(needle) + delta


def _after(path, *needles: bytes) -> int:
    """Offset of the first byte after ``needles`` found one after the other in the header."""
    start = stfile.read_header(path).data_start
    raw = path.read_bytes()[:start]
    pos = 0
    for needle in needles:
        pos = raw.index(needle, pos) + len(needle)
    return pos


REGIONS = {
    "codes": lambda p: _tensor_offset(p, "fq/e0/l1/codes"),
    "norms": lambda p: _tensor_offset(p, "fq/e1/l0/norms"),
    "codebook": lambda p: _tensor_offset(p, "fq/p0/codebook"),
    "rotation": lambda p: _tensor_offset(p, "fq/p0/rotation"),
    "passthrough": lambda p: _tensor_offset(p, "fq/raw/layer.1.query"),
    "metadata-json": lambda p: _header_offset(p, b"format_version", 3),
    "metadata-digest": lambda p: _header_offset(p, b'"fibquant_digest":"blake3:', 30),
    "header-padding": lambda p: stfile.read_header(p).data_start - 1,
    "header-length-prefix": lambda p: 0,
    "header-open-brace": lambda p: 8,
    "header-dtype": lambda p: _header_offset(p, b'"dtype":"U8"', 9),
    "header-shape": lambda p: _after(p, b'"fq/e1/l0/norms":{"dtype":"F16","shape":[1,'),
    "header-offsets": lambda p: _after(p, b'"fq/e0/l1/codes":', b'"data_offsets":['),
    "tensor-name": lambda p: _header_offset(p, b'"fq/e0/l1/codes":', 12),
    "format-version": lambda p: _header_offset(p, b'"fibquant_format":"2"', 19),
}
def _flip_cases():
    for region in REGIONS:
        for mask in (0x01, 0x20):
            yield pytest.param(region, mask, id=f"{region}-x{mask:02x}")


@pytest.mark.parametrize("region, mask", list(_flip_cases()))
def test_one_flipped_byte_is_detected(cli, compressed, region, mask):
    offset = REGIONS[region](compressed)
    raw = bytearray(compressed.read_bytes())
    if region == "header-padding":
        assert raw[offset] == 0x20
    raw[offset] ^= mask
    compressed.write_bytes(bytes(raw))
    directory = compressed.parent
    before = listing(directory)
    restored = directory / "r.safetensors"
    dec = cli("decompress", compressed, "-o", restored)
    val = cli("validate", compressed)
    for res in (dec, val):
        assert res.exit_code in (3, 4), (region, res.exit_code, res.output)
        assert_error(res, res.exit_code, str(compressed))
    assert listing(directory) == before  # no restored dump, sidecar or temporary file
    if region in ("codes", "norms", "codebook", "rotation", "passthrough"):
        assert dec.exit_code == 4 and "digest mismatch" in dec.stderr
        assert "tensor 'fq/" in dec.stderr


def _rewritten(compressed, name, edit_doc, version=None):
    """A copy of ``compressed`` whose document ``edit_doc`` changed, digest recomputed."""
    from fibquant_cli.formats.container import metadata_for

    header = stfile.read_header(compressed)
    tensors = {n: stfile.RawTensor(i.dtype, i.shape, stfile.read_raw(header, n))
               for n, i in header.tensors.items()}
    doc = json.loads(header.metadata["fibquant"])
    edit_doc(doc)
    metadata = metadata_for(doc)
    if version is not None:
        metadata["fibquant_format"] = version
    out = compressed.parent / name
    write_file(out, tensors, metadata)
    return out


def test_newer_format_version_is_refused(cli, compressed):
    newer = _rewritten(compressed, "newer.fq.safetensors",
                       lambda doc: doc.update(format_version=99))
    before = listing(compressed.parent)
    for command in ("decompress", "validate"):
        assert_error(cli(command, newer), 3, str(newer), "written by a newer fibquant",
                     "format version 99")
    assert listing(compressed.parent) == before


def test_a_version_that_disagrees_with_the_document_is_corruption_not_newer(cli, compressed):
    odd = _rewritten(compressed, "odd.fq.safetensors", lambda doc: None, version="3")
    for command in ("decompress", "validate"):
        assert_error(cli(command, odd), 4, str(odd), "format version 3 differs from the "
                     "document's 2")


def test_decompress_plain_dump_is_refused(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("decompress", dump.path, "-o", dump.path.parent / "r.safetensors"), 3,
                 str(dump.path), "not a fibquant compressed file")
    assert listing(dump.path.parent) == before


def test_compress_compressed_file_is_refused(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    before = listing(tmp_path)
    assert_error(cli("compress", comp, "-o", tmp_path / "again.fq.safetensors"), 3,
                 str(comp), "compressed fibquant file, not a KV dump")
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------- output paths


def test_compress_output_exists(cli, dump, tmp_path):
    out = tmp_path / "kv.fq.safetensors"
    out.write_bytes(b"precious")
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path), 2, str(out), "output exists", "--force")
    assert listing(tmp_path) == before
    assert_ok(cli("compress", dump.path, "--force"))
    assert out.read_bytes() != b"precious"
    assert_ok(cli("validate", out))
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary file left


def test_decompress_output_or_sidecar_exists(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    sidecar = tmp_path / "kv.restored.manifest.json"
    sidecar.write_text("precious")
    before = listing(tmp_path)
    assert_error(cli("decompress", comp), 2, str(sidecar), "output exists")
    assert listing(tmp_path) == before
    sidecar.unlink()
    (tmp_path / "kv.restored.safetensors").write_bytes(b"precious")
    before = listing(tmp_path)
    assert_error(cli("decompress", comp), 2, "kv.restored.safetensors", "output exists")
    assert listing(tmp_path) == before
    assert_ok(cli("decompress", comp, "--force"))
    assert_ok(cli("validate", tmp_path / "kv.restored.safetensors"))


@pytest.mark.parametrize("force", [False, True])
def test_output_is_the_input(cli, dump, tmp_path, force):
    flags = ["--force"] if force else []
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", dump.path, *flags), 2, "output is the input file")
    spelled = tmp_path / "." / "sub" / ".." / "kv.safetensors"
    (tmp_path / "sub").mkdir()
    assert_error(cli("compress", dump.path, "-o", spelled, *flags), 2, "output is the input file")
    (tmp_path / "sub").rmdir()
    assert listing(tmp_path) == before
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    before = listing(tmp_path)
    assert_error(cli("decompress", comp, "-o", comp, *flags), 2, "output is the input file")
    assert listing(tmp_path) == before


def test_compress_output_is_the_manifest(cli, dump, tmp_path):
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", dump.manifest_path), 2,
                 "output is the manifest file")
    assert_error(cli("compress", dump.path, "-o", dump.manifest_path, "--force"), 2,
                 "output is the manifest file")
    assert listing(tmp_path) == before


def test_output_directory_missing(cli, dump, tmp_path):
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", tmp_path / "nodir" / "o.fq.safetensors"), 2,
                 "does not exist")
    assert listing(tmp_path) == before and not (tmp_path / "nodir").exists()


# ----------------------------------------------------------------------------- --debug and messages


def test_debug_shows_the_exception(cli, tmp_path):
    missing = tmp_path / "nope.safetensors"
    plain = cli("compress", missing)
    assert_error(plain, 3, "no such file")
    debug = cli("--debug", "compress", missing)
    assert debug.exit_code != 0
    assert isinstance(debug.exception, InvalidInputError)
    assert debug.exc_info is not None and debug.exc_info[2] is not None  # a traceback exists
    # and the flag does not stick to the next invocation
    assert_error(cli("compress", missing), 3, "no such file")


def test_error_message_shows_bracketed_path_verbatim(cli, tmp_path):
    folder = tmp_path / "run[old]"
    folder.mkdir()
    missing = folder / "kv.safetensors"
    assert_error(cli("compress", missing), 3, f"{missing}: no such file")


def test_error_message_with_closing_tag_text(cli, dump):
    m = json.loads(json.dumps(dump.manifest))
    m["entries"][0]["shape"]["[/x]"] = 1
    dump.write_manifest(m)
    assert_error(cli("compress", dump.path), 3, "unknown key '[/x]'")


# ----------------------------------------------------------------------------- more shapes and dtypes


SHAPES = {
    "batch2-mqa": dict(batch=2, kv_heads=1, query_heads=4, attention_kind="mqa"),
    "one-layer-4d": dict(layers=1),
    "one-layer-5d": dict(layers=1, five_d=True),
    "mha-bthd": dict(kv_heads=4, query_heads=4, layout="bthd", attention_kind="mha"),
    "no-attention-no-extras": dict(queries=False, extras=False),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_shape_variants_round_trip(cli, tmp_path, case):
    kwargs = dict(SHAPES[case])
    kind = kwargs.pop("attention_kind", None)
    dump = make_dump(tmp_path, metadata={"format": "pt", "ünï": "ç"}, **kwargs)
    if kind:
        for entry in dump.manifest["entries"]:
            entry["shape"]["attention_kind"] = kind
        dump.write_manifest()
    _, restored, _ = roundtrip(cli, dump, tmp_path)
    out = tmp_path / "out.restored.safetensors"
    assert header_order(out) == header_order(dump.path)
    assert read_st_header(out)[0]["__metadata__"] == {"format": "pt", "ünï": "ç"}
    for name in dump.kv_names:
        assert restored[name].shape == dump.tensors[name].shape
        assert rel_mse(dump.tensors[name], restored[name]) < 0.05
    assert json.loads((tmp_path / "out.restored.manifest.json").read_text()) == dump.manifest


def test_unusual_passthrough_dtypes_are_bit_exact(cli, tmp_path):
    dump = make_dump(tmp_path)
    tensors = dict(dump.tensors)
    tensors["flags"] = np.array([True, False, True])
    tensors["f8"] = np.arange(10, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    tensors["f64"] = np.array([np.nan, 1.0, -0.0])  # NaN outside KV tensors is not an error
    tensors["scalar"] = np.array(3, dtype=np.int32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float16)
    write_safetensors(dump.path, tensors)
    # (no safetensors.numpy here: the installed binding cannot load F8_E4M3 into numpy)
    out = tmp_path / "out.restored.safetensors"
    assert_ok(cli("compress", dump.path, "-o", tmp_path / "out.fq.safetensors"))
    assert_ok(cli("decompress", tmp_path / "out.fq.safetensors", "-o", out))
    src_h, src_start = read_st_header(dump.path)
    out_h, out_start = read_st_header(out)
    assert list(out_h) == list(src_h)
    src, res = dump.path.read_bytes(), out.read_bytes()
    for name in ("flags", "f8", "f64", "scalar", "empty", "input_ids", "layer.0.query"):
        assert out_h[name]["dtype"] == src_h[name]["dtype"]
        assert out_h[name]["shape"] == src_h[name]["shape"]
        a, b = src_h[name]["data_offsets"], out_h[name]["data_offsets"]
        assert src[src_start + a[0]:src_start + a[1]] == res[out_start + b[0]:out_start + b[1]], name


def test_zero_vectors_restore_as_zeros(cli, tmp_path):
    dump = make_dump(tmp_path, dtype="f32")
    tensors = dict(dump.tensors)
    tensors["layer.0.key"] = tensors["layer.0.key"].copy()
    tensors["layer.0.key"][0, :, :5] = 0.0  # e.g. padding tokens
    tensors["layer.1.value"] = np.zeros_like(tensors["layer.1.value"])
    safetensors.numpy.save_file(tensors, str(dump.path))
    # keys are centered by default (a zero key then decodes near the mean): turn that off here
    report, restored, _ = roundtrip(cli, dump, tmp_path, "--no-center-keys")
    assert not restored["layer.0.key"][0, :, :5].any()
    assert not restored["layer.1.value"].any()
    assert rel_mse(tensors["layer.0.key"], restored["layer.0.key"]) < 0.05
    assert all(np.isfinite(entry["rel_mse"]) for entry in report["entries"])


@pytest.mark.parametrize("bits, k, n, bound", [("4", 2, 256, 0.02), ("1", 8, 256, 0.45),
                                              ("0.5", 8, 16, 0.75), ("6", 2, 256, 0.02)])
def test_other_presets_with_compare(cli, tmp_path, bits, k, n, bound):
    dump = make_dump(tmp_path)
    report, restored, comp = roundtrip(cli, dump, tmp_path, "--bits", bits, "--compare")
    assert {(e["profile"]["block_dim"], e["profile"]["size"]) for e in report["entries"]} == {(k, n)}
    assert comp["fq/p0/codebook"] == ("F32", [n, k])
    for name in dump.kv_names:
        assert rel_mse(dump.tensors[name], restored[name]) < bound
    scalar = report["total"]["scalar_rel_mse"]
    if bits == "0.5":  # no whole-bit scalar baseline at half a bit
        assert scalar is None
    else:
        assert scalar is not None and np.isfinite(scalar) and scalar > 0


def test_compare_table_has_scalar_row(cli, dump):
    res = assert_ok(cli("compress", dump.path, "--compare"))
    assert "scalar relative MSE" in res.stdout
    assert res.stderr == ""


def test_source_digest_recorded_in_compressed_file(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    src = json.loads(assert_ok(cli("digest", dump.path, "--json")).stdout)
    comp = json.loads(assert_ok(cli("digest", tmp_path / "kv.fq.safetensors", "--json")).stdout)
    assert comp["source_file_digest"] == src["file_digest"]
    assert_ok(cli("decompress", tmp_path / "kv.fq.safetensors"))
    restored = json.loads(assert_ok(cli("digest", tmp_path / "kv.restored.safetensors",
                                        "--json")).stdout)
    rows = {r["name"]: r["digest"] for r in restored["digests"]}
    for row in src["digests"]:  # pass-through tensors keep their digest, KV tensors change
        assert (rows[row["name"]] == row["digest"]) == (row["name"] not in dump.kv_names)


def test_decompress_json(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    res = assert_ok(cli("decompress", tmp_path / "kv.fq.safetensors", "--json"))
    rep = json.loads(res.stdout)
    assert rep["output"] == str(tmp_path / "kv.restored.safetensors")
    assert rep["manifest_output"] == str(tmp_path / "kv.restored.manifest.json")
    kinds = {row["name"]: row["kind"] for row in rep["tensors"]}
    assert [row["name"] for row in rep["tensors"]] == header_order(dump.path)
    assert {n for n, k in kinds.items() if k == "restored"} == set(dump.kv_names)


def test_validate_json_reports_the_failure(cli, dump):
    t = dict(dump.tensors)
    t["layer.0.key"] = t["layer.0.key"].copy()
    t["layer.0.key"][0, 0, 1, 2] = np.nan
    safetensors.numpy.save_file(t, str(dump.path))
    res = cli("validate", dump.path, "--json")
    assert_error(res, 3, "tensor 'layer.0.key'", "non-finite value nan at position [0, 0, 1, 2]")
    rep = json.loads(res.stdout)
    assert rep["ok"] is False and "non-finite" in rep["error"]
    assert [c["ok"] for c in rep["checks"]][-1] is False


def test_digest_of_corrupted_compressed_file(cli, compressed):
    raw = bytearray(compressed.read_bytes())
    raw[REGIONS["codes"](compressed)] ^= 0x01
    compressed.write_bytes(bytes(raw))
    res = cli("digest", compressed, "--json")
    assert_error(res, 4, "tensor 'fq/e0/l1/codes'", "digest mismatch")
    rep = json.loads(res.stdout)
    assert rep["ok"] is False
    bad = [r["name"] for r in rep["digests"] if r["status"] != "ok"]
    assert bad == ["fq/e0/l1/codes"]


@pytest.mark.parametrize("case", ["unknown-key", "json-syntax", "value-post-rope"])
def test_digest_of_bad_manifest(cli, dump, case):
    code, fragments = BAD_MANIFESTS[case](dump)
    assert_error(cli("digest", dump.manifest_path), code, *fragments)


def test_codebook_command(cli):
    rep = json.loads(assert_ok(cli("codebook", "--eval-vectors", "1000", "--json")).stdout)
    assert (rep["head_dim"], rep["block_dim"], rep["size"], rep["rate_bits"]) == (64, 2, 64, 3.0)
    assert rep["origin"] == "shipped"
    assert rep["shannon_bound"] < rep["d_unit"] < rep["scalar_d_unit"] < 0.05
    assert_error(cli("codebook", "--block-dim", "3", "--eval-vectors", "1000"), 3,
                 "not divisible by block_dim 3")


# ----------------------------------------------------------------------------- sidecar path problems


def _sidecar_is_a_directory(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    assert_ok(cli("decompress", tmp_path / "kv.fq.safetensors"))  # an earlier, good restore
    previous = (tmp_path / "kv.restored.safetensors").read_bytes()
    sidecar = tmp_path / "kv.restored.manifest.json"
    sidecar.unlink()
    sidecar.mkdir()
    res = cli("decompress", tmp_path / "kv.fq.safetensors", "--force")
    return res, previous


def test_decompress_sidecar_is_a_directory_is_usage_error(cli, dump, tmp_path):
    res, _ = _sidecar_is_a_directory(cli, dump, tmp_path)
    assert_error(res, 2, "kv.restored.manifest.json", "directory")


def test_failed_forced_decompress_keeps_previous_output(cli, dump, tmp_path):
    res, previous = _sidecar_is_a_directory(cli, dump, tmp_path)
    assert res.exit_code != 0
    assert (tmp_path / "kv.restored.safetensors").exists()
    assert (tmp_path / "kv.restored.safetensors").read_bytes() == previous


# ----------------------------------------------------------------------------- resource limits (exit 5)


def test_header_above_cap_is_resource_error(cli, tmp_path):
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as fh:  # sparse: costs no disk
        fh.write(struct.pack("<Q", 101 * 2**20))
        fh.truncate(102 * 2**20)
    for command in ("compress", "validate"):
        assert_error(cli(command, big), 5, str(big), "absurd header length 105906176",
                     "above the 104857600-byte cap")
    assert os.listdir(tmp_path) == ["big.safetensors"]


def test_size_overflow_in_manifest_is_resource_error(cli, dump):
    dump.manifest["entries"][0]["shape"]["tokens"] = 2**32
    dump.write_manifest()
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path), 5, str(dump.manifest_path),
                 "entries[0].shape: kv shape size overflow")
    assert listing(dump.path.parent) == before


def test_huge_manifest_is_resource_error(cli, dump):
    with open(dump.manifest_path, "r+b") as fh:
        fh.truncate(17 * 2**20)
    assert_error(cli("compress", dump.path), 5, str(dump.manifest_path),
                 "manifest is larger than 16777216 bytes")
    assert sorted(os.listdir(dump.path.parent)) == ["kv.manifest.json", "kv.safetensors"]


# ----------------------------------------------------------------------------- per-role points, kept tokens


def test_keep_first_and_last_tokens_are_bit_exact(cli, tmp_path):
    dump = make_dump(tmp_path)
    report, restored, comp = roundtrip(cli, dump, tmp_path, "--keep-first", "4", "--keep-last", "2")
    for name in dump.kv_names:
        src, out = dump.tensors[name], restored[name]
        assert bits_equal(out[:, :, :4], src[:, :, :4]), name
        assert bits_equal(out[:, :, -2:], src[:, :, -2:]), name
        assert not np.array_equal(out[:, :, 4:-2], src[:, :, 4:-2]), name  # the rest is lossy
        assert rel_mse(src, out) < 0.05
    assert_ok(cli("validate", tmp_path / "out.fq.safetensors"))


def test_keep_more_tokens_than_exist_stores_everything(cli, tmp_path):
    dump = make_dump(tmp_path)
    report, restored, _ = roundtrip(cli, dump, tmp_path, "--keep-first", "40")
    for name in dump.kv_names:
        assert bits_equal(restored[name], dump.tensors[name]), name
    assert report["total"]["rel_mse"] == 0.0


def test_negative_keep_is_usage_error(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--keep-first", "-1"), 2, "--keep-first")
    assert listing(dump.path.parent) == before


def test_per_role_operating_points(cli, tmp_path):
    dump = make_dump(tmp_path)
    report, restored, _ = roundtrip(cli, dump, tmp_path, "--key-bits", "4", "--value-bits", "2")
    points = {e["label"]: (e["profile"]["block_dim"], e["profile"]["size"]) for e in report["entries"]}
    assert points == {"key": (2, 256), "value": (4, 256)}
    assert rel_mse(dump.tensors["layer.0.key"], restored["layer.0.key"]) < 0.02
    assert rel_mse(dump.tensors["layer.0.value"], restored["layer.0.value"]) < 0.15
    assert_error(cli("compress", dump.path, "--key-bits", "2.5", "-o", tmp_path / "x"), 2,
                 "--key-bits 2.5 has no preset")
    assert_error(cli("compress", dump.path, "--key-block-dim", "4", "-o", tmp_path / "x"), 2,
                 "--key-block-dim and --key-size together")
    assert not (tmp_path / "x").exists()
