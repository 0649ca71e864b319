"""fibquant_cli.hf.cache and the README's Python example, on the tiny config-built Llama.

The must-show: a cache restored through the Python API continues generation; a round trip
that compresses nothing (every token kept exactly) continues token for token like the
original cache, and at the default settings the KL against the original cache is small.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
pytest.importorskip("transformers")

from tiny_models import TEXT, llama_config, save_tiny  # noqa: E402

from fibquant_cli import api as fq  # noqa: E402
from fibquant_cli.hf import cache as fqc  # noqa: E402
from fibquant_cli.hf.model import load_model  # noqa: E402
from fibquant_cli.hf.scoring import continuation_logp, kl  # noqa: E402

from conftest import bits_equal, ok  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX, NEW = 96, 24
# The tiny model's KL at the defaults is 0.0105 nats (prefix 96, continuation 48); a codec
# that lost the cache would be far above this.
DEFAULT_KL_BOUND = 0.05


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("models") / "llama", llama_config())
    return load_model(folder)


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([list(TEXT.encode())[:PREFIX + 49]])


def prefill(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids[:, :PREFIX], use_cache=True).past_key_values


def greedy(lm, ids, cache):
    return fqc.generate(lm, ids[:, :PREFIX + 1], cache, max_new_tokens=NEW, do_sample=False)


def test_a_round_trip_compressing_nothing_continues_token_for_token(lm, ids, tmp_path):
    cache = prefill(lm, ids)
    arrays = fqc.cache_to_arrays(cache)
    path = tmp_path / "c.fq.safetensors"
    fqc.compress_cache(cache, path, model=lm, keep_first=PREFIX)  # every token kept exactly
    reader = fq.open_compressed(path)
    assert reader.manifest.entries[0].rope == lm.rope
    restored = fqc.to_dynamic_cache(reader, lm)
    back = fqc.cache_to_arrays(restored)
    assert all(bits_equal(back[name], arrays[name]) for name in arrays)
    continued = greedy(lm, ids, restored)
    original = greedy(lm, ids, cache)  # the original cache object itself
    assert continued.shape[1] == PREFIX + 1 + NEW
    assert torch.equal(continued, original)
    # The comparison can fail: a cache that lost most of its bits continues differently.
    fq.compress(arrays, path, bits=0.5, keep_first=0, force=True, attention=False)
    assert not torch.equal(greedy(lm, ids, fqc.to_dynamic_cache(path, lm)), original)


def test_at_the_defaults_generation_runs_and_the_kl_is_small(lm, ids, tmp_path):
    cache = prefill(lm, ids)
    arrays = fqc.cache_to_arrays(cache)
    path = tmp_path / "c.fq.safetensors"
    rep = fqc.compress_cache(cache, path, model=lm)
    assert rep.total.ratio > 4
    assert greedy(lm, ids, fqc.to_dynamic_cache(path, lm)).shape[1] == PREFIX + 1 + NEW
    cont = ids[:, PREFIX:PREFIX + 48].numpy()
    value = kl(continuation_logp(lm, fqc.to_dynamic_cache(arrays, lm), cont),
               continuation_logp(lm, fqc.to_dynamic_cache(path, lm), cont))
    assert 0.0 < value < DEFAULT_KL_BOUND


def test_a_dumped_cache_is_what_the_cli_compresses(cli, lm, ids, tmp_path):
    cache = prefill(lm, ids)
    dump, manifest = fqc.cache_to_dump(cache, tmp_path / "kv.safetensors", model=lm)
    ok(cli("validate", dump))
    ok(cli("compress", dump, "--keep-first", PREFIX, "--no-attention"))
    restored = fqc.to_dynamic_cache(str(tmp_path / "kv.fq.safetensors"), dtype=torch.float16)
    k = restored.layers[0].keys if hasattr(restored, "layers") else restored.key_cache[0]
    assert k.dtype == torch.float16 and k.shape == (1, 2, PREFIX, 64)


def test_the_readme_python_example_runs_and_prints_the_kl(lm, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example.py", str(lm.path), str(text)])
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "continuation: " in out and re.search(r"compressed \d+\.\d\dx", out)
    found = re.search(r"KL against the original cache: (\S+) nats", out)
    assert found and 0.0 < float(found[1]) < DEFAULT_KL_BOUND, out
    assert np.isfinite(float(found[1]))
