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
