"""Float32 matmuls (and cache-free attention) on one CPU device through oneMKL, as XLA
FFI custom calls.

XLA:CPU's own GEMM kernels (YNNPACK, Eigen) ran the model's matmuls 1.3-1.7x slower
than oneMKL on the benchmark's Intel box (bench/NOTES.md); PyTorch uses oneMKL, so on
such a machine a JAX model on XLA's kernels cannot match transformers whatever the
rest of the program does. Where oneMKL is installed (``pip install 'meditron-jax[cpu]'``,
part of ``requirements.txt`` on x86-64), :func:`matmul` hands a float32 product (or a
batch of them) to it: a C++ handler (``csrc/cpu_gemm.cc``), compiled here once per
(source, jaxlib, compiler, CPU) with the system's C++ compiler and cached, splits the
output into tiles over XLA's own intra-op thread pool and runs single-threaded
``cblas_sgemm`` on each, so no second thread pool fights XLA's for the cores.
Transposed operands are BLAS flags, never copies, which is what the backward pass
needs (``dx = g w^T``, ``dw = x^T g``). :func:`causal_attention` is a second handler in
the same library: flash-style attention for undifferentiated forwards.

A custom call is opaque to GSPMD, so this path is for programs on **one CPU device**
only: :func:`resolve` turns the ``matmul_impl`` knob (``None``/"auto", "xla", "blas";
environment ``MEDITRON_MATMUL``) into "blas" only when the process has exactly one
device, it is a CPU, oneMKL loaded and the CPU is an Intel one (oneMKL dispatches by
vendor: on AMD Zen 4 XLA's own GEMMs were faster; "blas" still forces it). Meshes, TPUs, GPUs, bfloat16 and the
ahead-of-time planner (:func:`forced`) always use XLA's dot. Without a compiler or
oneMKL, "auto" quietly stays on XLA and :func:`status` says why.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import hostinfo
from meditron_jax.errors import UserError

TARGET = "meditron_cpu_gemm"
ATTENTION_TARGET = "meditron_cpu_causal_attention"
IMPLS = ("auto", "xla", "blas")
ENV = "MEDITRON_MATMUL"
# Below this many FLOPs per tile a GEMM is not split across threads (the wake-up of a
# pool thread costs more than it saves).
MIN_TILE_FLOPS = 1 << 21
# CPU vendors on which "auto" hands products to oneMKL. oneMKL dispatches its kernels by
# vendor: on Intel (Ice Lake) its GEMMs ran the model's shapes 1.3-1.7x faster than
# XLA's, on AMD Zen 4 they ran 0.5-1.1x of XLA's (bench/NOTES.md s.20), so elsewhere
# "auto" stays on XLA and only an explicit "blas" uses it.
AUTO_BLAS_VENDORS = ("GenuineIntel",)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_gemm.cc")
_MKL_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL: one thread per call; we tile ourselves

_lock = threading.Lock()
_state: dict = {}      # "provider" (str) once loaded, or "error" (str) once failed
_forced = threading.local()


def _cache_dir() -> str:
    root = os.environ.get("MEDITRON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "meditron-jax")
    return os.path.join(root, "kernels")


def _find_mkl() -> str | None:
    """libmkl_rt from ``MEDITRON_MKL_LIB``, the ``mkl`` wheel, or this environment's lib/."""
    env = os.environ.get("MEDITRON_MKL_LIB")
    if env:
        return env if os.path.isfile(env) else None
    try:
        for f in importlib.metadata.files("mkl") or ():
            if os.path.basename(str(f)).startswith("libmkl_rt.so"):
                path = str(f.locate())
                if os.path.isfile(path):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[-1]
    return None


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    return cxx if cxx else next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_signature() -> str:
    """The CPU model and feature flags (a cached build made with -march=native must not
    be reused on another CPU, e.g. under a shared home directory)."""
    found = [hostinfo.cpuinfo_field(name) for name in ("model name", "flags")]
    if any(found):
        return "\n".join(found)
    import platform
    return platform.processor() + platform.machine()


def cpu_vendor() -> str:
    """/proc/cpuinfo's ``vendor_id`` ("GenuineIntel", "AuthenticAMD", ...), "" if unknown."""
    return hostinfo.cpuinfo_field("vendor_id")


def _build() -> str:
    """The handlers' shared library, compiled once per (source, jaxlib, compiler, CPU)
    and cached; the compiler writes aside and the result is renamed into place."""
    import jaxlib
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + cxx.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = os.path.join(out_dir, f"cpu_gemm-{key}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".cpu_gemm-", suffix=".so")
    os.close(fd)
    # -march=native: compiled where it runs (the cache key holds the CPU's flags)
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {os.path.basename(_SOURCE)} failed: {last}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> None:
    mkl_path = _find_mkl()
    if mkl_path is None:
        raise RuntimeError("oneMKL is not installed (pip install 'meditron-jax[cpu]')")
    mkl = ctypes.CDLL(mkl_path)
    mkl.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    if mkl.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL) != _MKL_SEQUENTIAL:
        raise RuntimeError("oneMKL refused its sequential threading layer (unset "
                           "MKL_THREADING_LAYER)")
    handler = ctypes.CDLL(_build())
    handler.meditron_cpu_gemm_set_sgemm.argtypes = [ctypes.c_void_p]
    handler.meditron_cpu_gemm_set_sgemm(ctypes.cast(mkl.cblas_sgemm_64, ctypes.c_void_p))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.MeditronCpuGemm),
                                platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET,
                                jax.ffi.pycapsule(handler.MeditronCpuCausalAttention),
                                platform="cpu")
    version = "?"
    try:
        version = importlib.metadata.version("mkl")
    except importlib.metadata.PackageNotFoundError:
        pass
    _state["provider"] = f"oneMKL {version}"
    _state["handles"] = (mkl, handler)  # keep both libraries loaded


