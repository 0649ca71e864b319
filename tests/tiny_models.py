"""Tiny randomly initialised causal LMs built from a config, saved as local model folders.

Nothing is downloaded: the weights come from a fixed torch seed and the tokenizer is a
byte-level one built in code (one token per byte, 256 of them). Two architectures:
Llama-style GQA with RoPE, and GPT-2 (learned absolute positions, no RoPE).
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 256

TEXT = (
    "The lighthouse at the end of the harbor had been dark for eleven years when Mara "
    "decided to bring it back to life. Everyone in the village told her it was a waste of "
    "time, but she bought the keeper's cottage anyway and spent the winter on the stairs. "
) * 4


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True)
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, n_positions=1024)
    kw.update(overrides)
    return GPT2Config(**kw)


def save_tiny(folder: Path, config, *, seed: int = 0, tokenizer: bool = True) -> Path:
    """Build the model of ``config`` with weights from ``seed`` and save it to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger than the default init, so the random model has peaked attention and outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return Path(folder)
