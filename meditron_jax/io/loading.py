"""Load a model from a directory: a Hugging Face snapshot or a native checkpoint.

``load_model`` is the one entry point the commands use. It tells the two kinds of
directory apart by their files and returns the config, the parameters (placed in the
requested shardings), the tokenizer when present, and the generation config.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
from typing import Callable


from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_json_file
from meditron_jax.tokenizer import Tokenizer

# shardings(cfg) of the params; with quantize, shardings(cfg, quantize) of the quantized tree
ShardingsFn = Callable[..., object]

# Checkpoint files read whole for the fingerprint (configs, tokenizer, checksum manifests);
# weight files by their size and FINGERPRINT_SAMPLES evenly spaced 4 KiB blocks.
FINGERPRINT_CONTENT = ("*.json", "*.jinja", "tokenizer.model", "*checksum*", "*sha256*")
FINGERPRINT_SAMPLES = 16


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: dict
    tokenizer: Tokenizer | None
    generation_config: dict
    path: str
    kind: str  # "hf" or "native"
    quantize: str | None = None  # "int8": projections and head are int8 QArrays (model.quant)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Stop ids: the generation config's eos (when present), else the config's."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            return tuple(self.cfg.eos_token_id)
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def directory_kind(path: str) -> str:
    """'hf' or 'native', from the files present; a one-line error otherwise."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such directory; give a Hugging Face snapshot or a "
                        "native checkpoint directory")
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory; --model takes a checkpoint directory")
    if os.path.exists(os.path.join(path, "meditron_config.json")):
        return "native"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise UserError(f"{path}: neither a Hugging Face snapshot (config.json + *.safetensors) "
                    "nor a native checkpoint (meditron_config.json)")


def read_generation_config(path: str) -> dict:
    return read_json_file(os.path.join(path, "generation_config.json"), {})


def load_tokenizer(path: str) -> Tokenizer | None:
    try:
        return Tokenizer.from_dir(path)
    except UserError:
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise
        return None


def load_model(path: str | os.PathLike, *, shardings: ShardingsFn | None = None,
               dtype=None, verify: bool = True, quantize: str | None = None) -> LoadedModel:
    """Load config, params, tokenizer and generation config from ``path``.

    ``shardings(cfg)`` returns the target sharding tree for the params (from
    ``sharding.param_shardings``); without it the params land on the default device.
    ``dtype`` casts the weights (default: as stored). A native checkpoint's files are
    first checked against its checksums (``verify=False``: not). ``quantize="int8"``: the
    weights, loaded as above, are quantized once (``meditron_jax.model.quant``) into
    ``shardings(cfg, "int8")`` (int8 values like their weight, scales by the output axes)
    and the unquantized projections freed.
    """
    from meditron_jax.model.quant import check_scheme
    check_scheme(quantize)
    path = os.fspath(path)
    kind = directory_kind(path)
    if kind == "native":
        from meditron_jax.io import checkpoint
        cfg, params = checkpoint.restore_params(path, shardings=shardings, dtype=dtype,
                                                verify=verify)
    else:
        from meditron_jax.io import hf_io
        cfg, params = hf_io.load_hf_params(path, shardings=shardings, dtype=dtype)
    if quantize is not None:
        params = quantize_loaded(params, quantize,
                                 None if shardings is None else shardings(cfg, quantize))
    return LoadedModel(cfg=cfg, params=params, tokenizer=load_tokenizer(path),
                       generation_config=read_generation_config(path), path=path, kind=kind,
                       quantize=quantize)


def quantize_loaded(params: dict, scheme: str, shardings=None) -> dict:
    """``params`` quantized once under ``jax.jit`` into ``shardings`` (the quantized tree's,
    ``sharding.param_shardings(..., quantize=scheme)``; None: the default device). The
    inputs it replaced are deleted (the float copies are never kept beside the int8 ones)."""
    import jax
    from meditron_jax.model.quant import quantize_params

    out = jax.jit(lambda p: quantize_params(p, scheme), out_shardings=shardings)(params)
    for old in jax.tree.leaves(params):
        if isinstance(old, jax.Array) and not old.is_deleted():
            old.delete()
    return out


def model_fingerprint(path: str) -> str:
    """A stable hash of what a checkpoint computes, cheap at any size: its config,
    generation config, tokenizer and any checksum manifest by content; its weight files
    (``*.safetensors``, the files under a native ``params/``) by name, size and a sample
    of their bytes (64 KiB a file: two fine-tunes of one model have the same sizes).
    Hidden files and documentation do not count, nor where the checkpoint lives."""
    from meditron_jax.io.checkpoint import PARAMS_DIR
    directory_kind(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = os.path.join(root, name)
            rel = os.path.relpath(file, path)
            if any(fnmatch.fnmatch(name.lower(), p) for p in FINGERPRINT_CONTENT):
                with open(file, "rb") as f:
                    digest.update(f"{rel}\0{hashlib.sha256(f.read()).hexdigest()}\n".encode())
            elif name.endswith(".safetensors") or rel.startswith(PARAMS_DIR + os.sep):
                digest.update(f"{rel}\0{_sampled_digest(file)}\n".encode())
    return digest.hexdigest()


def _sampled_digest(file: str, block: int = 4096) -> str:
    size = os.path.getsize(file)
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        for i in range(FINGERPRINT_SAMPLES):
            f.seek(size * i // FINGERPRINT_SAMPLES)
            digest.update(f.read(block))
    return digest.hexdigest()
