"""How a manifest entry maps onto the tensors of a dump: axis orders, per-layer views, and the
check that a dump's tensors are what its manifest says (names, dtypes, shapes).
"""

from __future__ import annotations

from fibquant_cli.core.layer import SOURCE_DTYPES
from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats.manifest import LAYOUTS, KvShape, Manifest, ManifestEntry, validate_manifest

QUERY_DTYPES = ("F16", "BF16", "F32")
# Per-layer 4-D axis names by layout; "heads" is kv_heads or query_heads.
_LAYOUT_AXES = {
    "bhtd": ("batch", "heads", "tokens", "head_dim"),
    "bthd": ("batch", "tokens", "heads", "head_dim"),
}
_CANONICAL_PERMUTATION = {"bhtd": (0, 1, 2, 3), "bthd": (0, 2, 1, 3)}


def vectors_axes(layout: str, ndim: int) -> tuple[int, ...]:
    """Axis permutation taking a stored tensor to canonical order.

    ``array.transpose(vectors_axes(layout, array.ndim))`` is ``[batch, kv_heads, tokens,
    head_dim]`` for a per-layer 4-D tensor and ``[batch, layers, kv_heads, tokens, head_dim]``
    for a 5-D tensor (always canonical, so the identity). Reshaping the result to
    ``(-1, head_dim)`` lists the head vectors in canonical order. Query tensors use the same
    permutation with query_heads in place of kv_heads.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if ndim == 4:
        return _CANONICAL_PERMUTATION[layout]
    if ndim == 5:
        return (0, 1, 2, 3, 4)
    raise ValueError(f"KV tensors are 4-D or 5-D, not {ndim}-D")


def entry_layer_views(entry: ManifestEntry) -> list[tuple[str, int | None]]:
    """Where each layer's data lives: one ``(tensor_name, layer_index)`` per layer, in order.

    ``layer_index`` is None when the whole tensor is that layer (a per-layer 4-D tensor, or
    the single tensor of a one-layer entry, which may be 4-D or 5-D); otherwise it is the
    index along axis 1 of the entry's single 5-D tensor. Apply ``vectors_axes`` afterwards.
    """
    layers = entry.shape.layers
    if len(entry.tensors) == layers:
        return [(name, None) for name in entry.tensors]
    (name,) = entry.tensors
    return [(name, layer) for layer in range(layers)]


def expected_tensor_shape(
    shape: KvShape, layout: str, ndim: int, *, heads: int | None = None
) -> tuple[int, ...]:
    """Stored shape of an entry's tensor: 4-D per layer in ``layout`` order, or 5-D canonical.

    ``heads`` defaults to ``shape.kv_heads``; pass ``shape.query_heads`` for query tensors.
    """
    n_heads = shape.kv_heads if heads is None else heads
    if ndim == 5:
        return (shape.batch, shape.layers, n_heads, shape.tokens, shape.head_dim)
    sizes = {
        "batch": shape.batch, "heads": n_heads, "tokens": shape.tokens, "head_dim": shape.head_dim
    }
    return tuple(sizes[axis] for axis in _LAYOUT_AXES[layout])


def _axes_text(layout: str, ndim: int, heads_name: str) -> str:
    if ndim == 5:
        return f"batch, layers, {heads_name}, tokens, head_dim"
    names = [heads_name if axis == "heads" else axis for axis in _LAYOUT_AXES[layout]]
    return f"{layout}: " + ", ".join(names)


def _check_tensor(
    name: str,
    where: str,
    found: tuple[str, tuple[int, ...]] | None,
    *,
    shape: KvShape,
    layout: str,
    single: bool,
    query: bool,
    source: str,
) -> None:
    if found is None:
        raise InvalidInputError(
            f"listed in the manifest at {where} but not present in the file",
            path=source, tensor=name,
        )
    found_dtype, found_shape = found[0], tuple(found[1])
    if single and shape.layers > 1:
        ndim = 5
    elif single and len(found_shape) == 5:
        ndim = 5
    else:
        ndim = 4
    heads_name = "query_heads" if query else "kv_heads"
    heads = getattr(shape, heads_name)
    expected = expected_tensor_shape(shape, layout, ndim, heads=heads)
    if found_shape != expected:
        raise InvalidInputError(
            f"expected shape {list(expected)} ({_axes_text(layout, ndim, heads_name)}), "
            f"found {list(found_shape)}",
            path=source, tensor=name,
        )
    if query:
        if found_dtype not in QUERY_DTYPES:
            raise InvalidInputError(
                f"expected a float dtype ({', '.join(QUERY_DTYPES)}), found {found_dtype}",
                path=source, tensor=name,
            )
    elif found_dtype != SOURCE_DTYPES[shape.dtype]:
        raise InvalidInputError(
            f"expected dtype {SOURCE_DTYPES[shape.dtype]} (manifest dtype {shape.dtype}), "
            f"found {found_dtype}",
            path=source, tensor=name,
        )


def check_manifest_against_dump(
    manifest: Manifest,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    *,
    source: str,
) -> None:
    """Check that every tensor the manifest names is in the dump with the right shape and dtype.

    Args:
        manifest: the manifest (validated again here).
        tensors: name -> (safetensors dtype string such as ``"F16"``, shape) from the dump's
            header. Tensors the manifest does not mention are ignored.
        source: the dump's file name, used in error messages.

    Raises:
        InvalidInputError: ``source: tensor 'name': reason`` for the first problem found.
    """
    validate_manifest(manifest, source=source)
    for i, entry in enumerate(manifest.entries):
        single = len(entry.tensors) == 1
        for j, name in enumerate(entry.tensors):
            _check_tensor(
                name, f"entries[{i}].tensors[{j}]", tensors.get(name),
                shape=entry.shape, layout=entry.layout, single=single, query=False, source=source,
            )
    if manifest.attention is not None:
        key_entry = next(e for e in manifest.entries if e.shape.role == "key")
        layout = manifest.entries[0].layout
        queries = manifest.attention.query_tensors
        for j, name in enumerate(queries):
            _check_tensor(
                name, f"attention.query_tensors[{j}]", tensors.get(name),
                shape=key_entry.shape, layout=layout, single=len(queries) == 1, query=True,
                source=source,
            )
