"""The Llama decoder: its config (:mod:`.config`), parameters declared once (:mod:`.params`),
the layer math (:mod:`.layers`), the KV cache (:mod:`.kvcache`), LoRA adapters (:mod:`.lora`),
the one forward (:mod:`.decoder`) and an NNX view of it (:mod:`.nnx`)."""
from meditron_jax.model.decoder import (REMAT_POLICIES, check_token_ids, cross_entropy, forward,
                                        logits_from_hidden, mask_padded_vocab, token_log_probs,
                                        unstack_layers)
from meditron_jax.model.params import (VOCAB_MULTIPLE, Params, ParamSpec, abstract_params,
                                       count_params, init_params, is_spec, logical_axes,
                                       padded_vocab_size, param_specs)

__all__ = [
    "REMAT_POLICIES", "check_token_ids", "cross_entropy", "forward", "logits_from_hidden",
    "mask_padded_vocab", "token_log_probs", "unstack_layers", "VOCAB_MULTIPLE", "Params",
    "ParamSpec", "abstract_params", "count_params", "init_params", "is_spec", "logical_axes",
    "padded_vocab_size", "param_specs",
]
