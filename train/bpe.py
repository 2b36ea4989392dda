"""A small byte-level BPE tokenizer trained on the run's own corpus (``data.tokenizer: bpe:N``).

For pretraining a tiny model from scratch (the demo, the tests) a Llama-3 vocabulary
of 128k would dwarf the model; a few hundred merges learned from the corpus keep the
embedding small. The result is an ordinary ``tokenizer.json`` directory, laid out as
Llama-3's: the bos token comes from the post-processor (so ``tokenizers``, our
``Tokenizer`` and transformers' ``AutoTokenizer`` all add it, once) and
``tokenizer_config.json`` names the generic fast tokenizer class (without it, an
export's ``model_type: llama`` makes ``AutoTokenizer`` pick ``LlamaTokenizer``, which
wants a ``<unk>`` token this vocabulary does not have).
"""
from __future__ import annotations

import os

from meditron_jax import atomic
from meditron_jax.errors import UserError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"


def parse_spec(spec: str) -> int | None:
    """``"bpe:512"`` -> 512; anything else -> None (a tokenizer directory)."""
    if not spec.startswith("bpe:"):
        return None
    try:
        size = int(spec[4:])
    except ValueError:
        raise UserError(f"data.tokenizer {spec!r}: expected bpe:VOCAB_SIZE, e.g. bpe:512") from None
    if size < 260:
        raise UserError(f"data.tokenizer {spec!r}: vocab size must be >= 260 (256 bytes + "
                        "special tokens)")
    return size


def train_bpe(texts: list[str], vocab_size: int, out_dir: str) -> str:
    """Train on ``texts`` and write ``tokenizer.json`` + ``tokenizer_config.json``
    into ``out_dir`` (written aside, then renamed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = (BOS, tok.token_to_id(BOS))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[bos])])
    with atomic.staged_dir(out_dir) as staging:
        tok.save(os.path.join(staging, "tokenizer.json"))
        atomic.write_json(os.path.join(staging, "tokenizer_config.json"),
                          {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                           "eos_token": EOS, "pad_token": PAD, "add_bos_token": True})
    return out_dir
