"""Attention fidelity (spec section 5): the chunked path against the float64 reference, hand-
computed cases, GQA mapping, the key proxy, merging, and bounded memory."""

import math
import tracemalloc

import numpy as np
import pytest

from fibquant_cli.core import attention as at
from fibquant_cli.errors import InvalidInputError, ResourceError, UsageError

SUMMARY_FIELDS = ("cosine_mean", "cosine_p1", "cosine_min", "tv_mean", "tv_max",
                  "top8_agreement")


def _layer(seed=0, *, batch=2, query_heads=4, kv_heads=2, tokens_q=24, tokens_k=40, d=16,
           noise=0.3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, query_heads, tokens_q, d))
    k, v = (rng.standard_normal((batch, kv_heads, tokens_k, d)) for _ in range(2))
    k_hat = k + noise * rng.standard_normal(k.shape)
    v_hat = v + noise * rng.standard_normal(v.shape)
    return tuple(a.astype(dtype) for a in (q, k, v, k_hat, v_hat))


def _assert_close(fast, ref, tol=1e-6):
    assert fast.rows == ref.rows
    for name in SUMMARY_FIELDS:
        assert getattr(fast, name) == pytest.approx(getattr(ref, name), abs=tol), name
    np.testing.assert_allclose(fast.cosines, ref.cosines, atol=tol)


# --- chunked path == direct reference -----------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tokens_q", [40, 24, 5])
@pytest.mark.parametrize("budget_bytes,query_chunk", [
    (at.DEFAULT_BUDGET_BYTES, None),   # one block per group
    (3 * 40 * at.BYTES_PER_SCORE, None),  # 3 rows per block: the group of 2 heads, 1 position
    (40 * at.BYTES_PER_SCORE, None),   # one row: the group is split
    (at.DEFAULT_BUDGET_BYTES, 7),      # explicit chunk with a ragged tail
])
def test_chunked_matches_direct(causal, tokens_q, budget_bytes, query_chunk):
    layer = _layer(tokens_q=tokens_q)
    fast = at.attention_fidelity(*layer, causal=causal, budget_bytes=budget_bytes,
                                 query_chunk=query_chunk)
    _assert_close(fast, at.attention_fidelity_direct(*layer, causal=causal))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_chunked_matches_direct_other_dtypes(dtype):
    layer = _layer(3, batch=1, query_heads=6, kv_heads=3, tokens_q=17, tokens_k=33, dtype=dtype)
    fast = at.attention_fidelity(*layer, causal=True, budget_bytes=5 * 33 * at.BYTES_PER_SCORE)
    _assert_close(fast, at.attention_fidelity_direct(*layer, causal=True))


def test_causal_offset_matters():
    layer = _layer(1, tokens_q=8, tokens_k=40)
    causal = at.attention_fidelity(*layer, causal=True)
    full = at.attention_fidelity(*layer, causal=False)
    assert causal.cosine_mean != pytest.approx(full.cosine_mean, abs=1e-6)


# --- hand-checkable cases ------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_identical_reconstruction_is_perfect(causal):
    q, k, v, _, _ = _layer(2)
    stats = at.attention_fidelity(q, k, v, k.copy(), v.copy(), causal=causal, budget_bytes=4096)
    assert stats.rows == 2 * 4 * 24
    assert stats.cosine_mean == pytest.approx(1.0, abs=1e-6)
    assert stats.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert stats.tv_mean == 0.0 and stats.tv_max == 0.0
    assert stats.top8_agreement == 1.0


def _two_keys():
    """d = 4 (scale 1/2). Scores with K: [2*1/2, 0] = [1, 0]; with K_hat = 0: [0, 0]."""
    q = np.array([2.0, 0, 0, 0]).reshape(1, 1, 1, 4)
    k = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]).reshape(1, 1, 2, 4)
    v = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]).reshape(1, 1, 2, 4)
    return q, k, v, np.zeros_like(k), v.copy()


