"""compress --basis: the transform codec end to end (calibrate -> compress -> decompress)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

from fibquant_cli.core import rope as R

from conftest import assert_error, bits_equal, header_order, load, ok

HEADS, D, QUERY_HEADS, LAYERS = 2, 16, 4, 2
ROPE = {"theta": 10000.0, "style": "half", "first_position": 0}


def structured_dump(directory, name: str, *, tokens: int = 400, seed: int = 0,
                    rank: int = 6, rope: bool = True):
    """A dump whose pre-RoPE keys and values live near a rank-``rank`` subspace shared by the
    model (the same mixing for every seed, other coefficients per seed), keys rotated by RoPE,
    and a strong first token (an attention sink). Returns (path, tensors)."""
    model = np.random.default_rng(1234)  # the "model": fixed across dumps
    mix = {(l, r): model.standard_normal((rank, HEADS * D)) * model.uniform(0.5, 3, (rank, 1))
           for l in range(LAYERS) for r in ("key", "value")}
    means = {k: model.standard_normal(HEADS * D) for k in mix}
    rng = np.random.default_rng(seed)
    tensors = {"input_ids": rng.integers(0, 1000, (1, tokens), dtype=np.int64)}
    for l in range(LAYERS):
        for role in ("key", "value"):
            rows = rng.standard_normal((tokens, rank)) @ mix[l, role] + means[l, role]
            rows += 0.05 * rng.standard_normal(rows.shape)
            rows[0] *= 6.0  # the sink
            x = rows.reshape(1, tokens, HEADS, D).transpose(0, 2, 1, 3)
            if role == "key" and rope:
                x = R.rotate(x, np.arange(tokens), ROPE["theta"], ROPE["style"])
            tensors[f"layer.{l}.{role}"] = np.ascontiguousarray(x.astype(np.float16))
        tensors[f"layer.{l}.query"] = rng.standard_normal(
            (1, QUERY_HEADS, tokens, D)).astype(np.float16)
    shape = {"schema_version": "fib_quant_kv_tensor_shape_v1", "attention_kind": "gqa",
             "batch": 1, "layers": LAYERS, "kv_heads": HEADS, "query_heads": QUERY_HEADS,
             "tokens": tokens, "head_dim": D, "dtype": "f16"}
    entries = [{"shape": {**shape, "role": "key", "rope_state": "post_rope"},
                "tensors": [f"layer.{l}.key" for l in range(LAYERS)], "layout": "bhtd",
                **({"rope": ROPE} if rope else {})},
               {"shape": {**shape, "role": "value", "rope_state": "not_applicable"},
                "tensors": [f"layer.{l}.value" for l in range(LAYERS)], "layout": "bhtd"}]
    manifest = {"schema_version": "fibquant_kv_manifest_v1", "entries": entries,
                "attention": {"query_tensors": [f"layer.{l}.query" for l in range(LAYERS)],
                              "causal": True}}
    path = directory / f"{name}.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    (directory / f"{name}.manifest.json").write_text(json.dumps(manifest))
    return path, tensors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A calibration dump (one text), an evaluation dump (another), and the basis."""
    from conftest import invoke

    d = tmp_path_factory.mktemp("transform")
    calib, _ = structured_dump(d, "calib", seed=1)
    evald, tensors = structured_dump(d, "eval", seed=2)
    basis = d / "model.basis.safetensors"
    ok(invoke("calibrate", calib, "-o", basis))
    return d, evald, tensors, basis


def compress(cli, world, out_name, *extra):
    d, evald, _, basis = world
    out = d / out_name
    res = ok(cli("compress", evald, "--basis", basis, "-o", out, "--force", "--json", *extra))
    return out, json.loads(res.stdout)


def kv_rel_mse(original: dict, restored: dict) -> float:
    num = den = 0.0
    for name, x in original.items():
        if name.endswith((".key", ".value")):
            x64 = x.astype(np.float64)
            num += float(((restored[name].astype(np.float64) - x64) ** 2).sum())
            den += float((x64 ** 2).sum())
    return num / den


