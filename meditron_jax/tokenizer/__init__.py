"""Tokenizers of Llama checkpoints (tokenizer.json, or sentencepiece tokenizer.model)."""
from meditron_jax.tokenizer.core import TOKENIZER_FILES, Tokenizer

__all__ = ["TOKENIZER_FILES", "Tokenizer"]