def test_two_keys_by_hand():
    q, k, v, k_hat, v_hat = _two_keys()
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)  # softmax([1, 0])
    # p_hat = softmax([0, 0]) = [1/2, 1/2]; o = [p0, p1, 0, 0], o_hat = [1/2, 1/2, 0, 0]
    cos = (0.5 * p0 + 0.5 * p1) / (math.hypot(p0, p1) * math.sqrt(0.5))
    tv = 0.5 * (abs(p0 - 0.5) + abs(p1 - 0.5))
    # tokens_q 1 < tokens_k 2: causal or not, the one query (position 1) sees both keys.
    for causal in (False, True):
        stats = at.attention_fidelity(q, k, v, k_hat, v_hat, causal=causal)
        assert stats.rows == 1
        assert stats.cosine_mean == pytest.approx(cos, abs=1e-7)
        assert stats.cosine_p1 == pytest.approx(cos, abs=1e-7)
        assert stats.tv_mean == pytest.approx(tv, abs=1e-7)
        assert stats.tv_max == pytest.approx(tv, abs=1e-7)
        assert stats.top8_agreement == 1.0  # two visible keys: both top sets are {0, 1}


def test_two_keys_causal_first_row_sees_one_key():
    q, k, v, k_hat, v_hat = _two_keys()
    q2 = np.concatenate([q, q], axis=2)  # positions 0 and 1
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    cos1 = 0.5 / (math.hypot(p0, p1) * math.sqrt(0.5))
    stats = at.attention_fidelity(q2, k, v, k_hat, v_hat, causal=True)
    # Row 0 sees key 0 only: p = p_hat = [1], o = o_hat = v[0] -> cosine 1, TV 0.
    np.testing.assert_allclose(stats.cosines, [1.0, cos1], atol=1e-7)
    assert stats.tv_mean == pytest.approx((0.0 + (p0 - 0.5)) / 2, abs=1e-7)
    assert stats.cosine_min == pytest.approx(cos1, abs=1e-7)


def test_top8_disjoint_and_half():
    # 16 keys with scores proportional to j; K_hat reverses them, so the top 8 are disjoint.
    n, d = 16, 4
    q = np.zeros((1, 1, 1, d))
    q[..., 0] = math.sqrt(d)
    k = np.zeros((1, 1, n, d))
    k[0, 0, :, 0] = np.arange(n) * 0.5
    v = np.random.default_rng(0).standard_normal((1, 1, n, d))
    reversed_k = k[:, :, ::-1].copy()
    assert at.attention_fidelity(q, k, v, reversed_k, v, causal=False).top8_agreement == 0.0
    # Swap keys 4..11 pairwise around the middle: the top 8 {8..15} become {4..7, 12..15}.
    swapped = k.copy()
    swapped[0, 0, 4:12, 0] = k[0, 0, 4:12, 0][::-1]
    assert at.attention_fidelity(q, k, v, swapped, v, causal=False).top8_agreement == 0.5


@pytest.mark.parametrize("causal", [False, True])
def test_top8_ties_break_to_lowest_index_like_the_reference(causal):
    q, k, v, _, v_hat = _layer(10, tokens_q=20, tokens_k=30)
    flat = np.zeros_like(k)  # uniform weights with K_hat: every row ties at its 8th weight
    loud = k * 400.0  # float32 weights underflow to 0 beyond the first few keys of a row
    for keys, k_hat in ((k, flat), (loud, k), (loud, flat)):
        fast = at.attention_fidelity(q, keys, v, k_hat, v_hat, causal=causal, budget_bytes=3000)
        ref = at.attention_fidelity_direct(q, keys, v, k_hat, v_hat, causal=causal)
        assert fast.top8_agreement == pytest.approx(ref.top8_agreement, abs=1e-12)
        assert fast.tv_mean == pytest.approx(ref.tv_mean, abs=1e-6)
    # Scaling the keys keeps every row's ranking: ranked by score, top-8 agrees fully.
    assert at.attention_fidelity(q, loud, v, k, v, causal=causal).top8_agreement == 1.0


