"""The fast nearest-codeword searchers against the brute-force reference.

Exact searchers (GridSearcher, MatmulSearcher(exact=True)) must equal ``nearest_bruteforce``
on every block, ties to the lowest index included; the near-exact ones (MatmulSearcher's
default float32 path, PivotSearcher) must agree on >= 99.9% of blocks and reach a distortion
within 0.5% of the exact one.
"""

import pickle

import numpy as np
import pytest

from fibquant_cli.core import fastsearch as fs
from fibquant_cli.core import search
from fibquant_cli.core.codebook import initial_codebook, nearest_bruteforce
from fibquant_cli.core.codec import FibQuantizer, default_rotation, row_norms
from fibquant_cli.core.params import Profile
from fibquant_cli.core.pivots import PivotSearcher
from fibquant_cli.core.source import sample_canonical
from fibquant_cli.storage.codebook_cache import load_or_build

SHIPPED_K2 = [(64, 16), (64, 64), (64, 256), (128, 256)]  # (d, N) at k = 2
SHIPPED_GENERAL = [(64, 4, 256), (64, 8, 256), (64, 8, 16), (64, 32, 128)]  # (d, k, N)


def reference(y: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """nearest_bruteforce over chunks of rows (it has no memory bound of its own)."""
    rows = max(1, 2**22 // codebook.size)
    return np.concatenate([nearest_bruteforce(y[a:a + rows], codebook)
                           for a in range(0, len(y), rows)])


def mse(y: np.ndarray, codebook: np.ndarray, codes: np.ndarray) -> float:
    diff = y.astype(np.float64) - codebook[codes]
    return float(np.einsum("ij,ij->", diff, diff)) / len(y)


def assert_near_exact(y, codebook, codes):
    ref = reference(y, codebook)
    assert codes.dtype == np.uint32 and codes.shape == (len(y),)
    assert np.mean(codes == ref) >= 0.999
    assert mse(y, codebook, codes) <= 1.005 * mse(y, codebook, ref)


def blocks(d: int, k: int, n: int, seed: int) -> np.ndarray:
    """Fresh canonical-source blocks as the codec hands them over: float32."""
    return sample_canonical(d, k, n, np.random.default_rng([seed, d, k])).astype(np.float32)


@pytest.fixture(scope="module")
def shipped():
    cache = {}

    def get(d, k, n):
        if (d, k, n) not in cache:
            cache[(d, k, n)] = load_or_build(Profile(d, k, n))[0]
        return cache[(d, k, n)]

    return get


# --- GridSearcher (k = 2): exact --------------------------------------------------------------
@pytest.mark.parametrize("d,n", SHIPPED_K2)
def test_grid_equals_bruteforce_on_canonical_blocks(shipped, d, n):
    cb = shipped(d, 2, n)
    y = blocks(d, 2, 100_000, seed=1)
    np.testing.assert_array_equal(fs.GridSearcher(cb).nearest(y), reference(y, cb))


@pytest.mark.parametrize("side", [32, 1024])  # 32: most blocks fall in mixed cells
def test_grid_equals_bruteforce_off_the_grid_and_at_zero(shipped, side):
    cb = shipped(64, 2, 64)
    searcher = fs.GridSearcher(cb, side=side)
    rng = np.random.default_rng(2)
    reach = -searcher.lo
    y = np.concatenate([
        rng.uniform(-1.0, 1.0, (20_000, 2)),              # the whole unit square
        rng.uniform(-3.0, 3.0, (5_000, 2)),               # far outside any block's range
        reach * np.array([[1, 0], [0, 1], [-1, 0], [1, 1], [-1, -1]]),  # on the grid's rim
        np.zeros((3, 2)),
    ]).astype(np.float32)
    codes = searcher.nearest(y)
    np.testing.assert_array_equal(codes, reference(y, cb))
    assert codes[-1] == reference(np.zeros((1, 2)), cb)[0]


def test_grid_lists_are_short_and_most_cells_pure(shipped):
    searcher = fs.GridSearcher(shipped(64, 2, 256))
    assert searcher.pure_fraction > 0.95
    assert searcher.mixed_cand.shape[1] <= 8
    assert searcher.table.nbytes <= fs.BUDGET_BYTES


def tie_codebook() -> np.ndarray:
    """Codewords on a dyadic lattice, in scrambled order, with a duplicate: many exact ties."""
    g = np.arange(-3, 4) / 8.0
    lattice = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    lattice = lattice[np.random.default_rng(3).permutation(len(lattice))]
    return np.concatenate([lattice, lattice[5:6]])  # the last one duplicates index 5


def tie_points() -> np.ndarray:
    """Midpoints and cell centres of the lattice: equidistant from 2 or 4 codewords."""
    h = np.arange(-7, 8) / 16.0
    return np.stack(np.meshgrid(h, h, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)


@pytest.mark.parametrize("make", [fs.GridSearcher, lambda cb: fs.MatmulSearcher(cb, exact=True)],
                         ids=["grid", "matmul-exact"])
def test_exact_searchers_break_ties_to_the_lowest_index(make):
    cb = tie_codebook()
    y = tie_points()
    codes = make(cb).nearest(y)
    np.testing.assert_array_equal(codes, reference(y, cb))
    # Direct check of the rule, independent of the reference's own argmin.
    dist = ((y[:, None, :].astype(np.float64) - cb[None]) ** 2).sum(-1)
    lowest = np.array([np.flatnonzero(row == row.min())[0] for row in dist])
    np.testing.assert_array_equal(codes, lowest)
    assert len(cb) - 1 not in codes  # the duplicate of index 5 never wins


def test_lazy_grid_gives_the_same_codes_before_and_after_building(shipped, monkeypatch):
    monkeypatch.setattr(fs, "LAZY_GRID_WORK", 2**20)  # build after 4096 blocks of 256 words
    monkeypatch.setattr(fs, "LAZY_GRID_BLOCKS", 1)
    cb = shipped(64, 2, 256)
    searcher = search.make_searcher(cb)
    assert isinstance(searcher, fs.GridSearcher) and searcher.table is None
    y = blocks(64, 2, 20_000, seed=4)
    small = searcher.nearest(y[:1000])
    assert searcher.table is None  # 1000 blocks do not pay for a table
    large = searcher.nearest(y)
    assert searcher.table is not None
    ref = reference(y, cb)
    np.testing.assert_array_equal(small, ref[:1000])
    np.testing.assert_array_equal(large, ref)


def test_grid_on_a_large_codebook_and_a_tiny_one():
    for cb in (initial_codebook(64, 2, 2048), initial_codebook(64, 2, 2)):
        y = blocks(64, 2, 10_000, seed=11)
        np.testing.assert_array_equal(fs.GridSearcher(cb).nearest(y), reference(y, cb))


# --- MatmulSearcher (any k) ---------------------------------------------------------------------
@pytest.mark.parametrize("d,k,n", SHIPPED_GENERAL)
def test_matmul_exact_equals_bruteforce(shipped, d, k, n):
    cb = shipped(d, k, n)
    y = blocks(d, k, 200_000 // k, seed=5)
    np.testing.assert_array_equal(fs.MatmulSearcher(cb, exact=True).nearest(y), reference(y, cb))


@pytest.mark.parametrize("d,k,n", SHIPPED_GENERAL)
def test_matmul_float32_is_near_exact(shipped, d, k, n):
    cb = shipped(d, k, n)
    y = blocks(d, k, 200_000 // k, seed=6)
    assert_near_exact(y, cb, fs.MatmulSearcher(cb).nearest(y))


def test_matmul_handles_zero_blocks_and_empty_input(shipped):
    cb = shipped(64, 4, 256)
    for exact in (False, True):
        searcher = fs.MatmulSearcher(cb, exact=exact)
        zero = searcher.nearest(np.zeros((7, 4), np.float32))
        np.testing.assert_array_equal(zero, reference(np.zeros((7, 4)), cb))
        assert searcher.nearest(np.zeros((0, 4), np.float32)).shape == (0,)


def test_float64_reference_walks_the_codebook_in_slices(monkeypatch):
    monkeypatch.setattr(fs, "BUDGET_BYTES", 16 * 2 * 7)  # slices of 7 codewords, 1 row at once
    cb = tie_codebook()
    y = np.concatenate([tie_points(), blocks(64, 2, 500, seed=12)])
    np.testing.assert_array_equal(fs.brute_nearest_f64(y, cb), reference(y, cb))


# --- PivotSearcher (large N) --------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(4, 1024), (4, 4096), (3, 2048)])
def test_pivot_is_near_exact_on_large_codebooks(k, n):
    cb = initial_codebook(64, k, n)
    y = blocks(64, k, 10_000, seed=7)
    searcher = PivotSearcher(cb)
    assert 1 < len(searcher.pivot_index) < n
    assert_near_exact(y, cb, searcher.nearest(y))


def test_pivot_pruning_loses_no_candidate():
    # Float32 scores may only swap codewords whose distances are within rounding; on blocks
    # whose best two codewords are clearly apart the pruned search must be exact.
    cb = initial_codebook(64, 4, 1024)
    y = blocks(64, 4, 8_000, seed=8)
    dist = ((y[:, None, :].astype(np.float64) - cb[None]) ** 2).sum(-1)
    two = np.sort(dist, axis=1)[:, :2]
    clear = two[:, 1] - two[:, 0] > 1e-5
    codes = PivotSearcher(cb, pivots=64).nearest(y)
    np.testing.assert_array_equal(codes[clear], np.argmin(dist, axis=1)[clear])
    assert clear.mean() > 0.99


def test_pivot_scores_stay_precise_on_a_dense_codebook():
    # Near-duplicate codewords: origin-centred float32 scores lose ~3% of these blocks;
    # pivot-centred ones must not.
    rng = np.random.default_rng(13)
    cb = rng.standard_normal((2000, 1))
    y = rng.standard_normal((20_000, 1)).astype(np.float32)
    assert_near_exact(y, cb, PivotSearcher(cb).nearest(y))


def test_pivot_handles_zero_blocks_and_far_blocks():
    cb = initial_codebook(64, 4, 1024)
    y = np.concatenate([np.zeros((3, 4)), 5.0 * np.eye(4), -np.eye(4)]).astype(np.float32)
    np.testing.assert_array_equal(PivotSearcher(cb).nearest(y), reference(y, cb))


# --- choosing, caching, the codec ---------------------------------------------------------------
def test_make_searcher_picks_by_shape():
    assert isinstance(search.make_searcher(initial_codebook(64, 2, 64)), fs.GridSearcher)
    assert isinstance(search.make_searcher(initial_codebook(64, 4, 256)), fs.MatmulSearcher)
    assert isinstance(search.make_searcher(initial_codebook(64, 4, 1024)), PivotSearcher)
    with pytest.raises(ValueError, match="codebook"):
        search.make_searcher(np.zeros(4))


def test_make_searcher_keeps_float32_only_where_it_is_safe(shipped):
    for d, k, n in SHIPPED_GENERAL:
        assert search.make_searcher(shipped(d, k, n)).exact is False
    rng = np.random.default_rng(14)
    dense = rng.standard_normal((500, 1))  # neighbours ~1e-5 apart
    searcher = search.make_searcher(dense)
    assert searcher.exact is True
    y = rng.standard_normal((20_000, 1)).astype(np.float32)
    np.testing.assert_array_equal(searcher.nearest(y), reference(y, dense))


def test_searchers_pickle_without_their_tables(shipped):
    searcher = fs.GridSearcher(shipped(64, 2, 256))
    raw = pickle.dumps(searcher)
    assert len(raw) < 64 * 1024
    y = blocks(64, 2, 1000, seed=9)
    np.testing.assert_array_equal(pickle.loads(raw).nearest(y), searcher.nearest(y))


def test_codec_caches_one_searcher_and_encodes_exactly(shipped, monkeypatch):
    monkeypatch.setattr(fs, "LAZY_GRID_WORK", 2**20)
    monkeypatch.setattr(fs, "LAZY_GRID_BLOCKS", 1)
    profile = Profile(64, 2, 64)
    q = FibQuantizer(profile, shipped(64, 2, 64), default_rotation(profile))
    assert search.searcher_for(q) is search.searcher_for(q)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3000, 64)).astype(np.float16)
    x[0] = 0.0
    codes, _ = q.encode(x)
    assert search.searcher_for(q).table is not None
    # The codec's own float32 pipeline (one chunk of rows), then the reference search.
    nu = row_norms(x)
    u = (x.astype(np.float64) / np.where(nu > 0, nu, 1.0)[:, None]).astype(np.float32)
    y = (u @ q.rotation.T.astype(np.float32)).reshape(-1, 2)
    np.testing.assert_array_equal(codes.ravel(), reference(y, q.codebook))


def test_blocks_off_the_grid_are_searched_among_the_edge_codes_exactly():
    """Beyond the grid's square only codewords nearest to its edge (or outside it) can win:
    a few of them are searched, and the codes still equal brute force, far outliers too."""
    rng = np.random.default_rng(11)
    cb = rng.standard_normal((512, 2)) * np.array([1.0, 0.5])
    grid = fs.GridSearcher(cb, side=64, reach=1.0)  # most codewords lie beyond the square
    assert 0 < len(grid.edge_codes) < len(cb)
    y = np.concatenate([rng.standard_normal((20_000, 2)) * 3,
                        rng.standard_normal((2_000, 2)) * 1e3]).astype(np.float32)
    expected = fs.brute_nearest_f64(y.astype(np.float64), cb)
    np.testing.assert_array_equal(grid.nearest(y), expected)
    tight = fs.GridSearcher(cb * 0.1, side=64, reach=1.0)  # the codebook inside the square
    assert len(tight.edge_codes) < len(cb) // 4
    np.testing.assert_array_equal(tight.nearest(y), fs.brute_nearest_f64(y.astype(np.float64),
                                                                         cb * 0.1))
