"""Attention fidelity (docs/method.md §5): attention with the original K, V against the
reconstructed K_hat, V_hat, for one layer, in bounded memory.

Glossary
--------
row          one (batch, query head, query position): one softmax over the visible keys.
group        the query heads that read one KV head (GQA): query head h reads KV head
             h // group_heads, group_heads = query_heads // kv_heads.
visible key  key j is visible to query position i when attention is not causal, or when
             j <= i + (tokens_k - tokens_q): the queries are the last tokens_q positions.
p, p_hat     the attention weights of a row, softmax(q K^T / sqrt(d) + mask) with K and K_hat.
o, o_hat     the attention outputs p V and p_hat V_hat.
cosine       cos(o, o_hat) (paper Eq. 3); 1 when both are zero vectors, 0 when exactly one is.
cosine_p1    the 1st percentile of the row cosines, ``np.percentile`` (linear interpolation).
TV           total variation 0.5 * sum_j |p_j - p_hat_j|, in [0, 1].
top-8        |top_m(p) & top_m(p_hat)| / m with m = min(8, visible keys). A row with at most 8
             visible keys scores 1: both top sets are all of its keys. Keys are ranked by score
             (same order as p; immune to weights underflowing to 0); ties go to the lower index.
block        the rows scored at once: some heads of one group times a run of query positions.

Memory. No tokens x tokens matrix is ever formed. A block's score matrices (rows x visible
keys, float32, for K and K_hat) and their temporaries take at most ``BYTES_PER_SCORE`` bytes per
element, and ``plan_blocks`` sizes blocks so that this fits ``budget_bytes``. On top of the budget
live the float32 copies of one KV head (K, V, K_hat, V_hat: 4 x tokens_k x d x 4 bytes) and the
per-row cosines (8 bytes per row).

Precision. Scores, softmax and outputs are float32; the softmax denominators, the cosines and
every sum over rows are float64. ``attention_fidelity_direct`` is a brute-force float64
reference (full matrices, per-head loops) that the fast path is tested against.

Merging layers. ``FidelityStats`` keeps every row's cosine (``cosines``), so the 1st percentile
of merged stats is exact. TV and top-8 means merge count-weighted (rows), the maxima and minima
exactly.

Fewer statistics. A caller that decides on the cosine alone (a search, a trial) passes
``cosine_only``: TV and top-8 are then not computed and are None (ranking each row's top 8
keys, ``np.partition``, was 40% of scoring a 2,048-token layer); one that shows no TV (sweep)
passes ``total_variation=False``. Either may then score several reconstructions of the same
layer against one ``Reference``: what the original K, V give (the outputs o, and each row's
top-8 keys unless ``cosine_only``) is computed by the first scoring and read by the others,
about half of the work each. TV alone needs the original weights p, rows x keys: never kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fibquant_cli.errors import InvalidInputError, ResourceError, UsageError

TOP_K = 8
COSINE_PERCENTILE = 1.0
DEFAULT_BUDGET_BYTES = 64 * 2**20
# Bytes live at once per score element of a block: the float32 weights with K and with K_hat (8),
# one float32 partition copy (4), the two top-8 masks (2), the causal mask (1); 9 spare.
BYTES_PER_SCORE = 24
# The reference forms full float64 matrices; it is for tests and small inputs only.
DIRECT_MAX_SCORES = 2**22


@dataclass(frozen=True, eq=False)
class FidelityStats:
    """Attention-fidelity summary of a set of rows (one layer, or several merged).

    ``cosines (rows,) float64`` holds the per-row cosines in (batch, query head, query position)
    order (layer after layer when merged). ``proxy`` is True when keys stood in for the queries
    (``key_self_attention_proxy``); callers must label such numbers as a proxy.
    """

    rows: int
    cosine_mean: float
    cosine_p1: float
    cosine_min: float
    tv_mean: float | None  # None: not computed (see "Fewer statistics"), as tv_max
    tv_max: float | None
    top8_agreement: float | None  # None: not computed (``cosine_only``)
    cosines: np.ndarray = field(repr=False)
    proxy: bool = False

    @classmethod
    def from_rows(cls, cosines: np.ndarray, tv_sum: float | None, tv_max: float | None,
                  top8_sum: float | None, *, proxy: bool = False) -> FidelityStats:
        """Stats from per-row cosines and the float64 sums of TV and top-8 agreement (None:
        not computed)."""
        cosines = np.asarray(cosines, dtype=np.float64).ravel()
        rows = int(cosines.size)
        if rows == 0:
            raise UsageError("attention fidelity needs at least one row, found 0")
        tv_mean = None if tv_sum is None else float(tv_sum) / rows
        tv_max = None if tv_sum is None else float(tv_max)
        top8 = None if top8_sum is None else float(top8_sum) / rows
        return cls(rows=rows, cosine_mean=float(cosines.mean()),
                   cosine_p1=float(np.percentile(cosines, COSINE_PERCENTILE)),
                   cosine_min=float(cosines.min()), tv_mean=tv_mean, tv_max=tv_max,
                   top8_agreement=top8, cosines=cosines, proxy=proxy)

    @property
    def tails(self) -> tuple[float | None, float | None, float | None]:
        """(TV sum, TV max, top-8 sum) over the rows, None where not computed: what
        ``from_rows`` takes back."""
        tv = None if self.tv_mean is None else self.tv_mean * self.rows
        top8 = None if self.top8_agreement is None else self.top8_agreement * self.rows
        return tv, self.tv_max, top8

    @classmethod
    def merge(cls, parts: list[FidelityStats]) -> FidelityStats:
        """Combine stats of several layers as if their rows had been measured together."""
        parts = list(parts)
        if not parts:
            raise UsageError("cannot merge an empty list of attention-fidelity stats")
        cosines = np.concatenate([s.cosines for s in parts])
        proxy = any(s.proxy for s in parts)
        tails = [s.tails for s in parts]
        # a statistic one part lacks, the merge lacks
        has_tv = all(t[0] is not None for t in tails)
        has_top8 = all(t[2] is not None for t in tails)
        return cls.from_rows(cosines,
                             tv_sum=math.fsum(t[0] for t in tails) if has_tv else None,
                             tv_max=max(t[1] for t in tails) if has_tv else None,
                             top8_sum=math.fsum(t[2] for t in tails) if has_top8 else None,
                             proxy=proxy)

    def as_proxy(self) -> FidelityStats:
        """The same rows, labelled as the key-self-attention proxy (keys stood in for the
        queries)."""
        return replace(self, proxy=True)

    def summary(self) -> dict:
        """The scalar fields (no per-row array), for reports and JSON."""
        return {"rows": self.rows, "cosine_mean": self.cosine_mean,
                "cosine_p1": self.cosine_p1, "cosine_min": self.cosine_min,
                "tv_mean": self.tv_mean, "tv_max": self.tv_max,
                "top8_agreement": self.top8_agreement, "proxy": self.proxy}


class Reference:
    """What the original K, V give one layer's queries, kept between scorings of several
    reconstructions of that layer without TV: the first ``attention_fidelity`` given it fills
    ``outputs`` (batch, query_heads, tokens_q, d_v) float32 and, unless it scores the cosine
    alone, ``top`` (batch, query_heads, tokens_q, TOP_K) int32, each row's top-8 keys (rows
    seeing at most 8 keys: unused); later ones read them instead of computing them again. The
    same blocks give the same values: cosines and top-8 bit-identical to scoring without it."""

    def __init__(self) -> None:
        self.outputs: np.ndarray | None = None
        self.top: np.ndarray | None = None

    @staticmethod
    def n_bytes(q_shape: tuple[int, ...], d_v: int) -> int:
        """Bytes of a filled Reference for queries of ``q_shape`` (batch, heads, tokens_q)."""
        return 4 * math.prod(q_shape[:3]) * (d_v + TOP_K)


@dataclass(frozen=True)
class _Shape:
    batch: int
    query_heads: int
    kv_heads: int
    tokens_q: int
    tokens_k: int
    head_dim: int

    @property
    def group_heads(self) -> int:
        return self.query_heads // self.kv_heads


# --- the public functions -----------------------------------------------------------------------
def attention_fidelity(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_hat: np.ndarray,
                       v_hat: np.ndarray, *, causal: bool, query_chunk: int | None = None,
                       budget_bytes: int = DEFAULT_BUDGET_BYTES,
                       cosine_only: bool = False, total_variation: bool = True,
                       reference: Reference | None = None) -> FidelityStats:
    """Compare attention with K, V against attention with K_hat, V_hat for one layer.

    Parameters
    ----------
    q : (batch, query_heads, tokens_q, d) float array
    k, k_hat : (batch, kv_heads, tokens_k, d) float arrays; query_heads % kv_heads == 0.
    v, v_hat : (batch, kv_heads, tokens_k, d_v) float arrays.
    causal : mask keys after each query; the queries are the last tokens_q positions.
    query_chunk : optional upper bound on the query positions scored per block.
    budget_bytes : bound on a block's score matrices and temporaries (see module docstring).
    cosine_only : skip TV and top-8 (None in the result; see module docstring).
    total_variation : False skips TV alone (None in the result).
    reference : what K, V gave earlier scorings of these very q, k, v, or an empty
        ``Reference`` to fill; only without TV (it needs the original weights).

    Returns
    -------
    FidelityStats over batch * query_heads * tokens_q rows.

    Examples
    --------
    >>> stats = attention_fidelity(q, k, v, k_hat, v_hat, causal=True)
    >>> stats.cosine_mean, stats.cosine_p1, stats.top8_agreement
    """
    shape = _check_inputs(q, k, v, k_hat, v_hat, causal=causal)
    tv_wanted = total_variation and not cosine_only
    outputs = top = None  # a Reference being filled
    if reference is not None:
        if tv_wanted:
            raise UsageError("a Reference serves scoring without TV (TV needs the original "
                             "attention weights, which are not kept)")
        want = (shape.batch, shape.query_heads, shape.tokens_q)
        if reference.outputs is None:  # filled here, handed over only once complete
            outputs = np.empty((*want, v.shape[3]), dtype=np.float32)
            top = None if cosine_only else np.zeros((*want, TOP_K), dtype=np.int32)
        elif reference.outputs.shape != (*want, v.shape[3]):
            raise UsageError(f"a Reference of outputs {list(reference.outputs.shape)} cannot "
                             f"serve attention of shape {list((*want, v.shape[3]))}")
        elif reference.top is None and not cosine_only:
            raise UsageError("a Reference filled by cosine-only scoring has no top-8 keys")
    heads_per_block, chunk = plan_blocks(shape.group_heads, shape.tokens_q, shape.tokens_k,
                                         budget_bytes=budget_bytes, query_chunk=query_chunk)
    offset = shape.tokens_k - shape.tokens_q if causal else None
    scale = np.float32(1.0 / math.sqrt(shape.head_dim))
    group = shape.group_heads
    cosines = np.empty((shape.batch, shape.query_heads, shape.tokens_q), dtype=np.float64)
    tv_sum, tv_max, top8_sum = 0.0, 0.0, 0.0
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kv = tuple(_float32(a[b, g], name) for a, name in
                       ((k, "k"), (v, "v"), (k_hat, "k_hat"), (v_hat, "v_hat")))
            for h0 in range(g * group, (g + 1) * group, heads_per_block):
                h1 = min(h0 + heads_per_block, (g + 1) * group)
                for i0 in range(0, shape.tokens_q, chunk):
                    i1 = min(i0 + chunk, shape.tokens_q)
                    qb = _float32(q[b, h0:h1, i0:i1], "q") * scale
                    at = (b, slice(h0, h1), slice(i0, i1))
                    if reference is None:
                        ref = None
                    elif outputs is not None:  # filling it: the block writes here
                        ref = _BlockReference(outputs[at], None if top is None else top[at],
                                              False)
                    else:
                        ref = _BlockReference(reference.outputs[at], None if cosine_only
                                              else reference.top[at], True)
                    cos, tv, top8 = _score_block(qb, kv, i0, offset, cosine_only, tv_wanted,
                                                 ref)
                    cosines[b, h0:h1, i0:i1] = cos
                    if tv_wanted:
                        tv_sum += float(tv.sum())
                        tv_max = max(tv_max, float(tv.max()))
                    if not cosine_only:
                        top8_sum += float(top8.sum())
    if outputs is not None:
        reference.outputs, reference.top = outputs, top
    return FidelityStats.from_rows(cosines, tv_sum if tv_wanted else None,
                                   tv_max if tv_wanted else None,
                                   None if cosine_only else top8_sum)


def key_self_attention_proxy(k: np.ndarray, v: np.ndarray, k_hat: np.ndarray, v_hat: np.ndarray,
                             *, causal: bool, query_chunk: int | None = None,
                             budget_bytes: int = DEFAULT_BUDGET_BYTES,
                             cosine_only: bool = False,
                             total_variation: bool = True) -> FidelityStats:
    """A proxy for dumps without queries: the ORIGINAL keys serve as queries (one per KV head).

    Both sides use q = k; only the attended keys and values change (K_hat, V_hat). The result has
    ``proxy=True`` and must be labelled as a key-self-attention proxy, not the paper's metric.
    """
    stats = attention_fidelity(k, k, v, k_hat, v_hat, causal=causal, query_chunk=query_chunk,
                               budget_bytes=budget_bytes, cosine_only=cosine_only,
                               total_variation=total_variation)
    return stats.as_proxy()


def plan_blocks(group_heads: int, tokens_q: int, tokens_k: int, *, budget_bytes: int,
                query_chunk: int | None = None) -> tuple[int, int]:
    """(heads per block, query positions per block) so that a block fits ``budget_bytes``.

    A block scores heads x positions rows against up to tokens_k keys, at ``BYTES_PER_SCORE``
    bytes per score. Whole groups are preferred (their heads share K); a budget below one group's
    row splits the group, one position at a time.
    """
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise UsageError(f"budget_bytes must be a positive integer, found {budget_bytes!r}")
    if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
        raise UsageError(f"query_chunk must be a positive integer, found {query_chunk!r}")
    row_bytes = tokens_k * BYTES_PER_SCORE
    rows = budget_bytes // row_bytes
    if rows < 1:
        raise ResourceError(f"budget_bytes {budget_bytes} is below one score row: tokens_k "
                            f"{tokens_k} x {BYTES_PER_SCORE} bytes = {row_bytes}")
    if rows < group_heads:
        return rows, 1
    chunk = min(rows // group_heads, tokens_q)
    if query_chunk is not None:
        chunk = min(chunk, query_chunk)
    return group_heads, chunk


def attention_fidelity_direct(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_hat: np.ndarray,
                              v_hat: np.ndarray, *, causal: bool) -> FidelityStats:
    """Brute-force float64 reference of ``attention_fidelity``: full matrices, per-row loops.

    For tests and small inputs (tokens_q * tokens_k <= ``DIRECT_MAX_SCORES``).
    """
    shape = _check_inputs(q, k, v, k_hat, v_hat, causal=causal)
    tq, tk = shape.tokens_q, shape.tokens_k
    if tq * tk > DIRECT_MAX_SCORES:
        raise ResourceError(f"the direct reference is for small inputs: tokens_q {tq} x tokens_k "
                            f"{tk} exceeds {DIRECT_MAX_SCORES} scores")
    if causal:
        visible = np.minimum(np.arange(tq) + (tk - tq) + 1, tk)
    else:
        visible = np.full(tq, tk)
    hidden = np.arange(tk)[None, :] >= visible[:, None]
    cosines, tv_rows, top_rows = [], [], []
    for b in range(shape.batch):
        for h in range(shape.query_heads):
            g = h // shape.group_heads
            qh = np.asarray(q[b, h], dtype=np.float64)
            s, s_hat = (_scores_direct(qh, np.asarray(keys[b, g], dtype=np.float64), hidden)
                        for keys in (k, k_hat))
            p, p_hat = _softmax_direct(s), _softmax_direct(s_hat)
            o = p @ np.asarray(v[b, g], dtype=np.float64)
            o_hat = p_hat @ np.asarray(v_hat[b, g], dtype=np.float64)
            for i in range(tq):
                cosines.append(_cosine_direct(o[i], o_hat[i]))
                tv_rows.append(0.5 * np.abs(p[i] - p_hat[i]).sum())
                m = min(TOP_K, int(visible[i]))
                top = set(np.argsort(-s[i, :visible[i]], kind="stable")[:m].tolist())
                top_hat = set(np.argsort(-s_hat[i, :visible[i]], kind="stable")[:m].tolist())
                top_rows.append(len(top & top_hat) / m)
    return FidelityStats.from_rows(np.array(cosines), math.fsum(tv_rows), max(tv_rows),
                                   math.fsum(top_rows))


# --- one block ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BlockReference:
    """One block's part of a ``Reference``: its outputs (heads, positions, d_v) and top-8 keys
    (heads, positions, TOP_K) or None, and whether they are there (else they are written)."""

    outputs: np.ndarray
    top: np.ndarray | None
    filled: bool


def _score_block(qb: np.ndarray, kv: tuple[np.ndarray, ...], first: int,
                 offset: int | None, cosine_only: bool = False, tv_wanted: bool = True,
                 ref: _BlockReference | None = None):
    """(cosine, TV, top-8 agreement), each (heads, positions) float64, for one block; TV None
    unless ``tv_wanted``, top-8 None when ``cosine_only``.

    ``qb (heads, positions, d) float32`` is already scaled by 1/sqrt(d); ``first`` is the index
    of its first query position; ``offset`` is tokens_k - tokens_q when causal, else None.
    ``ref`` (without TV): what the original K, V give, read instead of computed, or written
    once computed.
    """
    heads, positions, _ = qb.shape
    n_keys = kv[0].shape[0]
    if offset is None:
        visible = np.full(positions, n_keys)
    else:
        visible = np.minimum(np.arange(first, first + positions) + offset + 1, n_keys)
    end = int(visible.max())
    # Keys after the block's last visible one are hidden from every row: never scored.
    k, v, k_hat, v_hat = (a[:end] for a in kv)
    hidden = None
    if int(visible.min()) < end:
        hidden = np.arange(end)[None, :] >= visible[:, None]
    rows = qb.reshape(heads * positions, -1)
    n = heads * positions

    # rows whose top-8 is not all of their keys; none when only cosines are wanted
    ranked = np.tile(visible > TOP_K, heads) if not cosine_only else np.zeros(n, bool)
    if ref is not None and ref.filled:
        p, o = None, ref.outputs.reshape(n, -1)
        top = None if ref.top is None else ref.top.reshape(n, TOP_K)  # key indices
    else:
        p, top = _softmax(rows @ k.T, hidden, heads, ranked)
        o = p @ v
        if ref is not None:
            ref.outputs[...] = o.reshape(heads, positions, -1)
            if ref.top is not None and top is not None:
                # a ranked row's mask holds exactly TOP_K keys (ties broken in _top_mask);
                # ref.top is a strided view: filled whole, not through a reshape
                keys = np.zeros((n, TOP_K), dtype=np.int32)
                keys[ranked] = np.nonzero(top[ranked])[1].reshape(-1, TOP_K)
                ref.top[...] = keys.reshape(heads, positions, TOP_K)
    p_hat, top_hat = _softmax(rows @ k_hat.T, hidden, heads, ranked)
    o_hat = p_hat @ v_hat
    cos = _cosine(o, o_hat).reshape(heads, positions)
    if cosine_only:
        return cos, None, None
    tv = None
    if tv_wanted:
        np.subtract(p, p_hat, out=p)
        np.abs(p, out=p)
        tv = (0.5 * p.sum(axis=-1, dtype=np.float64)).reshape(heads, positions)
    del p, p_hat

    top8 = np.ones(n)
    if top_hat is not None:
        if top.dtype == bool:  # the mask of the original weights
            np.logical_and(top, top_hat, out=top)
            top8[ranked] = np.count_nonzero(top, axis=-1)[ranked] / TOP_K
        else:  # the original's top-8 keys, kept: how many of them the reconstruction ranks
            kept = np.take_along_axis(top_hat[ranked], top[ranked].astype(np.intp), axis=1)
            top8[ranked] = np.count_nonzero(kept, axis=-1) / TOP_K
    return cos, tv, top8.reshape(heads, positions)


def _softmax(scores: np.ndarray, hidden: np.ndarray | None, heads: int,
             ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Row softmax of ``scores (heads * positions, keys) float32`` in place, and its top-8 mask.

    The top-8 keys are ranked by score, not by weight: softmax keeps the order, and weights that
    underflow to 0 in float32 would tie keys whose scores still differ.
    """
    if hidden is not None:
        np.copyto(scores.reshape(heads, hidden.shape[0], -1), -np.inf, where=hidden)
    top = _top_mask(scores, ranked)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    # Every row keeps its maximum, exp(0) = 1, so the denominator is >= 1. A float32 reciprocal
    # (one rounding) keeps the big multiply in float32, several times faster than a mixed divide.
    scores *= (1.0 / scores.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return scores, top


def _top_mask(s: np.ndarray, ranked: np.ndarray) -> np.ndarray | None:
    """``(rows, keys) bool``, True at each row's ``TOP_K`` largest scores; None if no row of
    ``ranked`` needs ranking (every key is in each row's top 8, or only cosines are wanted).

    The 8th largest score comes from ``np.partition`` (a float32 copy; ``argpartition`` would
    need int64 indices and is several times slower). A row of ``ranked`` (more than ``TOP_K``
    visible keys) with a tie at that score keeps the tied keys of lowest index.
    """
    n_keys = s.shape[-1]
    if n_keys <= TOP_K or not ranked.any():
        return None
    # The copy lets the (rows, keys) partitioned array go at once instead of living behind a view.
    kth = np.partition(s, n_keys - TOP_K, axis=-1)[:, n_keys - TOP_K, None].copy()
    top = s >= kth
    tied = np.flatnonzero(ranked & (np.count_nonzero(top, axis=-1) > TOP_K))
    for r in tied:
        above = np.flatnonzero(s[r] > kth[r, 0])
        at_kth = np.flatnonzero(s[r] == kth[r, 0])[:TOP_K - above.size]
        top[r] = False
        top[r, above] = True
        top[r, at_kth] = True
    return top


def _cosine(o: np.ndarray, o_hat: np.ndarray) -> np.ndarray:
    """Row cosines of two (rows, d_v) arrays in float64, with the zero-vector convention."""
    o = o.astype(np.float64)
    o_hat = o_hat.astype(np.float64)
    dot = np.einsum("ij,ij->i", o, o_hat)
    norm = np.sqrt(np.einsum("ij,ij->i", o, o))
    norm_hat = np.sqrt(np.einsum("ij,ij->i", o_hat, o_hat))
    denom = norm * norm_hat
    both_zero = (norm == 0) & (norm_hat == 0)
    cos = np.where(both_zero, 1.0, 0.0)
    nonzero = denom > 0
    cos[nonzero] = dot[nonzero] / denom[nonzero]
    return np.clip(cos, -1.0, 1.0)


def _scores_direct(q: np.ndarray, k: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    s = q @ k.T / math.sqrt(q.shape[-1])
    s[hidden] = -np.inf
    return s


def _softmax_direct(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cosine_direct(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


# --- validation at the boundary -----------------------------------------------------------------
def _check_inputs(q, k, v, k_hat, v_hat, *, causal: bool) -> _Shape:
    arrays = {"q": q, "k": k, "v": v, "k_hat": k_hat, "v_hat": v_hat}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.ndim != 4:
            found = f"{a.ndim}-D" if isinstance(a, np.ndarray) else type(a).__name__
            raise InvalidInputError(f"{name}: expected a 4-D array [batch, heads, tokens, d], "
                                    f"found {found}")
        if not _is_float(a.dtype):
            raise InvalidInputError(f"{name}: expected a float dtype, found {a.dtype}")
    batch, kv_heads, tokens_k, d = k.shape
    _, query_heads, tokens_q, d_q = q.shape
    expected = {"q": (batch, query_heads, tokens_q, d), "k_hat": k.shape,
                "v": (batch, kv_heads, tokens_k, v.shape[3]), "v_hat": v.shape}
    for name, want in expected.items():
        if arrays[name].shape != tuple(want):
            raise InvalidInputError(f"{name}: expected shape {list(want)} to match k "
                                    f"{list(k.shape)}, found {list(arrays[name].shape)}")
    if min(batch, kv_heads, tokens_k, d, query_heads, tokens_q, v.shape[3]) < 1:
        raise InvalidInputError(f"attention needs non-empty arrays, found q {list(q.shape)}, "
                                f"k {list(k.shape)}, v {list(v.shape)}")
    if query_heads % kv_heads:
        raise InvalidInputError(f"q: query_heads {query_heads} is not a multiple of kv_heads "
                                f"{kv_heads}")
    if causal and tokens_q > tokens_k:
        raise InvalidInputError(f"q: causal attention needs tokens_q <= tokens_k, found "
                                f"tokens_q {tokens_q} > tokens_k {tokens_k}")
    return _Shape(batch, query_heads, kv_heads, tokens_q, tokens_k, d)


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16 / float8 are not np.floating subtypes but are floats by name.
    return np.issubdtype(dtype, np.floating) or "float" in dtype.name


def _float32(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as float32 (a view when it already is), rejecting NaN/Inf."""
    out = np.asarray(x, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{name}: holds NaN or Inf (or a value beyond float32 range)")
    return out
