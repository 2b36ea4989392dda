"""Native checkpoints: our config, Orbax-saved params, tokenizer and generation config.

Layout of a checkpoint directory::

    meditron_config.json   {"format": "meditron-jax", "version": 1, "config": <HF-spelled config>}
    params/                an Orbax PyTree checkpoint of the params tree (OCDBT)
    tokenizer.json ...     copied from the source, when present
    generation_config.json
    checksums.json         size and CRC-32 of every other file, written last
                           (:mod:`meditron_jax.io.checksums`)

``params/`` is a plain Orbax checkpoint (``ocp.PyTreeCheckpointer().restore`` reads it
without this code). Restores go straight into the target shardings: Orbax reads only
the chunks each process's devices hold, so a checkpoint saved on one mesh restores
onto any other. Conversion writes parameters as :class:`StreamedArray` leaves, which a
small Orbax type handler writes block by block (chunks = the blocks of
:mod:`meditron_jax.io.tensor_blocks`), so converting never holds a whole tensor.

Loads first check every file against ``checksums.json`` (``verify=False`` skips it; a
checkpoint from before checksums loads with one warning line), and storage errors (a
truncated chunk, a full or read-only disk) are one UserError line naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Callable, Iterator

import jax
import numpy as np

from meditron_jax import atomic
from meditron_jax.io import checksums
from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.model import abstract_params
from meditron_jax.io.tensor_blocks import Index, TensorPlan
from meditron_jax.tokenizer import TOKENIZER_FILES

CONFIG_FILE = "meditron_config.json"
PARAMS_DIR = "params"
FORMAT, VERSION = "meditron-jax", 1
# Copied verbatim between checkpoint kinds when present.
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json", "chat_template.jinja", "added_tokens.json")
_log = logging.getLogger(__name__)


# ---- config -------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> LlamaConfig:
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no {CONFIG_FILE}; not a native checkpoint") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "config" not in data:
        raise UserError(f"{file}: not a {FORMAT} checkpoint config")
    if data.get("version") != VERSION:
        raise UserError(f"{file}: checkpoint format version {data.get('version')!r}; this "
                        f"meditron-jax reads version {VERSION}")
    return LlamaConfig.from_hf(data["config"])


def config_json(cfg: LlamaConfig) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": cfg.to_hf()}


# ---- streamed writes through Orbax --------------------------------------------------------
@dataclasses.dataclass
class StreamedArray:
    """A parameter that Orbax writes block by block; it is never whole in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    blocks: Callable[[], Iterator[tuple[Index, np.ndarray]]]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _registry():
    import orbax.checkpoint as ocp
    from orbax.checkpoint import future, type_handlers as th
    import tensorstore as ts

    class StreamedArrayHandler(th.NumpyHandler):
        """Saves a StreamedArray as Orbax saves a numpy array (same typestr, same
        on-disk array), writing one block at a time, one parameter at a time."""

        async def serialize(self, values, infos, args=None):
            args = args or [th.SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(
                self._write(values, infos, args), name="streamed_array")]

        async def _write(self, values, infos, args):
            # Orbax's context caches up to 100 MB of OCDBT data, useless when writing
            # once; a context of our own keeps none. Safe because this handler is the
            # only writer of the checkpoint (save_params refuses mixed trees).
            context = ts.Context({"file_io_concurrency": {"limit": 64},
                                  "cache_pool#ocdbt": {"total_bytes_limit": 0}})
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                ocdbt = bool(info.is_ocdbt_checkpoint)
                spec = th.get_json_tspec_write(
                    info, use_ocdbt=ocdbt, global_shape=value.shape,
                    local_shape=value.chunk_shape, dtype=value.dtype,
                    process_index=jax.process_index() if ocdbt else None, arg=arg)
                store = await ts.open(ts.Spec(spec), create=True, open=True, context=context)
                for index, block in value.blocks():
                    # The block is not touched again: tensorstore may read it in place.
                    await store[index].write(block, can_reference_source_data_indefinitely=True)
                    del block  # before the generator makes the next one

    registry = th.create_type_handler_registry(
        (jax.Array, th.get_type_handler(jax.Array)),
        (np.ndarray, th.get_type_handler(np.ndarray)),
    )
    registry.add(StreamedArray, StreamedArrayHandler(), override=True, ignore_warnings=True)
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


