"""``fibquant calibrate``: the fitted basis against the data's own statistics, RoPE undo,
order independence, sensitivity, and the refusals (one line, exit code)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fibquant_cli.core.rope import rotate
from fibquant_cli.formats.basis import load_basis

from conftest import assert_error, invoke, kv_shape, ok, write_safetensors


def write_kv(directory, name, keys, values, *, rope=None, rope_state="pre_rope", queries=None,
             query_heads=None):
    """A dump of per-layer ``[batch, kv_heads, tokens, head_dim]`` float32 keys and values."""
    batch, kv_heads, tokens, head_dim = keys[0].shape
    query_heads = query_heads or kv_heads
    geometry = dict(dtype="f32", batch=batch, layers=len(keys), kv_heads=kv_heads,
                    query_heads=query_heads, tokens=tokens, head_dim=head_dim,
                    attention_kind="mha" if query_heads == kv_heads else "gqa")
    tensors, entries = {}, []
    for role, arrays in (("key", keys), ("value", values)):
        names = [f"layer.{i}.{role}" for i in range(len(arrays))]
        tensors.update({n: np.asarray(a, np.float32) for n, a in zip(names, arrays)})
        entry = {"shape": kv_shape(role, rope_state=rope_state if role == "key" else None,
                                   **geometry), "tensors": names, "layout": "bhtd"}
        if role == "key" and rope is not None:
            entry["rope"] = rope
        entries.append(entry)
    manifest = {"schema_version": "fibquant_kv_manifest_v1", "entries": entries}
    if queries is not None:
        names = [f"layer.{i}.query" for i in range(len(queries))]
        tensors.update({n: np.asarray(q, np.float32) for n, q in zip(names, queries)})
        manifest["attention"] = {"query_tensors": names, "causal": True}
    path = directory / f"{name}.safetensors"
    write_safetensors(path, tensors)
    (directory / f"{name}.manifest.json").write_text(json.dumps(manifest))
    return path


def gaussian(rng, shape, mix):
    """Rows ``z @ mix`` (a known covariance mix^T mix) as [batch, heads, tokens, head_dim]."""
    batch, heads, tokens, head_dim = shape
    rows = rng.standard_normal((batch * tokens, mix.shape[0])) @ mix + 3.0
    return rows.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)


def rows_of(x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * t, h * d).astype(np.float64)


def test_basis_is_the_principal_axes_of_the_data(tmp_path):
    rng = np.random.default_rng(1)
    dim = 16
    mix = rng.standard_normal((dim, dim)) * np.geomspace(4, 0.05, dim)[:, None]
    keys = [gaussian(rng, (2, 2, 200, 8), mix).astype(np.float32)]  # as stored
    values = [gaussian(rng, (2, 2, 200, 8), mix.T).astype(np.float32)]
    src = write_kv(tmp_path, "a", keys, values)
    out = tmp_path / "m.basis.safetensors"
    rep = json.loads(ok(invoke("calibrate", src, "-o", out, "--keep-first", "3", "--json")).stdout)
    assert rep["tokens"] == 2 * 197 and rep["dim"] == dim and not rep["rope_undone"]
    basis = load_basis(out)
    assert (basis.layers, basis.kv_heads, basis.head_dim, basis.keep_first) == (1, 2, 8, 3)
    for role, data in (("key", keys[0]), ("value", values[0])):
        mean, columns, variance = basis.matrix(0, role)
        b64 = columns.astype(np.float64)
        assert np.abs(b64.T @ b64 - np.eye(dim)).max() < 1e-6
        rows = rows_of(data[:, :, 3:])
        np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-6, atol=1e-6)
        along = ((rows - rows.mean(axis=0)) @ b64).var(axis=0)
        np.testing.assert_allclose(variance, along, rtol=1e-6)
        assert (np.diff(variance) <= 0).all()
        biggest = np.abs(columns).argmax(axis=0)
        assert (columns[biggest, np.arange(dim)] > 0).all()
    assert basis.sensitivity(0, "key") is None  # no queries


def rope_dump(directory, name, *, seed=0, first_position=5):
    """Keys whose pre-RoPE rows live in a rank-3 subspace, stored post-RoPE."""
    rng = np.random.default_rng(seed)
    heads, tokens, head_dim = 2, 300, 16
    low = rng.standard_normal((tokens, 3)) @ rng.standard_normal((3, heads * head_dim))
    pre = low.reshape(1, tokens, heads, head_dim).transpose(0, 2, 1, 3)
    pos = first_position + np.arange(tokens)
    keys = rotate(pre, pos, 10000.0, "half")
    values = rng.standard_normal((1, heads, tokens, head_dim))
    rope = {"theta": 10000.0, "style": "half", "first_position": first_position}
    return write_kv(directory, name, [keys], [values], rope=rope, rope_state="post_rope")


def test_rope_undo_finds_the_low_rank_subspace(tmp_path):
    src = rope_dump(tmp_path, "r")
    undone, stored = tmp_path / "undone.basis.safetensors", tmp_path / "stored.basis.safetensors"
    ok(invoke("calibrate", src, "-o", undone))
    ok(invoke("calibrate", src, "-o", stored, "--no-rope-undo"))
    with_undo, without = load_basis(undone), load_basis(stored)
    assert with_undo.rope is not None and with_undo.rope.theta == 10000.0
    assert without.rope is None
    tail = [b.matrix(0, "key")[2] for b in (with_undo, without)]
    assert tail[0][3:].sum() / tail[0].sum() < 1e-6
    assert tail[1][3:].sum() / tail[1].sum() > 0.1


def test_result_does_not_depend_on_the_order_of_the_dumps(tmp_path):
    a, b = rope_dump(tmp_path, "a", seed=1), rope_dump(tmp_path, "b", seed=2, first_position=0)
    ok(invoke("calibrate", a, b, "-o", tmp_path / "ab.basis.safetensors"))
    ok(invoke("calibrate", b, a, "-o", tmp_path / "ba.basis.safetensors"))
    assert ((tmp_path / "ab.basis.safetensors").read_bytes()
            == (tmp_path / "ba.basis.safetensors").read_bytes())
    assert load_basis(tmp_path / "ab.basis.safetensors").tokens == 2 * 299


def test_sensitivity_is_measured_with_queries(tmp_path):
    rng = np.random.default_rng(3)
    shape = (1, 2, 160, 16)
    keys = [rng.standard_normal(shape) for _ in range(2)]
    values = [rng.standard_normal(shape) for _ in range(2)]
    queries = [rng.standard_normal((1, 4, 160, 16)) * 2 for _ in range(2)]
    src = write_kv(tmp_path, "q", keys, values, queries=queries, query_heads=4)
    out = tmp_path / "q.basis.safetensors"
    rep = json.loads(ok(invoke("calibrate", src, "-o", out, "--json")).stdout)
    basis = load_basis(out)
    sens = [basis.sensitivity(layer, role) for layer in range(2) for role in ("key", "value")]
    assert all(np.isfinite(s) and s > 0 for s in sens)
    assert rep["sensitivity"]["min"] == pytest.approx(min(sens), rel=1e-6)
    again = tmp_path / "again.basis.safetensors"
    ok(invoke("calibrate", src, "-o", again))
    assert again.read_bytes() == out.read_bytes()  # seeded: reruns agree to the bit


def test_geometry_mismatch_names_the_dump_field_and_values(tmp_path):
    rng = np.random.default_rng(4)
    a = write_kv(tmp_path, "a", [rng.standard_normal((1, 2, 40, 8))] * 2,
                 [rng.standard_normal((1, 2, 40, 8))] * 2)
    b = write_kv(tmp_path, "b", [rng.standard_normal((1, 2, 40, 8))] * 3,
                 [rng.standard_normal((1, 2, 40, 8))] * 3)
    assert_error(invoke("calibrate", a, b, "-o", tmp_path / "o.safetensors"), 3,
                 "b.safetensors: layers 3 differs from 2 in a.safetensors")
    c = rope_dump(tmp_path, "c")
    d = write_kv(tmp_path, "d", [rng.standard_normal((1, 2, 40, 16))],
                 [rng.standard_normal((1, 2, 40, 16))])
    assert_error(invoke("calibrate", c, d, "-o", tmp_path / "o.safetensors"), 3,
                 "d.safetensors: key rope_state pre_rope differs from post_rope in c.safetensors")


def test_rope_theta_mismatch(tmp_path):
    a = rope_dump(tmp_path, "a")
    manifest = json.loads((tmp_path / "a.manifest.json").read_text())
    manifest["entries"][0]["rope"]["theta"] = 500000.0
    b = tmp_path / "b.safetensors"
    b.write_bytes(a.read_bytes() + b"")
    (tmp_path / "b.manifest.json").write_text(json.dumps(manifest))
    assert_error(invoke("calibrate", a, b, "-o", tmp_path / "o.safetensors"), 3,
                 "b.safetensors", "rope theta 500000.0", "10000.0")


def test_missing_rope_object_is_refused_unless_asked_to_fit_as_stored(tmp_path):
    rng = np.random.default_rng(5)
    src = write_kv(tmp_path, "nr", [rng.standard_normal((1, 2, 40, 8))],
                   [rng.standard_normal((1, 2, 40, 8))], rope_state="post_rope")
    out = tmp_path / "o.basis.safetensors"
    assert_error(invoke("calibrate", src, "-o", out), 3, "nr.safetensors", "lacks a 'rope'",
                 "--no-rope-undo")
    assert not out.exists()
    ok(invoke("calibrate", src, "-o", out, "--no-rope-undo"))


def test_too_few_tokens_and_existing_output(tmp_path):
    rng = np.random.default_rng(6)
    src = write_kv(tmp_path, "s", [rng.standard_normal((1, 2, 17, 8))],
                   [rng.standard_normal((1, 2, 17, 8))])
    out = tmp_path / "o.basis.safetensors"
    assert_error(invoke("calibrate", src, "-o", out), 3, "at least 17 rows", "give 16")
    ok(invoke("calibrate", src, "-o", out, "--keep-first", "0"))
    assert_error(invoke("calibrate", src, "-o", out, "--keep-first", "0"), 2, "--force")
    ok(invoke("calibrate", src, "-o", out, "--keep-first", "0", "--force"))
    assert_error(invoke("calibrate", src, "-o", src), 2, "input file")


def test_sensitivity_does_not_depend_on_the_probing_threads(tmp_path, monkeypatch):
    # layers are probed in threads; each layer's noise has its own seed and the sums go in
    # layer order, so one thread and two give the same file to the bit
    from fibquant_cli.ops import fidelity  # the probes take their thread count from it

    rng = np.random.default_rng(4)
    shape = (1, 2, 120, 16)
    keys = [rng.standard_normal(shape) * (1 + layer) for layer in range(4)]
    values = [rng.standard_normal(shape) for _ in range(4)]
    queries = [rng.standard_normal((1, 4, 120, 16)) * 2 for _ in range(4)]
    src = write_kv(tmp_path, "q", keys, values, queries=queries, query_heads=4)
    outs = []
    for threads in (1, 2):
        monkeypatch.setattr(fidelity, "SCORING_THREADS", threads)
        outs.append(tmp_path / f"t{threads}.basis.safetensors")
        ok(invoke("calibrate", src, "-o", outs[-1]))
    assert outs[0].read_bytes() == outs[1].read_bytes()
    sens = [load_basis(outs[1]).sensitivity(layer, "key") for layer in range(4)]
    assert len(set(sens)) == 4  # the layers differ: a mix-up of their order would show
