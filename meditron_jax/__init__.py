"""meditron-jax: the Llama-3.1 decoder family (Meditron3-8B) in JAX.

Public API of the model layer; it knows nothing of meshes (see ``sharding``).
"""
from meditron_jax.model.config import PRESETS, LlamaConfig, RopeScaling, preset
from meditron_jax.errors import UserError
from meditron_jax.model.kvcache import KVCache
from meditron_jax.model import (REMAT_POLICIES, ParamSpec, abstract_params, count_params,
                                cross_entropy, forward, init_params, logical_axes,
                                logits_from_hidden, param_specs, token_log_probs)
from meditron_jax.tokenizer import Tokenizer

__all__ = [
    "PRESETS", "LlamaConfig", "RopeScaling", "preset", "UserError", "KVCache",
    "REMAT_POLICIES", "ParamSpec", "abstract_params", "count_params", "cross_entropy",
    "forward", "init_params", "logical_axes", "logits_from_hidden", "param_specs",
    "token_log_probs", "Tokenizer",
]