# ---- storage errors -----------------------------------------------------------------------
# Tensorstore reports storage failures as ValueError("STATUS: message"); a failing file
# operation's errno, when there is one, ends the message as [os_error_code='28'].
_TS_STATUS = re.compile(r"^[A-Z_]+: ")
_TS_OS_ERROR = re.compile(r'"([^"]+)": [^"]*\[os_error_code=\'(\d+)\'\]')
_DAMAGED = "the checkpoint is truncated or damaged"


def _as_user_error(exc: BaseException, prefix: str, hint: str) -> UserError | None:
    """The exception chain's storage failure as one line: the failing file and reason of
    an OSError or a tensorstore error; our own UserError (raised in an Orbax worker
    thread) as it is; None for any other error (a bug: keep its traceback)."""
    for e in _chain(exc):
        if isinstance(e, UserError):
            return e
        if isinstance(e, OSError):
            cause = atomic.os_error_line(e)
        elif isinstance(e, ValueError) and _TS_STATUS.match(str(e)):
            found = _TS_OS_ERROR.search(str(e))
            cause = (f"{found.group(1)}: {os.strerror(int(found.group(2)))}" if found
                     else _TS_STATUS.sub("", str(e), count=1))
        else:
            continue
        return UserError(f"{prefix}: {cause}{'; ' + hint if hint else ''}")
    return None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def storage_errors(prefix: str, hint: str = "") -> Iterator[None]:
    """A storage failure inside the block (an OSError, or tensorstore's errors however
    Orbax wraps them) becomes one UserError line, ``PREFIX: FILE: reason; HINT``;
    Orbax's ERROR logs of the same failure from its worker threads are held back."""
    absl, quiet = logging.getLogger("absl"), _OrbaxThreadFailures()  # one per block: they nest
    absl.addFilter(quiet)
    try:
        yield
    except Exception as exc:
        error = _as_user_error(exc, prefix, hint)
        if error is None:
            raise
        raise error from None
    finally:
        absl.removeFilter(quiet)


