"""``meditron-jax export``: a native checkpoint (or an HF snapshot) -> a Hugging Face
safetensors snapshot that ``transformers`` loads; optionally merges a LoRA adapter."""
from __future__ import annotations

import argparse

from cli.convert import add_common_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "Hugging Face directory to write (safetensors shards + "
                                 "index, config.json, generation_config.json, tokenizer)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard (e.g. 5GB, 500MB, 2GiB); one bigger "
                             "tensor gets a shard of its own")
    parser.add_argument("--lora", default=None, metavar="DIR",
                        help="merge this LoRA adapter into the weights before export (loads "
                             "the whole model into memory)")


def run(args: argparse.Namespace) -> int:
    from meditron_jax.io.convert import export_to_hf
    result = export_to_hf(args.model, args.out, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, lora=args.lora,
                          overwrite=args.overwrite, quiet=args.quiet,
                          verify=not args.no_verify)
    print(result.line(), flush=True)
    return 0
