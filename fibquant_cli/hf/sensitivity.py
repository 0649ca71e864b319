"""``calibrate --model``: each layer's and role's sensitivity measured by the model itself.

Without a model, ``calibrate`` probes the attention-output cosine: each layer alone, with exact
inputs, on the prefix's own queries. What a user feels is the model's next-token distribution
over what follows the prefix, and the two disagree: on SmolLM2-135M (basis and sensitivity
from the GPL-3 text, a Python-docs cache coded) the model's sensitivities (two draws) lower
the KL from 0.0066 to 0.0029 at 6x, 0.0219 to 0.0174 at 10x and 0.0635 to 0.0539 at 16x,
while the attention cosine they are not tuned for falls (docs/transform.md).

Per (layer, role): the prefix's cache with that one matrix perturbed by ``calibrate.probe``'s
noise (relative power ``SENSITIVITY_EPS``, shaped like the data through the fitted basis), the
continuation scored through it (``evaluate.Session``, whose self-checks must pass), and the KL
against the unperturbed cache divided by the noise's relative power: KL per unit of relative
MSE, the weight the allocator gives that matrix's error.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.hf.evaluate import DEFAULT_PREFIX_TOKENS, Session
from fibquant_cli.hf.kvfile import as_dtype, read_kv
from fibquant_cli.hf.model import (
    check_before_load,
    check_cache_of,
    load_model,
    read_token_ids,
)
from fibquant_cli.hf.scoring import compare
from fibquant_cli.ops.calibrate import DEFAULT_KEEP_FIRST, ROLES, SENSITIVITY_EPS, calibrate, probe

# Continuation tokens scored per probe: 120 probes (two draws) of SmolLM2 at 1,024 + 256 tokens
# take about 2 minutes on 2 cores (``LayerSkipper``: 0.44-1.4 s each, by layer).
DEFAULT_CONTINUATION_TOKENS = 256
# Noise draws averaged per (layer, role). One draw's KL is noisy: two seeds of SmolLM2's
# table agree to a log correlation of 0.95, single values within 0.54-1.86x (10th-90th
# percentile), and the 16x gain held with one seed, not the other (docs/transform.md).
DEFAULT_DRAWS = 2


def calibrate_with_model(paths: list[str], *, model, text=None, ids_from=None,
                         prefix: int = DEFAULT_PREFIX_TOKENS,
                         continuation: int = DEFAULT_CONTINUATION_TOKENS,
                         draws: int = DEFAULT_DRAWS, **options):
    """``ops.calibrate.calibrate`` with the sensitivity measured by ``model`` on ``text``
    (or the token ids of the dump ``ids_from``).

    What can fail is refused as early as it can be known, never after a wait that could have
    been spared: the model's path and the text (or ids) before anything, the dumps and the
    output next (``calibrate``), then the model is loaded and checked against the dumps (its
    geometry and RoPE, the text's length, the self-checks) before the basis is fitted."""
    keep_first = options.get("keep_first", DEFAULT_KEEP_FIRST)
    if prefix <= keep_first:  # every prefix token kept exactly: no probe would measure anything
        raise UsageError(f"{{prefix_tokens}} {prefix} leaves no token to perturb beyond the "
                         f"{keep_first} that {{keep_first}} keeps exactly",
                         options=("prefix_tokens", "keep_first"))
    check_before_load(model, text=text, ids_from=ids_from)
    label = f"model KL ({Path(model).name}, {Path(text or ids_from).name})"
    with tempfile.TemporaryDirectory(prefix="fibquant-calibrate-") as tmp:
        def prepare(shape, rope, progress):
            progress.start(1, "model: load, prefix, self-checks")
            session = _session(model, text, ids_from, prefix, continuation, Path(tmp),
                               (shape.layers, shape.kv_heads, shape.head_dim), rope)
            progress.advance("model: load, prefix, self-checks")

            def sensitivity_of(fits, layers, keep_first, rope, progress):
                return model_sensitivity(session, fits, layers, keep_first, rope, progress,
                                         draws)
            return sensitivity_of

        return calibrate(paths, model_sensitivity=(label, prepare), **options)


def _session(model, text, ids_from, prefix: int, continuation: int, workdir: Path,
             geometry: tuple[int, int, int], rope) -> Session:
    lm = load_model(model)
    check_cache_of(lm, "the dumps", geometry, rope)
    ids = read_token_ids(lm, text=text, ids_from=ids_from, needed=prefix + continuation + 1,
                         positions=prefix + continuation)
    session = Session(lm, ids, prefix, continuation, workdir)
    for check in session.checks:
        if not check["passed"]:
            raise InvalidInputError(f"the model's self-check '{check['name']}' failed "
                                    f"({check['what']}: {check['value']:.3g})", path=str(model))
    return session


def model_sensitivity(session: Session, fits, layers: int, keep_first: int, rope,
                      progress, draws: int = DEFAULT_DRAWS) -> np.ndarray:
    """``(layers, 2)``: KL per unit of relative MSE of each (layer, role), keys then values,
    the mean over ``draws`` noises. The session's model must be the dumps' (``_session``
    checks it with ``model.check_cache_of``)."""
    keys, values = read_kv(session.dump)
    t = keys[0].shape[2]
    model_rope = session.lm.rope  # what the prefix's dump records for its keys
    positions = (0 if model_rope is None else model_rope.first_position) + np.arange(t)
    out = np.zeros((layers, len(ROLES)))
    progress.start(layers * len(ROLES) * draws, "model sensitivity")
    skip = LayerSkipper(session, keys, values)
    for layer in range(layers):
        for j, role in enumerate(ROLES):
            for draw in range(draws):
                cache = {"key": list(keys), "value": list(values)}
                x_hat = probe(cache[role][layer], fits[(layer, role)], layer, role, keep_first,
                              rope if role == "key" else None, positions, draw)
                cache[role][layer] = as_dtype(x_hat, session.dtype).astype(np.float32)
                result = compare(session.logp_ref, skip.logp(layer, cache["key"], cache["value"]),
                                 session.targets)
                out[layer, j] += result.kl / SENSITIVITY_EPS / draws
                progress.advance(f"layer {layer} {role}")
    return out


class LayerSkipper:
    """``Session.logp`` for a cache that equals the reference ``keys``/``values`` below some
    layer: the layers below it are not run again.

    The continuation's hidden states entering layer L depend only on the cache of layers
    below L, so with that cache unchanged they are the reference run's. Each decoder layer's
    output in one reference run is kept (30 x 256 x 576 float32, 18 MB for SmolLM2 at 256
    continuation tokens), and a probe of layer L makes layers 0..L-1 return theirs instead of
    computing: the same arithmetic on the same inputs from L on, so the same log-probabilities
    bit for bit (tested), for about half the layers' work on average. A model whose decoder
    layers cannot be found runs whole, as before.
    """

    def __init__(self, session: Session, keys: list, values: list):
        self.session = session
        self.layers = decoder_layers(session.lm.model, session.lm.layers)
        self.outputs: list = [None] * len(self.layers)
        hooks = [layer.register_forward_hook(self._keep(i))
                 for i, layer in enumerate(self.layers)]
        try:
            session.logp(keys, values)
        finally:
            for hook in hooks:
                hook.remove()

    def _keep(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output
        return hook

    def logp(self, first: int, keys: list, values: list) -> np.ndarray:
        """Log-probabilities with layers ``0..first-1`` given their reference outputs."""
        skipped = self.layers[:first]
        for layer, output in zip(skipped, self.outputs):
            layer.forward = _returning(output)
        try:
            return self.session.logp(keys, values)
        finally:
            for layer in skipped:
                del layer.forward  # the class's forward again


def _returning(output):
    """A forward that returns a fresh copy of ``output`` (a tensor or a tuple of them): later
    layers may not write into the reference's own tensors."""
    import torch

    def forward(*args, **kwargs):
        if isinstance(output, torch.Tensor):
            return output.clone()
        return type(output)(x.clone() if isinstance(x, torch.Tensor) else x for x in output)
    return forward


def decoder_layers(model, count: int) -> list:
    """The model's ``count`` decoder layers in order (the ``ModuleList`` of that length whose
    every item holds one attention module: Llama's ``model.layers``, GPT-2's
    ``transformer.h``), or [] when there is no such list."""
    import torch

    from fibquant_cli.hf.capture import attention_modules

    attention = {id(m) for m in attention_modules(model)}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and all(
                sum(id(m) in attention for m in item.modules()) == 1 for item in module):
            return list(module)
    return []
