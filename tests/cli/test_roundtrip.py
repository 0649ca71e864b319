"""End-to-end round trips through the ``fibquant`` command line: every tensor comes back with
its name, shape and dtype; pass-through tensors bit-exact; KV error bounded."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from typer.testing import CliRunner

from fibquant_cli.formats import stfile

from conftest import (
    SAMPLE_DUMP,
    SAMPLE_MANIFEST,
    assert_error,
    bits_equal,
    header_order,
    listing,
    load,
    make_dump,
    read_st_header,
    rel_mse,
    roundtrip,
    st_dtype_of,
    write_safetensors,
)
from conftest import ok as assert_ok

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
    # index bits + a 16-bit norm per 64 values on 383 tokens; the kept sink token (the default
    # --keep-first 1) is 16 bits per value
    payload_bits = ({3: 3.25, 2: 2.25}[sample_rt["bits"]] * 383 + 16) / 384
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
    assert comp["fq/e0/l0/norms"][1] == [1, 2, 31]  # the sink token is kept (the default)
    assert report["entries"][1]["label"] == "value"  # values are never centered
    assert report["entries"][1]["payload_bits_per_value"] == pytest.approx((3.25 * 31 + 16) / 32)
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
    assert report["entries"][1]["payload_bits_per_value"] == pytest.approx((2.25 * 31 + 16) / 32)
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


def test_codebook_command(cli):
    rep = json.loads(assert_ok(cli("codebook", "--eval-vectors", "1000", "--json")).stdout)
    assert (rep["head_dim"], rep["block_dim"], rep["size"], rep["rate_bits"]) == (64, 2, 64, 3.0)
    assert rep["origin"] == "shipped"
    assert rep["shannon_bound"] < rep["d_unit"] < rep["scalar_d_unit"] < 0.05
    # A flag no profile can have is a usage error naming the flag (issue 12, item 7).
    assert_error(cli("codebook", "--block-dim", "3", "--eval-vectors", "1000"), 2,
                 "--block-dim 3 must divide head_dim 64")


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
