"""Everything a run needs before its first step, resolved from the run config.

The order matters for "the run does not start half-configured": the model config,
the tokenizer and every data file are read and checked (cheap) before any weights are
loaded or any step is compiled.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from meditron_jax import atomic
from meditron_jax.io.checkpoint import copy_side_files, read_config
from meditron_jax.model.config import LlamaConfig, preset
from meditron_jax.errors import UserError
from meditron_jax.model.lora import LoraConfig
from meditron_jax.tokenizer import Tokenizer
from train import bpe
from train.config import RunConfig, objective
from train.data import Loader, chat_template_for, fixed_batches, read_records

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RUN_META = "train_run.json"  # marks a training output dir usable as model.init_from


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_META))


def model_config(run: RunConfig) -> LlamaConfig:
    m = run.model
    if m.init_from:
        if m.overrides:
            raise UserError("run config: model.overrides cannot change a model loaded from "
                            "model.init_from (the weights fix the architecture)")
        return init_from_config(m.init_from)
    cfg = LlamaConfig.from_hf(m.config) if m.config else preset(m.preset or "tiny")
    if not m.overrides:
        return cfg
    try:
        return cfg.replace(**m.architecture_overrides())
    except UserError as exc:  # a value out of range, or sizes that do not agree
        raise UserError(f"run config: model.overrides: {exc}") from None


def init_from_config(path: str) -> LlamaConfig:
    """The architecture of ``model.init_from``: an HF snapshot, a native checkpoint or
    the output dir of an earlier training run."""
    if is_run_dir(path):
        with open(os.path.join(path, RUN_META), encoding="utf-8") as f:
            return LlamaConfig.from_hf(json.load(f)["model"])
    from meditron_jax.io.loading import directory_kind
    if directory_kind(path) == "native":
        return read_config(path)
    return LlamaConfig.from_hf(path)


def lora_config(run: RunConfig) -> LoraConfig | None:
    lo = run.lora
    return LoraConfig(lo.rank, lo.alpha, tuple(lo.targets)) if lo.rank else None


def tokenizer_for(run: RunConfig, cfg: LlamaConfig) -> tuple[Tokenizer, int, str]:
    """(tokenizer, eos id, its directory). ``bpe:N`` trains one on the training files once and keeps it
    in the output dir, so a resumed run reuses the exact same vocabulary."""
    spec = run.data.tokenizer
    if spec and bpe.parse_spec(spec):
        path = os.path.join(run.output_dir, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            if run.data.kind == "preference":
                from train.preference import pair_texts, read_pairs
                texts = [t for p in read_pairs(run.data.train_files, run.data) for t in pair_texts(p)]
            else:
                texts = read_records(run.data.train_files, run.data)
            if run.data.kind == "sft":
                texts = [p + c for p, c in texts]
            if jax.process_index() == 0:
                bpe.train_bpe(texts, bpe.parse_spec(spec), path)
            _barrier("tokenizer")
    else:
        path = spec or run.model.init_from
        if path and is_run_dir(path):
            path = os.path.join(path, "tokenizer")
        if not path:
            raise UserError("run config: no tokenizer; set data.tokenizer to a tokenizer "
                            "directory (or bpe:VOCAB_SIZE to train one on the corpus)")
    tok = Tokenizer.from_dir(path)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's "
                        f"vocab_size is {cfg.vocab_size}; use a matching tokenizer or model")
    eos = tok.eos_ids[0] if tok.eos_ids else (cfg.eos_token_id[0] if cfg.eos_token_id else None)
    if eos is None:
        raise UserError(f"tokenizer {path}: no end-of-text token to end documents with")
    return tok, int(eos), path


def keep_tokenizer(src: str, out_dir: str) -> None:
    """Copy the tokenizer (and generation config) files next to the run's checkpoints,
    so the output dir is self-contained for ``model.init_from`` and the final model."""
    dest = os.path.join(out_dir, "tokenizer")
    if jax.process_index() != 0 or os.path.abspath(src) == os.path.abspath(dest) \
            or os.path.exists(dest):
        return
    with atomic.staged_dir(dest) as staging:
        copy_side_files(src, staging)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class Data:
    train: Loader
    eval_batches: list[dict]
    local_batch: int


def make_data(run: RunConfig, tok: Tokenizer, eos: int, tok_dir: str | None = None) -> Data:
    """Validate every data file, then build this host's loader and eval batches."""
    n_proc, pid = jax.process_count(), jax.process_index()
    if run.train.batch_size % n_proc:
        raise UserError(f"train.batch_size {run.train.batch_size} is not divisible by the "
                        f"{n_proc} processes")
    local = run.train.batch_size // n_proc
    if run.data.kind == "preference":
        return _pair_data(run, tok, eos, local, tok_dir)
    records = read_records(run.data.train_files, run.data, pid, n_proc)
    template = chat_template_for(run.data, tok, tok_dir) if run.data.kind == "chat" else None
    eval_batches = []
    if run.data.eval_file:
        held_out = read_records([run.data.eval_file], run.data, pid, n_proc)
        eval_loader = Loader(held_out, tok, eos, run.data, local, shuffle=False, name="eval",
                             source=run.data.eval_file, chat_template=template)
        eval_batches = fixed_batches(eval_loader, run.log.eval_batches)
    return Data(Loader(records, tok, eos, run.data, local, chat_template=template,
                       source=", ".join(run.data.train_files)), eval_batches, local)


def _pair_data(run: RunConfig, tok: Tokenizer, eos: int, local: int, tok_dir: str | None) -> Data:
    """Preference pairs (train.preference): [local, 2, seq_len] batches."""
    import functools

    from train.preference import PairLoader, read_pairs
    n_proc, pid = jax.process_count(), jax.process_index()
    template = functools.cache(lambda: chat_template_for(run.data, tok, tok_dir))
    pairs = read_pairs(run.data.train_files, run.data, template, pid, n_proc)
    eval_batches = []
    if run.data.eval_file:
        held_out = read_pairs([run.data.eval_file], run.data, template, pid, n_proc)
        eval_loader = PairLoader(held_out, tok, eos, run.data, local, shuffle=False, name="eval",
                                 source=run.data.eval_file)
        eval_batches = fixed_batches(eval_loader, run.log.eval_batches)
    return Data(PairLoader(pairs, tok, eos, run.data, local,
                           source=", ".join(run.data.train_files)), eval_batches, local)


def run_meta(run: RunConfig, cfg: LlamaConfig, lora: LoraConfig | None) -> dict:
    """What a checkpoint must agree with to be resumed (see checkpoints.check_meta)."""
    return {"model": cfg.to_hf(),
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
            if lora else {},
            "seq_len": run.data.seq_len, "batch_size": run.train.batch_size,
            "data_kind": run.data.kind, "objective": objective(run)}
