"""compress without --basis: the dump's own basis, fitted, embedded and chosen when it pays
(ops/own_basis.py; docs/transform.md, "An own basis"; docs/container.md, "Format 5")."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from ops.test_transform_codec import (
    HEADS,
    D,
    _forged,
    check_restored,
    kv_rel_mse,
    structured_dump,
)

from conftest import assert_error, bits_equal, header_order, load, ok

LONG = 2400  # tokens: the own basis (every column, fp16) is ~10% of the per-vector file
MID = 400


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    long_path, long_tensors = structured_dump(d, "long", tokens=LONG, seed=3)
    mid_path, mid_tensors = structured_dump(d, "mid", tokens=MID, seed=4)
    return d, (long_path, long_tensors), (mid_path, mid_tensors)


def _compress(cli, path, out, *extra):
    res = ok(cli("compress", path, "-o", out, "--force", "--json", *extra))
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def long_auto(dumps):
    from conftest import invoke

    d, (path, _), _ = dumps
    out = d / "long.fq.safetensors"
    return out, _compress(invoke, path, out)


def test_auto_picks_the_own_basis_on_a_long_correlated_dump(cli, dumps, long_auto, tmp_path):
    d, (path, tensors), _ = dumps
    out, rep = long_auto
    dec = rep["own_basis"]
    assert dec["mode"] == "auto" and dec["choice"] == "own basis"
    assert dec["own"] > dec["per_vector"]  # the measured figures behind the choice
    assert dec["metric"] == "attention cosine, mean" and len(dec["layers"]) == 2
    # the file is the size of the per-vector file it was compared with, basis included
    never = _compress(cli, path, tmp_path / "never.fq.safetensors", "--own-basis", "never")
    assert never["own_basis"] is None
    assert out.stat().st_size <= (tmp_path / "never.fq.safetensors").stat().st_size
    assert rep["file_bytes"] <= dec["budget_bytes"]
    # and better: the report's own error measurement agrees with the trial's choice
    assert rep["attention"]["overall"]["cosine_mean"] > never["attention"]["overall"][
        "cosine_mean"]
    assert rep["total"]["rel_mse"] < never["total"]["rel_mse"]
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        doc = json.loads(f.metadata()["fibquant"])
        basis = {n: f.get_tensor(n) for n in f.keys() if n.startswith("fq/b/")}
    assert doc["format_version"] == 5
    assert doc["transform"]["own"] is True and doc["transform"]["embedded"] is True
    # only the coded columns are stored, fp16: the report's basis bytes are exactly these
    assert sum(a.nbytes for a in basis.values()) == dec["basis_bytes"]
    assert all(a.dtype == np.float16 and a.shape[0] == HEADS * D for a in basis.values())
    assert dec["basis_bytes"] <= dec["basis_bytes_bound"]
    assert dec["basis_share"] == pytest.approx(
        dec["basis_bytes"] / (dec["budget_bytes"] - rep["passthrough_bytes"]))


def test_an_own_basis_file_restores_without_basis(cli, dumps, long_auto, tmp_path):
    d, (path, tensors), _ = dumps
    out, rep = long_auto
    restored_path = tmp_path / "r.safetensors"
    ok(cli("decompress", out, "-o", restored_path))
    ok(cli("validate", out))
    restored = load(restored_path)
    assert header_order(restored_path) == header_order(path)
    check_restored(restored, tensors)
    # the report's error is that of the file as restored, and a slice equals the full decode
    assert kv_rel_mse(tensors, restored) == pytest.approx(rep["total"]["rel_mse"], rel=1e-5)
    part = tmp_path / "part.safetensors"
    ok(cli("decompress", out, "-o", part, "--layers", "1:2", "--tokens", "100:1000"))
    assert bits_equal(load(part)["layer.1.key"], restored["layer.1.key"][:, :, 100:1000])
    assert_error(cli("decompress", out, "--basis", path, "-o", tmp_path / "x.safetensors"), 2,
                 "--basis")


def test_the_sample_keeps_the_per_vector_file_byte_for_byte(cli, tmp_path):
    """make demo's sample (384 tokens, D = 192): an own basis would outweigh the per-vector
    file, so nothing is fitted and the file is today's, to the byte."""
    from conftest import SAMPLE_DIR

    path = SAMPLE_DIR / "kv_sample.safetensors"
    auto = _compress(cli, path, tmp_path / "auto.fq.safetensors", "--no-attention")
    never = _compress(cli, path, tmp_path / "never.fq.safetensors", "--no-attention",
                      "--own-basis", "never")
    assert (tmp_path / "auto.fq.safetensors").read_bytes() == \
        (tmp_path / "never.fq.safetensors").read_bytes()
    dec = auto["own_basis"]
    assert dec["choice"] == "per-vector" and dec["reason"].startswith("not tried")
    assert dec["per_vector"] is None and dec["own"] is None  # nothing was fitted or encoded
    assert dec["basis_bytes_bound"] == 2 * 4 * 2 * 192 ** 2  # fp16, layers, roles, D x D
    assert dec["basis_bytes_bound"] > 0.75 * (dec["budget_bytes"] - auto["passthrough_bytes"])
    assert never["own_basis"] is None
    # the budget both were to be compared at is the per-vector file's size
    assert dec["budget_bytes"] == (tmp_path / "never.fq.safetensors").stat().st_size


