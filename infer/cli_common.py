"""What the inference commands (generate, score, eval) share: model, mesh and batch
options, loading the weights straight into the inference shardings, and a sweep's
``--out``: checked, and its settings recorded, before the model loads."""
from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
from jax.sharding import Mesh

from infer.sweep import SETTINGS_SUFFIX, ResumableOutput
from meditron_jax.errors import UserError
from meditron_jax.io.loading import LoadedModel, load_model, model_fingerprint
from meditron_jax.kernels import ATTENTION
from meditron_jax.model.quant import check_scheme
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
    parser.add_argument("--attention", choices=ATTENTION, default="auto",
                        help="attention kernel: auto picks splash on TPU, cuDNN on GPU, XLA "
                             "elsewhere (meditron_jax.kernels)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="int8: weight-only int8 (each projection and the head, a float32 "
                             "scale per output channel), quantized once at load; activations "
                             "and the KV cache keep --dtype")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check a native checkpoint's files against its "
                             "checksums.json before loading (~1 GB/s per core)")


def inference_mesh(args: argparse.Namespace) -> Mesh | None:
    """Check the batch size, join the job (multi-process) and build the mesh, checked
    against the batch: before any file is written or weight read."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_scheme(getattr(args, "quantize", None))
    initialize_distributed()
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_batch(args.batch_size, mesh, INFER_RULES)
    return mesh


def load_for_inference(args: argparse.Namespace,
                       mesh: Mesh | None = None) -> tuple[LoadedModel, Mesh | None]:
    """The mesh (``mesh``, else :func:`inference_mesh`) and the model loaded into the
    inference shardings (kv heads vs tensor is checked on the config)."""
    if mesh is None:
        mesh = inference_mesh(args)
    shardings = None if mesh is None else (
        lambda cfg, quantize=None: param_shardings(cfg, mesh, INFER_RULES, quantize))
    return load_model(args.model, shardings=shardings, dtype=DTYPES[args.dtype],
                      verify=not getattr(args, "no_verify", False),
                      quantize=getattr(args, "quantize", None)), mesh


# ---- sweep outputs ---------------------------------------------------------------------------
# Options that never change a sweep's results: where it reads and writes, how the work is
# laid out (mesh, batch, weight layout: equal results, tested), checks that only refuse.
NOT_SETTINGS = frozenset({"model", "prompt", "prompts", "input", "out", "overwrite", "mesh",
                          "batch_size", "layers", "attention", "no_verify", "chat",
                          "prefix_cache"})
def add_sweep_output_arguments(parser: argparse.ArgumentParser, *, required: bool,
                               without: str = "") -> None:
    """``--out`` (``without``: what happens when it is not given) and ``--overwrite``."""
    parser.add_argument("--out", required=required, metavar="FILE.jsonl",
                        help="append results here; a rerun resumes, skipping ids already there, "
                             f"under the same model and settings (kept in FILE.jsonl"
                             f"{SETTINGS_SUFFIX}){without}")
    parser.add_argument("--overwrite", action="store_true",
                        help="start --out over: remove its results and settings (without it, "
                             "results of another model or other settings are refused)")


def sweep_settings(args: argparse.Namespace, command: str) -> dict:
    """What a sweep's results depend on, which a resume must match: every option but
    :data:`NOT_SETTINGS` (a new option counts until listed there), and the model by its
    fingerprint rather than its path."""
    options = {k: v for k, v in vars(args).items()
               if k not in NOT_SETTINGS and not k.startswith("_")}
    if options.get("quantize", "") is None:  # bf16 sweeps recorded before --quantize resume
        del options["quantize"]
    return {**options, "command": command, "model": model_fingerprint(args.model)}


def open_sweep_output(args: argparse.Namespace, command: str, source: str) -> ResumableOutput:
    """``--out`` opened for a sweep over the file ``source``, before the model loads:
    not the input itself, a writable file, and results of other settings refused
    (``--overwrite`` starts over). Call :func:`inference_mesh` first (it joins the job:
    which process writes is known only then)."""
    if os.path.exists(args.out) and os.path.samefile(args.out, source):
        raise UserError(f"--out {args.out} is the input file; give another path for the results")
    return ResumableOutput(args.out, settings=sweep_settings(args, command),
                           overwrite=args.overwrite)
