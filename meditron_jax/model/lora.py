"""LoRA adapters: declared like the params, merged into the block's weights, saved as PEFT.

For a target weight ``W`` of one layer with input dims ``I`` and output dims ``O``
(q: ``D -> N,H``; o: ``N,H -> D``; gate: ``D -> F``; ...), the adapter is ``a [I..., r]``
(random) and ``b [r, O...]`` (zeros, so training starts at the base model), and the
layer uses ``W + scale * a·b`` with ``scale = alpha / rank``. The forward merges per
layer inside the scanned block, so the model code gains one line and only one layer's
merged weights exist at a time.

Adapters are saved in the Hugging Face PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors`` with ``lora_A [r, in]`` / ``lora_B [out, r]`` per layer),
so ``peft`` can load them too; :func:`load_and_merge` folds them into full params for
``export --lora``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import atomic
from meditron_jax.model.config import LlamaConfig
from meditron_jax.model.params import param_specs
from meditron_jax.errors import UserError

# our target name -> (HF module path inside a decoder layer, number of input dims)
TARGETS = {
    "q": ("self_attn.q_proj", 1), "k": ("self_attn.k_proj", 1),
    "v": ("self_attn.v_proj", 1), "o": ("self_attn.o_proj", 2),
    "gate": ("mlp.gate_proj", 1), "up": ("mlp.up_proj", 1), "down": ("mlp.down_proj", 1),
}
_HF_TO_OURS = {hf.split(".")[-1]: ours for ours, (hf, _) in TARGETS.items()}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_UNSUPPORTED = ("fan_in_fan_out", "modules_to_save", "layers_to_transform", "rank_pattern",
                "alpha_pattern", "use_dora", "lora_bias")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if self.rank <= 0 or unknown or not self.targets:
            raise UserError(f"LoRA: rank must be > 0 and targets a non-empty subset of "
                            f"{', '.join(TARGETS)} (got rank={self.rank}, targets={list(self.targets)})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _io_shapes(cfg: LlamaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    spec = param_specs(cfg)["layers"][target]
    n_in = TARGETS[target][1]
    return spec.shape[1:1 + n_in], spec.shape[1 + n_in:]


def lora_logical_axes(cfg: LlamaConfig, lcfg: LoraConfig) -> dict:
    """Logical axes of each adapter (the rank dim is never sharded: it is tiny)."""
    out = {}
    for t in lcfg.targets:
        axes = param_specs(cfg)["layers"][t].axes  # ("layers", *in_axes, *out_axes)
        n_in = TARGETS[t][1]
        out[t] = {"a": ("layers",) + axes[1:1 + n_in] + (None,),
                  "b": ("layers", None) + axes[1 + n_in:]}
    return out


def init_lora(cfg: LlamaConfig, lcfg: LoraConfig, key: jax.Array) -> dict:
    """``a`` uniform in ±1/sqrt(fan_in) (PEFT's kaiming default), ``b`` zeros, float32."""
    layers = cfg.num_hidden_layers
    out = {}
    for i, t in enumerate(lcfg.targets):
        ins, outs = _io_shapes(cfg, t)
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, *ins, lcfg.rank),
                               jnp.float32, -bound, bound)
        out[t] = {"a": a, "b": jnp.zeros((layers, lcfg.rank, *outs), jnp.float32)}
    return out


def merge_layer(weights: dict, adapters: dict, scale: float) -> dict:
    """One layer's weights with ``W + scale * a·b`` for each adapted target, in float32
    (the caller casts to the compute dtype). ``a·b`` contracts the rank: for q,
    ``DR,RNH->DNH``; for o, ``NHR,RD->NHD``."""
    out = dict(weights)
    for name, ab in adapters.items():
        delta = jnp.tensordot(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), axes=1)
        out[name] = weights[name].astype(jnp.float32) + scale * delta
    return out


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """Full params with the adapters folded in (every layer), in each weight's dtype."""
    layers = dict(params["layers"])
    for name, ab in adapters.items():
        w = params["layers"][name]
        delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(
            jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32))
        layers[name] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


# ---- PEFT-format files ------------------------------------------------------------------
def _hf_key(i: int, target: str, which: str) -> str:
    return f"base_model.model.model.layers.{i}.{TARGETS[target][0]}.lora_{which}.weight"


