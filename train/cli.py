"""``meditron-jax train --config configs/NAME.yaml [--set key=value ...]``."""
from __future__ import annotations

import argparse
import json
import logging
import textwrap


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
    parser.epilog = _config_keys()
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sharding import initialize_distributed
    initialize_distributed()
    from train.loop import run_training
    summary = run_training(cfg)
    print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "final_eval_loss",
                                               "tokens_per_s", "mfu", "preempted",
                                               "latest_checkpoint", "output_dir")}))
    return 0
