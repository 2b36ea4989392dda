"""Continued pretraining and fine-tuning (peer of ``infer``; never imports it).

Public API (imported lazily, so ``meditron-jax train --help`` does not start JAX)::

    from train import RunConfig, load_config, run_training, abstract_train_step
    summary = run_training(load_config("configs/tiny_pretrain.yaml", ["train.steps=50"]))
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": ("train.config", "RunConfig"),
    "load_config": ("train.config", "load"),
    "run_training": ("train.loop", "run_training"),
    "TrainingDiverged": ("train.loop", "TrainingDiverged"),
    "abstract_train_step": ("train.step", "abstract_train_step"),
    "TrainState": ("train.step", "TrainState"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module), attr)
