"""Writing a basis file (formats/basis.py) through the one publish path."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from fibquant_cli.errors import FibQuantError
from fibquant_cli.formats.basis import Basis, BasisRope, BasisSource, encode_basis, load_basis
from fibquant_cli.storage.stwriter import write_file


def write_basis(path: str | os.PathLike, *, layers: int, kv_heads: int, head_dim: int,
                rope: BasisRope | None, keep_first: int, tokens: int,
                sources: Sequence[BasisSource],
                matrices: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
                sensitivity: np.ndarray | None = None, query_weight: np.ndarray | None = None,
                force: bool = False) -> Basis:
    """Write a basis file atomically (``storage.publish.publishing``) and return it loaded.

    Loading it back verifies what reached the disk, and hands the caller the same ``Basis``
    a later ``load_basis`` would. The bytes depend only on the arguments (not on the order of
    ``sources`` or of ``matrices``), so the same calibration writes the same file.

    Raises:
        UsageError: the output exists and ``force`` is False, or cannot be written there.
        InvalidInputError: values ``load_basis`` would refuse (nothing is written).

    Example::

        write_basis("m.basis.safetensors", layers=1, kv_heads=1, head_dim=2, rope=None,
                    keep_first=1, tokens=100, sources=[],
                    matrices={(0, "key"): (mean, basis, variance), (0, "value"): (...)})
    """
    try:
        tensors, metadata = encode_basis(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                         rope=rope, keep_first=keep_first, tokens=tokens,
                                         sources=sources, matrices=matrices,
                                         sensitivity=sensitivity, query_weight=query_weight)
    except FibQuantError as err:
        raise err.at(path=str(path)) from None
    write_file(path, tensors, metadata, force=force)
    return load_basis(path)
