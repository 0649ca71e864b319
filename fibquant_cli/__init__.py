"""fibquant: compress transformer KV-cache dumps (safetensors) with FibQuant vector quantization.

The package's layers, top to bottom (docs/architecture.md): ``cli`` -> ``ops`` -> ``formats``,
``storage`` -> ``codecs`` -> ``core`` -> ``errors``.
"""

__version__ = "0.2.0"