def test_own_basis_always_and_the_report_table(cli, dumps, tmp_path):
    d, _, (path, _) = dumps
    res = ok(cli("compress", path, "-o", tmp_path / "a.fq.safetensors", "--own-basis", "always",
                 "--no-attention"))
    assert "own basis (always): own basis; always: taken without measuring" in \
        " ".join(res.stdout.split())
    ok(cli("validate", tmp_path / "a.fq.safetensors"))
    res = ok(cli("compress", path, "-o", tmp_path / "b.fq.safetensors", "--no-attention"))
    line = " ".join(res.stdout.split())
    assert re.search(r"own basis \(auto\): own basis; measured at [\d,]+ bytes: attention "
                     r"cosine, mean 0\.\d{4} with the own basis \(\d+\.\d% of the KV bytes\), "
                     r"0\.\d{4} per-vector\. Own basis [\d.]+ KiB", line), line
    tiny, _ = structured_dump(tmp_path, "tiny", tokens=20)
    res = ok(cli("compress", tiny, "-o", tmp_path / "c.fq.safetensors", "--no-attention"))
    assert "own basis (auto): per-vector; not tried: too few tokens for an own basis: a " \
        "32-dimensional basis needs 33 rows, the dump has 19" in " ".join(res.stdout.split())


def test_own_basis_option_conflicts(cli, dumps, tmp_path):
    d, _, (path, _) = dumps
    assert_error(cli("compress", path, "-o", tmp_path / "x.fq.safetensors", "--own-basis",
                     "sometimes"), 2, "--own-basis")
    assert_error(cli("compress", path, "-o", tmp_path / "x.fq.safetensors", "--own-basis",
                     "always", "--basis", path), 2, "--own-basis", "--basis")
    tiny, _ = structured_dump(tmp_path, "tiny", tokens=20)
    assert_error(cli("compress", tiny, "-o", tmp_path / "x.fq.safetensors", "--own-basis",
                     "always"), 2, "too few tokens")
    assert not (tmp_path / "x.fq.safetensors").exists()