def test_zero_vector_cosine_convention():
    q, k, v, k_hat, _ = _two_keys()
    zero = np.zeros_like(v)
    assert at.attention_fidelity(q, k, zero, k_hat, zero, causal=False).cosine_mean == 1.0
    assert at.attention_fidelity(q, k, zero, k_hat, v, causal=False).cosine_mean == 0.0
    assert at.attention_fidelity_direct(q, k, zero, k_hat, zero, causal=False).cosine_mean == 1.0


# --- GQA -----------------------------------------------------------------------------------------
def test_gqa_only_the_group_of_a_bad_kv_head_is_affected():
    q, k, v, _, _ = _layer(4, batch=1, query_heads=4, kv_heads=2)
    k_hat, v_hat = k.copy(), v.copy()
    rng = np.random.default_rng(9)
    k_hat[:, 1] = rng.standard_normal(k_hat[:, 1].shape)
    v_hat[:, 1] = rng.standard_normal(v_hat[:, 1].shape)
    stats = at.attention_fidelity(q, k, v, k_hat, v_hat, causal=True, budget_bytes=2000)
    per_head = stats.cosines.reshape(1, 4, 24)
    np.testing.assert_allclose(per_head[0, :2], 1.0, atol=1e-6)  # heads 0, 1 read KV head 0
    assert (per_head[0, 2:].mean(axis=-1) < 0.9).all()  # heads 2, 3 read KV head 1


# --- proxy and merge -----------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_proxy_is_attention_with_keys_as_queries(causal):
    _, k, v, k_hat, v_hat = _layer(5)
    proxy = at.key_self_attention_proxy(k, v, k_hat, v_hat, causal=causal, budget_bytes=5000)
    plain = at.attention_fidelity(k, k, v, k_hat, v_hat, causal=causal)
    assert proxy.proxy and not plain.proxy
    _assert_close(proxy, plain, tol=1e-7)  # float32 scores, other block shapes: rounding differs
    assert proxy.rows == 2 * 2 * 40


def test_merge_equals_measuring_together():
    layer = _layer(6)
    together = at.attention_fidelity(*layer, causal=True)
    parts = [at.attention_fidelity(*(a[b:b + 1] for a in layer), causal=True) for b in range(2)]
    merged = at.FidelityStats.merge(parts)
    _assert_close(merged, together, tol=1e-12)
    assert merged.cosine_p1 == np.percentile(np.concatenate([p.cosines for p in parts]), 1)
    with pytest.raises(UsageError):
        at.FidelityStats.merge([])


@pytest.mark.parametrize("causal", [False, True])
def test_cosine_only_gives_the_same_cosines_and_no_tails(causal):
    layer = _layer(7, tokens_q=24, tokens_k=40)
    full = at.attention_fidelity(*layer, causal=causal, budget_bytes=5 * 40 * at.BYTES_PER_SCORE)
    only = at.attention_fidelity(*layer, causal=causal, budget_bytes=5 * 40 * at.BYTES_PER_SCORE,
                                 cosine_only=True)
    np.testing.assert_array_equal(only.cosines, full.cosines)  # the same arithmetic, bit for bit
    assert (only.cosine_mean, only.cosine_p1) == (full.cosine_mean, full.cosine_p1)
    assert (only.tv_mean, only.tv_max, only.top8_agreement) == (None,) * 3
    assert only.tails == (None,) * 3
    assert None not in full.tails and full.top8_agreement < 1  # the layer has something to rank
    proxy = at.key_self_attention_proxy(*layer[1:], causal=causal, cosine_only=True)
    assert proxy.proxy and proxy.tv_mean is None
    # a merge with one part lacking them has none (not the other part's alone)
    merged = at.FidelityStats.merge([full, only])
    assert merged.tv_mean is None and merged.rows == 2 * full.rows
    assert at.FidelityStats.merge([full, full]).tv_mean == pytest.approx(full.tv_mean)


