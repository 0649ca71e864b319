"""Make fibquant_cli/codebooks/gauss_v1_grids.npz: the transform encoder's search grids.

For each width w = 1..VQ_MAX_WIDTH, the refined lookup grid of the searcher that codes
coefficient pairs at that width (``core.transform._searcher``: ``GridSearcher.refined()``),
with the key it was made for (``core.transform.grid_key``: the codebook, the grid's side and
reach). Shipped because refining them took 0.55 s of every encoding process; the encoder
builds any grid whose key no longer matches, and the tests check the file against a build.
Rerun after changing gauss_v1.npz, ``SEARCH_GRID_SIDE`` or ``SEARCH_FINE``.

    python scripts/search_grids.py            # writes the npz (a few seconds)
"""

from __future__ import annotations

import numpy as np

from fibquant_cli.core import transform as T
from fibquant_cli.core.fastsearch import GridSearcher


def main() -> None:
    arrays = {}
    for width in range(1, T.VQ_MAX_WIDTH + 1):
        cb, reach = T.grid_codebook(width)
        table, lists = GridSearcher(cb, side=T.SEARCH_GRID_SIDE, reach=reach,
                                    lazy=True).refined()
        arrays[f"table{width}"] = table.astype(np.int16)  # codes < 1,024, lists < 32,768
        arrays[f"lists{width}"] = lists.astype(np.int16)
        assert np.array_equal(arrays[f"table{width}"], table)
        assert np.array_equal(arrays[f"lists{width}"], lists)
        arrays[f"key{width}"] = T.grid_key(cb, reach)
    np.savez_compressed(T.GRIDS_PATH, **arrays)
    print(f"wrote {T.GRIDS_PATH} ({T.GRIDS_PATH.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
