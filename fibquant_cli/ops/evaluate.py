"""eval: attention fidelity of a compressed file or a restored dump against the original."""

from __future__ import annotations

import numpy as np

from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats import container, stfile
from fibquant_cli.formats.kvdump import open_dump, read_layer
from fibquant_cli.ops.fidelity import measure, require_kv_pair
from fibquant_cli.ops.reader import open_verified, reconstructor


def evaluate(original, other, *, manifest=None, max_queries: int = 2048, basis=None):
    """Attention fidelity of ``other`` (compressed file or restored dump) against ``original``
    (``basis``: the basis file a transform-coded ``other`` needs)."""
    dump = open_dump(original, manifest)
    require_kv_pair(dump, "attention fidelity")
    header = stfile.read_header(other)
    if container.is_compressed(header):
        loaded = open_verified(other, basis=basis)
        if loaded.manifest.to_json() != dump.manifest.to_json():
            raise InvalidInputError("was compressed from a dump with another manifest",
                                    path=str(other))
        reconstruct = reconstructor(loaded)
    else:
        restored = open_dump(other, manifest if manifest is not None else dump.manifest_path)

        def reconstruct(i: int, layer: int) -> np.ndarray:
            return read_layer(restored, restored.manifest.entries[i], layer).astype(np.float32)

    return measure(dump, reconstruct, max_queries=max_queries)
