"""What the inference commands (generate, score, eval) share: model, mesh and batch
options, and loading the weights straight into the inference shardings."""
from __future__ import annotations

import argparse

import jax.numpy as jnp
from jax.sharding import Mesh

from meditron_jax.errors import UserError
from meditron_jax.loading import LoadedModel, load_model
from sharding import INFER_RULES, check_batch, initialize_distributed, make_mesh, param_shardings

DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``several``: ``--model`` may repeat (a list of paths; ``eval`` compares them)."""
    parser.add_argument("--model", required=True, metavar="PATH",
                        action="append" if several else "store",
                        help="Hugging Face snapshot or native checkpoint directory"
                             + ("; repeat it, or give a quoted glob, to compare checkpoints"
                                if several else ""))
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help="device mesh, e.g. tensor=8 or data=2,tensor=4 (inference rules: "
                             "weights split over tensor, batch over data); none: one device")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="rows run together (a multiple of the mesh's data axis)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weight and compute dtype (auto: as stored in the checkpoint)")


def load_for_inference(args: argparse.Namespace) -> tuple[LoadedModel, Mesh | None]:
    """The mesh (checked against the batch before any weight is read) and the model
    loaded into the inference shardings (kv heads vs tensor is checked on the config)."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    initialize_distributed()
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_batch(args.batch_size, mesh, INFER_RULES)
    shardings = None if mesh is None else (lambda cfg: param_shardings(cfg, mesh, INFER_RULES))
    return load_model(args.model, shardings=shardings, dtype=DTYPES[args.dtype]), mesh
