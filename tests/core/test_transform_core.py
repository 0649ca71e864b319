"""core/transform: the coefficient quantizers, the allocator and the row codes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fibquant_cli.core import bitpack
from fibquant_cli.core import transform as T
from fibquant_cli.core.fastsearch import brute_nearest_f64


def test_lloyd_max_gaussian_matches_max_1960():
    # 1 bit: +-sqrt(2/pi) exactly; 2 bits: Max's table (0.4528, 1.510).
    one = T.lloyd_max_gaussian(2)
    assert one == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=1e-12)
    two = T.lloyd_max_gaussian(4)
    assert two[2:] == pytest.approx([0.4528, 1.5104], abs=2e-4)


def test_lloyd_max_levels_are_centroids_of_their_cells():
    y = T.lloyd_max_gaussian(16)
    edges = np.concatenate([[-np.inf], (y[1:] + y[:-1]) / 2, [np.inf]])
    cdf = np.vectorize(lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2))))
    pdf = np.vectorize(lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi))
    centroid = (pdf(edges[:-1]) - pdf(edges[1:])) / np.diff(cdf(edges))
    np.testing.assert_allclose(y, centroid, atol=1e-12)


def test_spiral_radii_are_companded_rayleigh_quantiles():
    cb = T.spiral_codebook(64)
    r = np.hypot(cb[:, 0], cb[:, 1])
    q = (np.arange(64) + 0.5) / 64
    # P(R <= r) of the variance-2 Gaussian's radius is 1 - exp(-r^2 / 4)
    np.testing.assert_allclose(1 - np.exp(-r * r / 4), q, rtol=1e-12)


def test_shipped_tables_distortion_as_recorded_on_fresh_samples():
    tab = T.tables()
    rng = np.random.default_rng(99)
    x = rng.standard_normal((200_000, 2)).astype(np.float32)
    for w in (1, 3, 6, 10, 12, 16):
        codes = T.encode_pairs(x, w)
        err = x - T.decode_pairs(codes, w)
        assert float((err * err).mean()) == pytest.approx(tab.delta[w], rel=0.03), w
    deltas = [tab.delta[w] for w in T.WIDTHS]
    assert all(a > b for a, b in zip(deltas, deltas[1:]))
    # VQ beats whole-bit scalar Lloyd-Max at the same bits (1 bit per component: 0.3634)
    assert tab.delta[2] < 0.3634 and tab.delta[6] < 0.03454


def test_vq_codes_are_the_nearest_codewords():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((20_000, 2)).astype(np.float32)
    for w in (1, 2, 3, 5, 8, 10):
        ref = brute_nearest_f64(y.astype(np.float64), T.tables().vq[w].astype(np.float64))
        got = T.encode_pairs(y, w)
        cb = T.tables().vq[w].astype(np.float64)
        d_ref = ((y - cb[ref]) ** 2).sum(1)
        d_got = ((y - cb[got]) ** 2).sum(1)
        np.testing.assert_allclose(d_got, d_ref, rtol=0, atol=1e-6)  # ties may pick either


@pytest.mark.parametrize("width", T.WIDTHS[1:])
def test_decode_range_equals_unpacking_code_by_code(width):
    """Several codes per table lookup, the same coefficients as one by one: aligned and
    unaligned starts, and stream ends that stop inside a lookup (padded)."""
    rng = np.random.default_rng(width)
    for n in (4096 * 3, 8 * 37 + 5, 1):
        ids = rng.integers(0, 2**width, n, dtype=np.uint32)
        stream = bitpack.pack(ids, width)
        for start, stop in ((0, n), (n // 3, n), (0, n - n // 4), (1, n), (n - 1, n)):
            if start >= stop:
                continue
            expected = T.decode_pairs(ids[start:stop], width)
            got = T.decode_range(stream, width, start, stop)
            assert got.dtype == np.float32 and got.shape == (stop - start, 2)
            np.testing.assert_array_equal(got, expected)


def test_hull_drops_points_above_the_chord():
    delta = {0: 1.0, 1: 0.9, 2: 0.3, 3: 0.2, 4: 0.05}
    # (1, 0.9) lies above the chord (0, 1) -> (2, 0.3); (3, 0.2) above (2, 0.3) -> (4, 0.05)
    assert T.hull_widths(delta) == [0, 2, 4]


def _objective(variances, weights, widths, delta):
    return sum(w * sum((v[2 * p] + v[2 * p + 1]) * delta[x] for p, x in enumerate(ws))
               for v, w, ws in zip(variances, weights, widths))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_against_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    delta = {w: 2.0 ** (-1.8 * w) * (1 + 0.1 * w) for w in range(6)}  # convex, unit steps
    delta[0] = 1.0
    assert T.hull_widths(delta) == list(range(6))
    variances = [np.sort(rng.gamma(1.0, size=4))[::-1] for _ in range(2)]
    weights = list(rng.uniform(0.2, 3.0, size=2))
    budget = int(rng.integers(1, 14))
    got = T.allocate(variances, weights, budget, delta)
    assert sum(map(sum, got)) <= budget
    best = min(_objective(variances, weights, (c[:2], c[2:]), delta)
               for c in itertools.product(range(6), repeat=4) if sum(c) <= budget)
    assert _objective(variances, weights, got, delta) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_steps_priced_with_opening_costs_are_lagrangian_optimal(seed):
    """With a cost per opened pair (an embedded basis' columns), every prefix of the steps
    minimises distortion + lambda * bits over all allocations, opening costs counted, at the
    lambda of its last step: no choice of widths, hull or not, does better at that price."""
    rng = np.random.default_rng(seed)
    delta = {w: 2.0 ** (-1.8 * w) * (1 + 0.1 * w) for w in range(6)}
    delta[0] = 1.0
    variances = [np.sort(rng.gamma(1.0, size=4))[::-1] for _ in range(2)]
    weights = list(rng.uniform(0.2, 3.0, size=2))
    open_bits = list(rng.uniform(0.5, 6.0, size=2))
    steps = T.greedy_steps(variances, weights, delta, open_bits)
    assert any(t > 1 for s_, t in zip(steps.step, steps.to) if s_ == 0)  # a jump at opening

    def cost_and_distortion(widths):
        bits = sum(w + (f if w else 0) for ws, f in zip(widths, open_bits) for w in ws)
        return bits, _objective(variances, weights, widths, delta)

    for k in range(1, len(steps) + 1):
        m = int(steps.pair[k - 1] >= 2)
        p, lo, to = int(steps.pair[k - 1]) - 2 * m, int(steps.step[k - 1]), int(steps.to[k - 1])
        pv = weights[m] * (variances[m][2 * p] + variances[m][2 * p + 1])
        price = pv * (delta[lo] - delta[to]) / (to - lo + (open_bits[m] if lo == 0 else 0))
        got_bits, got = cost_and_distortion(steps.widths(k))
        best = min(d + price * b for b, d in (
            cost_and_distortion((c[:2], c[2:])) for c in itertools.product(range(6), repeat=4)))
        assert got + price * got_bits <= best + 1e-12


def test_allocation_moves_bits_to_the_heavier_weight():
    var = [np.ones(8), np.ones(8)]
    light, heavy = T.allocate(var, [1.0, 100.0], 24)
    assert sum(heavy) > sum(light)


def _layout_and_data(rows=1000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((rows, d)).astype(np.float32)
    c[17, 3] = 9.5   # exceptions: in a coded pair
    c[400, 0] = -6.25
    c[5, 15] = 30.0  # in a dropped pair: not an exception (decodes as 0)
    layout = T.RowLayout((10, 6, 6, 3, 1, 14, 2, 0), rows)
    return c, layout


def test_rows_round_trip_exactly_as_their_codes_say():
    c, layout = _layout_and_data()
    codes, pos, val = T.encode_rows(c, layout)
    assert codes.size == layout.code_bytes
    out = T.decode_rows(codes, pos, val, layout, c.shape[1])
    # every coded pair decodes to its nearest codeword (or scalar levels), except exceptions
    for width, idx, _, _ in layout.groups:
        cols = np.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)
        expect = T.decode_pairs(T.encode_pairs(c[:, cols], width), width).reshape(len(c), -1)
        big = np.abs(c[:, cols]) > T.TAU
        np.testing.assert_array_equal(out[:, cols][~big], expect[~big])
    assert out[17, 3] == np.float16(9.5) and out[400, 0] == np.float16(-6.25)
    assert np.all(out[:, 14:] == 0)  # the dropped pair
    assert set(pos.tolist()) >= {17 * 16 + 3, 400 * 16 + 0}
    assert 5 * 16 + 15 not in set(pos.tolist())


def test_random_access_rows_equal_the_full_decode():
    c, layout = _layout_and_data(seed=1)
    codes, pos, val = T.encode_rows(c, layout)
    full = T.decode_rows(codes, pos, val, layout, c.shape[1])
    for r0, r1 in ((0, 1), (17, 18), (399, 401), (3, 999), (0, 1000)):
        part = T.decode_rows(codes, pos, val, layout, c.shape[1], r0, r1)
        np.testing.assert_array_equal(part, full[r0:r1])


def test_shipped_search_grids_are_what_a_build_makes():
    from fibquant_cli.core.fastsearch import GridSearcher

    for width in range(1, T.VQ_MAX_WIDTH + 1):
        cb, reach = T.grid_codebook(width)
        shipped = T.shipped_grid(width, cb, reach)
        assert shipped is not None, f"width {width}: rerun scripts/search_grids.py"
        table, lists = GridSearcher(cb, side=T.SEARCH_GRID_SIDE, reach=reach,
                                    lazy=True).refined()
        np.testing.assert_array_equal(shipped[0], table)
        np.testing.assert_array_equal(shipped[1], lists)


def test_a_grid_made_for_other_arguments_is_not_used(monkeypatch):
    from fibquant_cli.core.fastsearch import GridSearcher

    shipped = T.shipped_grid(3, *T.grid_codebook(3))
    monkeypatch.setattr(T, "SEARCH_GRID_SIDE", 128)
    monkeypatch.setattr(T, "_SEARCHERS", {})
    assert T.shipped_grid(3, *T.grid_codebook(3)) is None  # its key names side 256
    y = np.random.default_rng(5).standard_normal((20_000, 2)).astype(np.float32) * 2
    searcher = T._searcher(3)
    assert searcher.side == 128
    np.testing.assert_array_equal(searcher.nearest(y),
                                  brute_nearest_f64(y.astype(np.float64), T.tables().vq[3]
                                                    .astype(np.float64)))
    cb, reach = T.grid_codebook(3)
    with pytest.raises(ValueError, match="do not fit"):  # a 256-side grid on a 128 side
        GridSearcher(cb, side=128, reach=reach, refined=shipped)


def test_grouped_tables_are_made_once_per_codebook():
    shipped = T.tables()
    again = T.Tables({w: t.copy() for w, t in shipped.vq.items()}, shipped.scalar, {})
    assert again.grouped(3) is shipped.grouped(3)  # a file's copy of the shipped tables
    other = T.Tables({3: shipped.vq[3] * 2}, {}, {})
    np.testing.assert_array_equal(other.grouped(3), shipped.grouped(3) * 2)
    assert not shipped.grouped(3).flags.writeable
