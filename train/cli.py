"""``meditron-jax train --config configs/NAME.yaml [--set key=value ...]``."""
from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
