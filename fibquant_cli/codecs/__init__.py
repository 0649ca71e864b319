"""Stream codecs: how one layer of K or V becomes stored parts, and back.

A compressed file's entries each name their codec (``entries[i].codec``); the container lays
out and checks each layer's parts as that codec declares them (``layer_parts``) and the
operations encode and decode through it. A codec is one module of this package exposing:

* ``layer_parts(shape, profile, entry, chosen_dtype, layer) -> [(part, dtype, dims)]``: the
  stored parts of one layer (``chosen_dtype(part)`` is the dtype the file declares, for parts whose
  dtype the encoder may choose; the codec refuses a choice it does not allow);
* ``block_bytes(part, dtype, profile) -> int | None``: the size of the digested byte blocks of
  a part random access reads in pieces (None: the part is read and checked whole);
* an encoder (``fibquant.encode_layer``; ``transform.encode_layer`` after the file-wide
  allocation of ``ops/transform``);
* ``restore_layer(ctx, parts, shape, entry, out, name_of, layer)`` and
  ``decode_tokens(ctx, parts, shape, entry, t0, t1, name_of, layer)``, which check what they read and
  raise ``IntegrityError`` naming the stored array (``name_of(part)``); ``decode_tokens``
  gets readers (``whole()``, ``span(lo, hi)``) that check each block before handing it over.

``ctx`` is what decoding needs beyond the parts: the entry's ``FibQuantizer`` for
``fibquant``, the layer's ``LayerBasis`` for ``transform`` (``ops/reader.Opened.context``).

Adding a codec: write the module, add its name to ``NAMES`` below. Modules are imported only
when a file or a command uses them. Codecs are numpy only, like ``core``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("fibquant", "transform")


def get(name: str) -> ModuleType:
    """The codec module registered as ``name`` (the container has checked the name)."""
    if name not in NAMES:
        raise KeyError(f"unknown codec {name!r}")
    return importlib.import_module(f"fibquant_cli.codecs.{name}")
