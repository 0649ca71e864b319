"""A captured cache as a KV dump (safetensors + manifest), and a dump back as layer arrays.

Tensors: ``layer.{i}.key`` / ``layer.{i}.value`` ``[batch, kv_heads, tokens, head_dim]`` (bhtd,
the cache's own layout) in the dump dtype, ``layer.{i}.query`` ``[batch, query_heads, tokens,
head_dim]`` post-RoPE (when captured), and ``input_ids [batch, tokens] int64``. The key entry
carries the model's ``rope`` object; a model without RoPE stores pre-RoPE (position-free) keys
in the manifest's terms, so ``rope_state`` says ``pre_rope`` and there is no ``rope`` object.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from fibquant_cli.errors import UsageError
from fibquant_cli.formats.kvdump import open_dump, read_layer
from fibquant_cli.formats.manifest import AttentionSpec, KvShape, Manifest, ManifestEntry, manifest_path_for
from fibquant_cli.hf.capture import Capture
from fibquant_cli.hf.model import LoadedModel
from fibquant_cli.storage.publish import check_output, publishing

NUMPY_DTYPES = {"f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
                "f32": np.dtype(np.float32)}


def attention_kind(query_heads: int, kv_heads: int) -> str:
    if kv_heads == query_heads:
        return "mha"
    return "mqa" if kv_heads == 1 else "gqa"


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` in the dump dtype; refuses values that would overflow it."""
    out = np.ascontiguousarray(x.astype(NUMPY_DTYPES[dtype]))
    if not np.isfinite(out.astype(np.float32)).all():
        raise UsageError(f"the cache overflows {dtype}: use --dtype f32 or bf16")
    return out


def dump_manifest(lm: LoadedModel, cap: Capture, dtype: str) -> Manifest:
    b, _, t, _ = cap.keys[0].shape
    common = dict(attention_kind=attention_kind(lm.query_heads, lm.kv_heads), batch=b,
                  layers=len(cap.keys), kv_heads=lm.kv_heads, query_heads=lm.query_heads,
                  tokens=t, head_dim=lm.head_dim, dtype=dtype)
    n = len(cap.keys)
    key = ManifestEntry(KvShape(role="key", rope_state="pre_rope" if lm.rope is None
                                else "post_rope", **common),
                        [f"layer.{i}.key" for i in range(n)], "bhtd", lm.rope)
    value = ManifestEntry(KvShape(role="value", rope_state="not_applicable", **common),
                          [f"layer.{i}.value" for i in range(n)], "bhtd")
    attention = None if cap.queries is None else AttentionSpec(
        [f"layer.{i}.query" for i in range(n)], True)
    return Manifest([key, value], attention)


def dump_tensors(cap: Capture, input_ids: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    tensors = {}
    for i, (k, v) in enumerate(zip(cap.keys, cap.values)):
        tensors[f"layer.{i}.key"] = as_dtype(k, dtype)
        tensors[f"layer.{i}.value"] = as_dtype(v, dtype)
        if cap.queries is not None:
            tensors[f"layer.{i}.query"] = as_dtype(cap.queries[i], dtype)
    tensors["input_ids"] = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    return tensors


def write_dump(lm: LoadedModel, cap: Capture, input_ids: np.ndarray, out: Path,
               dtype: str = "f16") -> tuple[Path, Path]:
    """Write ``out`` and its manifest beside it (each to a temporary file, then renamed)."""
    from safetensors.numpy import save_file

    if dtype not in NUMPY_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(NUMPY_DTYPES)}")
    out = Path(out)
    manifest = dump_manifest(lm, cap, dtype)
    tensors = dump_tensors(cap, input_ids, dtype)
    mpath = manifest_path_for(out)
    with publishing([out, mpath], force=True) as (tmp, tmp_manifest):
        save_file(tensors, str(tmp), metadata={"fibquant_source": lm.path.name})
        tmp_manifest.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return out, mpath


def read_kv(path, manifest=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Keys and values of every layer of a dump, ``(b, kv_heads, t, d) float32`` each.

    Read through ``open_dump``/``read_layer``, the code compress itself reads with, so a
    restored dump and the original go through one path.
    """
    dump = open_dump(path, manifest)
    by_role = {e.shape.role: e for e in dump.manifest.entries}
    k_entry, v_entry = by_role["key"], by_role["value"]
    keys = [read_layer(dump, k_entry, i).astype(np.float32) for i in range(k_entry.shape.layers)]
    values = [read_layer(dump, v_entry, i).astype(np.float32)
              for i in range(v_entry.shape.layers)]
    return keys, values


def dump_model(model, *, out, text=None, ids_from=None, tokens: int = 1024, dtype: str = "f16",
               force: bool = False) -> dict:
    """``fibquant dump --model``: run ``tokens`` tokens of a text and write the KV dump.

    Returns a summary: the outputs, the geometry, the RoPE and the key-recompute error.
    """
    from fibquant_cli.hf.capture import run_prefix
    from fibquant_cli.hf.model import check_before_load, load_model, read_token_ids

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError("the dump must be a .safetensors file", path=str(out))
    inputs = {Path(p): "input file" for p in (text, ids_from) if p is not None}
    for path in (out, manifest_path_for(out)):
        check_output(path, force=force, inputs=inputs)
    check_before_load(model, text=text, ids_from=ids_from)
    lm = load_model(model)
    ids = read_token_ids(lm, text=text, ids_from=ids_from, needed=tokens)
    cap = run_prefix(lm, ids)
    path, mpath = write_dump(lm, cap, ids, out, dtype)
    return {"dump": str(path), "manifest": str(mpath), "model": str(model),
            "model_type": lm.model_type, "layers": lm.layers, "query_heads": lm.query_heads,
            "kv_heads": lm.kv_heads, "head_dim": lm.head_dim, "tokens": tokens, "dtype": dtype,
            "rope": None if lm.rope is None else lm.rope.to_json(),
            "queries": cap.queries is not None, "key_match_error": cap.key_match_error,
            "note": cap.note}
