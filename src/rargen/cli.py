"""The ``rargen`` command: a thin layer of argparse subcommands over the library API.

Each subcommand parses its flags and calls one library function. Process-wide settings
(threads, TF32) are made here, never at import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register ``fn(subparsers)`` as the builder of subcommand ``name``."""

    def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    from rargen import __version__

    parser = argparse.ArgumentParser(prog="rargen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rargen {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in COMMANDS.values():
        build(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"rargen {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())


@command("pretokenize")
def _pretokenize_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretokenize",
        help="tokenize an image dataset into a memory-mapped token store (resumable, torchrun-aware)",
        description="Tokenize every image (and its crops) once, into a token store folder. Rerun the same "
        "command to resume after a crash; launch with torchrun to split shards across ranks.",
    )
    parser.add_argument(
        "--data", required=True, help="'digits[:train|heldout|all]', an image folder or an .npz"
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (rargen.load)")
    parser.add_argument("--out", required=True, help="token store folder to write (or resume)")
    parser.add_argument("--augment", choices=["none", "flip", "ten-crop"], default="none")
    parser.add_argument("--image-size", type=int, default=256, help="square crop size fed to the tokenizer")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per tokenizer call")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (resume unit)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding threads")
    parser.add_argument(
        "--device", default=None, help="tokenizer device (default: cuda if available, else cpu)"
    )
    parser.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args: argparse.Namespace) -> None:
    import os
    from datetime import timedelta

    import torch

    from rargen.store import pretokenize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        # gloo only for the final barrier; ranks can finish far apart, hence the long timeout.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        out = pretokenize(
            args.data,
            args.tokenizer,
            args.out,
            augment=args.augment,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            device=device,
        )
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"token store written to {out}")
