"""Random tiny transformers models for parity tests.

Weights use std 0.25 (not transformers' 0.02; embeddings 0.02, as in real checkpoints): at 0.02 the attention logits are so
small that a wrong RoPE scaling, eps or theta hardly moves the output and a parity
test would pass on a wrong model (tests/test_parity.py shows the wrong variants fail).
"""
from __future__ import annotations

import os

import numpy as np

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_hf_model(std: float = 0.25, seed: int = 0, **overrides):
    """A float32 ``LlamaForCausalLM`` with N(0, std) weights (norm weights around 1)."""
    from transformers import LlamaConfig

    kwargs = dict(TINY_HF)
    kwargs.update(overrides)
    return model_from_config(LlamaConfig(**kwargs), std, seed)


def model_from_config(hf_cfg, std: float = 0.25, seed: int = 0):
    """:func:`make_hf_model`'s weights for any transformers ``LlamaConfig``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).eval().to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                # Real Llama-3 embeddings are small (std ~0.01): the first RMSNorm then
                # sees mean(x^2) ~ 1e-4, where eps = 1e-5 vs 1e-6 matters.
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def make_hf_snapshot(path, max_shard_size: str | None = None, **overrides) -> str:
    model = make_hf_model(**overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(os.fspath(path), safe_serialization=True, **kwargs)
    return os.fspath(path)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    import torch
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask))
        if position_ids is not None:
            kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids))
        out = model(torch.as_tensor(np.asarray(tokens)), **kwargs)
    return out.logits.float().numpy()


def add_word_tokenizer(snapshot_dir, out_dir, words) -> str:
    """Copy an HF snapshot and give it a word-level tokenizer.json: ids 0-3 are
    <pad> <s> </s> <unk> (bos 1, eos 2, matching TINY_HF), then ``words`` in order."""
    import json
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    out_dir = os.fspath(out_dir)
    shutil.copytree(os.fspath(snapshot_dir), out_dir, dirs_exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(  # bos as Llama's tokenizer.json adds it
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return out_dir