def check_restored(restored: dict, tensors: dict) -> None:
    """Every tensor restored with its dtype and shape; pass-through tensors bit-exact, and the
    first token (the kept sink) of keys and values."""
    for name, x in tensors.items():
        assert restored[name].dtype == x.dtype and restored[name].shape == x.shape
        if not name.endswith((".key", ".value")):
            assert bits_equal(restored[name], x)  # pass-through, bit-exact
        else:
            assert bits_equal(restored[name][:, :, :1], x[:, :, :1])  # the kept sink


def test_ratio_is_met_all_inclusive_and_the_file_restores(cli, world, tmp_path):
    d, evald, tensors, basis = world
    out, rep = compress(cli, world, "r6.fq.safetensors", "--ratio", "6")
    kv_source = sum(x.nbytes for n, x in tensors.items() if n.endswith((".key", ".value")))
    passthrough = sum(x.nbytes for n, x in tensors.items() if not n.endswith((".key", ".value")))
    kv_file = out.stat().st_size - rep["passthrough_bytes"]
    assert rep["passthrough_bytes"] == passthrough
    assert kv_source / kv_file == pytest.approx(rep["total"]["ratio"], rel=1e-9)
    assert 6.0 <= rep["total"]["ratio"] <= 6.2  # at least the target, as close as steps allow
    restored_path = tmp_path / "r.safetensors"
    ok(cli("decompress", out, "--basis", basis, "-o", restored_path))
    restored = load(restored_path)
    assert header_order(restored_path) == header_order(evald)
    check_restored(restored, tensors)
    # the report's error is that of the file as restored
    assert kv_rel_mse(tensors, restored) == pytest.approx(rep["total"]["rel_mse"], rel=1e-5)
    assert rep["total"]["rel_mse"] < 0.01
    # the Python API decodes the same values into memory, in threads or not
    from fibquant_cli import api

    for jobs in (1, 2):
        in_memory = api.decompress(out, basis=basis, jobs=jobs)
        assert list(in_memory) == list(restored)
        assert all(bits_equal(in_memory[name], restored[name]) for name in restored)


def test_more_bytes_buy_less_error(cli, world):
    errors = [compress(cli, world, f"b{b}.fq.safetensors", "--bits", b, "--no-attention")[1]
              ["total"]["rel_mse"] for b in ("2.5", "3.5", "6")]
    assert errors[0] > errors[1] > errors[2]


def test_basis_is_required_and_checked_by_digest(cli, world, tmp_path):
    d, evald, _, basis = world
    out, _ = compress(cli, world, "chk.fq.safetensors", "--ratio", "5", "--no-attention")
    digest = json.loads(safetensors.safe_open(str(basis), "np").metadata()["fibquant_basis"])[
        "digest"]
    err = assert_error(cli("decompress", out, "-o", tmp_path / "x.safetensors"), 2, "--basis")
    assert digest in err
    other_dump, _ = structured_dump(tmp_path, "other", seed=9, rank=3)
    other = tmp_path / "other.basis.safetensors"
    ok(cli("calibrate", other_dump, "-o", other))
    assert_error(cli("decompress", out, "--basis", other, "-o", tmp_path / "y.safetensors"),
                 3, digest)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_embedded_basis_is_self_contained(cli, world, tmp_path):
    d, evald, tensors, basis = world
    plain, rep_plain = compress(cli, world, "plain.fq.safetensors", "--bits", "4",
                                "--no-attention")
    emb, rep_emb = compress(cli, world, "emb.fq.safetensors", "--bits", "4", "--embed-basis",
                            "--no-attention")
    # the embedded basis (its coded columns, fp16) is counted in the file, at the same size
    assert emb.stat().st_size == pytest.approx(plain.stat().st_size, rel=0.01)
    assert rep_emb["total"]["rel_mse"] > rep_plain["total"]["rel_mse"]  # fewer bytes for codes
    ok(cli("decompress", emb, "-o", tmp_path / "e.safetensors"))
    ok(cli("decompress", plain, "--basis", basis, "-o", tmp_path / "p.safetensors"))
    assert_error(cli("decompress", emb, "--basis", basis, "-o", tmp_path / "z.safetensors"), 2,
                 "--basis")
    ok(cli("validate", emb))


