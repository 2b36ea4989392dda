"""The transformers side: PyTorch ``LlamaForCausalLM`` in float32, eager, as users run it.

It builds the random model (the weights both sides use) and saves it as a safetensors
snapshot for our side to load, or loads that snapshot in a later process. Each
benchmark is a :class:`~bench.timing.Bench`: warm up, then one timed run per call, so
the parent can interleave them with ours (bench/cli.py). The worker also answers the
ceiling probes taken between the pairs (:func:`bench.ceilings.probe`).
"""
from __future__ import annotations

import os

import numpy as np

from bench import presets as workloads
from bench.presets import BenchPreset
from bench.timing import Bench, KeepLast, timed


def build_model(p: BenchPreset, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = dict(p.cfg.to_hf())
    hf_cfg.pop("architectures")
    # transformers' own init (normal, std initializer_range=0.02): a fair random model.
    return LlamaForCausalLM(LlamaConfig(**hf_cfg)).to(torch.float32).eval()


def load_or_build(p: BenchPreset, seed: int, weights_dir: str):
    """The shared weights: built (and saved for our side) by the first process of a
    preset, loaded from the snapshot by any later one."""
    import torch
    from transformers import LlamaForCausalLM

    if os.path.exists(os.path.join(weights_dir, "config.json")):
        return LlamaForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).eval()
    model = build_model(p, seed)
    model.save_pretrained(weights_dir, safe_serialization=True)
    return model


class _Forward(Bench):
    def __init__(self, model, p: BenchPreset, out_dir: str):
        import torch
        self.torch, self.model, self.out_dir = torch, model, out_dir
        self.tokens = torch.from_numpy(workloads.forward_tokens(p))
        self.step = KeepLast(lambda: self.model(input_ids=self.tokens).logits)

    def warm(self) -> dict:
        with self.torch.inference_mode():
            return {"first_call_s": timed(self.step)}

    def once(self) -> dict:
        with self.torch.inference_mode():
            return {"seconds": timed(self.step)}

    def finish(self) -> dict:
        np.save(os.path.join(self.out_dir, workloads.REFERENCE_LOGITS),
                workloads.reference_slice(self.step.last.numpy()))
        return {}


class _Generate(Bench):
    def __init__(self, model, p: BenchPreset, bench: str):
        import torch
        self.torch, self.model, self.p = torch, model, p
        self.prompt = torch.from_numpy(workloads.prompt_tokens(p, bench))
        self.mask = torch.ones_like(self.prompt)
        self.full = KeepLast(lambda: self._gen(p.work.new_tokens))

    def _gen(self, n: int):
        out = self.model.generate(input_ids=self.prompt, attention_mask=self.mask,
                                  do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == self.prompt.shape[1] + n, out.shape
        return out

    def warm(self) -> dict:
        with self.torch.inference_mode():
            first = timed(self.full)
            self._gen(1)
        return {"first_call_s": first}

    def once(self) -> dict:
        with self.torch.inference_mode():
            ttft = timed(lambda: self._gen(1))
            total = timed(self.full)
        return workloads.decode_once(self.p, ttft, total)

    def finish(self) -> dict:
        return {"tokens": self.full.last[:, self.prompt.shape[1]:].numpy().tolist()}


class _Train(Bench):
    def __init__(self, model, p: BenchPreset):
        import torch
        hp = workloads.TRAIN_HPARAMS
        self.model = model
        self.tokens = torch.from_numpy(workloads.forward_tokens(p))
        model.train()
        if p.work.train_remat == "full":
            model.gradient_checkpointing_enable()
        named = list(model.named_parameters())
        decay = [w for n, w in named if w.ndim > 1 and "embed" not in n]
        no_decay = [w for n, w in named if not (w.ndim > 1 and "embed" not in n)]
        # The fused CPU kernel is torch's fastest AdamW: the strongest baseline.
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]),
                                     eps=hp["eps"], fused=True)
        self.clip = hp["clip_norm"]

    def _step(self):
        import torch
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def warm(self) -> dict:
        return {"first_call_s": timed(self._step)}

    def once(self) -> dict:
        return {"seconds": timed(self._step)}


class Side:
    """One process's transformers model; ``bench(name)`` makes each benchmark."""

    def __init__(self, p: BenchPreset, weights_dir: str, seed: int):
        self.p, self.weights_dir = p, weights_dir
        self.model = load_or_build(p, seed, weights_dir)

    def bench(self, name: str) -> Bench:
        # Training must be the last: it changes the weights the others share with ours.
        if name == "forward":
            return _Forward(self.model, self.p, self.weights_dir)
        if name == "train":
            return _Train(self.model, self.p)
        return _Generate(self.model, self.p, name)
