"""Real models: dump a model's KV cache, and judge a compressed cache by the model's own loss.

This package is the only one that imports torch and transformers (the optional ``hf`` extra,
``pip install 'fibquant[hf]'``), and only when one of its functions runs, so the rest of the
tool never needs them.

Modules
-------
model     load a local Hugging Face folder or a GGUF file offline; its geometry and RoPE.
capture   run a prefix through the model: its cache (keys, values) and its post-RoPE queries.
kvfile    write that capture as a KV dump and manifest, and read a dump back into a cache.
cache     a transformers cache compressed or dumped through ``fibquant_cli.api``, and a
          compressed file back as a ``DynamicCache`` that generation continues from.
scoring   score a continuation through a cache: NLL, KL and top-1 agreement (numpy formulas).
evaluate  ``eval --model`` and ``sweep --model``: compress and restore the cache through the
          library's own compress/decompress, then score it against the uncompressed cache.
"""
