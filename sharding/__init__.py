"""Meshes, logical-axis rule tables, placement and multi-host start-up."""
from sharding.mesh import MESH_AXES, describe, initialize_distributed, make_mesh, mesh_shape, parse_mesh_spec
from sharding.placement import (batch_sharding, cache_shardings, derived_shardings, init_sharded,
                                param_shardings, place, replicated, tree_shardings)
from sharding.rules import (INFER_RULES, LOGICAL_NAMES, PRESETS, TRAIN_RULES, Rules,
                            activation_constrainer, check_batch, check_model_fits)

__all__ = [
    "MESH_AXES", "describe", "initialize_distributed", "make_mesh", "mesh_shape",
    "parse_mesh_spec", "batch_sharding", "cache_shardings", "derived_shardings",
    "init_sharded", "param_shardings", "place", "replicated", "tree_shardings",
    "INFER_RULES", "LOGICAL_NAMES", "PRESETS", "TRAIN_RULES", "Rules",
    "activation_constrainer", "check_batch", "check_model_fits",
]
