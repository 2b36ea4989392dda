"""Training checkpoints: Orbax ``CheckpointManager`` with the data position and a fingerprint.

Each step directory holds four items: ``params`` (what is trained: the full params,
or under LoRA only the adapters, never the frozen base), ``opt`` (step and optimizer
state; apart, so a later run can take just the params), ``data`` (the loader's
grain state, so a resumed run sees the batches the uninterrupted run would have) and
``meta`` (the model config and LoRA settings, checked on resume before any array is
read). Orbax commits a step atomically (written aside, then renamed), so a kill during
a save leaves the previous step as the latest. Saves are async: the device-to-host
copy finishes inside ``save`` (the next step may then donate the buffers) and the
files are written in the background.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

from meditron_jax.errors import UserError
from train.step import TrainState, with_shardings

log = logging.getLogger("meditron_jax.train")


def _opt(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "opt", "data", "meta"))
        self.last_saved: int | None = self._mgr.latest_step()

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        if self.last_saved == step:
            return
        self._mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt=ocp.args.StandardSave(_opt(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.last_saved = step

    def read_meta(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract: TrainState, shardings: TrainState,
                meta: dict) -> tuple[TrainState, dict]:
        """The state placed in ``shardings`` (``frozen`` left None) and the data state."""
        check_meta(self.read_meta(step), meta, f"{self.directory}/{step}")
        out = self._mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_shardings(abstract.params, shardings.params)),
            opt=ocp.args.StandardRestore(with_shardings(_opt(abstract), _opt(shardings))),
            data=ocp.args.JsonRestore()))
        opt = out.opt
        return TrainState(opt["step"], out.params, opt["opt_state"], None), out.data

    def restore_params(self, step: int, abstract_params, shardings):
        """Only the trained params (``model.init_from`` an earlier run's output dir)."""
        out = self._mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_shardings(abstract_params, shardings))))
        return out.params

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def check_meta(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint written for another model or LoRA setting."""
    for section in ("model", "lora"):
        a, b = saved.get(section) or {}, current.get(section) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a.get(k)!r} vs run {b.get(k)!r}" for k in diff[:4])
            raise UserError(f"{where}: checkpoint was written for a different {section} ({shown}); "
                            "use a new output_dir or the run config that wrote it")
    for key in ("seq_len", "batch_size", "data_kind"):
        if key in saved and saved.get(key) != current.get(key):
            log.warning("resuming %s with %s=%r (checkpoint had %r): the data order will differ "
                        "from an uninterrupted run", where, key, current.get(key), saved.get(key))


class Preemption:
    """SIGTERM (a TPU / cluster preemption notice) -> save at the current step, exit 0.

    With one process a signal handler sets a flag. With several, every host must save
    at the same step, so JAX's coordination service decides (it watches for the
    notice itself): ``reached_preemption_sync_point``.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self) -> "Preemption":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()