def test_a_ratio_without_basis_codes_against_the_own_basis(cli, dumps, tmp_path):
    """compress --ratio R without --basis: the transform codec at R against the dump's own
    basis, embedded; the file restores without a basis; the conflicting flags are refused."""
    d, (path, tensors), _ = dumps
    out = tmp_path / "r6.fq.safetensors"
    rep = _compress(cli, path, out, "--ratio", "6")
    dec = rep["own_basis"]
    assert dec["choice"] == "own basis" and "size asked for" in dec["reason"]
    kv_source = sum(a.nbytes for n, a in tensors.items() if n.endswith((".key", ".value")))
    passthrough = sum(a.nbytes for a in tensors.values()) - kv_source
    assert 6.0 <= kv_source / (out.stat().st_size - passthrough) < 6.2  # all inclusive
    assert rep["file_bytes"] <= dec["budget_bytes"]
    back = tmp_path / "r6.restored.safetensors"
    ok(cli("decompress", out, "-o", back))
    check_restored(load(back), tensors)
    x = tmp_path / "x.fq.safetensors"
    assert_error(cli("compress", path, "-o", x, "--ratio", "6", "--own-basis", "never"), 2,
                 "--ratio", "--own-basis never")
    assert_error(cli("compress", path, "-o", x, "--ratio", "6", "--embed-basis"), 2,
                 "--embed-basis")
    assert_error(cli("compress", path, "-o", x, "--ratio", "6", "--block-dim", "2", "--size",
                     "64"), 2, "--block-dim")
    tiny, _ = structured_dump(tmp_path, "tiny", tokens=20)
    assert_error(cli("compress", tiny, "-o", x, "--ratio", "6"), 2,
                 "--ratio without --basis", "too few tokens")
    assert not x.exists()


def _rewrite_basis(src, dst, fn):
    """A copy whose ``fq/b/l0/key`` is ``fn(columns)`` (F16, any shape), digests recomputed."""
    from fibquant_cli.formats import stfile
    from fibquant_cli.formats.digest import CONTAINER_SCHEMA, bytes_digest, tensor_digest
    from fibquant_cli.storage.stwriter import write_file

    header = stfile.read_header(src)
    doc = json.loads(header.metadata["fibquant"])
    tensors = {}
    for name, info in header.tensors.items():
        raw, dtype, shape = stfile.read_raw(header, name), info.dtype, info.shape
        if name == "fq/b/l0/key":
            arr = fn(np.frombuffer(raw, "<f2").reshape(shape).copy()).astype("<f2")
            raw, shape = arr.tobytes(), arr.shape
            doc["arrays"][name] = tensor_digest(dtype, shape, raw)
        tensors[name] = stfile.RawTensor(dtype, shape, raw)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    meta = {"fibquant_format": str(doc["format_version"]), "fibquant": text,
            "fibquant_digest": bytes_digest(CONTAINER_SCHEMA, text.encode())}
    write_file(dst, tensors, meta)
    return dst


def test_forged_embedded_columns_are_refused(cli, long_auto, tmp_path):
    out, _ = long_auto
    fewer = _rewrite_basis(out, tmp_path / "fewer.fq.safetensors", lambda u: u[:, :-1])
    assert_error(cli("decompress", fewer, "-o", tmp_path / "a.safetensors"), 4,
                 "fq/b/l0/key", "the document implies F16")
    skewed = _rewrite_basis(out, tmp_path / "skew.fq.safetensors", lambda u: u * 1.5)
    assert_error(cli("decompress", skewed, "-o", tmp_path / "a.safetensors"), 4,
                 "fq/b/l0/key", "not orthonormal")
    assert_error(cli("validate", skewed), 4, "not orthonormal")

    def not_embedded(doc):
        doc["transform"]["embedded"] = False

    def no_own(doc):
        del doc["transform"]["own"]

    lost = _forged(out, tmp_path / "lost.fq.safetensors", doc_edit=not_embedded)
    assert_error(cli("validate", lost), 4, "transform.own")
    v4 = _forged(out, tmp_path / "v4.fq.safetensors", doc_edit=no_own)
    assert_error(cli("validate", v4), 4, "transform")
    assert not (tmp_path / "a.safetensors").exists()


def test_the_trial_scores_the_values_the_files_restore(cli, dumps, long_auto, tmp_path):
    """The trial's layers come from encode_layer(restored=): the values decompress writes,
    for both candidates, without decoding each layer a second time."""
    from threadpoolctl import threadpool_limits

    from fibquant_cli.formats.kvdump import open_dump
    from fibquant_cli.ops import own_basis
    from fibquant_cli.ops.progress import Progress
    from fibquant_cli.ops.spec import resolve_spec

    d, (path, _), _ = dumps
    dump, spec = open_dump(path), resolve_spec()
    never = tmp_path / "never.fq.safetensors"
    _compress(cli, path, never, "--own-basis", "never", "--no-attention")
    _, planned, _ = own_basis.decide(dump, spec, "always", Progress())
    candidates = ((never, own_basis._per_vector_reconstructor(dump, spec)),
                  (long_auto[0], own_basis._transform_reconstructor(dump, planned)))
    for compressed, reconstruct in candidates:
        restored_path = tmp_path / "r.safetensors"
        ok(cli("decompress", compressed, "-o", restored_path, "--force"))
        restored = load(restored_path)
        for i, role in enumerate(("key", "value")):
            with threadpool_limits(1):  # as compress runs the trial: the same rounding
                got = reconstruct(i, 1)
            assert bits_equal(got, restored[f"layer.1.{role}"].astype(np.float32))