def test_format_4_files_with_an_embedded_basis_still_decode(cli, world, tmp_path):
    """Format 4 stored every column in F32 (D, D). The same file written that way -- the
    basis rounded as the encoder used it, every digest recomputed -- restores to the same
    bytes as its format-5 original."""
    from fibquant_cli.formats import stfile
    from fibquant_cli.formats.basis import load_basis
    from fibquant_cli.formats.digest import CONTAINER_SCHEMA, bytes_digest, tensor_digest
    from fibquant_cli.storage.stwriter import write_file

    d, evald, _, basis = world
    v5, _ = compress(cli, world, "v5.fq.safetensors", "--bits", "3", "--embed-basis",
                     "--no-attention")
    header = stfile.read_header(v5)
    doc = json.loads(header.metadata["fibquant"])
    doc["format_version"] = 4
    del doc["transform"]["own"]
    model = load_basis(basis)
    tensors = {}
    for name, info in header.tensors.items():
        raw, dtype, shape = stfile.read_raw(header, name), info.dtype, info.shape
        if name.startswith("fq/b/"):
            layer, role = int(name.split("/")[2][1:]), name.split("/")[3]
            u = model.matrix(layer, role)[1].astype(np.float16).astype("<f4")
            assert info.shape[1] < u.shape[1]  # format 5 stored fewer columns
            raw, dtype, shape = u.tobytes(), "F32", u.shape
            doc["arrays"][name] = tensor_digest(dtype, shape, raw)
        tensors[name] = stfile.RawTensor(dtype, shape, raw)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    meta = {"fibquant_format": "4", "fibquant": text,
            "fibquant_digest": bytes_digest(CONTAINER_SCHEMA, text.encode())}
    v4 = tmp_path / "v4.fq.safetensors"
    write_file(v4, tensors, meta)
    ok(cli("validate", v4))
    ok(cli("decompress", v4, "-o", tmp_path / "a.safetensors"))
    ok(cli("decompress", v5, "-o", tmp_path / "b.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert v4.stat().st_size > v5.stat().st_size


def test_slices_are_bit_identical_to_the_full_decode(cli, world, tmp_path):
    d, evald, _, basis = world
    out, _ = compress(cli, world, "sl.fq.safetensors", "--ratio", "8", "--no-attention")
    full = tmp_path / "full.safetensors"
    part = tmp_path / "part.safetensors"
    ok(cli("decompress", out, "--basis", basis, "-o", full))
    ok(cli("decompress", out, "--basis", basis, "-o", part, "--layers", "1:2",
           "--tokens", "0:137"))
    a, b = load(full), load(part)
    for role in ("key", "value"):
        assert bits_equal(a[f"layer.1.{role}"][:, :, 0:137], b[f"layer.1.{role}"])


def test_undoing_rope_fits_the_keys_better(cli, world, tmp_path):
    d, evald, tensors, basis = world
    calib = d / "calib.safetensors"
    plain = tmp_path / "norope.basis.safetensors"
    ok(cli("calibrate", calib, "-o", plain, "--no-rope-undo"))
    reports = {}
    for name, b in (("undo", basis), ("as stored", plain)):
        res = ok(cli("compress", evald, "--basis", b, "--ratio", "8", "--no-attention",
                     "-o", tmp_path / f"{len(reports)}.fq.safetensors", "--json"))
        reports[name] = json.loads(res.stdout)["entries"][0]["rel_mse"]  # keys
    assert reports["undo"] < 0.5 * reports["as stored"]


def test_a_flipped_code_byte_is_refused(cli, world, tmp_path):
    d, evald, _, basis = world
    out, _ = compress(cli, world, "flip.fq.safetensors", "--ratio", "6", "--no-attention")
    header = safetensors.safe_open(str(out), "np")
    del header
    raw = bytearray(out.read_bytes())
    meta_len = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + meta_len])
    start, _ = hdr["fq/e0/l1/codes"]["data_offsets"]
    raw[8 + meta_len + start + 3] ^= 0x10
    bad = tmp_path / "bad.fq.safetensors"
    bad.write_bytes(bytes(raw))
    assert_error(cli("decompress", bad, "--basis", basis, "-o", tmp_path / "o.safetensors"), 4,
                 "fq/e0/l1/codes")
    assert_error(cli("validate", bad, "--basis", basis), 4)
    assert not (tmp_path / "o.safetensors").exists()


