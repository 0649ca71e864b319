"""verify: every check of a compressed file, without writing anything (``fibquant validate``)."""

from __future__ import annotations

from fibquant_cli.errors import IntegrityError
from fibquant_cli.ops.reader import layer_parts, open_verified


def verify(path, checks: list | None = None, basis=None) -> list[tuple[str, bool, str]]:
    """Every check of a compressed file, in order; stops at the first failure (re-raised).

    ``basis``: the basis file a transform-coded file needs (unless it embeds one)."""
    checks = [] if checks is None else checks
    opened = open_verified(path, checks=checks, basis=basis)
    n = 0
    for i, entry in enumerate(opened.manifest.entries):
        for layer in range(entry.shape.layers):
            try:
                opened.codec(i).check_layer(opened.context(i, layer),
                                            layer_parts(opened, i, layer), entry.shape,
                                            opened.doc.entries[i], opened.names(i, layer), layer)
            except IntegrityError as err:
                raise err.at(path=str(opened.path)) from None
            n += 1
    checks.append(("indices < N, norms and statistics finite", True,
                   f"{n} layer streams checked"))
    return checks
