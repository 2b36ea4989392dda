"""Meshes, logical-axis rule tables, placement and multi-host start-up."""
from sharding.distributed import add_distributed_arguments, initialize_distributed, initialize_from_args
from sharding.mesh import (ALL_AXES, CONTEXT_AXIS, MESH_AXES, describe, make_mesh, mesh_shape,
                           parse_mesh_spec)
from sharding.placement import (batch_sharding, cache_shardings, derived_shardings, init_sharded,
                                step_kernels,
                                param_shardings, place, replicated, sharded_initializer,
                                tree_shardings)
from sharding.rules import (INFER_RULES, LOGICAL_NAMES, PREFILL_RULES, PRESETS, TRAIN_RULES,
                            Rules, activation_constrainer, cache_heads, check_batch,
                            check_model_fits, check_sequence)

__all__ = [
    "add_distributed_arguments", "initialize_distributed", "initialize_from_args",
    "ALL_AXES", "CONTEXT_AXIS", "MESH_AXES", "describe", "make_mesh", "mesh_shape",
    "parse_mesh_spec", "batch_sharding", "cache_shardings", "derived_shardings",
    "init_sharded", "param_shardings", "place", "replicated", "sharded_initializer", "tree_shardings",
    "step_kernels",
    "INFER_RULES", "LOGICAL_NAMES", "PREFILL_RULES", "PRESETS", "TRAIN_RULES", "Rules",
    "activation_constrainer", "cache_heads", "check_batch", "check_model_fits",
    "check_sequence",
]