def _document(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return json.loads(f.metadata()["fibquant"])


@pytest.mark.parametrize("flags, window", [
    (["--ratio", "8"], 16),  # 2,048 / (16 x 8): 1/16 of the file
    (["--bits", "1"], 0),  # 1 bit a value on fp16 is 16x: 8 tokens, too few to pay
    (["--ratio", "6"], 0),  # 21 tokens, but below the ratios it was measured at
    (["--ratio", "8", "--keep-last", "5"], 5),  # asked for: as given
    (["--ratio", "8", "--keep-last", "0"], 0),
])
def test_the_recent_window_is_kept_exact_where_the_default_keeps_one(cli, world, tmp_path,
                                                                     flags, window):
    """``--keep-last auto`` (the default): the last tokens / (16 x ratio) of a cache kept
    exact when that is >= 16 tokens at ratios >= 8; the file records the window, counts it in
    its ratio, and restores it bit for bit."""
    _, _, _, basis = world
    dump, tensors = structured_dump(tmp_path, "long", tokens=2048, seed=3)
    out, rest = tmp_path / "w.fq.safetensors", tmp_path / "w.safetensors"
    res = ok(cli("compress", dump, "--basis", basis, "-o", out, "--json", "--no-attention",
                 *flags))
    doc = _document(out)
    assert [e["keep_last"] for e in doc["entries"]] == [window, window]
    rep = json.loads(res.stdout)
    assert [e["profile"]["keep_last"] for e in rep["entries"]] == [window, window]  # reported
    ratio = rep["total"]["ratio"]
    if flags[0] == "--ratio":
        assert float(flags[1]) <= ratio <= float(flags[1]) * 1.03
    ok(cli("decompress", out, "--basis", basis, "-o", rest))
    restored = load(rest)
    for name, x in tensors.items():
        if name.endswith((".key", ".value")):
            t = x.shape[2]
            tail = restored[name][:, :, t - window:]
            assert bits_equal(tail, x[:, :, t - window:])
            if window == 0:  # nothing kept at the end: the last token was coded, not copied
                assert not bits_equal(restored[name][:, :, -1:], x[:, :, -1:])


def test_recent_window_formula():
    from fibquant_cli.ops.spec import CompressSpec, recent_window, resolve_spec

    def w(tokens, bits=16, bits_=None, **spec):  # bits: the source's; bits_: --bits
        return recent_window(resolve_spec(basis="B", bits=bits_, **spec), tokens, bits)

    assert w(4096, ratio=16) == 16 and w(4096, ratio=8) == 32 and w(7168, ratio=16) == 28
    assert w(4095, ratio=16) == 0  # 15.99 tokens: too few to pay
    assert w(1 << 20, ratio=7.99) == 0  # below the measured ratios
    assert w(4096, bits=16, bits_=2.0) == 32  # 2 bits on fp16: 8x
    assert w(4096, bits=32, bits_=4.0) == 32  # 4 bits on fp32: 8x too
    assert w(4096, ratio=16, keep_last=3) == 3
    assert w(4096, ratio=16, keep_last="AUTO") == 16
    assert recent_window(resolve_spec(bits=1), 1 << 20, 16) == 0  # per-vector: none
    assert recent_window(resolve_spec(ratio=16), 1 << 20, 16) == 0  # an own basis: none
    assert recent_window(resolve_spec(ratio=16, keep_last=3), 1 << 20, 16) == 3
    assert resolve_spec(bits=1).keep_last == 0
    assert recent_window(CompressSpec(keep_last=7), 100, 16) == 7


@pytest.mark.parametrize("value, fragment", [("-1", ">= 0"), ("some", "number of tokens"),
                                             ("1.5", "number of tokens")])
def test_a_bad_keep_last_is_one_line(cli, world, tmp_path, value, fragment):
    d, evald, _, basis = world
    out = tmp_path / "never.fq.safetensors"
    assert_error(cli("compress", evald, "--basis", basis, "--ratio", "8", "--keep-last", value,
                     "-o", out), 2, fragment)
    assert not out.exists()


@pytest.mark.parametrize("flags, code, fragment", [
    (["--ratio", "4", "--embed-basis"], 2, "--embed-basis"),  # nothing to embed: own basis
    (["--basis", "B", "--block-dim", "2", "--size", "16"], 2, "--block-dim"),
    (["--basis", "B", "--ratio", "0.5"], 2, "--ratio"),
    (["--basis", "B", "--ratio", "4", "--bits", "2"], 2, "--ratio"),
    (["--basis", "B", "--ratio", "5000"], 2, "--bits"),  # below the fixed cost
])
def test_bad_flags_exit_with_one_line(cli, world, tmp_path, flags, code, fragment):
    d, evald, _, basis = world
    flags = [str(basis) if f == "B" else f for f in flags]
    out = tmp_path / "never.fq.safetensors"
    assert_error(cli("compress", evald, "-o", out, *flags), code, fragment)
    assert not out.exists()


def test_basis_of_another_geometry_is_refused(cli, world, tmp_path):
    from conftest import make_dump

    d, evald, _, basis = world
    other = make_dump(tmp_path, "wide", head_dim=32, layers=LAYERS, kv_heads=HEADS)
    assert_error(cli("compress", other.path, "--basis", basis, "-o", tmp_path / "w.fq"),
                 3, "head_dim")


def test_query_weight_is_the_queries_energy_along_each_key_column(world):
    from fibquant_cli.formats.basis import load_basis

    d, _, _, basis_path = world
    basis = load_basis(basis_path)
    calib = safetensors.numpy.load_file(str(d / "calib.safetensors"))
    for layer in range(LAYERS):
        q = calib[f"layer.{layer}.query"][:, :, 1:].astype(np.float64)  # after the sink
        energy = (q * q).mean(axis=(0, 2))  # (query heads, D)
        pair = energy[:, : D // 2] + energy[:, D // 2:]  # rotate-half pairs share it
        per_head = np.concatenate([pair, pair], axis=1) / 2
        per_channel = per_head.reshape(HEADS, QUERY_HEADS // HEADS, D).sum(axis=1).reshape(-1)
        u = basis.matrix(layer, "key")[1].astype(np.float64)
        g = (u * u * per_channel[:, None]).sum(axis=0)
        np.testing.assert_allclose(basis.query_weight(layer), g / g.mean(), rtol=1e-5)


def test_without_queries_there_is_no_query_weight(cli, tmp_path):
    path, _ = structured_dump(tmp_path, "noq", seed=3)
    manifest = json.loads((tmp_path / "noq.manifest.json").read_text())
    del manifest["attention"]
    (tmp_path / "noq.manifest.json").write_text(json.dumps(manifest))
    from fibquant_cli.formats.basis import load_basis

    out = tmp_path / "noq.basis.safetensors"
    ok(cli("calibrate", path, "-o", out))
    basis = load_basis(out)
    assert basis.query_weight(0) is None and basis.sensitivity(0, "key") is None


def test_sweep_adds_the_transform_ladder(world):
    from fibquant_cli.ops.sweep import TRANSFORM_RATIOS, sweep

    d, evald, _, basis = world
    rep = sweep(evald, specs=[], peers=False, scalar=False, basis=basis, max_queries=64)
    points = [p for p in rep.points if p.method == "transform"]
    assert points and len(points) + len(rep.skipped) == len(TRANSFORM_RATIOS)
    for p in points:  # each point at (at least) its target ratio, ordered as the sweep sorts
        target = float(p.label.split()[1].rstrip("x"))
        assert p.ratio >= target * (1 - 1e-9)
    cosines = [p.cosine_mean for p in sorted(points, key=lambda p: p.ratio)]
    assert cosines[0] > cosines[-1]
    assert all("bytes" in reason for reason in rep.skipped.values())  # too small a file


def test_sweep_runs_and_labels_the_default_recent_window(world, tmp_path):
    """The sweep's ladder is compress's default at each ratio, the recent window included
    (2,048 tokens: the last 16 at 8x, none at 6x or 10x, where it would be 21 and 12), and
    labels each point by the window it kept; against an own basis it keeps none, as compress."""
    from fibquant_cli.ops.sweep import sweep

    _, _, _, basis = world
    dump, _ = structured_dump(tmp_path, "long", tokens=2048, seed=3)
    labels = {p.label for p in sweep(dump, specs=[], peers=False, scalar=False, basis=basis,
                                     max_queries=32).points}
    assert {"transform 6x keep 1+0", "transform 8x keep 1+16", "transform 10x keep 1+0"} <= labels
    own = sweep(dump, specs=[], peers=False, scalar=False, own_basis=True, max_queries=32)
    assert {p.spec["keep_last"] for p in own.points} == {0}


def test_sweep_refuses_a_basis_it_cannot_use_instead_of_skipping_its_points(cli, world,
                                                                            tmp_path):
    from conftest import make_dump

    d, evald, _, basis = world
    assert_error(cli("sweep", evald, "--basis", tmp_path / "none.basis.safetensors",
                     "--no-peers"), 3, "none.basis.safetensors", "no such file")
    other = make_dump(tmp_path, "wide", head_dim=32, layers=LAYERS, kv_heads=HEADS)
    assert_error(cli("sweep", other.path, "--basis", basis, "--no-peers"), 3, "head_dim 32")


def test_target_cosine_picks_the_highest_ratio_that_meets_it(cli, world):
    d, evald, _, basis = world
    out = d / "target.fq.safetensors"
    res = json.loads(ok(cli("compress", evald, "--basis", basis, "--target-cosine", "0.99",
                            "-o", out, "--force", "--json", "--max-queries", "4096")).stdout)
    chosen = res["target"]["chosen"]["ratio"]
    tried = {float(t["label"].split()[1].rstrip("x")): t["cosine_mean"]
             for t in res["target"]["tried"]}
    assert res["target"]["measured_cosine"] >= 0.99 and tried[chosen] >= 0.99
    # every ratio tried above the chosen one missed the target, every one below met it
    assert all(cos < 0.99 for r, cos in tried.items() if r > chosen)
    assert all(cos >= 0.99 for r, cos in tried.items() if r < chosen)
    assert len(tried) >= 6 and res["total"]["ratio"] >= chosen * (1 - 1e-9)


def _bits_lsb_first(data: bytes, count: int, width: int) -> list[int]:
    """``count`` indices of ``width`` bits, LSB-first (docs/container.md), read by hand."""
    value = int.from_bytes(data, "little")
    return [(value >> (i * width)) & ((1 << width) - 1) for i in range(count)]


def test_a_layer_decodes_by_hand_from_the_documented_bytes(cli, world, tmp_path):
    """docs/container.md, "Format 4" and "Format 5", followed by hand: widths and exceptions
    from the document, indices from the bit streams, codewords from the stored tables, the
    embedded basis (its coded columns, fp16), then RoPE; the result equals what decompress
    restores."""
    from safetensors import safe_open

    d, evald, tensors, _ = world
    out, _ = compress(cli, world, "hand.fq.safetensors", "--bits", "12", "--embed-basis",
                      "--no-attention")
    restored_path = tmp_path / "hand.safetensors"
    ok(cli("decompress", out, "-o", restored_path))
    restored = load(restored_path)
    with safe_open(str(out), "np") as f:
        doc = json.loads(f.metadata()["fibquant"])
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    assert doc["format_version"] == 5 and doc["transform"]["embedded"]
    assert doc["transform"]["own"] is False
    used = {w for e in doc["entries"] for runs in e["widths"] for w, _ in runs}
    assert max(used) > 10 and used & set(range(1, 11))  # both scalar and 2-D codebook pairs
    assert sum(e["exceptions"][1] for e in doc["entries"]) > 0
    tokens, dim = 400, HEADS * D
    for i, role in enumerate(("key", "value")):
        entry = doc["entries"][i]
        assert entry["codec"] == "transform"
        layer = 1
        widths = [w for w, n in entry["widths"][layer] for _ in range(n)]
        rows = tokens - entry["keep_first"]
        codes = arrays[f"fq/e{i}/l{layer}/codes"].tobytes()
        c = np.zeros((rows, dim))
        offset = 0
        for width in sorted(set(widths) - {0}):
            pairs = [p for p, w in enumerate(widths) if w == width]
            n_bytes = (rows * len(pairs) * width + 7) // 8
            idx = _bits_lsb_first(codes[offset:offset + n_bytes], rows * len(pairs), width)
            offset += n_bytes
            for k, code in enumerate(idx):
                r, p = divmod(k, len(pairs))
                if width <= 10:
                    c[r, 2 * pairs[p]:2 * pairs[p] + 2] = arrays[f"fq/t/vq{width}"][code]
                else:
                    levels = arrays[f"fq/t/scalar{width // 2}"]
                    c[r, 2 * pairs[p]] = levels[code >> (width // 2)]
                    c[r, 2 * pairs[p] + 1] = levels[code & ((1 << (width // 2)) - 1)]
        assert offset == len(codes)
        exc = arrays[f"fq/e{i}/l{layer}/except"].tobytes()
        n = entry["exceptions"][layer]
        for k in range(n):
            pos = int.from_bytes(exc[4 * k:4 * k + 4], "little")
            c[pos // dim, pos % dim] = float(np.frombuffer(exc[4 * n + 2 * k:4 * n + 2 * k + 2],
                                                           "<f2")[0])
        mean, scale = arrays[f"fq/e{i}/l{layer}/stats"].astype(np.float64)
        stored = arrays[f"fq/b/l{layer}/{role}"]
        live = [2 * p + k for p, w in enumerate(widths) if w for k in (0, 1)]  # ascending
        assert stored.dtype == np.float16 and stored.shape == (dim, len(live))
        u = stored.astype(np.float64)
        x = (c[:, live] * scale[live]) @ u.T + mean  # rows: tokens 1.. of the only batch row
        x = x.reshape(rows, HEADS, D).transpose(1, 0, 2)[None]
        if role == "key":
            x = R.rotate(x, np.arange(1, tokens), ROPE["theta"], ROPE["style"])
        got = restored[f"layer.{layer}.{role}"][:, :, 1:].astype(np.float64)
        # float64 here, float32 in the codec: equal to fp16's rounding of either
        spacing = np.abs(np.spacing(got.astype(np.float16))).astype(np.float64)
        assert np.all(np.abs(got - x) <= spacing + 1e-4), role
        assert bits_equal(restored[f"layer.{layer}.{role}"][:, :, :1],
                          tensors[f"layer.{layer}.{role}"][:, :, :1])


def test_the_basis_file_is_never_an_output(cli, world):
    d, evald, _, basis = world
    before = basis.read_bytes()
    assert_error(cli("compress", evald, "--basis", basis, "-o", basis, "--force"), 2, "basis")
    assert basis.read_bytes() == before


def test_validate_without_the_basis_names_the_flag_in_its_table_too(cli, world):
    d, evald, _, basis = world
    out, _ = compress(cli, world, "val.fq.safetensors", "--ratio", "5", "--no-attention")
    res = cli("validate", out)
    assert res.exit_code == 2
    assert "--basis" in res.stdout and "{basis}" not in res.stdout + res.stderr


def _forged(src, dst, *, tensor_edit=None, doc_edit=None):
    """A copy of a compressed file with an array and/or the document changed and every
    digest recomputed: only the document's validation and the value checks can catch it."""
    from fibquant_cli.formats import stfile
    from fibquant_cli.formats.digest import CONTAINER_SCHEMA, bytes_digest, tensor_digest
    from fibquant_cli.storage.stwriter import write_file

    header = stfile.read_header(src)
    raws = {n: stfile.read_raw(header, n) for n in header.tensors}
    doc = json.loads(header.metadata["fibquant"])
    if tensor_edit is not None:
        name, fn = tensor_edit
        info = header.tensors[name]
        arr = fn(np.frombuffer(raws[name], dtype="<f4").copy())
        raws[name] = arr.astype("<f4").tobytes()
        doc["arrays"][name] = tensor_digest(info.dtype, info.shape, raws[name])
    if doc_edit is not None:
        doc_edit(doc)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    meta = {"fibquant_format": str(doc["format_version"]), "fibquant": text,
            "fibquant_digest": bytes_digest(CONTAINER_SCHEMA, text.encode())}
    tensors = {n: stfile.RawTensor(i.dtype, i.shape, raws[n]) for n, i in header.tensors.items()}
    write_file(dst, tensors, meta)
    return dst


def test_forged_tables_and_widths_are_refused(cli, world, tmp_path):
    d, evald, _, basis = world
    out, _ = compress(cli, world, "forge.fq.safetensors", "--bits", "6", "--embed-basis",
                      "--no-attention")
    nan_table = _forged(out, tmp_path / "nan.fq.safetensors",
                        tensor_edit=("fq/t/vq2", lambda a: np.full_like(a, np.nan)))
    assert_error(cli("decompress", nan_table, "-o", tmp_path / "a.safetensors"), 4,
                 "fq/t/vq2", "non-finite")

    def short_runs(doc):
        doc["entries"][0]["widths"][0][-1][1] -= 1

    runs = _forged(out, tmp_path / "runs.fq.safetensors", doc_edit=short_runs)
    assert_error(cli("validate", runs), 4, "widths[0]", "pairs")
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("bad_run, field, reason", [
    ([11, 1], "widths[0][1][0]", "width 11 is not one of"),
    ([True, 1], "widths[0][1][0]", "expected an integer"),
    ([3, 0], "widths[0][1][1]", "expected an integer >= 1"),
    ([3], "widths[0][1]", "expected [width, pairs]"),
    ("3x1", "widths[0][1]", "expected an array"),
])
def test_a_forged_run_is_named_in_the_refusal(cli, world, tmp_path, bad_run, field, reason):
    # the document's runs are checked without naming each one first (a fast path): a bad run
    # must still be refused, naming that very run
    out, _ = compress(cli, world, "forge.fq.safetensors", "--bits", "6", "--embed-basis",
                      "--no-attention")

    def edit(doc):
        doc["entries"][0]["widths"][0].insert(1, bad_run)

    forged = _forged(out, tmp_path / "run.fq.safetensors", doc_edit=edit)
    assert_error(cli("validate", forged), 4, field, reason)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_codec_rows_are_the_basis_rows_in_pair_order(style):
    """The codec turns keys on pair-ordered channels (one complex multiply) and moves them
    back on output: the same rows calibrate fits its basis on, RoPE undone in float64."""
    from types import SimpleNamespace

    from fibquant_cli.codecs import transform as C
    from fibquant_cli.core import transform as T

    rng = np.random.default_rng(5)
    b, h, t, d, first = 2, 3, 20, 8, 5
    x = rng.standard_normal((b, h, t, d)).astype(np.float16)
    rope = SimpleNamespace(theta=500.0, style=style, first_position=100)
    lb = C.LayerBasis(np.eye(h * d, dtype=np.float32), T.tables(), rope, d)
    got = C.codec_rows(x, lb, first)
    plain = R.unrotate(x.astype(np.float64), 100 + first + np.arange(t), 500.0, style)
    want = C.heads_side_by_side(plain)
    assert np.abs(got - want[:, lb.order]).max() < 1e-5
    assert np.abs(lb.to_stored(got) - want).max() < 1e-5
    # and back: place() puts pair-ordered rows of one batch row into the heads' own order
    dest = np.empty((h, t, d), dtype=np.float32)
    C.place(lb, got[:t].reshape(t, h, d), dest)
    assert np.abs(dest - plain[0]).max() < 1e-5
