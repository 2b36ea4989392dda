"""Tokenizer wrapper: HF ``tokenizer.json`` (Llama-3) or sentencepiece ``tokenizer.model``.

Encoding follows transformers' ``AutoTokenizer`` on the same files: the bos token is
added where the files say so (a ``tokenizer.json`` in its post-processor, as Llama-2/3's
do and SmolLM2's does not; a sentencepiece model by ``add_bos_token`` in
``tokenizer_config.json``, default true), and special tokens written in the text
(``<|end_of_text|>``; a Llama-2 fine-tune's added tokens such as ``<|im_start|>``) encode
to their ids. One deliberate difference: for a text that starts with a space,
sentencepiece (Meta's reference, and transformers 4) keeps the dummy-prefix ``▁`` in
front of it, transformers 5's ``LlamaTokenizer`` drops it; we encode as sentencepiece,
the tokenizer the Llama-2 family was trained with.
"""
from __future__ import annotations

import os
import re
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
        # As transformers 5 encodes a tokenizer.json: bos comes from its post-processor
        # (Llama-2/3 add it there; SmolLM2's has none), never added a second time here.
        return cls(tok, "tokenizers", bos, (eos,) if eos is not None else (), False)

    @classmethod
    def from_sentencepiece(cls, file: str) -> "Tokenizer":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(file)
        except Exception:
            raise UserError(f"{file}: not a sentencepiece model (Llama-3's tiktoken-format "
                            "tokenizer.model is not supported; use its tokenizer.json)") from None
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        cfg = read_json_file(config_file, {})
        if not isinstance(cfg, dict):
            raise UserError(f"{config_file}: expected a JSON object")
        backend = _SentencePiece(sp, _added_tokens(cfg, config_file),
                                 legacy=bool(cfg.get("legacy", False)))
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = (sp.eos_id(),) if sp.eos_id() >= 0 else ()
        return cls(backend, "sentencepiece", bos, eos, bool(cfg.get("add_bos_token", True)))

    # ---- use -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._backend.vocab_size
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"expected text, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            ids = self._backend.encode(text)
        else:
            ids = list(self._backend.encode(text, add_special_tokens=add_bos).ids)
        if add_bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Ids of ``text`` (no bos) and each token's [start, end) characters in it, where
        the tokenizer can tell them (tokenizer.json); None for sentencepiece."""
        if self.kind == "sentencepiece":
            return None
        enc = self._backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids, skip_special_tokens)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePiece:
    """A sentencepiece model with the added tokens of ``tokenizer_config.json``, split out
    of the text as transformers' ``LlamaTokenizer`` does: the text before the first one
    is encoded as sentencepiece encodes it; each later piece without the dummy-prefix
    ``▁`` (``legacy: false``, transformers 5's default) or with it unless it starts with
    a space (``legacy: true``)."""

    def __init__(self, sp, added: dict[str, tuple[int, bool]], legacy: bool):
        self.sp = sp
        self.added = added  # content -> (id, special)
        self.by_id = {i: (content, special) for content, (i, special) in added.items()}
        self.legacy = legacy
        longest_first = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self._split = re.compile(f"({longest_first})") if added else None
        self._bare = None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.GetPieceSize()] + [i + 1 for i in self.by_id])

    def _no_prefix(self):
        """The model without its dummy prefix (protobuf edit, as transformers 4 did)."""
        if self._bare is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._bare

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(self.sp.EncodeAsIds(text))
        ids: list[int] = []
        for k, piece in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self.added[piece][0])
            elif k == 0:
                ids += self.sp.EncodeAsIds(piece)
            elif piece:
                prefix = " " if self.legacy and not piece.startswith(" ") else ""
                ids += self._no_prefix().EncodeAsIds(prefix + piece)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not self.by_id:
            return self.sp.DecodeIds(ids)
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and i not in self.by_id:
                run.append(i)
                continue
            if run:
                parts.append(self._no_prefix().DecodeIds(run))
                run = []
            if i is not None and not (skip_special_tokens and self.by_id[i][1]):
                parts.append(self.by_id[i][0])
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text  # the dummy prefix's space


def _added_tokens(cfg: dict, file: str) -> dict[str, tuple[int, bool]]:
    """``added_tokens_decoder`` of a tokenizer_config.json: content -> (id, special)."""
    out = {}
    for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
        try:
            content, token_id = entry["content"], int(key)
        except (KeyError, TypeError, ValueError):
            content = None
        if not isinstance(content, str) or not content:
            raise UserError(f"{file}: added_tokens_decoder entry {key!r} needs an integer id "
                            "and a non-empty 'content' string")
        out[content] = (token_id, bool(entry.get("special", False)))
    return out


def _token_id(tok, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    return tok.token_to_id(token)
