"""fibquant_cli.hf: dump --model, eval --model and sweep --model on tiny config-built models.

Needs the ``hf`` extra (torch, transformers); nothing is downloaded: the models are built from
a config with a fixed seed and saved to a temporary folder (tests/tiny_models.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny matmuls: threads only add hand-off cost
pytest.importorskip("transformers")

from tiny_models import TEXT, gpt2_config, llama_config, save_tiny  # noqa: E402

from fibquant_cli.formats.manifest import load_manifest  # noqa: E402
from fibquant_cli.hf.scoring import kl, log_softmax, nll, top1_agreement  # noqa: E402

from conftest import SAMPLE_DUMP, assert_error  # noqa: E402

PREFIX, CONT = "96", "48"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"llama": save_tiny(root / "llama", llama_config()),
            "gpt2": save_tiny(root / "gpt2", gpt2_config()),
            "text": text, "root": root}


def test_scoring_formulas_match_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 11)).astype(np.float32) * 3
    b = a + rng.normal(size=a.shape).astype(np.float32) * 0.5
    targets = rng.integers(0, 11, size=7)
    la, lb = log_softmax(a), log_softmax(b)
    pa = np.exp(a.astype(np.float64)) / np.exp(a.astype(np.float64)).sum(-1, keepdims=True)
    pb = np.exp(b.astype(np.float64)) / np.exp(b.astype(np.float64)).sum(-1, keepdims=True)
    assert np.allclose(np.exp(la), pa, atol=1e-15)
    assert nll(la, targets) == pytest.approx(
        np.mean([-np.log(pa[i, t]) for i, t in enumerate(targets)]), abs=1e-13)
    direct = np.mean([sum(pa[i, v] * np.log(pa[i, v] / pb[i, v]) for v in range(11))
                      for i in range(7)])
    assert kl(la, lb) == pytest.approx(direct, abs=1e-13)
    assert kl(la, la) == 0.0
    assert top1_agreement(la, lb) == np.mean(pa.argmax(-1) == pb.argmax(-1))


def test_dump_writes_keys_values_queries_and_rope(cli, models, tmp_path):
    out = tmp_path / "kv.safetensors"
    res = cli("dump", "--model", models["llama"], "--text", models["text"], "--tokens", 64,
              "-o", out)
    assert res.exit_code == 0, res.output
    assert "RoPE theta 10000 half" in res.stdout
    m = load_manifest(tmp_path / "kv.manifest.json")
    key = m.entries[0]
    assert key.rope is not None and key.rope.to_json() == {
        "theta": 10000.0, "style": "half", "first_position": 0}
    assert (key.shape.layers, key.shape.kv_heads, key.shape.query_heads, key.shape.tokens,
            key.shape.head_dim) == (2, 2, 4, 64, 64)
    assert m.attention is not None and m.attention.causal
    assert cli("validate", out).exit_code == 0
    # The dump's keys are the model's own: unrotating them gives k_proj's raw output.
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fibquant_cli.core.rope import unrotate

    tensors = load_file(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(models["llama"]))
    seen = {}
    model.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda mod, a, o: seen.setdefault("k", o.detach()))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(tensors["input_ids"]))
    raw = seen["k"].unflatten(-1, (-1, 64)).transpose(1, 2).numpy()
    back = unrotate(tensors["layer.1.key"].astype(np.float32), np.arange(64), 10000.0, "half")
    assert np.abs(back - raw).max() <= 2e-3 * np.abs(raw).max()  # fp16 storage of the keys


def test_eval_model_self_checks_pass_and_bits_order_kl(cli, models):
    base = ("eval", "--model", models["llama"], "--text", models["text"], "--prefix-tokens",
            PREFIX, "--continuation-tokens", CONT, "--json")
    results = {}
    for bits in ("1", "4"):
        res = cli(*base, "--bits", bits)
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert [c["name"] for c in rep["checks"]] == ["cache", "round trip"]
        assert all(c["passed"] for c in rep["checks"])
        assert rep["checks"][1]["value"] == 0.0
        ref, point = rep["points"]
        assert ref["kl"] == 0.0 and ref["delta_nll"] == 0.0
        assert point["nll"] - rep["reference_nll"] == pytest.approx(point["delta_nll"], abs=1e-12)
        results[bits] = point
    assert results["1"]["kl"] > results["4"]["kl"] > 0.0
    assert results["1"]["ratio"] > results["4"]["ratio"]


def test_eval_model_prints_the_self_checks(cli, models):
    res = cli("eval", "--model", models["gpt2"], "--text", models["text"], "--prefix-tokens",
              PREFIX, "--continuation-tokens", CONT)
    assert res.exit_code == 0, res.output
    assert "self-check cache: PASS" in res.stdout
    assert "self-check round trip: PASS" in res.stdout


def test_model_without_rope_dumps_pre_rope_keys(cli, models, tmp_path):
    out = tmp_path / "gpt2.safetensors"
    res = cli("dump", "--model", models["gpt2"], "--text", models["text"], "--tokens", 40,
              "-o", out)
    assert res.exit_code == 0, res.output
    key = load_manifest(tmp_path / "gpt2.manifest.json").entries[0]
    assert key.shape.rope_state == "pre_rope" and key.rope is None
    assert key.shape.attention_kind == "mha"


def test_sweep_model_lists_points_and_peers(cli, models, tmp_path):
    res = cli("sweep", "--model", models["llama"], "--text", models["text"], "--prefix-tokens",
              "64", "--continuation-tokens", "32", "--own-basis", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    methods = {p["method"] for p in rep["points"]}
    assert {"reference", "fibquant", "q4_0", "q8_0"} <= methods
    assert any(p["pareto"] for p in rep["points"])
    assert all(p["kl"] >= 0.0 for p in rep["points"])
    # 64 tokens cannot fit a basis of D = 128 columns: the ladder is skipped, saying why
    assert "own basis" not in methods
    assert "too few tokens for an own basis" in rep["skipped"]["own basis"]


def test_sweep_model_own_basis_ladder_embeds_one_fitted_basis(models):
    from fibquant_cli.hf.evaluate import evaluate_model
    from fibquant_cli.ops.sweep import TRANSFORM_RATIOS

    rep = evaluate_model(models["llama"], text=models["text"], specs=[], prefix=160,
                         continuation=32, own_ladder=True)
    own = [p for p in rep.points if p.method == "own basis"]
    ladder = [f"own basis {r:g}x keep 1+0" for r in TRANSFORM_RATIOS]
    # each ratio is a point or skipped with its reason (at 160 tokens the embedded basis
    # alone is more than 20x allows)
    assert sorted([p.label for p in own] + list(rep.skipped)) == sorted(ladder)
    assert len(own) >= 6 and all("the target allows" in why for why in rep.skipped.values())
    for p in own:
        r = float(p.label.split()[2][:-1])
        assert r * 0.95 <= p.ratio <= r * 1.1  # all-inclusive: the embedded columns counted
        assert p.spec["embed_basis"] and p.spec["basis"].endswith("own.basis.safetensors")
    assert own[0].kl < own[-1].kl and all(p.kl >= 0.0 for p in own)


def test_missing_model_is_invalid_input(cli, models, tmp_path):
    res = cli("eval", "--model", tmp_path / "nope", "--text", models["text"])
    assert res.exit_code == 3
    assert res.stderr.count("\n") == 1 and "no such model file or folder" in res.stderr


def test_rope_scaling_is_refused(cli, models, tmp_path):
    folder = save_tiny(tmp_path / "scaled", llama_config(
        rope_scaling={"rope_type": "linear", "factor": 2.0}))
    res = cli("dump", "--model", folder, "--text", models["text"], "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 3
    assert "RoPE scaling 'linear' is not supported" in res.stderr
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_text_too_short_is_invalid_input(cli, models, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    res = cli("eval", "--model", models["llama"], "--text", short)
    assert res.exit_code == 3
    assert "text too short: 9 tokens, needs 1537" in res.stderr


@pytest.mark.parametrize("command", ["eval", "sweep", "dump", "calibrate"])
def test_an_unreadable_or_empty_text_is_refused_before_the_model_loads(cli, models, tmp_path,
                                                                       monkeypatch, command):
    from fibquant_cli.hf import evaluate, model, sensitivity

    # each module's own name (imported before hf.model's is patched, or it would keep the patch)
    for module in (evaluate, model, sensitivity):
        monkeypatch.setattr(module, "load_model", _must_not_run)
    dump = tmp_path / "kv.safetensors"
    front = {"eval": ["eval"], "sweep": ["sweep"], "dump": ["dump", "-o", dump],
             "calibrate": ["calibrate", SAMPLE_DUMP,
                           "-o", tmp_path / "b.basis.safetensors"]}[command]
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text(" \n", encoding="utf-8")
    binary.write_bytes(b"\x8c\xff\x00 not text")
    for text, reason in ((empty, "the text is empty"), (binary, "cannot read text ('utf-8'")):
        res = cli(*front, "--model", models["llama"], "--text", text)
        assert_error(res, 3, str(text), reason)
    assert not dump.exists() and not (tmp_path / "b.basis.safetensors").exists()


def test_eval_refuses_a_point_it_cannot_score_before_the_prefix_runs(cli, models, tmp_path,
                                                                      monkeypatch):
    """eval --model asked for one point: a basis that is missing (before the model loads), of
    another geometry, or a block length that does not divide head_dim (right after the load)
    fail the command, where a sweep would list the point as skipped and exit 0."""
    from fibquant_cli.hf import evaluate

    monkeypatch.setattr(evaluate, "Session", _must_not_run)
    args = ("eval", "--model", models["llama"], "--text", models["text"])
    with monkeypatch.context() as early:
        early.setattr(evaluate, "load_model", _must_not_run)
        assert_error(cli(*args, "--basis", tmp_path / "none.basis.safetensors", "--ratio", 8),
                     3, "none.basis.safetensors", "no such file")
    sample = tmp_path / "sample.basis.safetensors"  # 4 layers; the tiny llama has 2
    assert cli("calibrate", SAMPLE_DUMP, "-o", sample, "--no-rope-undo").exit_code == 0
    assert_error(cli(*args, "--basis", sample, "--ratio", 8), 3,
                 "the model's cache has (layers, kv_heads, head_dim) (2, 2, 64)",
                 "sample.basis.safetensors (4, ")
    assert_error(cli(*args, "--block-dim", 3, "--size", 16), 2,
                 "block_dim 3, which must divide the head_dim 64 of the model")


def test_eval_labels_a_point_by_the_recent_window_it_kept(cli, tmp_path):
    """``--keep-last auto`` (the default): a 2,048-token prefix at 8x keeps its last 16 tokens
    exact, and the point says so ("keep 1+16", what was scored), not "keep 1+auto"."""
    model = save_tiny(tmp_path / "long", llama_config(max_position_embeddings=4096))
    text = tmp_path / "long.txt"
    text.write_text(TEXT * (1 + 2100 // len(TEXT)), encoding="utf-8")
    calib, basis = tmp_path / "calib.safetensors", tmp_path / "b.basis.safetensors"
    assert cli("dump", "--model", model, "--text", text, "--tokens", 300, "-o", calib
               ).exit_code == 0
    assert cli("calibrate", calib, "-o", basis).exit_code == 0
    args = ("eval", "--model", model, "--text", text, "--prefix-tokens", 2048,
            "--continuation-tokens", 16, "--basis", basis, "--json")
    labels = {(ratio, keep): json.loads(cli(*args, "--ratio", ratio, "--keep-last", keep).stdout)
              ["points"][1]["label"] for ratio, keep in (("8", "auto"), ("8", "3"), ("12", "auto"))}
    assert labels == {("8", "auto"): "transform 8x keep 1+16", ("8", "3"): "transform 8x keep 1+3",
                      ("12", "auto"): "transform 12x keep 1+0"}  # 10.7 tokens: too few


def test_an_error_in_the_prefix_cache_names_it_not_a_temporary_file(cli, models):
    res = cli("eval", "--model", models["llama"], "--text", models["text"], "--prefix-tokens",
              100, "--continuation-tokens", 32, "--ratio", 8)  # too short for an own basis
    assert_error(res, 2, "the model's 100-token prefix cache: --ratio without --basis: too few")
    assert "safetensors" not in res.stderr


def test_a_sequence_beyond_learned_positions_is_refused(cli, models, tmp_path):
    """GPT-2 has position embeddings for n_positions (1,024) tokens and cannot run more (was
    an internal error); a RoPE model runs past its max_position_embeddings."""
    out = tmp_path / "x.safetensors"
    assert_error(cli("dump", "--model", models["gpt2"], "--text", models["text"], "--tokens",
                     1025, "-o", out), 3,
                 "1025 positions asked for, but the model's learned position embeddings cover 1024")
    # a scored continuation's last token is only a target: 524 + 500 tokens fill 1,024 positions
    assert_error(cli("eval", "--model", models["gpt2"], "--text", models["text"],
                     "--prefix-tokens", 525, "--continuation-tokens", 500), 3, "1025 positions")
    res = cli("dump", "--model", models["llama"], "--text", models["text"], "--tokens", 1025,
              "-o", out)
    assert_error(res, 3, "text too short", "needs 1025")
    assert "prefix" not in res.stderr  # dump has no prefix or continuation
    assert not out.exists()


def test_model_flags_are_usage_errors(cli, models, tmp_path):
    assert cli("eval", "--model", models["llama"]).exit_code == 2
    res = cli("eval", "--text", models["text"])
    assert res.exit_code == 2 and "--text and --ids go with --model" in res.stderr
    res = cli("sweep", tmp_path / "x.safetensors", "--model", models["llama"], "--text",
              models["text"])
    assert res.exit_code == 2


def test_ids_from_a_dump_equal_the_text_path(cli, models, tmp_path):
    out = tmp_path / "kv.safetensors"
    assert cli("dump", "--model", models["llama"], "--text", models["text"], "--tokens", 145,
               "-o", out).exit_code == 0
    runs = [cli("eval", "--model", models["llama"], src, val, "--prefix-tokens", PREFIX,
                "--continuation-tokens", CONT, "--json")
            for src, val in (("--text", models["text"]), ("--ids", out))]
    a, b = (json.loads(r.stdout)["points"][1] for r in runs)
    assert a["kl"] == b["kl"] and a["nll"] == b["nll"]


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from fibquant_cli.cli import app;"
            "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['eval', '--help']);"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_wrong_rope_is_refused_not_recorded(models, monkeypatch):
    """The recomputed keys check the recorded RoPE: a wrong theta does not reproduce the cache."""
    from fibquant_cli.errors import InvalidInputError
    from fibquant_cli.formats.manifest import RopeSpec
    from fibquant_cli.hf import capture
    from fibquant_cli.hf.model import load_model

    lm = load_model(models["llama"])
    ids = np.arange(48)[None, :] % 256
    assert capture.run_prefix(lm, ids).key_match_error < 1e-5
    lm.rope = RopeSpec(theta=5000.0, style="half")
    with pytest.raises(InvalidInputError, match="refusing to record wrong RoPE parameters"):
        capture.run_prefix(lm, ids)
    lm.rope = RopeSpec(theta=10000.0, style="interleaved")
    with pytest.raises(InvalidInputError, match="refusing to record wrong RoPE parameters"):
        capture.run_prefix(lm, ids)


def test_gguf_files_are_read_once_per_load(tmp_path):
    # load_model shares one reader per GGUF file and one tensor-name map per architecture
    # and depth (transformers asks for them 3 and ~400 times); outside the block, gguf's own
    gguf = pytest.importorskip("gguf")
    from fibquant_cli.hf.model import gguf_read_once

    paths = []
    for name in ("a", "b"):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        writer.add_block_count(2)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(tmp_path / f"{name}.gguf")
    original = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        first = gguf.GGUFReader(paths[0])
        assert gguf.GGUFReader(str(paths[0])) is first  # the same file, however named
        assert gguf.GGUFReader(paths[1]) is not first
        assert first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 3)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == original
    assert gguf.GGUFReader(paths[0]) is not gguf.GGUFReader(paths[0])


def test_no_progress_bar_reaches_stderr_when_a_model_loads():
    # transformers' GGUF loader draws a tqdm bar that disable_progress_bar does not reach;
    # import_torch sets tqdm's default off before transformers imports it (a fresh process:
    # tqdm reads TQDM_* once, at its import)
    code = ("import os; os.environ.pop('TQDM_DISABLE', None)\n"
            "from fibquant_cli.hf.model import import_torch; import_torch()\n"
            "from tqdm.auto import tqdm; print(tqdm(range(3)).disable)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True" and out.stderr == ""


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_skipper_scores_as_the_full_forward_without_running_the_lower_layers(models,
                                                                                   tmp_path,
                                                                                   arch):
    from fibquant_cli.hf.capture import attention_modules
    from fibquant_cli.hf.evaluate import Session
    from fibquant_cli.hf.kvfile import read_kv
    from fibquant_cli.hf.model import load_model, read_token_ids
    from fibquant_cli.hf.sensitivity import LayerSkipper

    lm = load_model(models[arch])
    ids = read_token_ids(lm, text=models["text"], ids_from=None, needed=96 + 48 + 1)
    session = Session(lm, ids, 96, 48, tmp_path)
    keys, values = read_kv(session.dump)
    skip = LayerSkipper(session, keys, values)
    ran = []
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, m in enumerate(attention_modules(lm.model))]
    rng = np.random.default_rng(0)
    try:
        for layer in range(lm.layers):
            perturbed = list(values)
            perturbed[layer] = perturbed[layer] + rng.normal(
                size=perturbed[layer].shape).astype(np.float32)
            ran.clear()
            fast = skip.logp(layer, keys, perturbed)
            assert ran == list(range(layer, lm.layers))
            full = session.logp(keys, perturbed)
            assert np.array_equal(fast, full)
            assert not np.array_equal(full, session.logp_ref)  # the probe moved something
    finally:
        for hook in hooks:
            hook.remove()
    assert np.array_equal(session.logp(keys, values), session.logp_ref)  # layers restored


def _must_not_run(*args, **kwargs):
    raise AssertionError("reached work that a refused input should have spared")


def test_calibrate_measures_sensitivity_with_the_model(cli, models, tmp_path, monkeypatch):
    """calibrate --model: the basis of the dumps, each (layer, role)'s sensitivity the KL of
    the model's continuation with that matrix perturbed; the same run twice writes the same
    bytes; a model of another RoPE than the dumps' is refused with nothing written."""
    from fibquant_cli.formats.basis import load_basis

    dump = tmp_path / "kv.safetensors"
    assert cli("dump", "--model", models["llama"], "--text", models["text"], "--tokens", 200,
               "-o", dump).exit_code == 0
    plain, a, b = (tmp_path / f"{n}.basis.safetensors" for n in ("plain", "a", "b"))
    assert cli("calibrate", dump, "-o", plain).exit_code == 0
    args = ("--model", models["llama"], "--text", models["text"], "--prefix-tokens", PREFIX,
            "--continuation-tokens", CONT)
    res = cli("calibrate", dump, "-o", a, *args, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["sensitivity_by"].startswith("model KL (llama, text.txt)")
    assert cli("calibrate", dump, "-o", b, *args).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    by_model, by_attention = load_basis(a), load_basis(plain)
    sens = np.array([[by_model.sensitivity(layer, r) for r in ("key", "value")]
                     for layer in range(2)])
    assert np.isfinite(sens).all() and (sens >= 0).all() and sens.max() > 0
    # the same fit, another measure
    for layer in range(2):
        assert np.array_equal(by_model.matrix(layer, "key")[1], by_attention.matrix(layer, "key")[1])
    assert not np.allclose(sens, [[by_attention.sensitivity(layer, r) for r in ("key", "value")]
                                  for layer in range(2)])
    one = tmp_path / "one.basis.safetensors"  # draw 0 alone: another mean than two draws'
    assert cli("calibrate", dump, "-o", one, *args, "--draws", "1").exit_code == 0
    single = np.array([[load_basis(one).sensitivity(layer, r) for r in ("key", "value")]
                       for layer in range(2)])
    assert np.isfinite(single).all() and not np.allclose(single, sens)
    c = tmp_path / "c.basis.safetensors"
    assert cli("calibrate", dump, "-o", c, *args, "--draws", "0").exit_code == 2
    # a prefix of kept tokens only: no probe would perturb anything (all-zero sensitivities)
    assert_error(cli("calibrate", dump, "-o", c, "--model", models["llama"], "--text",
                     models["text"], "--prefix-tokens", 1), 2,
                 "--prefix-tokens 1 leaves no token to perturb beyond the 1 that --keep-first")
    # another model's cache is refused once the model is loaded, before the basis is fitted
    monkeypatch.setattr("fibquant_cli.ops.calibrate.fit_sources", _must_not_run)
    res = cli("calibrate", dump, "-o", c, "--model", models["gpt2"], "--text", models["text"],
              "--prefix-tokens", PREFIX, "--continuation-tokens", CONT)
    assert res.exit_code == 3 and "RoPE (none) differs" in res.stderr and not c.exists()
    res = cli("calibrate", dump, "-o", c, "--text", models["text"])
    assert res.exit_code == 2 and "--text and --ids go with --model" in res.stderr
    res = cli("calibrate", dump, "-o", c, "--model", tmp_path / "nope.gguf", "--text",
              models["text"])
    assert res.exit_code == 3 and "no such model file or folder" in res.stderr
    assert not c.exists()