@pytest.mark.parametrize("causal", [False, True])
def test_a_reference_gives_the_same_cosines_and_is_what_gets_read(causal):
    q, k, v, k_hat, v_hat = _layer(8, tokens_q=24, tokens_k=40)
    budget = 5 * 40 * at.BYTES_PER_SCORE  # several blocks per group
    ref = at.Reference()
    first = at.attention_fidelity(q, k, v, k_hat, v_hat, causal=causal, budget_bytes=budget,
                                  cosine_only=True, reference=ref)
    assert ref.outputs is not None and ref.outputs.shape == (2, 4, 24, 16)
    plain = at.attention_fidelity(q, k, v, k_hat, v_hat, causal=causal, budget_bytes=budget,
                                  cosine_only=True)
    np.testing.assert_array_equal(first.cosines, plain.cosines)
    # another reconstruction of the same layer, scored against the kept outputs
    other = (k + 0.5, v * 0.7)
    again = at.attention_fidelity(q, k, v, *other, causal=causal, budget_bytes=budget,
                                  cosine_only=True, reference=ref)
    np.testing.assert_array_equal(
        again.cosines, at.attention_fidelity(q, k, v, *other, causal=causal, budget_bytes=budget,
                                             cosine_only=True).cosines)
    # the kept outputs are what is read: outputs of other K, V give other cosines
    wrong = at.Reference()
    at.attention_fidelity(q, k_hat, v_hat, k_hat, v_hat, causal=causal, budget_bytes=budget,
                          cosine_only=True, reference=wrong)
    misled = at.attention_fidelity(q, k, v, *other, causal=causal, budget_bytes=budget,
                                   cosine_only=True, reference=wrong)
    assert not np.array_equal(misled.cosines, again.cosines)


def test_a_reference_is_refused_where_it_cannot_serve():
    q, k, v, k_hat, v_hat = _layer(9)
    ref = at.Reference()
    with pytest.raises(UsageError, match="without TV"):
        at.attention_fidelity(q, k, v, k_hat, v_hat, causal=True, reference=ref)
    assert ref.outputs is None
    at.attention_fidelity(q, k, v, k_hat, v_hat, causal=True, cosine_only=True, reference=ref)
    with pytest.raises(UsageError, match="cannot serve"):
        at.attention_fidelity(q[:, :, :5], k, v, k_hat, v_hat, causal=True, cosine_only=True,
                              reference=ref)
    with pytest.raises(UsageError, match="no top-8 keys"):  # filled for the cosine alone
        at.attention_fidelity(q, k, v, k_hat, v_hat, causal=True, total_variation=False,
                              reference=ref)


@pytest.mark.parametrize("causal", [False, True])
def test_a_reference_without_tv_keeps_top8_to_the_bit_ties_included(causal):
    # sweep's case: cosine and top-8, no TV. The kept top-8 keys must give the agreement the
    # original's mask gives, ties broken to the lowest index as there (flat K_hat: every row
    # ties at its 8th weight; loud keys: weights underflow, ranked by score)
    q, k, v, k_hat, v_hat = _layer(10, tokens_q=20, tokens_k=30)
    flat, loud = np.zeros_like(k), k * 400.0
    for keys, first_hat in ((k, k_hat), (loud, flat), (flat, loud)):
        ref = at.Reference()
        for other in (first_hat, flat, k + 0.3, loud):
            full = at.attention_fidelity(q, keys, v, other, v_hat, causal=causal,
                                         budget_bytes=3000)
            kept = at.attention_fidelity(q, keys, v, other, v_hat, causal=causal,
                                         budget_bytes=3000, total_variation=False,
                                         reference=ref)
            assert ref.top is not None and kept.tv_mean is None and kept.tv_max is None
            np.testing.assert_array_equal(kept.cosines, full.cosines)
            assert kept.top8_agreement == full.top8_agreement


