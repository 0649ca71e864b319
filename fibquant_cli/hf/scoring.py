"""Score a continuation through a KV cache, and compare next-token distributions.

Glossary
--------
prefix        the first ``P`` tokens; their keys and values are the cache under test.
continuation  the next ``C`` tokens, fed on top of the cache; the logits at continuation
              position ``i`` predict token ``P + i + 1``, so ``P + C + 1`` tokens are needed.
NLL           mean over the ``C`` predictions of ``-log p(next token)``, in nats.
KL            mean over the predictions of ``KL(p_ref || p) = sum_v p_ref (log p_ref - log p)``,
              ``p_ref`` from the uncompressed cache, ``p`` from the cache under test.
top-1         the fraction of predictions whose most likely token is the same under both.

All sums are float64 over float32 logits; the formulas are numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``logits (n, vocab)`` -> log-probabilities ``(n, vocab) float64``."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll(logp: np.ndarray, targets: np.ndarray) -> float:
    """Mean ``-log p(target)`` of ``logp (n, vocab)`` at ``targets (n,)``, in nats."""
    return float(-logp[np.arange(len(targets)), np.asarray(targets)].mean())


def kl(logp_ref: np.ndarray, logp: np.ndarray) -> float:
    """Mean over rows of ``KL(p_ref || p)``, in nats."""
    return float((np.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1).mean())


def top1_agreement(logp_ref: np.ndarray, logp: np.ndarray) -> float:
    """Fraction of rows whose argmax is the same."""
    return float((logp_ref.argmax(axis=-1) == logp.argmax(axis=-1)).mean())


@dataclass(frozen=True)
class Comparison:
    """A cache's continuation score against the reference cache's."""

    nll: float
    delta_nll: float
    kl: float
    top1: float

    def to_json(self) -> dict:
        return {"nll": self.nll, "delta_nll": self.delta_nll, "kl": self.kl, "top1": self.top1}


def compare(logp_ref: np.ndarray, logp: np.ndarray, targets: np.ndarray) -> Comparison:
    value = nll(logp, targets)
    return Comparison(value, value - nll(logp_ref, targets), kl(logp_ref, logp),
                      top1_agreement(logp_ref, logp))


def continuation_logp(lm, cache, continuation_ids: np.ndarray) -> np.ndarray:
    """Feed ``continuation_ids (b, C)`` on top of ``cache``; log-probabilities ``(b*C, vocab)``.

    The cache is extended in place by the model: build a fresh one for every call.
    """
    import torch

    with torch.no_grad():
        out = lm.model(input_ids=torch.from_numpy(np.asarray(continuation_ids, dtype=np.int64)),
                       use_cache=True, **{cache_keyword(lm.model): cache})
    logits = out.logits.float().numpy()
    return log_softmax(logits.reshape(-1, logits.shape[-1]))


def cache_keyword(model) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def full_logp(lm, input_ids: np.ndarray, first: int) -> np.ndarray:
    """No cache: one forward over ``input_ids (b, t)``; log-probabilities of positions
    ``first:`` as ``(b*(t - first), vocab)`` (the cache self-check's reference)."""
    import torch

    with torch.no_grad():
        out = lm.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
                       use_cache=False)
    logits = out.logits[:, first:].float().numpy()
    return log_softmax(logits.reshape(-1, logits.shape[-1]))
