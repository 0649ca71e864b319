"""Attention fidelity end to end: ``fibquant eval``, the ``attention`` section of ``compress
--json``, the key-self-attention proxy and ``--max-queries``.

The reference numbers are recomputed here independently of fibquant's attention code: the
restored tensors are read with ``safetensors.numpy`` and attention is done by hand in float64
(causal softmax, GQA query head h reads KV head h // group).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from fibquant_cli.formats.kvdump import open_dump
from fibquant_cli.ops.fidelity import kv_entries, measure

from conftest import SAMPLE_DUMP, SAMPLE_MANIFEST, invoke, make_dump, ok

OVERALL_KEYS = {"rel_mse", "key_rel_mse", "value_rel_mse", "rows", "cosine_mean", "cosine_p1",
                "cosine_min", "tv_mean", "tv_max", "top8_agreement", "proxy"}


def ok_json(*args) -> dict:
    return json.loads(ok(invoke(*args, "--json")).stdout)


# ----------------------------------------------------------------------------- independent helpers


def canonical_layers(tensors: dict, manifest: dict, role: str) -> list[np.ndarray]:
    """Per-layer [batch, kv_heads, tokens, head_dim] arrays of ``role``, read from the manifest."""
    (entry,) = [e for e in manifest["entries"] if e["shape"]["role"] == role]
    assert len(entry["tensors"]) == entry["shape"]["layers"]  # one tensor per layer here
    out = []
    for name in entry["tensors"]:
        x = tensors[name]
        out.append(x.transpose(0, 2, 1, 3) if entry["layout"] == "bthd" else x)
    return out


def query_layers(tensors: dict, manifest: dict) -> list[np.ndarray]:
    layout = manifest["entries"][0]["layout"]
    return [tensors[n].transpose(0, 2, 1, 3) if layout == "bthd" else tensors[n]
            for n in manifest["attention"]["query_tensors"]]


def attention_cosines(q, k, v, k_hat, v_hat) -> np.ndarray:
    """Row cosines of causal GQA attention outputs, float64, rows in (b, h, position) order.

    ``q`` holds the LAST tokens_q positions; keys j <= i + tokens_k - tokens_q are visible.
    """
    q, k, v, k_hat, v_hat = (np.asarray(a, dtype=np.float64) for a in (q, k, v, k_hat, v_hat))
    batch, qh, tq, d = q.shape
    kvh, tk = k.shape[1], k.shape[2]
    group = qh // kvh
    pos = np.arange(tk - tq, tk)
    hidden = np.arange(tk)[None, :] > pos[:, None]
    out = []
    for b in range(batch):
        for h in range(qh):
            g = h // group
            outs = []
            for kk, vv in ((k, v), (k_hat, v_hat)):
                s = q[b, h] @ kk[b, g].T / np.sqrt(d)
                s[hidden] = -np.inf
                p = np.exp(s - s.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                outs.append(p @ vv[b, g])
            o, o_hat = outs
            cos = (o * o_hat).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(o_hat, axis=1))
            out.append(cos)
    return np.concatenate(out)


def rel_err(xs, ys) -> float:
    num = sum(float(((np.float64(x) - np.float64(y)) ** 2).sum()) for x, y in zip(xs, ys))
    den = sum(float((np.float64(x) ** 2).sum()) for x in xs)
    return num / den


# ----------------------------------------------------------------------------- the sample, via eval


@pytest.fixture(scope="module")
def sample_eval(tmp_path_factory):
    """The sample compressed at --bits 2 (attention on the last 64 positions), then restored."""
    out = tmp_path_factory.mktemp("sample-eval")
    comp, restored = out / "s.fq.safetensors", out / "s.restored.safetensors"
    report = ok_json("compress", SAMPLE_DUMP, "--bits", 2, "--max-queries", 64, "-o", comp)
    ok(invoke("decompress", comp, "-o", restored))
    ev_comp = ok_json("eval", SAMPLE_DUMP, comp, "--max-queries", 64)
    ev_rest = ok_json("eval", SAMPLE_DUMP, restored, "--max-queries", 64)
    return {"comp": comp, "restored": restored, "report": report, "ev_comp": ev_comp,
            "ev_rest": ev_rest}


def test_eval_compressed_and_restored_agree(sample_eval):
    a, b = sample_eval["ev_comp"], sample_eval["ev_rest"]
    assert set(a["overall"]) == OVERALL_KEYS
    assert a["overall"] == b["overall"]  # bit-identical floats through JSON
    assert a["layers"] == b["layers"]
    assert (a["proxy"], a["causal"], a["query_positions"], a["tokens"]) == (False, True, 64, 384)
    assert b["proxy"] is False and b["query_positions"] == 64
    # the attention section of compress measured the same thing
    assert sample_eval["report"]["attention"]["overall"] == a["overall"]


def test_eval_equals_measure_with_independent_reconstruction(sample_eval):
    restored = safetensors.numpy.load_file(str(sample_eval["restored"]))
    manifest = json.loads(SAMPLE_MANIFEST.read_text())
    dump = open_dump(SAMPLE_DUMP)
    assert kv_entries(dump) == (0, 1)
    roles = [e["shape"]["role"] for e in manifest["entries"]]
    per_role = {r: canonical_layers(restored, manifest, r) for r in roles}
    calls = []

    def reconstruct(i: int, layer: int) -> np.ndarray:
        calls.append((i, layer))
        return per_role[roles[i]][layer].astype(np.float32)

    rep = measure(dump, reconstruct, max_queries=64)
    assert sorted(set(calls)) == [(i, layer) for i in (0, 1) for layer in range(4)]
    assert rep.to_json()["overall"] == sample_eval["ev_rest"]["overall"]
    assert rep.to_json()["layers"] == sample_eval["ev_rest"]["layers"]
    # ... and its MSE fields are the plain relative errors of the restored tensors
    original = safetensors.numpy.load_file(str(SAMPLE_DUMP))
    orig = {r: canonical_layers(original, manifest, r) for r in roles}
    ov = rep.overall
    assert ov["key_rel_mse"] == pytest.approx(rel_err(orig["key"], per_role["key"]), rel=1e-9)
    assert ov["value_rel_mse"] == pytest.approx(rel_err(orig["value"], per_role["value"]),
                                                rel=1e-9)
    assert ov["rel_mse"] == pytest.approx(
        rel_err(orig["key"] + orig["value"], per_role["key"] + per_role["value"]), rel=1e-9)
    assert 0 < ov["key_rel_mse"] < 0.2 and 0 < ov["value_rel_mse"] < 0.2


def test_layers_scored_in_threads_give_the_same_figures(sample_eval, monkeypatch):
    """measure scores layers in threads: the report must not depend on which finishes first
    (the slow layer 0 finishes last)."""
    import time

    import fibquant_cli.ops.fidelity as fidelity

    restored = safetensors.numpy.load_file(str(sample_eval["restored"]))
    manifest = json.loads(SAMPLE_MANIFEST.read_text())
    roles = [e["shape"]["role"] for e in manifest["entries"]]
    per_role = {r: canonical_layers(restored, manifest, r) for r in roles}

    def reconstruct(i: int, layer: int) -> np.ndarray:
        if layer == 0:
            time.sleep(0.05)
        return per_role[roles[i]][layer].astype(np.float32)

    reports = []
    for threads in (1, 2):
        monkeypatch.setattr(fidelity, "SCORING_THREADS", threads)
        reports.append(measure(open_dump(SAMPLE_DUMP), reconstruct, max_queries=64).to_json())
    assert reports[0] == reports[1]
    assert [row["layer"] for row in reports[1]["layers"]] == [0, 1, 2, 3]


def test_a_search_keeps_the_original_attention_and_scores_the_same(sample_eval,
                                                                     monkeypatch):
    """measure(references=): a search's points share the original attention (computed by
    the first), with the figures of scoring each point afresh; over the byte budget nothing
    is kept."""
    import fibquant_cli.ops.fidelity as fidelity

    restored = safetensors.numpy.load_file(str(sample_eval["restored"]))
    manifest = json.loads(SAMPLE_MANIFEST.read_text())
    roles = [e["shape"]["role"] for e in manifest["entries"]]
    per_role = {r: canonical_layers(restored, manifest, r) for r in roles}
    dump = open_dump(SAMPLE_DUMP)

    def point(shift: float):  # reconstructions standing for a search's points
        return lambda i, layer: per_role[roles[i]][layer].astype(np.float32) + shift

    references: dict = {}
    for shift in (0.0, 0.05):
        kept = measure(dump, point(shift), sample=64, cosine_only=True, references=references)
        fresh = measure(dump, point(shift), sample=64, cosine_only=True)
        assert kept.to_json() == fresh.to_json()
        assert kept.overall["top8_agreement"] is None and kept.overall["tv_mean"] is None
    assert len(references) == 4 * 2  # every layer and window: 64 positions in 2 windows of 32
    assert all(ref.outputs is not None for ref in references.values())
    monkeypatch.setattr(fidelity, "REFERENCE_BYTES", 0)
    over: dict = {}
    measure(dump, point(0.0), sample=64, cosine_only=True, references=over)
    assert over == {}


def test_sample_attention_section_has_per_layer_rows(sample_eval):
    att = sample_eval["report"]["attention"]
    assert att["proxy"] is False and att["causal"] is True and att["note"] == ""
    assert att["query_positions"] == 64 and att["tokens"] == 384
    assert [row["layer"] for row in att["layers"]] == [0, 1, 2, 3]
    for row in att["layers"]:
        assert row["rows"] == 1 * 9 * 64  # batch * query heads * scored positions
        assert row["proxy"] is False
        assert 0.5 < row["cosine_mean"] <= 1.0
        assert row["cosine_min"] <= row["cosine_p1"] <= row["cosine_mean"]
    ov = att["overall"]
    assert ov["rows"] == 4 * 9 * 64
    # the overall mean is the row-weighted mean of the layers (equal rows: the plain mean)
    assert ov["cosine_mean"] == pytest.approx(np.mean([r["cosine_mean"] for r in att["layers"]]),
                                              rel=1e-12)
    assert ov["cosine_min"] == min(r["cosine_min"] for r in att["layers"])
    assert ov["tv_max"] == max(r["tv_max"] for r in att["layers"])


def test_sample_max_queries_8_scores_last_8_positions(sample_eval):
    rep = ok_json("eval", SAMPLE_DUMP, sample_eval["comp"], "--max-queries", 8)
    assert rep["query_positions"] == 8 and rep["tokens"] == 384
    assert [row["rows"] for row in rep["layers"]] == [1 * 9 * 8] * 4
    assert rep["overall"]["rows"] == 1 * 9 * 8 * 4  # batch * query heads * 8 * layers
    # by hand, on positions 376..383 with all earlier keys visible
    manifest = json.loads(SAMPLE_MANIFEST.read_text())
    original = safetensors.numpy.load_file(str(SAMPLE_DUMP))
    back = safetensors.numpy.load_file(str(sample_eval["restored"]))
    qs = query_layers(original, manifest)
    ks, vs = (canonical_layers(original, manifest, r) for r in ("key", "value"))
    khs, vhs = (canonical_layers(back, manifest, r) for r in ("key", "value"))
    for layer in range(4):
        cos = attention_cosines(qs[layer][:, :, -8:], ks[layer], vs[layer], khs[layer],
                                vhs[layer])
        assert rep["layers"][layer]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
        assert rep["layers"][layer]["cosine_min"] == pytest.approx(cos.min(), abs=1e-6)
    # the original against itself is perfect on the same rows
    same = ok_json("eval", SAMPLE_DUMP, SAMPLE_DUMP, "--max-queries", 8)
    assert same["overall"]["rows"] == 288 and same["overall"]["rel_mse"] == 0.0
    assert same["overall"]["cosine_mean"] == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- tiny dump, by hand


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """1 layer, 2 kv heads, 4 query heads, 16 tokens, d=64, compressed at --bits 1 and restored."""
    out = tmp_path_factory.mktemp("tiny")
    dump = make_dump(out, "tiny", layers=1, kv_heads=2, query_heads=4, tokens=16, head_dim=64,
                     seed=7)
    comp, restored = out / "tiny.fq.safetensors", out / "tiny.restored.safetensors"
    report = ok_json("compress", dump.path, "--bits", 1, "-o", comp)
    ok(invoke("decompress", comp, "-o", restored))
    original = safetensors.numpy.load_file(str(dump.path))
    back = safetensors.numpy.load_file(str(restored))
    return {"dir": out, "dump": dump, "comp": comp, "restored": restored, "report": report,
            "original": original, "back": back}


def _hand_cosines(tiny, n_q: int) -> np.ndarray:
    manifest = tiny["dump"].manifest
    (q,) = query_layers(tiny["original"], manifest)
    (k,), (v,) = (canonical_layers(tiny["original"], manifest, r) for r in ("key", "value"))
    (k_hat,), (v_hat,) = (canonical_layers(tiny["back"], manifest, r) for r in ("key", "value"))
    assert not np.array_equal(k, k_hat) and not np.array_equal(v, v_hat)  # lossy, really
    return attention_cosines(q[:, :, 16 - n_q:], k, v, k_hat, v_hat)


def test_tiny_attention_cosine_matches_hand_computation(tiny):
    att = tiny["report"]["attention"]
    cos = _hand_cosines(tiny, 16)
    assert cos.size == 1 * 4 * 16 == att["overall"]["rows"] == att["layers"][0]["rows"]
    assert att["proxy"] is False and att["query_positions"] == 16
    assert att["overall"]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert att["overall"]["cosine_min"] == pytest.approx(cos.min(), abs=1e-6)
    assert att["overall"]["cosine_p1"] == pytest.approx(np.percentile(cos, 1.0), abs=1e-6)
    assert cos.mean() < 0.999  # the check is not vacuous: 1-bit keys and values do move outputs


def test_tiny_max_queries_8_matches_hand_computation(tiny):
    rep = ok_json("eval", tiny["dump"].path, tiny["restored"], "--max-queries", 8)
    cos = _hand_cosines(tiny, 8)
    assert rep["query_positions"] == 8
    assert rep["overall"]["rows"] == 1 * 4 * 8 * 1 == cos.size
    assert rep["overall"]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    # scoring the FIRST 8 positions instead would give a different number
    first8 = attention_cosines(*_first_positions(tiny, 8))
    assert abs(first8.mean() - cos.mean()) > 1e-4


def _first_positions(tiny, n: int):
    """Inputs of attention over the first n tokens only (a prefix: causal queries 0..n-1)."""
    manifest = tiny["dump"].manifest
    (q,) = query_layers(tiny["original"], manifest)
    (k,), (v,) = (canonical_layers(tiny["original"], manifest, r) for r in ("key", "value"))
    (k_hat,), (v_hat,) = (canonical_layers(tiny["back"], manifest, r) for r in ("key", "value"))
    return q[:, :, :n], k[:, :, :n], v[:, :, :n], k_hat[:, :, :n], v_hat[:, :, :n]


@pytest.fixture(scope="module")
def tiny_proxy(tiny):
    """The tiny dump with a manifest WITHOUT the attention section."""
    manifest = dict(tiny["dump"].manifest)
    del manifest["attention"]
    path = tiny["dir"] / "noattn.manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def test_proxy_without_queries_json(tiny, tiny_proxy, tmp_path):
    out = tmp_path / "p.fq.safetensors"
    rep = ok_json("compress", tiny["dump"].path, "-m", tiny_proxy, "--bits", 1, "-o", out)
    att = rep["attention"]
    assert att["proxy"] is True and att["overall"]["proxy"] is True
    assert all(row["proxy"] is True for row in att["layers"])
    assert "proxy" in att["note"]
    # the key self-attention proxy by hand: the original keys are the queries, one per KV head
    manifest = tiny["dump"].manifest
    (k,), (v,) = (canonical_layers(tiny["original"], manifest, r) for r in ("key", "value"))
    restored = tmp_path / "p.restored.safetensors"
    ok(invoke("decompress", out, "-o", restored))
    back = safetensors.numpy.load_file(str(restored))
    (k_hat,), (v_hat,) = (canonical_layers(back, manifest, r) for r in ("key", "value"))
    cos = attention_cosines(k, k, v, k_hat, v_hat)
    assert att["overall"]["rows"] == 1 * 2 * 16 == cos.size
    assert att["overall"]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)


def test_proxy_without_queries_table_says_proxy(tiny, tiny_proxy, tmp_path):
    out = tmp_path / "p.fq.safetensors"
    res = ok(invoke("compress", tiny["dump"].path, "-m", tiny_proxy, "--bits", 1, "-o", out))
    assert "PROXY" in res.stdout
    res = ok(invoke("eval", tiny["dump"].path, out, "-m", tiny_proxy))
    assert "PROXY" in res.stdout
    # with queries, the table does not say proxy
    res = ok(invoke("eval", tiny["dump"].path, tiny["comp"]))
    assert "PROXY" not in res.stdout and "attention output" in res.stdout


def test_eval_bthd_compressed_and_restored_agree(tmp_path):
    """Layout bthd (queries too): eval of both forms and measure() on a hand-read restore agree."""
    dump = make_dump(tmp_path, "b", layout="bthd", layers=2, tokens=24, seed=3)
    comp, restored = tmp_path / "b.fq.safetensors", tmp_path / "b.restored.safetensors"
    ok(invoke("compress", dump.path, "--bits", 2, "-o", comp, "--no-attention"))
    ok(invoke("decompress", comp, "-o", restored))
    a = ok_json("eval", dump.path, comp)
    b = ok_json("eval", dump.path, restored)
    assert a["overall"] == b["overall"] and a["layers"] == b["layers"]
    back = safetensors.numpy.load_file(str(restored))
    per_role = {r: canonical_layers(back, dump.manifest, r) for r in ("key", "value")}
    rep = measure(open_dump(dump.path),
                  lambda i, layer: per_role[("key", "value")[i]][layer].astype(np.float32))
    assert rep.to_json()["overall"] == a["overall"]
    # and by hand, layer by layer
    original = safetensors.numpy.load_file(str(dump.path))
    qs = query_layers(original, dump.manifest)
    ks, vs = (canonical_layers(original, dump.manifest, r) for r in ("key", "value"))
    cos = np.concatenate([attention_cosines(qs[i], ks[i], vs[i], per_role["key"][i],
                                            per_role["value"][i]) for i in range(2)])
    assert a["overall"]["rows"] == cos.size == 2 * 4 * 24
    assert a["overall"]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["b.safetensors", "b.manifest.json", "b.fq.safetensors", "b.restored.safetensors",
         "b.restored.manifest.json"])


def test_sample_windows_spread_over_the_context():
    from fibquant_cli.ops.fidelity import sample_windows

    assert sample_windows(100, 100) == [slice(0, 100)]
    windows = sample_windows(4096, 256)
    assert len(windows) == 8 and all(w.stop - w.start == 32 for w in windows)
    assert windows[0] == slice(0, 32) and windows[-1].stop == 4096
    assert all(a.stop <= b.start for a, b in zip(windows, windows[1:]))


def test_sampled_scoring_counts_its_windows_and_full_sample_is_full_scoring(tmp_path):
    from fibquant_cli.formats.kvdump import open_dump, read_layer
    from fibquant_cli.ops.fidelity import measure, sample_windows

    from conftest import make_dump

    d = make_dump(tmp_path, tokens=200, layers=1)
    dump = open_dump(d.path)
    rng = np.random.default_rng(0)

    def noisy(i, layer):
        x = read_layer(dump, dump.manifest.entries[i], layer).astype(np.float32)
        return x + 0.1 * np.random.default_rng(i).standard_normal(x.shape).astype(np.float32)

    del rng
    full = measure(dump, noisy, max_queries=200)
    same = measure(dump, noisy, sample=500)
    assert not same.sampled and same.overall == full.overall
    part = measure(dump, noisy, sample=64)
    assert part.sampled
    assert part.query_positions == sum(w.stop - w.start for w in sample_windows(200, 64)) == 64
    assert part.overall["rows"] == 64 * 4  # 4 query heads
    assert part.overall["cosine_mean"] != full.overall["cosine_mean"]


def test_compress_leads_with_the_headline_statistic(tmp_path, cli):
    from fibquant_cli.ops.fidelity import HEADLINE_METRIC

    from conftest import make_dump

    d = make_dump(tmp_path)
    res = cli("compress", d.path, "-o", tmp_path / "o.fq.safetensors", "--json")
    rep = json.loads(res.stdout)
    assert rep["headline"]["metric"] == HEADLINE_METRIC
    assert rep["headline"]["value"] == rep["attention"]["overall"][HEADLINE_METRIC]
    res = cli("compress", d.path, "-o", tmp_path / "o.fq.safetensors", "--force")
    first = res.stdout.splitlines()[0]
    assert first.startswith("attention cosine, 1st percentile: ")
    assert f"{rep['headline']['value']:.4f}" in first


def test_sample_layers_spread_over_the_depth():
    from fibquant_cli.ops.fidelity import sample_layers

    assert sample_layers(30, 4) == [0, 10, 19, 29] and sample_layers(30, 3) == [0, 14, 29]
    assert sample_layers(8, 3) == list(range(8)) and sample_layers(12, None) == list(range(12))
    assert sample_layers(30, 1) == [0]


def test_default_compress_scores_a_sample_of_layers(tmp_path):
    from fibquant_cli.ops.compress import compress
    from fibquant_cli.ops.fidelity import DEFAULT_LAYER_SAMPLE

    from conftest import make_dump

    d = make_dump(tmp_path, layers=10, tokens=200, kv_heads=1, query_heads=2)
    rep = compress(d.path, output=tmp_path / "o.fq.safetensors")
    assert [row["layer"] for row in rep.attention.layers] == [0, 4, 9]
    assert len(rep.attention.layers) == DEFAULT_LAYER_SAMPLE and rep.attention.sampled
    full = compress(d.path, output=tmp_path / "o.fq.safetensors", force=True, max_queries=200)
    assert [row["layer"] for row in full.attention.layers] == list(range(10))
    assert not full.attention.sampled and full.attention.query_positions == 200
