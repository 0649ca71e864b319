"""Transform coding of token rows: coefficient quantizers, rate allocation, exceptions.

The numeric core of the transform codec (docs/transform.md; ``../shared/TRANSFORM_CODING.md``
has the prototype it grew from). A matrix is the tokens of one layer and role, one row per
token: the concatenated KV heads, keys with RoPE undone. Projected on a basis and divided by
their standard deviations, its coefficients are close to unit Gaussians; this module codes
such normalised coefficients.

Glossary
--------
pair        components (2j, 2j + 1) of a row: the unit a width is given to. Components come
            ordered by decreasing variance, so a pair holds two of similar variance.
width       bits spent on one pair of one row: 0 (the pair is dropped: decoded as 0, the
            mean), 1..``VQ_MAX_WIDTH`` (the index of the nearest of the ``2**width`` codewords
            of a 2-D Gaussian codebook: FibQuant's radial-angular spiral refined by Lloyd),
            or an even width above that (two Lloyd-Max scalar indices of ``width / 2`` bits,
            first component in the high bits). ``WIDTHS`` lists them.
delta       ``DELTA[w]``: mean squared error per component of unit Gaussians coded at width
            ``w`` (1 at width 0); what the allocator trades against bits.
exception   a coefficient of a coded pair with ``|c| > TAU``: outside every codebook's reach,
            clipping it would cost ``(|c| - reach)**2``. Real caches have such outliers on the
            tokens attention looks at (prototype: cosine 0.93 -> 1.0 at 8 bits per value once
            they were kept), so they are stored exactly beside the codes, by flat position.
stream      the codes of one width: ``rows * pairs_of_that_width`` indices bit-packed
            (``core/bitpack``) in row-major order, so rows ``[r0, r1)`` are one contiguous
            range of indices: random access by token.

Allocation (``allocate``) is greedy over the lower convex hull of ``DELTA``: every step gives
the next hull width to the pair whose weighted distortion falls most per bit, across every
matrix at once. For convex distortion-rate curves this is optimal for the budget it ends at
(the classical result of Shoham and Gersho 1988); weights say what a unit of each matrix's
squared error costs (its measured sensitivity), so no layer is starved because its values
are small.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.core import bitpack

VQ_MAX_WIDTH = 10
SCALAR_WIDTHS = (12, 14, 16)
WIDTHS = tuple(range(VQ_MAX_WIDTH + 1)) + SCALAR_WIDTHS
SEARCH_GRID_SIDE = 256
SEARCH_FINE = 3.0  # standard deviations the lookup grid covers at least
TAU = 4.0  # |coefficient| above which a coded coefficient is an exception (stored exactly)
TABLES_PATH = Path(__file__).resolve().parent.parent / "codebooks" / "gauss_v1.npz"
GRIDS_PATH = TABLES_PATH.with_name("gauss_v1_grids.npz")  # scripts/search_grids.py


# --------------------------------------------------------------------------- the quantizers


@dataclass(frozen=True)
class Tables:
    """The coefficient quantizers: ``vq[w]`` (2**w, 2) and ``scalar[b]`` (2**b,) ascending,
    float32 as stored in files, and ``delta[w]`` per width (measured on unit Gaussians)."""

    vq: dict[int, np.ndarray]
    scalar: dict[int, np.ndarray]
    delta: dict[int, float]

    @functools.cached_property
    def _grouped(self) -> dict[int, np.ndarray]:
        return {}

    def grouped(self, width: int) -> np.ndarray:
        """(2**(m * width), 2 * m) float32, m = ``codes_per_lookup(width)``: the codewords of
        m consecutive codes, indexed by their m * width bits read as one number (the packed
        stream's order: the first code in the lowest bits)."""
        table = self._grouped.get(width)
        if table is None:
            table = _grouped_table(width, np.ascontiguousarray(self.vq[width]).tobytes())
            self._grouped[width] = table
        return table

    @classmethod
    def from_npz(cls, data) -> Tables:
        vq = {w: np.asarray(data[f"vq{w}"], dtype=np.float32) for w in range(1, VQ_MAX_WIDTH + 1)}
        scalar = {w // 2: np.asarray(data[f"scalar{w // 2}"], dtype=np.float32)
                  for w in SCALAR_WIDTHS}
        delta = dict(zip(WIDTHS, (float(x) for x in data["delta"])))
        return cls(vq, scalar, delta)


@functools.lru_cache(maxsize=64)
def _grouped_table(width: int, codebook: bytes) -> np.ndarray:
    """``Tables.grouped`` of the float32 codebook with these bytes, made once per process:
    every file carries its tables, mostly the shipped ones, and making the six grouped tables
    again took 1.3 ms of every decode. Read-only: files share it."""
    vq = np.frombuffer(codebook, dtype=np.float32).reshape(-1, 2)
    m, mask = codes_per_lookup(width), (1 << width) - 1
    index = np.arange(1 << (m * width))
    codes = np.stack([(index >> (j * width)) & mask for j in range(m)], axis=1)
    table = np.ascontiguousarray(vq[codes].reshape(len(index), 2 * m))
    table.flags.writeable = False
    return table


@functools.cache
def tables() -> Tables:
    """The shipped tables (``scripts/gauss_codebooks.py`` made them; tests check them)."""
    with np.load(TABLES_PATH) as data:
        return Tables.from_npz(data)


def spiral_codebook(n: int) -> np.ndarray:
    """FibQuant's k = 2 radial-angular codebook for a unit 2-D Gaussian, (n, 2) float64.

    Radii at the quantiles (i + 1/2)/n of the companded law: the MSE-optimal point density is
    p**(k/(k+2)) = exp(-|x|**2 / 4), a Gaussian of variance 2, whose radius is Rayleigh:
    r_i = sqrt(-4 ln(1 - q_i)). Angles 2 pi i (1 - 1/phi) (golden). Lloyd then refines it.
    """
    q = (np.arange(n, dtype=np.float64) + 0.5) / n
    r = np.sqrt(-4.0 * np.log1p(-q))
    golden = (1.0 + 5.0 ** 0.5) / 2.0
    a = 2.0 * np.pi * np.arange(n, dtype=np.float64) * (1.0 - 1.0 / golden)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def lloyd_max_gaussian(levels: int, iterations: int = 2000) -> np.ndarray:
    """The Lloyd-Max quantizer of a unit Gaussian with ``levels`` levels, (levels,) float64.

    Exact centroid steps: a cell [a, b] has mass Phi(b) - Phi(a) and first moment
    phi(a) - phi(b), so each level moves to their ratio; edges are midpoints.
    """
    from math import erf, exp, pi, sqrt

    cdf = np.vectorize(lambda x: 0.5 * (1.0 + erf(x / sqrt(2.0))))
    pdf = np.vectorize(lambda x: exp(-0.5 * x * x) / sqrt(2.0 * pi))
    y = np.linspace(-3.0, 3.0, levels)
    for _ in range(iterations):
        edges = np.concatenate([[-np.inf], (y[1:] + y[:-1]) / 2.0, [np.inf]])
        mass = np.diff(cdf(edges))
        moment = pdf(edges[:-1]) - pdf(edges[1:])
        y_new = moment / mass
        if np.max(np.abs(y_new - y)) < 1e-13:
            return y_new
        y = y_new
    return y


# --------------------------------------------------------------------------- coding


def _scalar_codes(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    edges = (levels[1:] + levels[:-1]) / 2.0
    return np.searchsorted(edges, x).astype(np.uint32)


_SEARCHERS: dict[int, object] = {}
_SEARCHER_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _searcher(width: int):
    """The lookup-grid searcher (``core/fastsearch``, exact) of the shipped ``vq[width]``, its
    grid over the codebook and at least ``SEARCH_FINE`` standard deviations; the rarer
    coefficients beyond it are searched exactly among the few codewords that can win there.
    On a 256-cell side: for these codebooks 6x faster to build than the default 1,024 and as
    fast to search (10 M pairs/s at 1,024 codewords); for 2-8 codewords 3x faster than a
    matrix-product search. Its costly part comes from ``GRIDS_PATH`` (``shipped_grid``).

    Made once per process and width: the encoder threads ask for the same widths at the same
    moment, and a plain cache let both build them (13 builds for 9 widths, 0.3 s of a core).
    """
    found = _SEARCHERS.get(width)
    if found is not None:
        return found
    with _LOCKS_LOCK:
        lock = _SEARCHER_LOCKS.setdefault(width, threading.Lock())
    with lock:  # other widths build meanwhile in other threads
        if width not in _SEARCHERS:
            from fibquant_cli.core.fastsearch import GridSearcher

            cb, reach = grid_codebook(width)
            _SEARCHERS[width] = GridSearcher(cb, side=SEARCH_GRID_SIDE, reach=reach,
                                             refined=shipped_grid(width, cb, reach))
        return _SEARCHERS[width]


def grid_codebook(width: int) -> tuple[np.ndarray, float]:
    """The codebook ``_searcher`` searches (float64) and the half-width its grid covers."""
    cb = tables().vq[width].astype(np.float64)
    return cb, max(SEARCH_FINE, 1.05 * float(np.sqrt((cb * cb).sum(axis=1).max())))


def grid_key(cb: np.ndarray, reach: float) -> np.ndarray:
    """What a shipped grid was refined for: the codebook's bytes (``grid_codebook``), the side
    and the reach, hashed (uint8): a grid is used only for the very arguments that made it."""
    import hashlib

    h = hashlib.sha256(cb.tobytes())
    h.update(np.array([SEARCH_GRID_SIDE, reach], dtype=np.float64).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


@functools.cache
def _shipped_grids() -> dict[str, np.ndarray]:
    if not GRIDS_PATH.exists():
        return {}
    with np.load(GRIDS_PATH) as data:
        return {name: data[name] for name in data.files}


def shipped_grid(width: int, cb: np.ndarray, reach: float
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """``GridSearcher.refined()`` of ``_searcher(width)`` (its ``grid_codebook``: ``cb`` and
    ``reach``), shipped: refining the grids of
    widths 1-10 took 0.55 s of every process that encoded (a third of compressing a 19 MB
    dump from the command line); loading all of them takes 7 ms. None when the file is
    missing or was made for other tables, side or reach (the grid is then built, the same
    codes either way); the tests check the file against a build."""
    grids = _shipped_grids()
    key = grids.get(f"key{width}")
    if key is None or not np.array_equal(key, grid_key(cb, reach)):
        return None
    return grids[f"table{width}"], grids[f"lists{width}"]


def encode_pairs(c: np.ndarray, width: int, tab: Tables | None = None) -> np.ndarray:
    """Indices (rows * pairs,) uint32 of coefficients ``c`` (rows, 2 * pairs) at ``width``."""
    tab = tab or tables()
    rows, cols = c.shape
    y = np.ascontiguousarray(c, dtype=np.float32).reshape(-1, 2)
    if width <= VQ_MAX_WIDTH:
        return nearest_codeword(y, width, tab)
    levels = tab.scalar[width // 2]
    hi = _scalar_codes(y[:, 0], levels)
    lo = _scalar_codes(y[:, 1], levels)
    return (hi << np.uint32(width // 2)) | lo


def nearest_codeword(y: np.ndarray, width: int, tab: Tables) -> np.ndarray:
    """Index of the nearest codeword of ``tab.vq[width]`` for each row of y (m, 2)."""
    if tab is not tables():  # other tables (tests, a file's own): brute force, exact
        from fibquant_cli.core.fastsearch import brute_nearest_f64

        return brute_nearest_f64(np.asarray(y, dtype=np.float64),
                                 tab.vq[width].astype(np.float64)).astype(np.uint32)
    return _searcher(width).nearest(np.ascontiguousarray(y, dtype=np.float32))


def codes_per_lookup(width: int) -> int:
    """How many consecutive codes of ``width`` bits ``decode_range`` decodes with one table
    lookup: as many as fit 8 bits (a byte per lookup), four for width 3 (12 bits: a
    4,096-row table), two for widths 5 and 6; one for wider codes, whose tables would not
    stay in cache."""
    if width <= 4:
        return 4 if width == 3 else 8 // width
    return 2 if width <= 6 else 1


def decode_range(stream: np.ndarray, width: int, start: int, stop: int,
                 tab: Tables | None = None) -> np.ndarray:
    """Coefficients (stop - start, 2) float32 of codes [start, stop) of one width's packed
    ``stream``: ``decode_pairs`` of ``bitpack.unpack_range``, the same values, but m codes at a
    time (``codes_per_lookup``): the stream is read as (m * width)-bit indices into
    ``Tables.grouped``, m times fewer unpacked and looked up (widths 1-4: 4-10x faster)."""
    tab = tab or tables()
    m = codes_per_lookup(width)
    g0, g1 = start // m, -(-stop // m)
    if m == 1 or start % m or (g0 * m * width) % 8:
        return decode_pairs(bitpack.unpack_range(stream, start, stop, width), width, tab)
    need = -(-g1 * m * width // 8)
    if stream.size < need:  # the stream's last codes: pad them to a whole lookup
        b0 = g0 * m * width // 8
        stream = np.concatenate([stream[b0:], np.zeros(need - stream.size, np.uint8)])
        g0, g1 = 0, g1 - g0
    ids = bitpack.unpack_range(stream, g0, g1, m * width)
    return np.take(tab.grouped(width), ids, axis=0).reshape(-1, 2)[:stop - start]


def decode_pairs(codes: np.ndarray, width: int, tab: Tables | None = None) -> np.ndarray:
    """Coefficients (len(codes), 2) float32 of indices at ``width`` (``encode_pairs``' inverse)."""
    tab = tab or tables()
    codes = np.asarray(codes)
    if width <= VQ_MAX_WIDTH:
        return np.take(tab.vq[width], codes.astype(np.intp), axis=0)
    b = width // 2
    levels = tab.scalar[b]
    mask = (1 << b) - 1
    out = np.empty((len(codes), 2), dtype=np.float32)
    out[:, 0] = np.take(levels, (codes >> b).astype(np.intp))
    out[:, 1] = np.take(levels, (codes & mask).astype(np.intp))
    return out


@dataclass(frozen=True)
class RowLayout:
    """Where each width's stream of one matrix sits: ``pairs[w]`` lists the pair indices
    coded at width w (ascending), and the streams follow each other in ascending width, each
    padded to a whole byte."""

    widths: tuple[int, ...]  # per pair
    rows: int

    @functools.cached_property
    def groups(self) -> list[tuple[int, np.ndarray, int, int]]:
        """(width, pair indices, byte offset, byte length) of each coded width."""
        w = np.asarray(self.widths)
        out, offset = [], 0
        for width in sorted(set(self.widths) - {0}):
            idx = np.flatnonzero(w == width)
            n = bitpack.packed_n_bytes(self.rows * len(idx), width)
            out.append((width, idx, offset, n))
            offset += n
        return out

    @property
    def code_bytes(self) -> int:
        counts = np.bincount(np.asarray(self.widths, dtype=np.int64), minlength=WIDTHS[-1] + 1)
        return sum(bitpack.packed_n_bytes(self.rows * int(n), w)
                   for w, n in enumerate(counts) if w and n)

    @functools.cached_property
    def live_order(self) -> np.ndarray:
        """The coded components group by group (ascending width, then pair): the column order
        ``decode_live`` returns, so each width's coefficients land in one contiguous block."""
        parts = [np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1) for _, idx, _, _ in self.groups]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def live_slot(self) -> np.ndarray:
        """(D,) the column of each coded component in ``live_order`` (-1 for dropped ones)."""
        slot = np.full(2 * len(self.widths), -1, dtype=np.int64)
        slot[self.live_order] = np.arange(len(self.live_order))
        return slot

    @functools.cached_property
    def live(self) -> np.ndarray:
        """Components of coded pairs (the others decode as 0), ascending."""
        pairs = np.flatnonzero(np.asarray(self.widths) > 0)
        return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


def encode_rows(c: np.ndarray, layout: RowLayout, tab: Tables | None = None):
    """Code normalised coefficients ``c`` (rows, D) float32.

    Returns (codes uint8 (layout.code_bytes,), exception positions uint32 (row * D + column,
    ascending), exception values float16): every coefficient of a coded pair with |c| > TAU is
    an exception and decodes exactly as stored (to float16 precision).
    """
    tab = tab or tables()
    rows, d = c.shape
    codes = np.empty(layout.code_bytes, dtype=np.uint8)
    for width, idx, offset, n in layout.groups:
        cols = np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)
        # np.take, not c[:, cols]: the same columns, 5x faster (1.2 vs 6.7 ms a layer)
        packed = bitpack.pack(encode_pairs(np.take(c, cols, axis=1), width, tab), width)
        codes[offset:offset + n] = packed
    flat = c.reshape(-1)
    positions = np.flatnonzero(np.abs(flat) > TAU)  # row-major: ascending (outliers are rare)
    positions = positions[layout.live_slot[positions % d] >= 0]
    values = flat[positions].astype(np.float16)
    return codes, positions.astype(np.uint32), values


def decode_rows(codes: np.ndarray, positions: np.ndarray, values: np.ndarray,
                layout: RowLayout, d: int, r0: int = 0, r1: int | None = None,
                tab: Tables | None = None) -> np.ndarray:
    """Coefficients of rows [r0, r1) (r1 - r0, D) float32: only those rows are unpacked."""
    r1 = layout.rows if r1 is None else r1
    out = np.zeros((r1 - r0, d), dtype=np.float32)
    out[:, layout.live_order] = decode_live(codes, positions, values, layout, d, r0, r1, tab)
    return out


def decode_live(codes: np.ndarray, positions: np.ndarray, values: np.ndarray,
                layout: RowLayout, d: int, r0: int, r1: int,
                tab: Tables | None = None) -> np.ndarray:
    """The coded coefficients of rows [r0, r1), (r1 - r0, coded components) float32, in
    ``layout.live_order``: what synthesis multiplies, without the dropped columns."""
    tab = tab or tables()
    out = np.empty((r1 - r0, len(layout.live_order)), dtype=np.float32)
    col = 0
    for width, idx, offset, n in layout.groups:
        k = len(idx)
        pairs = decode_range(codes[offset:offset + n], width, r0 * k, r1 * k, tab)
        out[:, col:col + 2 * k] = pairs.reshape(r1 - r0, 2 * k)
        col += 2 * k
    lo, hi = np.searchsorted(positions, [r0 * d, r1 * d])
    if hi > lo:
        p = positions[lo:hi].astype(np.int64) - r0 * d
        out[p // d, layout.live_slot[p % d]] = values[lo:hi].astype(np.float32)
    return out


# --------------------------------------------------------------------------- allocation


def hull_widths(delta: dict[int, float]) -> list[int]:
    """The widths on the lower convex hull of (width, delta), ascending from 0: the only
    widths a greedy allocator may stop at without wasting bits."""
    ws = sorted(delta)
    hull = [ws[0]]
    for w in ws[1:]:
        if delta[w] >= delta[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the chord a -> w: drop it
            if (delta[b] - delta[a]) * (w - a) >= (delta[w] - delta[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(w)
    return hull


def greedy_steps(variances: list[np.ndarray], weights: list[float],
                 delta: dict[int, float] | None = None,
                 open_bits: list[float] | None = None) -> Steps:
    """The allocator's steps, best first: each raises one pair of one matrix to its next width
    on the hull of ``delta``, by the largest fall of ``weights[m] * (var[2p] + var[2p + 1])
    * delta`` per bit. The steps do not depend on the budget: a budget takes the longest
    prefix it can pay for (``Steps.widths``), so one ordering serves a search over budgets.

    ``open_bits[m]``: bits per row that coding a pair of matrix m costs once, whatever its
    width (an embedded basis stores the pair's two columns). Its first step then goes from 0
    straight to the width whose fall per bit, that cost included, is largest: the lower hull
    of the pair's (bits, distortion) points from 0. Later steps are the hull's own, and fall
    less per bit than the first (that width beat every later one from 0).

    On a convex hull a pair's falls per bit decrease step by step, so sorting every (pair,
    step) by its fall gives each pair's steps in order: the greedy allocator's sequence,
    computed by one sort instead of a heap (ties: lower matrix, pair, step first).
    """
    delta = delta or tables().delta
    hull = np.asarray(hull_widths(delta))
    pairs = [len(v) // 2 for v in variances]
    d = np.asarray([delta[int(w)] for w in hull])
    per_bit = (d[:-1] - d[1:]) / np.diff(hull)  # (levels - 1,) decreasing
    open_bits = open_bits if open_bits is not None else [0.0] * len(variances)
    pair, step, to, gain = [], [], [], []
    offset = 0
    for v, wm, cost in zip(variances, weights, open_bits):
        n = len(v) // 2
        if n and len(hull) > 1:
            v = np.asarray(v, np.float64)
            pv = wm * (v[0::2] + v[1::2])
            first = 1 + int(np.argmax((d[0] - d[1:]) / (hull[1:] + cost)))  # cost 0: level 1
            lo = np.concatenate([[0], np.arange(first, len(hull) - 1)])
            rate = np.concatenate([[(d[0] - d[first]) / (hull[first] + cost)], per_bit[first:]])
            pair.append(np.repeat(offset + np.arange(n), len(lo)))
            step.append(np.tile(lo, n))
            to.append(np.tile(np.concatenate([[first], lo[1:] + 1]), n))
            gain.append((pv[:, None] * rate[None, :]).reshape(-1))
        offset += n
    pair, step, to, gain = (np.concatenate(a) if a else np.zeros(0, np.int64)
                            for a in (pair, step, to, gain))
    gain = gain.astype(np.float64)
    keep = gain > 0
    order = np.lexsort((step[keep], pair[keep], -gain[keep]))
    return Steps(pair[keep][order], step[keep][order], to[keep][order], hull, pairs)


@dataclass(frozen=True)
class Steps:
    """The greedy allocator's steps in order: ``pair`` (over all matrices' pairs, matrix by
    matrix) raised from width ``hull[step]`` to ``hull[to]`` (``to`` is ``step + 1`` but
    for a first step that opening costs made skip levels; ``step == 0``: the pair is opened)."""

    pair: np.ndarray
    step: np.ndarray
    to: np.ndarray
    hull: np.ndarray
    pairs: list[int]

    def __len__(self) -> int:
        return len(self.pair)

    def widths(self, count: int) -> list[tuple[int, ...]]:
        """Widths per pair of each matrix after the first ``count`` steps."""
        level = np.zeros(sum(self.pairs), dtype=np.int64)
        np.maximum.at(level, self.pair[:count], self.to[:count])  # a pair's steps ascend
        flat = self.hull[level].tolist()
        out, start = [], 0
        for n in self.pairs:
            out.append(tuple(flat[start:start + n]))
            start += n
        return out


def allocate(variances: list[np.ndarray], weights: list[float], budget_bits: float,
             delta: dict[int, float] | None = None) -> list[tuple[int, ...]]:
    """Widths per pair of each matrix, minimising sum_m weights[m] * sum_i var[m][i] *
    delta(width of i's pair) with at most ``budget_bits`` bits per row over all matrices:
    the longest prefix of ``greedy_steps`` within the budget. (``ops/transform`` takes the
    longest prefix whose whole file fits instead: the same steps, another measure of cost.)
    """
    steps = greedy_steps(variances, weights, delta)
    spent = np.cumsum(steps.hull[steps.to] - steps.hull[steps.step])
    return steps.widths(int(np.searchsorted(spent, budget_bits, side="right")))