class _OrbaxThreadFailures(logging.Filter):
    """Drops Orbax's log of an exception in a worker thread (re-raised in the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


def check_files(path: str, verify: bool = True) -> None:
    """Every file of the checkpoint against its ``checksums.json`` (nothing when not
    ``verify``); a checkpoint from before checksums gets one warning line."""
    if verify and not checksums.verify(path):
        _log.warning("%s: no %s (written before checksums); loading it unverified",
                     path, checksums.MANIFEST)


# ---- save / restore -----------------------------------------------------------------------
def _check_tree(tree, cfg: LlamaConfig, where: str) -> None:
    """Same paths and shapes as the model's declaration; names what differs."""
    want = {_name(p): tuple(x.shape) for p, x in
            jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    have = {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise UserError(f"{where}: params do not match {CONFIG_FILE}: missing "
                        f"{missing or 'none'}, unexpected {extra or 'none'}")
    for name, shape in want.items():
        if have[name] != shape:
            raise UserError(f"{where}: parameter {name} has shape {have[name]}, expected "
                            f"{shape} from {CONFIG_FILE}")


def _name(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def copy_side_files(source_dir: str | None, out_dir: str) -> None:
    if not source_dir:
        return
    for name in SIDE_FILES:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def save_params(path: str | os.PathLike, cfg: LlamaConfig, params, *,
                source_dir: str | os.PathLike | None = None) -> None:
    """Write a native checkpoint atomically (an existing one at ``path`` is replaced
    only once the new one is complete). ``params`` leaves are jax Arrays (any
    sharding; every process calls this) or :class:`StreamedArray`. Tokenizer and
    generation files are copied from ``source_dir`` when given; ``checksums.json``
    comes last. A storage error (disk full, no permission) is a one-line UserError."""
    path = os.path.abspath(os.fspath(path))
    _check_tree(params, cfg, path)
    streamed = [isinstance(x, StreamedArray) for x in jax.tree.leaves(params)]
    if any(streamed) and not all(streamed):
        raise ValueError("save_params: StreamedArray leaves cannot be mixed with arrays")
    lead = jax.process_index() == 0
    barrier = _barrier if jax.process_count() > 1 else None
    with atomic.staged_dir(path, lead=lead, barrier=barrier) as staging:
        with storage_errors(f"writing {path}"):
            _registry().save(os.path.join(staging, PARAMS_DIR), args=_save_args(params))
            if lead:
                atomic.write_json(os.path.join(staging, CONFIG_FILE), config_json(cfg))
                copy_side_files(os.fspath(source_dir) if source_dir else None, staging)
                checksums.write(staging)  # last: every process's shards are complete


def _save_args(params):
    import orbax.checkpoint as ocp
    return ocp.args.PyTreeSave(params)


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _orbax_metadata(params_dir: str) -> dict:
    """``{"layers.q": (shape, dtype), ...}`` from the Orbax metadata, or a UserError."""
    if not os.path.isdir(params_dir):
        raise UserError(f"{params_dir}: missing; the checkpoint is incomplete (re-run the "
                        "conversion or save)")
    try:
        tree = _registry().metadata(params_dir).item_metadata.tree
    except Exception as exc:  # orbax raises assorted types on unreadable directories
        raise UserError(f"{params_dir}: not a readable Orbax checkpoint ({type(exc).__name__}: "
                        f"{exc})") from None
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves}


def restore_params(path: str | os.PathLike, *, shardings=None, dtype=None, verify: bool = True):
    """``(cfg, params)`` from a native checkpoint, each array in its target sharding.

    ``shardings(cfg)`` gives the target tree (default: the first local device);
    ``dtype`` casts on read (default: as stored); ``verify=False`` skips the checksums.
    """
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.fspath(path))
    cfg = read_config(path)
    check_files(path, verify)
    params_dir = os.path.join(path, PARAMS_DIR)
    stored = _orbax_metadata(params_dir)
    _check_tree(_unflatten(stored), cfg, path)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = shardings(cfg) if shardings is not None else jax.tree.map(
        lambda _: default, abstract_params(cfg))

    def args(keypath, sharding):
        shape, stored_dtype = stored[_name(keypath)]
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape,
                                    dtype=np.dtype(dtype) if dtype is not None else stored_dtype)
    restore_args = jax.tree_util.tree_map_with_path(args, targets)
    with storage_errors(f"reading {params_dir}", _DAMAGED):
        params = _registry().restore(params_dir,
                                     args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return cfg, params


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for name, (shape, dtype) in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, dtype)
    return out


# ---- blockwise reads (export) -------------------------------------------------------------
class NativeReader:
    """Reads blocks of a native checkpoint's parameters (tensorstore slices of the
    Orbax arrays), so an export never holds a whole stacked parameter."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        import orbax.checkpoint as ocp
        self.path = os.path.abspath(os.fspath(path))
        self.cfg = read_config(self.path)
        check_files(self.path, verify)
        self._dir = os.path.join(self.path, PARAMS_DIR)
        self.stored = _orbax_metadata(self._dir)
        _check_tree(_unflatten(self.stored), self.cfg, self.path)
        self._context = ocp.type_handlers.get_ts_context()
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(_epath(self._dir))
        self._zarr3 = bool(getattr(_registry().metadata(self._dir).item_metadata, "use_zarr3", False))
        self._open: dict[str, object] = {}

    def dtype_of(self, p: TensorPlan) -> np.dtype:
        return self.stored[".".join(p.path)][1]

    def read(self, p: TensorPlan, index: Index) -> np.ndarray:
        with storage_errors(f"reading {self._dir}", _DAMAGED):
            return self._store(".".join(p.path))[index].read().result()

    def _store(self, name: str):
        if name not in self._open:
            import orbax.checkpoint as ocp
            import tensorstore as ts
            info = ocp.type_handlers.ParamInfo(
                name=name, parent_dir=_epath(self._dir), is_ocdbt_checkpoint=self._ocdbt,
                use_zarr3=self._zarr3, ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[name] = ts.open(spec, open=True, context=self._context).result()
        return self._open[name]


def _epath(path: str):
    from etils import epath
    return epath.Path(path)
