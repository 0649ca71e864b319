"""Attention fidelity of a reconstruction against its original dump, layer by layer.

With queries in the manifest (``attention``), each layer's attention output with the original
K, V is compared to the one with the reconstructed K_hat, V_hat (core/attention.py). Without
queries the keys stand in for them (key self-attention), which is reported as a proxy.
Long contexts are scored on a sample of query positions (``sample``): windows of
``SAMPLE_WINDOW`` consecutive positions spread evenly from the start of the context to its end,
each seeing all the keys before it, so early positions (where the attention sink dominates) and
late ones both count while the cost stays a fraction of the encode. ``max_queries`` instead
scores the last N positions (N >= tokens: every position, the full measurement).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fibquant_cli.core.attention import FidelityStats, Reference, attention_fidelity
from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats import stfile
from fibquant_cli.formats.kvdump import Dump, read_layer
from fibquant_cli.formats.kvlayout import vectors_axes
from fibquant_cli.ops.process import one_blas_thread
from fibquant_cli.ops.threads import in_order

DEFAULT_MAX_QUERIES = 2048
# compress's default sample: query positions (in windows of SAMPLE_WINDOW) and layers (evenly
# spaced, first and last included). Sized on a 236 MB SmolLM2 dump (30 layers, 4,096 tokens)
# so the scoring adds at most 20% to compress --bits 3 (README, "Scoring cost").
DEFAULT_QUERY_SAMPLE = 96
DEFAULT_LAYER_SAMPLE = 3
SCORING_THREADS = 2  # layers scored at once (``measure``, calibrate's probes)
# At most this many bytes of reference outputs are kept for a search (``measure``'s
# ``references``): 159 MB for SmolLM2-135M at 2,048 query positions in every layer.
REFERENCE_BYTES = 512 << 20
# Dumps with at most this many layers are scored in every layer (cheap, and every row counts).
SAMPLE_LAYERS_ABOVE = 8
SAMPLE_WINDOW = 32
# What compress's report leads with: of the attention statistics, the one whose ranking of
# operating points agreed best with the model's own KL across sweep --model on SmolLM2-135M
# (Spearman rank correlation, README "A headline that tracks the model").
HEADLINE_METRIC = "cosine_p1"
HEADLINE_LABELS = {"cosine_p1": "attention cosine, 1st percentile",
                   "cosine_mean": "attention cosine, mean", "cosine_min": "attention cosine, min"}


def headline(fid: FidelityReport | None) -> dict | None:
    """``{"metric", "label", "value"}`` of ``HEADLINE_METRIC`` over all layers, or None."""
    if fid is None:
        return None
    return {"metric": HEADLINE_METRIC, "label": HEADLINE_LABELS[HEADLINE_METRIC],
            "value": fid.overall[HEADLINE_METRIC]}

Reconstruct = Callable[[int, int], np.ndarray]  # (entry index, layer) -> [b, h, t, d] float32


@dataclass
class FidelityReport:
    proxy: bool
    causal: bool
    query_positions: int
    tokens: int
    layers: list = field(default_factory=list)  # dicts per layer
    overall: dict = field(default_factory=dict)
    note: str = ""
    sampled: bool = False  # query positions in windows over the context, not the last ones

    def to_json(self) -> dict:
        return {"proxy": self.proxy, "causal": self.causal, "query_positions": self.query_positions,
                "tokens": self.tokens, "sampled": self.sampled, "layers": self.layers,
                "overall": self.overall, "note": self.note}


def kv_entries(dump: Dump) -> tuple[int, int] | None:
    """Indices of the key and value entries attention is measured on, or None."""
    keys = [i for i, e in enumerate(dump.manifest.entries) if e.shape.role == "key"]
    values = [i for i, e in enumerate(dump.manifest.entries) if e.shape.role == "value"]
    if len(keys) != 1 or len(values) != 1:
        return None
    k, v = dump.manifest.entries[keys[0]].shape, dump.manifest.entries[values[0]].shape
    same = ("batch", "layers", "kv_heads", "tokens", "head_dim")
    if any(getattr(k, f) != getattr(v, f) for f in same):
        return None
    return keys[0], values[0]


def require_kv_pair(dump: Dump, what: str) -> tuple[int, int]:
    """``kv_entries`` or an error saying that ``what`` needs one key and one value entry."""
    pair = kv_entries(dump)
    if pair is None:
        raise InvalidInputError(f"{what} needs exactly one key and one value entry of the same "
                                "geometry", path=str(dump.manifest_path or dump.path))
    return pair


def read_query_layer(dump: Dump, layer: int, positions: slice) -> np.ndarray:
    """Queries of ``layer`` as [batch, query_heads, tokens, head_dim] float32."""
    names = dump.manifest.attention.query_tensors
    layout = dump.manifest.entries[0].layout
    if len(names) == 1 and len(dump.header.tensors[names[0]].shape) == 5:
        arr = stfile.read_tensor(dump.header, names[0], index=(slice(None), slice(layer, layer + 1)))
        q = arr[:, 0]
    else:
        q = stfile.read_tensor(dump.header, names[layer]).transpose(vectors_axes(layout, 4))
    return q[:, :, positions].astype(np.float32)


def sample_windows(tokens: int, sample: int, window: int = SAMPLE_WINDOW) -> list[slice]:
    """Query windows ``[a, b)`` of at most ``window`` positions, about ``sample`` positions in
    all, their ends spread evenly over ``(0, tokens]``; one window of everything when
    ``sample >= tokens``. Deterministic (no seed): the same dump always scores the same rows."""
    if sample >= tokens:
        return [slice(0, tokens)]
    count = max(1, -(-sample // window))
    ends = np.unique(np.round(np.linspace(min(window, tokens), tokens, count)).astype(int))
    windows, start = [], 0
    for end in ends:
        a = max(start, end - window)
        if end > a:
            windows.append(slice(int(a), int(end)))
        start = end
    return windows


def sample_layers(layers: int, count: int | None) -> list[int]:
    """``count`` layer indices spread evenly over ``range(layers)``, first and last included
    (every layer when ``count`` is None or there are at most ``SAMPLE_LAYERS_ABOVE``)."""
    if count is None or layers <= SAMPLE_LAYERS_ABOVE:
        return list(range(layers))
    return sorted({int(round(x)) for x in np.linspace(0, layers - 1, max(count, 1))})


def measure(dump: Dump, reconstruct: Reconstruct, *,
            max_queries: int = DEFAULT_MAX_QUERIES,
            sample: int | None = None, layers: int | None = None,
            cosine_only: bool = False, total_variation: bool = True,
            references: dict | None = None) -> FidelityReport | None:
    """Per-layer and overall attention fidelity of ``reconstruct`` against ``dump``.

    ``sample`` (when given) scores about that many query positions in windows spread over the
    context (``sample_windows``); otherwise the last ``max_queries`` positions are scored.
    ``layers`` (when given) scores that many layers spread over the depth (``sample_layers``);
    only those are read and decoded. ``cosine_only``: TV and top-8 are not computed (None),
    for callers that decide on the cosine alone; ``total_variation`` False: TV is not
    (``core/attention``, "Fewer statistics"). ``references``: without TV, a dict the caller
    keeps across its scorings of several reconstructions of this dump (a search, a sweep):
    what the original K, V give is computed by the first and kept there
    (``core/attention.Reference``), within ``REFERENCE_BYTES``; the figures are the same to
    the bit.
    BLAS runs single-threaded here: the score blocks are small matmuls, for which OpenBLAS's
    thread hand-offs cost more than they save (measured 2x slower on 2 busy cores).
    """
    with one_blas_thread():
        return _measure(dump, reconstruct, max_queries, sample, layers, cosine_only,
                        total_variation, references)


def _measure(dump: Dump, reconstruct: Reconstruct, max_queries: int,
             sample: int | None = None, layers: int | None = None,
             cosine_only: bool = False, total_variation: bool = True,
             references: dict | None = None) -> FidelityReport | None:
    pair = kv_entries(dump)
    if pair is None:
        return None
    ik, iv = pair
    shape = dump.manifest.entries[ik].shape
    attn = dump.manifest.attention
    causal = attn.causal if attn is not None else True
    if sample is not None:
        windows = sample_windows(shape.tokens, sample)
    else:
        windows = [slice(shape.tokens - min(shape.tokens, max_queries), shape.tokens)]
    n_q = sum(w.stop - w.start for w in windows)
    scored = sample_layers(shape.layers, layers)
    rep = FidelityReport(proxy=attn is None, causal=causal, query_positions=n_q,
                         tokens=shape.tokens,
                         sampled=len(windows) > 1 or len(scored) < shape.layers)
    if attn is None:
        rep.note = ("no queries in the manifest: key self-attention (keys as queries) "
                    "stands in as a proxy")
    parts = []
    key_err = [0.0, 0.0]
    value_err = [0.0, 0.0]
    heads = shape.query_heads if attn is not None else shape.kv_heads
    d_v = dump.manifest.entries[iv].shape.head_dim
    kept_bytes = len(scored) * Reference.n_bytes((shape.batch, heads, n_q), d_v)
    if (total_variation and not cosine_only) or kept_bytes > REFERENCE_BYTES:
        references = None  # TV needs the original weights; or too much to keep

    def reference(layer: int, window: slice) -> Reference | None:
        if references is None:
            return None
        return references.setdefault((layer, window.start, window.stop), Reference())

    def score(layer: int):
        k = read_layer(dump, dump.manifest.entries[ik], layer).astype(np.float32)
        v = read_layer(dump, dump.manifest.entries[iv], layer).astype(np.float32)
        k_hat, v_hat = reconstruct(ik, layer), reconstruct(iv, layer)
        per_window = [_window_stats(dump, layer, w, (k, v, k_hat, v_hat), attn, causal,
                                    cosine_only=cosine_only, total_variation=total_variation,
                                    reference=reference(layer, w))
                      for w in windows]
        stats = per_window[0] if len(per_window) == 1 else FidelityStats.merge(per_window)
        return layer, stats, _err(k, k_hat), _err(v, v_hat)

    # Layers are scored in threads (their results merged in order, so the figures do not
    # depend on it); ``reconstruct`` must be safe to call from several threads at once.
    for layer, stats, ek, ev in in_order(score, scored, scoring_threads(), "fibquant-score"):
        parts.append(stats)
        key_err = [key_err[0] + ek[0], key_err[1] + ek[1]]
        value_err = [value_err[0] + ev[0], value_err[1] + ev[1]]
        rep.layers.append({"layer": layer, "key_rel_mse": ek[0] / ek[1] if ek[1] else 0.0,
                           "value_rel_mse": ev[0] / ev[1] if ev[1] else 0.0, **stats.summary()})
    overall = FidelityStats.merge(parts)
    both = key_err[1] + value_err[1]
    rep.overall = {"rel_mse": (key_err[0] + value_err[0]) / both if both else 0.0,
                   "key_rel_mse": key_err[0] / key_err[1] if key_err[1] else 0.0,
                   "value_rel_mse": value_err[0] / value_err[1] if value_err[1] else 0.0,
                   **overall.summary()}
    return rep


def _window_stats(dump: Dump, layer: int, window: slice, kv, attn, causal: bool,
                  **scoring):
    """Rows of the query positions ``window``; a causal window sees the keys up to its end.
    ``scoring``: ``attention_fidelity``'s statistics and reference keywords."""
    stop = window.stop if causal else kv[0].shape[2]
    k, v, k_hat, v_hat = (x[:, :, :stop] for x in kv)
    q = read_query_layer(dump, layer, window) if attn is not None else kv[0][:, :, window]
    stats = attention_fidelity(q, k, v, k_hat, v_hat, causal=causal, **scoring)
    return stats if attn is not None else stats.as_proxy()


def scoring_threads() -> int:
    """Threads that score layers at once: ``SCORING_THREADS``, at most one per core."""
    return min(os.cpu_count() or 1, SCORING_THREADS)


def _err(x: np.ndarray, x_hat: np.ndarray) -> tuple[float, float]:
    x64 = x.astype(np.float64)
    return float(((x64 - x_hat) ** 2).sum()), float((x64 * x64).sum())
