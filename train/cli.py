"""``meditron-jax train --config configs/NAME.yaml [--set key=value ...]``."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import textwrap

EXIT_STATUS = """\
stopping: SIGTERM (a preemption notice) or Ctrl-C (SIGINT) at any point saves a checkpoint
  at the end of the current step (the first step includes compilation) and stops; before
  there is a training state (reading data, loading weights) there is nothing to save and it
  stops at once. A second Ctrl-C aborts immediately, keeping the last complete checkpoint.
  Rerun the same command to resume. With several processes SIGTERM goes through JAX's
  preemption notice (every process saves the same step) and Ctrl-C is not caught.
  One run per output_dir at a time: a lock file beside it (.NAME.lock) that the system
  releases when the run ends, however it ends.

exit status:
  0    finished, or stopped by SIGTERM (checkpoint saved)
  2    a one-line error: bad config or data, output_dir in use by another run or not
       writable, a failed write such as a full disk (the last complete checkpoint is
       kept and the error names it), a diverged loss
  130  stopped by Ctrl-C (checkpoint saved); a second Ctrl-C ends it by the signal"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _config_keys() -> str:
    """Every run-config key with its default, for --help (the config is the real CLI)."""
    import dataclasses
    from train.config import RunConfig
    lines = ["run config keys (YAML sections, or --set SECTION.KEY=VALUE) and defaults:"]
    for section in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), section.name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"  {section.name}: {value}")
            continue
        items = ", ".join(f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value))
        lines.append(textwrap.fill(f"{section.name}: {items}", 88, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.epilog = f"{EXIT_STATUS}\n\n{_config_keys()}"
    parser.add_argument("--config", default=None,
                        help="YAML run config (configs/*.yaml); omitted: the built-in defaults "
                             "(tiny random model, needs data.train_files)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.grad_accum=4 "
                             "--set output_dir=runs/x (repeatable; values are YAML)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config as JSON and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (same as --set log.progress=false)")


def run(args: argparse.Namespace) -> int:
    from train.config import load
    overrides = list(args.overrides) + (["log.progress=false"] if args.no_progress else [])
    cfg = load(args.config, overrides)  # bad keys fail here, before JAX starts
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    _log_other_libraries()
    _quiet_orbax()
    from sharding import initialize_distributed
    initialize_distributed()
    from train.checkpoints import Interrupted
    from train.loop import run_training
    try:
        summary = run_training(cfg)
    except Interrupted as exc:
        print(f"train: stopped by {exc.signal} before training started; nothing to save",
              file=sys.stderr)
        return _status(exc.signal)
    keys = ("steps", "final_loss", "final_eval_loss", "reward_margin", "reward_accuracy",
            "eval_reward_margin", "eval_reward_accuracy", "tokens_per_s", "mfu", "preempted",
            "signal", "latest_checkpoint", "output_dir")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))  # rewards: preference runs
    return _status(summary["signal"])


def _status(signal_name: str | None) -> int:
    return 130 if signal_name == "SIGINT" else 0


@functools.cache  # once per process
def _log_other_libraries() -> None:
    """Other libraries' warnings (Orbax, absl, JAX) as ``LEVEL name: message``, unless the
    embedding program configured logging (ours are the CLI's one-line warnings)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


@functools.cache  # once per process
def _quiet_orbax() -> None:
    """Orbax reports a failed background save over and over: its own log records from
    each thread (tracebacks included), asyncio's "exception was never retrieved" for the
    writes it gathered, and tensorstore's unraisable "Event loop is closed" for writes
    still in flight when it closed its event loop. The Checkpointer raises the failure
    once, as one line (exit 2): drop the rest."""
    logging.getLogger("absl").addFilter(lambda record: "/orbax/" not in record.pathname)
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage())
    previous = sys.unraisablehook

    def unraisablehook(info):
        if not (info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"):
            previous(info)
    sys.unraisablehook = unraisablehook