def status() -> tuple[str | None, str | None]:
    """(provider description, None) once the BLAS path works; (None, reason) if not.
    Loads and compiles on the first call; never raises."""
    with _lock:
        if not _state:
            try:
                _load()
            except Exception as exc:  # noqa: BLE001 (any failure means: use XLA's dot)
                _state["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(
                    exc, RuntimeError) else str(exc)
        return _state.get("provider"), _state.get("error")


def available() -> bool:
    return status()[0] is not None


@contextlib.contextmanager
def forced(impl: str) -> Iterator[None]:
    """Every :func:`resolve` in this thread returns ``impl`` inside the block. "xla"
    also keeps the layers scanned (:func:`scan_layers`): the ahead-of-time planner
    lowers programs for other devices and forces it."""
    if impl not in ("xla", "blas"):
        raise ValueError(f"forced matmul impl must be 'xla' or 'blas', got {impl!r}")
    previous = getattr(_forced, "impl", None)
    _forced.impl = impl
    try:
        yield
    finally:
        _forced.impl = previous


def check_impl(impl: str | None, what: str = "matmul_impl") -> str:
    impl = "auto" if impl is None else impl
    if impl not in IMPLS:
        raise UserError(f"{what} {impl!r}: choose one of {', '.join(IMPLS)}")
    return impl


def resolve(impl: str | None = None) -> str:
    """"xla" or "blas" for a matmul traced now. ``None``/"auto" defers to the
    environment's ``MEDITRON_MATMUL`` (default "auto"), and "auto" picks "blas" only in a
    one-CPU-device process on an Intel CPU (:data:`AUTO_BLAS_VENDORS`) where oneMKL
    loaded; an explicit "blas" that cannot load is an error naming why."""
    forced_impl = getattr(_forced, "impl", None)
    if forced_impl is not None:
        impl = forced_impl
    elif impl in (None, "auto"):
        impl = check_impl(os.environ.get(ENV) or "auto", ENV)
    else:
        impl = check_impl(impl)
    if impl == "xla":
        return "xla"
    if impl == "auto":
        return "blas" if auto_prefers_blas() and available() else "xla"
    _require()
    return "blas"


def _require() -> None:
    """Loads the handlers on first use; a UserError naming why they cannot load."""
    provider, error = status()
    if provider is None:
        raise UserError(f"matmul implementation 'blas' is unavailable: {error}")


def auto_prefers_blas() -> bool:
    """Whether "auto" would use oneMKL here, if it loads: one CPU device, and a CPU on
    which oneMKL's kernels beat XLA's."""
    return one_cpu_device() and cpu_vendor() in AUTO_BLAS_VENDORS


def one_cpu_device() -> bool:
    """The process has exactly one device and it is a CPU: nothing is partitioned, so
    the choices made for XLA:CPU here (oneMKL GEMMs, unrolled layers) are safe."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def scan_layers(requested: bool | None = None, matmul_impl: str = "xla") -> bool:
    """Whether the decoder runs its layers as one ``lax.scan``. None: yes, except where
    the matmuls go to oneMKL (``matmul_impl``, as :func:`resolve` returned it: one CPU
    device), around whose custom calls XLA:CPU copied every scanned weight slice and
    zero-filled, wrote and re-read stacked buffers for the saved activations (Intel box:
    small train step 9.45 s unrolled against 10.15 s scanned). With XLA's own GEMMs
    scanned was as fast or faster (AMD box: forward 3.04 vs 3.43 s, train 10.93 vs
    11.04 s) and holds no split copy of the weights (bench/NOTES.md s.15, s.20). Inside
    ``forced("xla")`` always scanned (the planner's programs are for other devices)."""
    if getattr(_forced, "impl", None) == "xla":
        return True
    if requested is not None:
        return bool(requested)
    return matmul_impl != "blas"


def _call(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    _require()
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        a, b, trans_a=bool(trans_a), trans_b=bool(trans_b),
        min_tile_flops=np.int64(MIN_TILE_FLOPS))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` for float32 arrays, op = transpose where flagged: a is [M, K]
    ([K, M] with ``trans_a``), b is [K, N] ([N, K] with ``trans_b``), or both with one
    leading batch dim [Bt, ...] (a batched product). Only call it where :func:`resolve`
    returned "blas"."""
    return _call(a, b, trans_a, trans_b)


def _matmul_fwd(a, b, trans_a, trans_b):
    return _call(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, res, g):
    a, b = res
    g = g.astype(jnp.float32)
    # y = op(a) op(b): d op(a) = g op(b)^T and d op(b) = op(a)^T g, stored back in the
    # operands' own layouts by choosing the flags (no transposed copies).
    da = _call(b, g, trans_b, True) if trans_a else _call(g, b, False, not trans_b)
    db = _call(g, a, True, trans_a) if trans_b else _call(a, g, not trans_a, False)
    return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float) -> jax.Array:
    """Cache-free causal attention in one custom call (``csrc/cpu_gemm.cc``): q
    [B,T,N,H], k/v [B,T,K,H] float32, segment_ids [B,T]; key slot s is visible from
    query slot t when s <= t and their segments match. A flash-style loop over key
    blocks with an online softmax, no [T, T] buffer. Forward only: differentiate
    :func:`meditron_jax.layers.causal_attention`, which wraps it."""
    _require()
    return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")(
        q, k, v, segment_ids.astype(jnp.int32), scale=np.float32(scale))


def supports(*arrays) -> bool:
    """Whether :func:`matmul` takes these operands (float32 only: bf16 stays on XLA)."""
    return all(x.dtype == jnp.float32 for x in arrays)
