"""fibquant: compress transformer KV-cache safetensors dumps with FibQuant vector quantization."""

__version__ = "0.1.0"