def test_sweep_adds_the_own_basis_ladder(dumps, tmp_path):
    """sweep --own-basis: the transform ladder against a basis fitted on the dump, embedded
    and counted; on the long dump it beats the per-vector default at a higher ratio. A dump
    too short for a basis is skipped with the reason."""
    from fibquant_cli.ops.spec import resolve_spec
    from fibquant_cli.ops.sweep import OWN_BASIS, TRANSFORM_RATIOS, sweep

    _, (path, _), _ = dumps
    rep = sweep(path, specs=[resolve_spec(bits=3)], peers=False, scalar=False, own_basis=True,
                max_queries=64)
    own = {float(p.label.split()[2].rstrip("x")): p for p in rep.points if p.method == OWN_BASIS}
    assert len(own) + sum(k.startswith(OWN_BASIS) for k in rep.skipped) == len(TRANSFORM_RATIOS)
    assert all(p.ratio >= r * (1 - 1e-9) and p.spec["embed_basis"] for r, p in own.items())
    (per_vector,) = [p for p in rep.points if p.method == "fibquant"]
    assert own[5.0].ratio > per_vector.ratio and own[5.0].cosine_mean > per_vector.cosine_mean
    short, _ = structured_dump(tmp_path, "short", tokens=HEADS * D // 2, seed=5)
    rep = sweep(short, specs=[], peers=False, scalar=False, own_basis=True, max_queries=64)
    assert not rep.points and "too few tokens" in rep.skipped[OWN_BASIS]


def test_target_cosine_searches_the_own_basis_too(dumps, monkeypatch):
    """--target-cosine on a long dump: after the per-vector search, the highest ratio against
    the dump's own basis that meets the target (a real search); the smaller file wins. The
    per-vector answer is given (its ladder would train codebooks for this geometry)."""
    from fibquant_cli.ops import target as T
    from fibquant_cli.ops.spec import resolve_spec

    _, (path, _), _ = dumps

    def per_vector_at(ratio):
        def answer(dump, target, seed, max_queries, progress, scoring):
            tried = [{"label": "k=2,N=64 keep 1+0", "ratio": ratio, "cosine_mean": 0.96}]
            spec = resolve_spec(bits=3)
            return spec, T.TargetChoice(target, spec.to_json(), 0.96, tried, ratio)
        return answer

    monkeypatch.setattr(T, "_per_vector", per_vector_at(3.0))
    spec, choice = T.choose_for_target(path, 0.95, max_queries=128, own_basis=True)
    assert spec.own_transform and spec.ratio == choice.chosen["ratio"]  # the own basis won
    own = [t for t in choice.tried if t["label"].startswith("own basis")]
    assert choice.tried[0]["ratio"] == 3.0 and len(own) == len(choice.tried) - 1
    assert choice.chosen_ratio > 3.0 and choice.measured_cosine >= 0.95
    assert all(t["cosine_mean"] < 0.95 for t in own if t["ratio"] > choice.chosen_ratio)
    assert max(t["ratio"] for t in own if t["cosine_mean"] >= 0.95) == choice.chosen_ratio
    monkeypatch.setattr(T, "_per_vector", per_vector_at(40.0))  # a per-vector file smaller
    spec, choice = T.choose_for_target(path, 0.95, max_queries=128, own_basis=True)
    assert not spec.own_transform and choice.chosen_ratio == 40.0
    spec, choice = T.choose_for_target(path, 0.95, max_queries=128)  # not asked: not searched
    assert not spec.own_transform and len(choice.tried) == 1
