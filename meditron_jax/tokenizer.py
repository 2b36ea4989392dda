"""Tokenizer wrapper: HF ``tokenizer.json`` (Llama-3) or sentencepiece ``tokenizer.model``.

Encoding follows transformers' ``AutoTokenizer`` on the same files: the bos token is
added by default (Llama-3's ``tokenizer.json`` says so in its post-processor; Llama-2's
sentencepiece tokenizer always prepends it), and special tokens written in the text
(``<|end_of_text|>``) encode to their ids.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_json_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")


class Tokenizer:
    """A small common interface over the two tokenizer kinds."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool):
        self._backend = backend
        self.kind = kind
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return cls.from_tokenizer_json(os.path.join(path, "tokenizer.json"))
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            return cls.from_sentencepiece(os.path.join(path, "tokenizer.model"))
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model; pass token ids "
                        "(prompt_ids / context_ids) or add the tokenizer files")

    @classmethod
    def from_tokenizer_json(cls, file: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"{file}: not a valid tokenizer.json ({exc})") from None
        cfg = read_json_file(os.path.join(os.path.dirname(file), "tokenizer_config.json"), {})
        bos = _token_id(tok, cfg.get("bos_token")) if cfg else None
        eos = _token_id(tok, cfg.get("eos_token")) if cfg else None
        if bos is None:
            bos = tok.token_to_id("<|begin_of_text|>")
        if eos is None:
            eos = tok.token_to_id("<|end_of_text|>")
        add_bos = bool(cfg.get("add_bos_token", True)) if cfg else True
        # Llama-3's tokenizer.json adds bos in its post-processor; do not add it twice.
        post = json.loads(tok.to_str()).get("post_processor") or {}
        adds_itself = "TemplateProcessing" in json.dumps(post)
        return cls(tok, "tokenizers", bos, (eos,) if eos is not None else (),
                   add_bos and not adds_itself)

    @classmethod
    def from_sentencepiece(cls, file: str) -> "Tokenizer":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(file)
        except Exception:
            raise UserError(f"{file}: not a sentencepiece model (Llama-3's tiktoken-format "
                            "tokenizer.model is not supported; use its tokenizer.json)") from None
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = (sp.eos_id(),) if sp.eos_id() >= 0 else ()
        return cls(sp, "sentencepiece", bos, eos, True)

    # ---- use -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._backend.GetPieceSize()
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"expected text, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            ids = list(self._backend.EncodeAsIds(text))
            prefix = add_bos and self.bos_id is not None
            return ([self.bos_id] if prefix else []) + ids
        ids = self._backend.encode(text, add_special_tokens=add_bos).ids
        if add_bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.DecodeIds(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_id(tok, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    return tok.token_to_id(token)
