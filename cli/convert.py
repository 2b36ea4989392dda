"""``meditron-jax convert``: a Hugging Face snapshot (or a native checkpoint) -> a native
checkpoint, streamed tensor by tensor; the last line reports the peak RSS."""
from __future__ import annotations

import argparse

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def add_common_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--model", required=True,
                        help="source directory: a Hugging Face snapshot (config.json + "
                             "*.safetensors) or a native checkpoint (meditron_config.json)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="cast the weights; unset keeps each tensor's stored dtype")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint already at --out (swapped in only once "
                             "the new one is complete)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check a native --model's files against its checksums.json "
                             "first (~1 GB/s per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "native checkpoint directory to write (Orbax params, "
                                 "meditron_config.json, tokenizer files)")


def run(args: argparse.Namespace) -> int:
    from meditron_jax.io.convert import convert_to_native
    result = convert_to_native(args.model, args.out, dtype=args.dtype,
                               overwrite=args.overwrite, quiet=args.quiet,
                               verify=not args.no_verify)
    print(result.line(), flush=True)
    return 0
