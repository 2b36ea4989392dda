"""Reading Hugging Face safetensors snapshots into our params (provisional in-memory
version; the checkpoint issue replaces it with the streaming, sharded reader)."""
from __future__ import annotations

import glob
import os

import jax
import numpy as np

from meditron_jax.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.hf_keys import params_from_hf


def load_hf_params(path: str, *, shardings=None, dtype=None):
    from safetensors.numpy import load_file
    cfg = LlamaConfig.from_hf(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights (pickled .bin/.pt are not supported)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    params = params_from_hf(tensors, cfg, dtype=dtype)
    if shardings is not None:
        params = jax.tree.map(jax.device_put, params, shardings(cfg))
    else:
        params = jax.tree.map(jax.numpy.asarray, params)
    return cfg, params