# --- memory --------------------------------------------------------------------------------------
def test_plan_blocks_for_32k_tokens():
    tokens, budget = 32768, 64 * 2**20
    heads, chunk = at.plan_blocks(1, tokens, tokens, budget_bytes=budget)
    assert heads == 1 and 1 <= chunk < tokens
    assert heads * chunk * tokens * at.BYTES_PER_SCORE <= budget
    assert (chunk + 1) * tokens * at.BYTES_PER_SCORE > budget  # the budget is used, not wasted
    heads, chunk = at.plan_blocks(4, tokens, tokens, budget_bytes=budget)
    assert heads == 4 and heads * chunk * tokens * at.BYTES_PER_SCORE <= budget
    assert at.plan_blocks(4, tokens, tokens, budget_bytes=budget, query_chunk=3) == (4, 3)
    assert at.plan_blocks(4, 5, 10, budget_bytes=budget) == (4, 5)  # never beyond tokens_q
    assert at.plan_blocks(4, 5, 10, budget_bytes=2 * 10 * at.BYTES_PER_SCORE) == (2, 1)
    with pytest.raises(ResourceError, match="below one score row"):
        at.plan_blocks(1, tokens, tokens, budget_bytes=tokens * at.BYTES_PER_SCORE - 1)
    with pytest.raises(UsageError):
        at.plan_blocks(1, tokens, tokens, budget_bytes=budget, query_chunk=0)


def test_long_context_memory_is_bounded():
    tokens_k, tokens_q, d = 32768, 256, 64
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 1, tokens_q, d), dtype=np.float32).astype(np.float16)
    k, v = (rng.standard_normal((1, 1, tokens_k, d), dtype=np.float32).astype(np.float16)
            for _ in range(2))
    k_hat = (k + np.float16(0.05)).astype(np.float16)
    v_hat = (v * np.float16(0.98)).astype(np.float16)
    tracemalloc.start()
    try:
        stats = at.attention_fidelity(q, k, v, k_hat, v_hat, causal=True,
                                      budget_bytes=64 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.rows == tokens_q
    assert stats.cosine_mean > 0.99
    assert peak < 300 * 2**20, peak  # a full score matrix would be 32768**2 * 4 bytes = 4 GiB
    # The budget, plus the float32 copies of one KV head's K, V, K_hat, V_hat, plus slack.
    assert peak < 64 * 2**20 + 4 * tokens_k * d * 4 + 8 * 2**20, peak


# --- validation ----------------------------------------------------------------------------------
def test_rejects_bad_inputs():
    q, k, v, k_hat, v_hat = _layer(8, query_heads=4, kv_heads=2)
    with pytest.raises(InvalidInputError, match="not a multiple of kv_heads"):
        at.attention_fidelity(q[:, :3], k, v, k_hat, v_hat, causal=False)
    with pytest.raises(InvalidInputError, match="k_hat: expected shape"):
        at.attention_fidelity(q, k, v, k_hat[:, :, :5], v_hat, causal=False)
    with pytest.raises(InvalidInputError, match="tokens_q <= tokens_k"):
        at.attention_fidelity(np.concatenate([q, q], axis=2), k, v, k_hat, v_hat, causal=True)
    with pytest.raises(InvalidInputError, match="4-D"):
        at.attention_fidelity(q[0], k, v, k_hat, v_hat, causal=False)
    with pytest.raises(InvalidInputError, match="float dtype"):
        at.attention_fidelity(q, k.astype(np.int32), v, k_hat, v_hat, causal=False)
    bad = v_hat.copy()
    bad[1, 1, 3, 2] = np.nan
    with pytest.raises(InvalidInputError, match="v_hat: holds NaN"):
        at.attention_fidelity(q, k, v, k_hat, bad, causal=False)
