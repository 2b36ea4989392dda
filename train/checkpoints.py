"""Training checkpoints: Orbax ``CheckpointManager`` with the data position and a fingerprint.

Each step directory holds four items: ``params`` (what is trained: the full params,
or under LoRA only the adapters, never the frozen base), ``opt`` (step and optimizer
state; apart, so a later run can take just the params), ``data`` (each process's
loader state, ``process_I-of-N.json``, so a resumed run sees the batches the
uninterrupted run would have) and
``meta`` (the model config and LoRA settings, checked on resume before any array is
read). Orbax commits a step atomically (written aside, then renamed), so a kill during
a save leaves the previous step as the latest. Saves are async: the device-to-host
copy finishes inside ``save`` (the next step may then donate the buffers) and the
files are written in the background.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

from meditron_jax.io.checkpoint import storage_errors
from meditron_jax.errors import UserError
from train.step import TrainState, with_shardings

log = logging.getLogger("meditron_jax.train")


def _opt(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


class Checkpointer:
    """One run's checkpoints. ``committed`` is the newest step known complete on disk.

    A failed write (disk full, no permission) is a one-line UserError naming the file,
    the step and the last complete checkpoint, raised at the first wait point after
    the background write failed: the next ``check()`` (every step), ``save`` or
    ``wait``. Orbax then never commits the step, so the previous ones stay intact.
    """

    def __init__(self, directory: str, keep: int, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        # The run writing here clears what a killed save left (its lock keeps it alone);
        # a reader (another run's model.init_from) leaves the directory as it is.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save)
        # Each process saves its own data position (its records and packing differ).
        self._data = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        data = ocp.JsonCheckpointHandler(self._data, multiprocessing_options=(
            ocp.options.MultiprocessingOptions(primary_host=None)))
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "opt", "data", "meta"),
                                          item_handlers={"data": data})
        if not read_only:  # a kill between a commit and the removal of the oldest step
            for old in sorted(self._mgr.all_steps())[:-keep]:
                self._mgr.delete(old)
        self.committed: int | None = self._mgr.latest_step()
        self._writing: int | None = None  # the step whose async save may still run
        self._failed = False

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        if step in (self.committed, self._writing):
            return
        self.wait()  # the previous save first, so that its failure is reported as its own
        with self._storage(step):
            self._mgr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params), opt=ocp.args.StandardSave(_opt(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        self._writing = step

    def check(self) -> None:
        """Cheap, every step: a background save that has ended is waited for, so a failed
        one stops training now, not at the next save."""
        if self._writing is not None and not self._mgr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        if self._writing is None:
            return
        with self._storage(self._writing):
            self._mgr.wait_until_finished()
        self.committed, self._writing = self._writing, None

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._mgr.close()
            except Exception:
                if not self._failed:  # after a failed save Orbax raises it once more here
                    raise

    def last_complete(self) -> str:
        """Where a rerun resumes from, for messages."""
        if self.committed is None:
            return "no checkpoint is complete yet (a rerun starts over)"
        return f"the last complete checkpoint is step {self.committed} in {self.directory}"

    @contextlib.contextmanager
    def _storage(self, step: int):
        try:
            with storage_errors(f"checkpoint step {step} was not written",
                                f"{self.last_complete()}, intact; free space (or fix the file "
                                "system) and rerun the same command to resume"):
                yield
        except UserError:
            self._failed = True
            raise

    def read_meta(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract: TrainState, shardings: TrainState,
                meta: dict) -> tuple[TrainState, dict]:
        """The state placed in ``shardings`` (``frozen`` left None) and the data state."""
        check_meta(self.read_meta(step), meta, f"{self.directory}/{step}")
        data = os.path.join(self.directory, str(step), "data")
        if not os.path.isfile(os.path.join(data, self._data)):
            saved = sorted(n for n in os.listdir(data) if n.endswith(".json"))
            raise UserError(f"{data}: no {self._data} (it holds {', '.join(saved)}); resume "
                            "with as many processes as wrote the checkpoint (each process "
                            "keeps its own data position)")
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


def check_meta(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint written for another model or LoRA setting."""
    for section in ("model", "lora"):
        a, b = saved.get(section) or {}, current.get(section) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a.get(k)!r} vs run {b.get(k)!r}" for k in diff[:4])
            raise UserError(f"{where}: checkpoint was written for a different {section} ({shown}); "
                            "use a new output_dir or the run config that wrote it")
    for key in ("seq_len", "batch_size", "data_kind", "objective"):
        if key in saved and saved.get(key) != current.get(key):
            log.warning("resuming %s with %s=%r (checkpoint had %r): the data order will differ "
                        "from an uninterrupted run", where, key, current.get(key), saved.get(key))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT before the training state existed: there was nothing to save."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class Preemption:
    """SIGTERM (a TPU / cluster preemption notice) or SIGINT (Ctrl-C) -> save at the end
    of the current step and stop.

    Until :meth:`arm` (while reading data, loading weights) there is no training state
    to save, so the first signal raises :class:`Interrupted` wherever the main thread
    is. Once armed the handler only records the signal, which the loop reads after
    every step (the first one includes the compilation). After the first signal, SIGINT
    is back to the OS default: a second Ctrl-C ends the process at once, keeping the last
    complete checkpoint as a kill does. With several processes every host must save at
    the same step, so JAX's coordination service decides (it watches for SIGTERM
    itself): ``reached_preemption_sync_point``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None  # the first signal received
        self._armed = False
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._received) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _received(self, signum: int, _frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if first and not self._armed:
            raise Interrupted(self.signal)

    def arm(self) -> None:
        """From now on a signal is read at the end of a step (there is a state to save)."""
        self._armed = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal is not None
