"""The transformers side: PyTorch ``LlamaForCausalLM`` in float32, eager, as users run it.

It builds the random model (the weights both sides use), saves it as a safetensors
snapshot for our side to load, and times forward, ``generate`` and one AdamW step.
"""
from __future__ import annotations

import os

import numpy as np

from bench import presets as workloads
from bench.presets import BenchPreset
from bench.timing import KeepLast, OtherLoad, median_seconds, timed


def build_model(p: BenchPreset, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = dict(p.cfg.to_hf())
    hf_cfg.pop("architectures")
    # transformers' own init (normal, std initializer_range=0.02): a fair random model.
    return LlamaForCausalLM(LlamaConfig(**hf_cfg)).to(torch.float32).eval()


def save_snapshot(model, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True)


def _forward(model, p: BenchPreset, repeats: int, out_dir: str | None) -> dict:
    import torch

    tokens = torch.from_numpy(workloads.forward_tokens(p))
    with torch.inference_mode():
        step = KeepLast(lambda: model(input_ids=tokens).logits)
        first = timed(step)
        seconds = median_seconds(step, repeats, warmup=0)
        if out_dir:
            np.save(os.path.join(out_dir, workloads.REFERENCE_LOGITS),
                    workloads.reference_slice(step.last.numpy()))
    return {"seconds": seconds, "first_call_s": first}


def _generate(model, p: BenchPreset, bench: str, repeats: int) -> dict:
    import torch

    prompt = torch.from_numpy(workloads.prompt_tokens(p, bench))
    mask = torch.ones_like(prompt)

    def gen(n: int):
        out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + n, out.shape
        return out

    with torch.inference_mode():
        first = timed(lambda: gen(p.work.new_tokens))
        ttft = median_seconds(lambda: gen(1), repeats)
        full = KeepLast(lambda: gen(p.work.new_tokens))
        total = median_seconds(full, repeats, warmup=0)
        tokens = full.last[:, prompt.shape[1]:].numpy()
    return workloads.decode_result(p, bench, ttft, total, first, tokens)


def _train(model, p: BenchPreset, repeats: int) -> dict:
    import torch

    hp = workloads.TRAIN_HPARAMS
    tokens = torch.from_numpy(workloads.forward_tokens(p))
    model.train()
    if p.work.train_remat == "full":
        model.gradient_checkpointing_enable()
    decay = [w for n, w in model.named_parameters() if w.ndim > 1 and "embed" not in n]
    no_decay = [w for n, w in model.named_parameters() if not (w.ndim > 1 and "embed" not in n)]
    # The fused CPU kernel is torch's fastest AdamW: the strongest baseline.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                            fused=True)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = timed(step)
    seconds = median_seconds(step, repeats, warmup=0)
    model.eval()
    return {"seconds": seconds, "first_call_s": first}


def run(p: BenchPreset, benches: list[str], repeats: int, seed: int, weights_dir: str) -> dict:
    """Build, save the weights to ``weights_dir``, time each benchmark in ``benches``."""
    model = build_model(p, seed)
    save_snapshot(model, weights_dir)
    results = {}
    # Training last: it changes the weights the other benchmarks share with our side.
    for bench in sorted(benches, key=lambda b: b == "train"):
        with OtherLoad() as load:
            if bench == "forward":
                results[bench] = _forward(model, p, repeats, weights_dir)
            elif bench == "train":
                results[bench] = _train(model, p, repeats)
            else:
                results[bench] = _generate(model, p, bench, repeats)
        results[bench]["other_load"] = load.value
    return results
