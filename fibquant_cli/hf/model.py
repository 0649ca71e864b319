"""Load a causal language model offline, and read what a KV dump needs from its config.

A model is a local Hugging Face folder (``config.json`` and weights, a tokenizer if any) or a
GGUF file, which transformers de-quantizes to float32. Nothing is ever downloaded:
``HF_HUB_OFFLINE`` is set before transformers is imported, and ``local_files_only`` is passed.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import stfile
from fibquant_cli.formats.manifest import RopeSpec

HF_HINT = "needs the optional torch and transformers packages: pip install 'fibquant[hf]'"
# Model types whose attention rotates (j, j + d/2) pairs with transformers' rotate_half.
HALF_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3",
                    "granite", "smollm3")


def import_torch():
    """(torch, transformers), offline, or a one-line UsageError naming the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' GGUF loader draws a tqdm bar of its own, which disable_progress_bar (below)
    # does not reach; tqdm takes defaults from TQDM_* when first imported (transformers does)
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import torch
        import transformers
    except ImportError as err:
        raise UsageError(f"--model {HF_HINT} ({err.name} is missing)") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # stderr carries one-line errors only
    return torch, transformers


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (or None) and its attention geometry."""

    path: Path
    model: object
    tokenizer: object | None
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    rope: RopeSpec | None  # None: the model has no rotary embedding (keys are position-free)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def load_model(path, *, threads: int | None = None) -> LoadedModel:
    """Load ``path`` (a folder or a ``.gguf`` file) in float32 with eager attention.

    Raises:
        InvalidInputError: no such file or folder, a folder without ``config.json``, a model
            transformers cannot load, or RoPE it cannot describe exactly (see ``rope_of``).
    """
    path = check_model_path(path)
    torch, transformers = import_torch()
    if threads:
        torch.set_num_threads(threads)
    folder, extra = (path, {}) if path.is_dir() else (path.parent, {"gguf_file": path.name})
    with gguf_read_once():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, attn_implementation="eager",
                local_files_only=True, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InvalidInputError(f"transformers cannot load this model ({first})",
                                    path=str(path)) from None
        model.eval()
        tokenizer = load_tokenizer(transformers, folder, extra)
    layers, query_heads, kv_heads, head_dim = config_geometry(model.config)
    return LoadedModel(path, model, tokenizer, layers, query_heads, kv_heads, head_dim,
                       rope_of(model.config, head_dim, str(path)))


def check_model_path(path) -> Path:
    """``path`` as a Path if it can be a model (a folder with ``config.json`` or a ``.gguf``
    file), without loading anything: commands check it before their long work."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError("no such model file or folder", path=str(path))
    if path.is_dir() and not (path / "config.json").is_file():
        raise InvalidInputError("a model folder needs a config.json", path=str(path))
    if path.is_file() and path.suffix != ".gguf":
        raise InvalidInputError("a model file must be a .gguf (or give a model folder)",
                                path=str(path))
    return path


@contextmanager
def gguf_read_once():
    """Within the block, ``gguf.GGUFReader`` of one file returns one reader, and
    ``gguf.get_tensor_name_map`` of one architecture and depth one map.

    transformers parses a GGUF file's header once for the config, once for the weights and
    once for the tokenizer, in Python: 4.9 s each for SmolLM2-135M's, whose 49,152-token
    vocabulary and merges are fields. It then builds the same tensor-name map for each of
    the model's 397 modules. Both are imported from ``gguf`` at each call, so the block's
    shared ones serve; both are only read from. Loading SmolLM2-135M: 35.3 -> 16.1 s, the
    same tokens and logits. Outside the block (and where the package is missing) nothing
    changes.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    made: dict = {}

    def once(name, key, *args):
        if (name, key) not in made:
            made[name, key] = originals[name](*args)
        return made[name, key]

    gguf.GGUFReader = lambda path, mode="r": once(
        "GGUFReader", (os.path.realpath(os.fspath(path)), mode), path, mode)
    gguf.get_tensor_name_map = lambda arch, n_blocks: once(
        "get_tensor_name_map", (arch, n_blocks), arch, n_blocks)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def config_geometry(cfg) -> tuple[int, int, int, int]:
    """(layers, query_heads, kv_heads, head_dim) of a transformers config (GPT-2's names too)."""
    query_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or query_heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // query_heads
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return layers, query_heads, kv_heads, head_dim


def load_tokenizer(transformers, folder: Path, extra: dict):
    """The model's tokenizer, or None when the folder has none (token ids must be given)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                          **extra)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rope_parameters(cfg) -> dict | None:
    """The config's RoPE parameters in one form (transformers 4.x and 5.x name them apart)."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        if getattr(cfg, "rope_theta", None) is not None:
            params.setdefault("rope_theta", cfg.rope_theta)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise InvalidInputError("per-layer-type RoPE parameters (sliding and full attention "
                                "layers rotate differently) are not supported")
    return params or None


def rope_of(cfg, head_dim: int, where: str) -> RopeSpec | None:
    """The model's RoPE as a manifest ``rope`` object, None without RoPE, or an error.

    Only plain RoPE over the whole head is described exactly; scaled RoPE (linear, dynamic,
    YaRN, Llama-3, LongRoPE) and partial rotary embeddings are refused rather than recorded
    wrongly, so a dump's keys are never silently mis-rotated.
    """
    params = rope_parameters(cfg)
    if params is None or "rope_theta" not in params:
        if cfg.model_type in HALF_STYLE_TYPES:
            raise InvalidInputError(f"{cfg.model_type} config has no rope_theta", path=where)
        return None
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind != "default":
        raise InvalidInputError(
            f"RoPE scaling {kind!r} is not supported: fibquant records plain RoPE only "
            "(theta, style, first position), and would mis-rotate scaled keys", path=where)
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0, 1):
        raise InvalidInputError(f"partial rotary embedding (factor {partial}) is not supported",
                                path=where)
    if cfg.model_type not in HALF_STYLE_TYPES:
        raise InvalidInputError(f"unknown RoPE pair style of model type {cfg.model_type!r} "
                                f"(known: {', '.join(HALF_STYLE_TYPES)})", path=where)
    theta = float(params["rope_theta"])
    if not (math.isfinite(theta) and theta > 1.0):
        raise InvalidInputError(f"rope_theta {theta!r} is not a finite number > 1", path=where)
    if head_dim % 2:
        raise InvalidInputError(f"RoPE needs an even head_dim, found {head_dim}", path=where)
    return RopeSpec(theta=theta, style="half", first_position=0)


