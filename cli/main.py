"""The ``meditron-jax`` command: one subcommand per job, each defined next to its code.

Each entry names the module that defines ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their subcommand runs, so ``--help`` is fast and a
user's bad input is reported before JAX starts. This file sits above the layers
(like ``__main__``), so it may reach ``train`` and ``infer``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys

from meditron_jax import hostinfo
from meditron_jax.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help, and the environment epilog kept as written."""


# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("cli.convert", "convert a Hugging Face snapshot to a native checkpoint"),
    "export": ("cli.export", "export a native checkpoint to a Hugging Face directory"),
    "generate": ("infer.generate_cli", "generate text (one prompt, streamed, or a resumable JSONL sweep)"),
    "serve": ("serve.cli", "OpenAI-compatible HTTP server (completions, chat, streaming) on continuous batching"),
    "score": ("infer.score_cli", "log-likelihood of continuations (multiple-choice scoring)"),
    "eval": ("infer.eval_cli", "few-shot medical multiple-choice evaluation (MedQA, MedMCQA, PubMedQA, MMLU)"),
    "train": ("train.cli", "continued pretraining / fine-tuning from a YAML run config"),
    "plan": ("cli.plan", "ahead-of-time memory and FLOPs plan for a mesh and target (no weights)"),
    "bench": ("bench.cli", "benchmark against transformers and the machine's ceilings"),
    "demo": ("demo.run", "the whole mission end to end on a tiny model (make demo)"),
}


ENVIRONMENT = """environment:
  MEDITRON_DISTRIBUTED=0|1        start jax.distributed: never, or let JAX detect the cluster
  MEDITRON_HUGEPAGES=1|0          start with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent
                                  huge pages for XLA's per-call buffers: fewer page faults;
                                  the command restarts itself once to set it), or not"""


def build_parser(load_all: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meditron-jax",
        description="Llama-3.1 / Meditron3-8B in JAX: convert, train, generate, score, evaluate, plan.",
        epilog=ENVIRONMENT, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=ENVIRONMENT,
                           formatter_class=_Formatter)
        if load_all:
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError:
                p.set_defaults(_missing=module)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load_all=False)
    known = set(COMMANDS)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None:
        if any(a in ("-h", "--help") for a in argv):
            parser.print_help()
            return 0
        parser.print_usage(sys.stderr)
        print("meditron-jax: error: give a command; see meditron-jax --help", file=sys.stderr)
        return 2
    if first not in known:
        print(f"meditron-jax: error: unknown command {first!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _skip_absent_tpu()
    # Load just the chosen subcommand's options.
    module = importlib.import_module(COMMANDS[first][0])
    sub_parser = argparse.ArgumentParser(
        prog=f"meditron-jax {first}", description=COMMANDS[first][1], epilog=ENVIRONMENT,
        formatter_class=_Formatter)
    module.add_arguments(sub_parser)
    rest = argv[argv.index(first) + 1:]
    args = sub_parser.parse_args(rest)
    with _warnings_to_stderr(first):
        try:
            result = module.run(args)
        except UserError as exc:
            print(f"meditron-jax {first}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a file-system error no command turned into its own line
            from meditron_jax.atomic import os_error_line
            print(f"meditron-jax {first}: error: {os_error_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"meditron-jax {first}: interrupted", file=sys.stderr)
            return 130
        return int(result or 0)


@contextlib.contextmanager
def _warnings_to_stderr(command: str):
    """The library's warnings (logger ``meditron_jax``: ignored config keys, checkpoints
    without checksums, skipped data, ...) as one line each, in the shape of its errors,
    and only there (not again through a handler some library put on the root logger)."""
    log = logging.getLogger("meditron_jax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"meditron-jax {command}: warning: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _skip_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` extra, which ``plan`` uses to compile for TPUs
    without one), JAX probes for TPU chips at start-up and prints a screen of warnings
    on hosts that have none: skip that backend there (GPUs and CPUs are unaffected)."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    from sharding.distributed import on_tpu_vm
    if not on_tpu_vm():
        import jax  # it may already be imported: set the config as well as the environment
        os.environ["JAX_PLATFORMS"] = "cuda,cpu"
        jax.config.update("jax_platforms", "cuda,cpu")


def entry() -> None:
    """The console script and ``python -m cli``: huge pages for the allocator
    first (a re-exec, :func:`meditron_jax.hostinfo.reexec_with_hugepages`), then
    :func:`main`."""
    hostinfo.reexec_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
