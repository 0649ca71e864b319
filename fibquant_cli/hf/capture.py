"""Run a prefix through a model: its KV cache and the post-RoPE queries of every layer.

The keys and values are the cache's own tensors, ``[batch, kv_heads, tokens, head_dim]``.
Queries are not cached by the model; they are captured from the attention's projections
(``q_proj``, or GPT-2's fused ``c_attn``) and rotated here with the recorded RoPE. The keys are
captured and rotated the same way and must reproduce the cache: that check proves the RoPE
parameters written to the manifest are the ones the model used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fibquant_cli.core.rope import rotate
from fibquant_cli.errors import InvalidInputError
from fibquant_cli.hf.model import LoadedModel

# Recomputed keys must match the cache to this fraction of the largest |key|. transformers
# computes the angles in float32, whose rounding grows with the position (1.1e-4 measured at
# 4,096 tokens on SmolLM2); a wrong theta or pair style is off by order 1.
KEY_MATCH_TOLERANCE = 1e-2


@dataclass
class Capture:
    """One prefix pass: keys, values ``(b, kv_heads, t, d) float32`` and queries per layer."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    queries: list[np.ndarray] | None  # (b, query_heads, t, d) float32, or None when unknown
    note: str = ""
    key_match_error: float | None = None  # max |recomputed - cached| / max |cached|
    extra: dict = field(default_factory=dict)


def cache_layers(cache) -> list[tuple]:
    """(keys, values) torch tensors of every layer of a transformers cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def build_cache(keys: list[np.ndarray], values: list[np.ndarray], *, dtype=None, device=None):
    """A fresh transformers ``DynamicCache`` holding ``keys``/``values``: float32 copies, or
    torch ``dtype`` on ``device`` (through float32, exact from float16 and bfloat16)."""
    import torch
    from transformers import DynamicCache

    def tensor(x):
        t = torch.from_numpy(np.array(x, dtype=np.float32))
        return t if dtype is None and device is None else t.to(device=device, dtype=dtype)

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(tensor(k), tensor(v), i)
    return cache


def attention_modules(model) -> list:
    """The attention module of every layer, in order (those with q/k projections)."""
    found = [m for m in model.modules()
             if (hasattr(m, "q_proj") and hasattr(m, "k_proj")) or hasattr(m, "c_attn")]
    return found


def _projection_hooks(lm: LoadedModel, captured: dict):
    """Register hooks that store each layer's raw q and k as (b, t, heads, d) tensors."""
    handles = []
    d = lm.head_dim
    for i, attn in enumerate(attention_modules(lm.model)):
        if hasattr(attn, "c_attn"):  # GPT-2: one fused projection, q | k | v
            def fused(module, args, out, i=i):
                q, k, _ = out.split(out.shape[-1] // 3, dim=-1)
                captured[i] = (q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)))
            handles.append(attn.c_attn.register_forward_hook(fused))
            continue
        # qk-norm models (Qwen3, OLMo-2) normalize after the projection and before RoPE.
        q_mod = getattr(attn, "q_norm", None) or attn.q_proj
        k_mod = getattr(attn, "k_norm", None) or attn.k_proj

        def store(module, args, out, i=i, slot=0):
            pair = list(captured.get(i, (None, None)))
            pair[slot] = out.unflatten(-1, (-1, d)) if out.shape[-1] != d else out
            captured[i] = tuple(pair)
        handles.append(q_mod.register_forward_hook(lambda m, a, o, i=i: store(m, a, o, i, 0)))
        handles.append(k_mod.register_forward_hook(lambda m, a, o, i=i: store(m, a, o, i, 1)))
    return handles


def _to_bhtd(x, first_position: int, lm: LoadedModel) -> np.ndarray:
    """(b, t, heads, d) torch -> (b, heads, t, d) float32 numpy, rotated when the model ropes."""
    arr = x.detach().float().numpy().transpose(0, 2, 1, 3)
    if lm.rope is None:
        return np.ascontiguousarray(arr)
    positions = first_position + np.arange(arr.shape[2])
    return rotate(arr, positions, lm.rope.theta, lm.rope.style).astype(np.float32)


def run_prefix(lm: LoadedModel, input_ids: np.ndarray, *, queries: bool = True) -> Capture:
    """One forward pass over ``input_ids (b, t) int64`` with a cache; its K, V and queries."""
    import torch

    captured: dict = {}
    handles = _projection_hooks(lm, captured) if queries else []
    try:
        with torch.no_grad():
            out = lm.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
                           use_cache=True)
    finally:
        for h in handles:
            h.remove()
    kv = cache_layers(out["cache"] if "cache" in out else out.past_key_values)
    keys = [k.detach().float().numpy().copy() for k, _ in kv]
    values = [v.detach().float().numpy().copy() for _, v in kv]
    cap = Capture(keys, values, None)
    if not queries:
        return cap
    if len(captured) != len(keys) or any(None in pair for pair in captured.values()):
        cap.note = (f"queries not captured ({lm.model_type}: no q/k projections found per "
                    "layer); attention fidelity falls back to the key proxy")
        return cap
    worst = 0.0
    qs = []
    for i, (q, k) in sorted(captured.items()):
        k_re = _to_bhtd(k, 0, lm)
        scale = float(np.abs(keys[i]).max()) or 1.0
        worst = max(worst, float(np.abs(k_re - keys[i]).max()) / scale)
        qs.append(_to_bhtd(q, 0, lm))
    cap.key_match_error = worst
    if worst > KEY_MATCH_TOLERANCE:
        raise InvalidInputError(
            f"keys recomputed with the recorded RoPE ({lm.rope}) differ from the model's cache "
            f"by {worst:.2e} of max |key|: the model rotates differently; refusing to record "
            "wrong RoPE parameters", path=str(lm.path))
    cap.queries = qs
    return cap
