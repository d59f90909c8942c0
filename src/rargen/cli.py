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


@command("train-tokenizer")
def _train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train the small VQ tokenizer on the embedded digits or an .npz of images",
        description="Writes DIR/tokenizer (a rargen.load-able checkpoint), DIR/samples/*.png "
        "(originals over reconstructions) and DIR/report.json (held-out PSNR, codebook usage, perplexity).",
    )
    parser.add_argument("--data", default="digits", help="'digits' or an .npz with arr_0 (N, H, W, C) images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="vq-digits", help="VQTokenizerConfig preset (vq-digits, vq-tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="square training size (default: preset)")
    parser.add_argument("--codebook-size", type=int, default=None, help="codes (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 2e-3)")
    parser.add_argument(
        "--seed", type=int, default=None, help="initialisation and data-order seed (default 0)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (exact)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    import json

    import torch

    from rargen.tokenizer_train import TokenizerTrainConfig, train_tokenizer
    from rargen.vq_tokenizer import VQTokenizerConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"image_size": args.image_size, "codebook_size": args.codebook_size}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model_config = (
        None if args.resume and not overrides else VQTokenizerConfig.from_name(args.preset, **overrides)
    )
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    train_config = TokenizerTrainConfig(**{k: v for k, v in given.items() if v is not None})
    report = train_tokenizer(
        args.out, args.data, model_config=model_config, train_config=train_config,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(report["heldout"], indent=2))
    return 0
