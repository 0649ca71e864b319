"""transformers caches <-> fibquant: a ``DynamicCache`` compressed or dumped, and a compressed
file (or arrays) back as a ``DynamicCache`` that generation continues from.

Example::

    from fibquant_cli import api as fq
    from fibquant_cli.hf import cache as fqc

    out = model(input_ids=prefix, use_cache=True)
    fqc.compress_cache(out.past_key_values, "cache.fq.safetensors", model=model)
    cache = fqc.to_dynamic_cache(fq.open_compressed("cache.fq.safetensors"), model)
    model.generate(input_ids=prefix_and_next, past_key_values=cache, max_new_tokens=20)

The cache's layers are read as ``hf.capture`` reads them for ``dump --model``
(``cache_layers``) and rebuilt with its ``build_cache``; compressing goes through
``fibquant_cli.api``, the code of the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fibquant_cli import api
from fibquant_cli.errors import UsageError
from fibquant_cli.hf.capture import build_cache, cache_layers
from fibquant_cli.hf.model import LoadedModel, config_geometry, rope_of

if TYPE_CHECKING:
    import numpy as np

    from fibquant_cli.formats.manifest import RopeSpec
    from fibquant_cli.ops.compress_report import CompressReport


def cache_to_arrays(cache) -> dict[str, np.ndarray]:
    """A transformers cache as ``{"layer.{i}.key" | "layer.{i}.value": array}``, each
    ``[batch, kv_heads, tokens, head_dim]`` in the cache's dtype (a copy, on the CPU)."""
    arrays = {}
    for i, (k, v) in enumerate(cache_layers(cache)):
        arrays[f"layer.{i}.key"] = k
        arrays[f"layer.{i}.value"] = v
    return api.to_arrays(arrays)


def _model_and_name(model):
    """(transformers model, a name for errors) of a ``LoadedModel`` or a transformers model."""
    if isinstance(model, LoadedModel):
        return model.model, str(model.path)
    return model, getattr(model.config, "_name_or_path", "") or type(model).__name__


def model_rope(model) -> RopeSpec | None:
    """The RoPE a model applies to its keys (a manifest ``rope``), None without RoPE; refuses
    RoPE fibquant cannot describe exactly (``hf.model.rope_of``)."""
    if isinstance(model, LoadedModel):
        return model.rope
    hf_model, where = _model_and_name(model)
    return rope_of(hf_model.config, config_geometry(hf_model.config)[3], where)


def _manifest_options(model) -> dict:
    if model is None:
        return {}
    hf_model, _ = _model_and_name(model)
    return {"rope": model_rope(model), "query_heads": config_geometry(hf_model.config)[1]}


def compress_cache(cache, path, *, model=None, **options) -> CompressReport:
    """Compress a transformers cache into ``path``: ``api.compress`` of ``cache_to_arrays``,
    with the RoPE and query heads of ``model`` (a transformers model or a ``LoadedModel``)
    in the manifest when given. ``options``: those of ``api.compress`` (``bits``,
    ``keep_first``, ...)."""
    return api.compress(cache_to_arrays(cache), path, **_manifest_options(model), **options)


def cache_to_dump(cache, path, *, model=None, force: bool = False) -> tuple[Path, Path]:
    """Write a transformers cache uncompressed as a dump ``path`` and its manifest (the input
    of ``fibquant compress``); returns both paths."""
    return api.save_dump(cache_to_arrays(cache), path, force=force, **_manifest_options(model))


def to_dynamic_cache(source, model=None, *, dtype=None, device=None):
    """A fresh transformers ``DynamicCache`` holding ``source``'s keys and values.

    Args:
        source: an ``api.Reader``, the path of a compressed file, or arrays (``{name:
            array}`` / ``(keys, values)``, named as ``api.make_manifest`` reads them).
        model: puts the cache on the model's device and in its dtype (a transformers model
            or a ``LoadedModel``); else ``dtype``/``device`` (torch's), default float32, CPU.

    Generation continues from it: ``model.generate(input_ids=..., past_key_values=cache)``.
    """
    if model is not None:
        hf_model, _ = _model_and_name(model)
        weight = next(hf_model.parameters())
        dtype, device = dtype or weight.dtype, device or weight.device
    if isinstance(source, (str, Path)):
        with api.open_compressed(source) as reader:
            return to_dynamic_cache(reader, dtype=dtype, device=device)
    if isinstance(source, api.Reader):
        layers = {e.shape.role: e.shape.layers for e in source.manifest.entries}
        if set(layers) != {"key", "value"} or len(source.manifest.entries) != 2:
            raise UsageError("a cache needs one key and one value entry", path=str(source.path))
        keys = [source.layer("key", i) for i in range(layers["key"])]
        values = [source.layer("value", i) for i in range(layers["value"])]
    else:
        arrays = api.to_arrays(source)
        manifest = api.make_manifest(arrays)
        keys = [arrays[name] for name in manifest.entries[0].tensors]
        values = [arrays[name] for name in manifest.entries[1].tensors]
    return build_cache(keys, values, dtype=dtype, device=device)


def generate(model, input_ids, cache, **kwargs):
    """``model.generate(input_ids, <cache>=cache, **kwargs)`` with the cache passed by the
    keyword this transformers takes (``cache`` from 5.2x on, ``past_key_values`` before).

    ``input_ids`` ``(batch, tokens) int64`` (torch) holds the cached prefix and at least one
    more token: generation starts after the tokens the cache does not hold yet.
    """
    from fibquant_cli.hf.scoring import cache_keyword

    hf_model, _ = _model_and_name(model)
    return hf_model.generate(input_ids=input_ids, **{cache_keyword(hf_model): cache}, **kwargs)