def save_adapters(adapters: dict, lcfg: LoraConfig, path: str | os.PathLike,
                  base_model: str | None = None) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (written aside,
    then renamed, so an interrupted save leaves the previous adapters intact)."""
    from safetensors.numpy import save_file
    path = os.fspath(path)
    tensors = {}
    for t, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(a.shape[0]):
            tensors[_hf_key(i, t, "A")] = np.ascontiguousarray(a[i].reshape(-1, lcfg.rank).T)
            tensors[_hf_key(i, t, "B")] = np.ascontiguousarray(b[i].reshape(lcfg.rank, -1).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
        "lora_alpha": lcfg.alpha, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False,
        "target_modules": sorted(TARGETS[t][0].split(".")[-1] for t in lcfg.targets),
        "base_model_name_or_path": base_model,
    }
    with atomic.staged_dir(path) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE))
        atomic.write_json(os.path.join(staging, CONFIG_FILE), config)
    return path


def read_adapter_config(path: str) -> tuple[LoraConfig, float]:
    """(config, scale) from ``adapter_config.json``; refuses settings we cannot merge."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise UserError(f"{path}: no {CONFIG_FILE}; --lora takes a LoRA adapter directory "
                        "written by `meditron-jax train` (or PEFT)")
    try:
        with open(file, encoding="utf-8") as f:
            c = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{file}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    # PEFT options a plain merge would get wrong (alpha_pattern: silently, with the wrong scale)
    special = [k for k in _UNSUPPORTED if c.get(k) not in (None, {}, []) and c.get(k) is not False]
    if c.get("bias", "none") != "none" or special:
        raise UserError(f"{file}: only plain LoRA adapters are supported (bias='none', no "
                        f"{', '.join(_UNSUPPORTED)}); this one sets "
                        f"{', '.join(special) or 'bias=' + repr(c.get('bias'))}")
    modules = c.get("target_modules") or []
    if isinstance(modules, str):
        modules = [modules]
    unknown = [m for m in modules if m not in _HF_TO_OURS]
    if unknown:
        raise UserError(f"{file}: unsupported target module(s) {unknown}; supported: "
                        f"{', '.join(_HF_TO_OURS)}")
    rank, alpha = int(c.get("r", 0)), float(c.get("lora_alpha", 0))
    lcfg = LoraConfig(rank, alpha, tuple(_HF_TO_OURS[m] for m in modules))
    scale = alpha / math.sqrt(rank) if c.get("use_rslora") else alpha / rank
    return lcfg, scale


def load_adapters(path: str | os.PathLike, cfg: LlamaConfig) -> tuple[dict, LoraConfig, float]:
    """Read a PEFT-format adapter dir into our stacked layout; every tensor checked."""
    from safetensors.numpy import load_file
    path = os.fspath(path)
    lcfg, scale = read_adapter_config(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        raise UserError(f"{path}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
    tensors = load_file(file)
    adapters, used = {}, set()
    for t in lcfg.targets:
        ins, outs = _io_shapes(cfg, t)
        a_list, b_list = [], []
        for i in range(cfg.num_hidden_layers):
            ka, kb = _hf_key(i, t, "A"), _hf_key(i, t, "B")
            for k, want in ((ka, (lcfg.rank, math.prod(ins))), (kb, (math.prod(outs), lcfg.rank))):
                if k not in tensors:
                    raise UserError(f"{file}: missing tensor {k} (adapter and model disagree?)")
                if tuple(tensors[k].shape) != want:
                    raise UserError(f"{file}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                                    f"expected {want} for this model and r={lcfg.rank}")
            a_list.append(tensors[ka].T.reshape(*ins, lcfg.rank))
            b_list.append(tensors[kb].T.reshape(lcfg.rank, *outs))
            used.update((ka, kb))
        adapters[t] = {"a": np.stack(a_list).astype(np.float32),
                       "b": np.stack(b_list).astype(np.float32)}
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(f"{file}: unexpected tensor(s) {', '.join(extra[:3])}"
                        f"{' ...' if len(extra) > 3 else ''} (more layers than the model?)")
    return adapters, lcfg, scale


def load_and_merge(params: dict, cfg: LlamaConfig, adapter_dir: str | os.PathLike) -> dict:
    """Base params with the adapters in ``adapter_dir`` merged in (for ``export --lora``)."""
    adapters, _, scale = load_adapters(adapter_dir, cfg)
    return merge(params, adapters, scale)
