"""The ``rargen`` command: argparse subcommands over the library API, each one's flags derived from
the function it calls (``rargen.cli.flags``): ``convert`` here, the model-making commands in
``rargen.cli.train``, the generator-using ones in ``rargen.cli.sample``. Process-wide settings
(threads) are made here, never at import time.

One error policy (``main``): an error the user can cause (a bad flag value, a missing or unreadable
file, a full disk, a bad checkpoint) prints one line naming the value and the fix, status 2; a
traceback is a bug in rargen (``--debug`` or ``RARGEN_DEBUG=1`` shows those of expected errors too).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from rargen.checkpoint import load, load_official, save
from rargen.cli import sample, train  # noqa: F401 - importing them registers their commands
from rargen.cli.flags import COMMANDS, command
from rargen.convert import check_against_preset, describe_converted, save_official
from rargen.hub.releases import resolve
from rargen.model import RAR
from rargen.tokenizers.titok import TiTok
from rargen.tokenizers.titok_convert import convert_official_titok, save_official_snapshot
from rargen.version import __version__

# The order of `rargen --help`.
_ORDER = ("convert train pretokenize evaluate sample edit train-tokenizer train-classifier serve demo "
          "sweep ablate")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block) and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rargen", description="RAR (Randomized AutoRegressive visual generation): convert, "
                     "pretokenize, train, sample, evaluate, serve. Start with `rargen demo`.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"rargen {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="tracebacks for expected errors too (or RARGEN_DEBUG=1)")  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(COMMANDS, key=lambda name: _ORDER.split().index(name)):
        COMMANDS[name](subparsers)
    return parser


def describe_os_error(error: OSError) -> str:
    """One line for an OSError a user can cause: what failed, on which path, and the fix."""
    where = f" {error.filename!r}" if error.filename is not None else ""
    if error.filename2 is not None:
        where += f" -> {error.filename2!r}"
    fixes = {
        **dict.fromkeys((errno.EACCES, errno.EPERM), "check its permissions or choose another path"),
        errno.EROFS: "the file system is read-only; choose a writable path",
        errno.ENOSPC: "the disk is full; free some space or choose another path",
        errno.EDQUOT: "the disk quota is exceeded; free some space or choose another path",
        errno.ENOENT: "check the path", errno.EISDIR: "it is a folder; pass a file",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "it exists already; remove it or choose another path",
    }  # fmt: skip
    reason = error.strerror or str(error)
    fix = fixes.get(error.errno, "check the path and try again")
    return f"{reason}:{where} ({fix})" if where else f"{reason} ({fix})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("RARGEN_DEBUG", "") not in ("", "0")
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = args.run(args)
    except (ValueError, OSError) as error:  # expected: the user can fix them (CheckpointError too)
        if debug:
            raise
        message = describe_os_error(error) if isinstance(error, OSError) and error.errno else str(error)
        print(f"rargen {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"rargen {args.command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0  # what else a runner returns is its result


# Subcommands: convert (the others are in rargen.cli.train and rargen.cli.sample).


@command("convert")
def _convert(parser: argparse.ArgumentParser) -> None:
    """convert official weights to rargen checkpoints and back"""
    kinds = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    for name, source, help, source_help in [
        ("official-rar", "file", "an official rar_*.bin generator file -> checkpoint folder",
         "rar_b.bin ... rar_xxl.bin (torch.save state dict) or .safetensors, a released name (rar-b) or "
         "hf://OWNER/REPO/FILE[@REV]"),
        ("official-vqgan", "file", "maskgit-vqgan-imagenet-f16-256.bin -> tokenizer folder",
         "the official .bin, the released name maskgit-vqgan, or hf://..."),
        ("official-titok", "snapshot", "a TiTok Hub snapshot folder -> tokenizer folder",
         "folder with config.json + model.safetensors (or pytorch_model.bin)"),
        ("to-official", "checkpoint", "a rargen generator (-> .safetensors) or TiTok folder (-> snapshot "
         "folder)", "rargen generator or TiTok checkpoint folder"),
    ]:  # fmt: skip
        kind = kinds.add_parser(name, help=help)
        kind.add_argument("source", metavar=source, help=source_help)
        kind.add_argument(
            "--out", required=True, help="output folder (to-official: a generator's .safetensors)"
        )
        if name == "official-rar":
            kind.add_argument("--preset", help="check the inferred architecture against this preset")
        kind.set_defaults(run=_to_official if name == "to-official" else _from_official)


def _from_official(args: argparse.Namespace) -> None:
    extra = {"converted_from": str(args.source)}
    if args.conversion == "official-titok":
        model, extra["notes"] = convert_official_titok(args.source)
        for note in extra["notes"]:
            print(f"note: {note}")
    else:
        kind = {"official-rar": "rar", "official-vqgan": "maskgit-vqgan"}[args.conversion]
        model = load_official(resolve(args.source, convert=False), kind=kind)
    if getattr(args, "preset", None) is not None:
        check_against_preset(model.config, args.preset)
    save(model, args.out, extra=extra)
    print(f"converted {args.source} -> {args.out}{describe_converted(model)}")


def _to_official(args: argparse.Namespace) -> None:
    model = load(args.source)
    if not isinstance(model, (RAR, TiTok)):
        raise ValueError(f"{args.source!r} is a {type(model).__name__} checkpoint, not a RAR generator")
    (save_official_snapshot if isinstance(model, TiTok) else save_official)(model, args.out)
    layout = "snapshot layout" if isinstance(model, TiTok) else "layout"
    print(f"wrote the official {layout} of {args.source} to {args.out}")


__all__ = ["build_parser", "describe_os_error", "main"]
