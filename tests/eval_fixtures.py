"""A tiny HF snapshot with a tokenizer, for the evaluation tests.

The shared tiny fixture has no tokenizer; evaluation needs text. A small byte-level
BPE is trained on the bundled texts (every byte stays encodable) and saved next to a
random std-0.25 model whose vocabulary matches it.
"""
from __future__ import annotations

import glob
import os

from tests import hf_fixtures

DATA = os.path.join(os.path.dirname(__file__), os.pardir, "meditron_jax", "data")
EVAL_DATA = os.path.join(DATA, "eval")
VOCAB = 1024
SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]  # ids 0, 1, 2 = TINY_HF's bos/eos


def sample(name: str) -> str:
    return os.path.normpath(os.path.join(EVAL_DATA, f"{name}_sample.jsonl"))


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    files = sorted(glob.glob(os.path.join(EVAL_DATA, "*.jsonl"))) + [
        os.path.join(DATA, "clinical_corpus.txt")]
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    return tok


def make_eval_snapshot(path, seed: int = 0, **overrides) -> str:
    """Random tiny Llama (std 0.25) + the trained tokenizer, as an HF directory."""
    kwargs = dict(vocab_size=VOCAB, max_position_embeddings=2048, seed=seed)
    kwargs.update(overrides)
    path = hf_fixtures.make_hf_snapshot(path, **kwargs)
    train_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return path