def check_token_source(*, text: Path | None, ids_from: Path | None):
    """The text (str) or the ``input_ids`` dump's header that ``read_token_ids`` will read,
    checked without the model: commands call it before loading one, so that an unreadable,
    empty or id-less input is refused at once, not after the load."""
    if (text is None) == (ids_from is None):
        raise UsageError("give exactly one of --text FILE and --ids DUMP")
    if text is not None:
        try:
            content = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"cannot read text ({err})", path=str(text)) from None
        if not content.strip():
            raise InvalidInputError("the text is empty", path=str(text))
        return content
    header = stfile.read_header(ids_from)
    if "input_ids" not in header.tensors:
        raise InvalidInputError("no 'input_ids' tensor", path=str(ids_from))
    return header


def check_before_load(model, *, text: Path | None, ids_from: Path | None) -> None:
    """What a model command can refuse before the load it would otherwise wait for (15-25 s
    for a GGUF): the model's path (``check_model_path``) and the text or ids
    (``check_token_source``)."""
    check_model_path(model)
    check_token_source(text=text, ids_from=ids_from)


def check_cache_of(lm: LoadedModel, owner: str, geometry: tuple[int, int, int], rope) -> None:
    """Refuse a model whose KV cache cannot be ``owner``'s (the calibration dumps, a basis):
    another (layers, kv_heads, head_dim) than ``geometry``, or, when ``owner``'s keys have
    RoPE undone (``rope``), another RoPE (theta, style) or none.

    Raises:
        InvalidInputError: naming the model and both sides.
    """
    mine = (lm.layers, lm.kv_heads, lm.head_dim)
    if mine != tuple(geometry):
        raise InvalidInputError(f"the model's cache has (layers, kv_heads, head_dim) {mine}, "
                                f"{owner} {tuple(geometry)}: not the same model",
                                path=str(lm.path))
    if rope is not None and (lm.rope is None or (lm.rope.theta, lm.rope.style)
                             != (rope.theta, rope.style)):
        found = "none" if lm.rope is None else f"theta {lm.rope.theta:g} {lm.rope.style}"
        raise InvalidInputError(f"the model's RoPE ({found}) differs from {owner}'s (theta "
                                f"{rope.theta:g} {rope.style}): not the same model",
                                path=str(lm.path))


def learned_positions(lm: LoadedModel) -> int | None:
    """How many positions a model without RoPE has embeddings for (GPT-2's ``n_positions``):
    it cannot run a longer sequence at all. None for RoPE models, which run past their
    ``max_position_embeddings`` (beyond what they were trained on, which is the user's call)."""
    if lm.rope is not None:
        return None
    cfg = lm.model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def read_token_ids(lm: LoadedModel, *, text: Path | None, ids_from: Path | None,
                   needed: int, positions: int | None = None) -> np.ndarray:
    """``(1, needed) int64`` token ids from a text file (the model's tokenizer, no special
    tokens added) or from a dump's ``input_ids``; InvalidInputError when there are fewer, or
    when the model would read more than ``positions`` of them (default all ``needed``; a
    scored continuation's last token is only a target) than its learned positions cover."""
    source = check_token_source(text=text, ids_from=ids_from)
    limit = learned_positions(lm)
    read = needed if positions is None else positions
    if limit is not None and read > limit:
        raise InvalidInputError(f"{read} positions asked for, but the model's learned "
                                f"position embeddings cover {limit}", path=str(lm.path))
    if text is not None:
        if lm.tokenizer is None:
            raise UsageError("this model has no tokenizer: give token ids with --ids DUMP",
                             path=str(lm.path))
        ids = np.asarray(lm.tokenizer(source, add_special_tokens=False)["input_ids"],
                         dtype=np.int64)[None, :]
        where = str(text)
    else:
        ids = np.asarray(stfile.read_tensor(source, "input_ids"), dtype=np.int64)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids[:1]
        where = str(ids_from)
    if ids.shape[1] < needed:
        why = "" if positions is None else " (prefix + continuation + 1)"
        raise InvalidInputError(f"text too short: {ids.shape[1]} tokens, needs {needed}{why}",
                                path=where)
    vocab = lm.model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InvalidInputError(f"token id {int(ids.max())} outside the model's vocabulary "
                                f"of {vocab}", path=where)
    return ids[:, :needed]
