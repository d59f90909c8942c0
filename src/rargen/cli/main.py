"""The ``rargen`` command: a thin layer of argparse subcommands over the library API.

Each subcommand parses its flags and calls one library function. Process-wide settings
(threads, TF32) are made here, never at import time. The commands are registered with
``rargen.cli.flags.command``: ``convert`` here, the model-making ones (pretokenize, train,
train-tokenizer, demo) in ``rargen.cli.train``, the generator-using ones (sample, sweep, evaluate,
serve) in ``rargen.cli.sample``. A new command is one parser builder and one runner in one of them.

One error policy for every subcommand (``main``): an error the user can cause (a bad flag value, a
missing or unreadable file, a full disk, a bad checkpoint) prints one line naming the value and
the fix and exits with status 2; a traceback means a bug in rargen. ``--debug`` (or
``RARGEN_DEBUG=1``) shows the traceback of expected errors too.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from rargen.cli import sample, train  # noqa: F401 - importing them registers their commands
from rargen.cli.flags import COMMANDS, command

# The order of `rargen --help`.
_ORDER = (
    "convert train pretokenize evaluate sample train-tokenizer train-classifier serve demo sweep ablate"
).split()


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block) and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from rargen.version import __version__

    parser = _Parser(
        prog="rargen",
        description="RAR (Randomized AutoRegressive visual generation): convert, pretokenize, train, "
        "sample, evaluate, serve. Start with `rargen demo`.",
    )
    parser.add_argument("--version", action="version", version=f"rargen {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="tracebacks for expected errors too (or RARGEN_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(COMMANDS, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)):
        COMMANDS[name](subparsers)
    return parser


def describe_os_error(error: OSError) -> str:
    """One line for an OSError a user can cause: what failed, on which path, and the fix."""
    where = f" {error.filename!r}" if error.filename is not None else ""
    if error.filename2 is not None:
        where += f" -> {error.filename2!r}"
    fixes = {
        errno.EACCES: "check its permissions or choose another path",
        errno.EPERM: "check its permissions or choose another path",
        errno.EROFS: "the file system is read-only; choose a writable path",
        errno.ENOSPC: "the disk is full; free some space or choose another path",
        errno.EDQUOT: "the disk quota is exceeded; free some space or choose another path",
        errno.ENOENT: "check the path",
        errno.EISDIR: "it is a folder; pass a file",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "it exists already; remove it or choose another path",
    }
    reason = error.strerror or str(error)
    fix = fixes.get(error.errno, "check the path and try again")
    return f"{reason}:{where} ({fix})" if where else f"{reason} ({fix})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("RARGEN_DEBUG", "") not in ("", "0")
    try:
        if getattr(args, "threads", None):
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
    return int(result or 0)


# Subcommands: convert (the others are in cli_train and cli_sample).


@command("convert")
def _convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert official weights to rargen checkpoints and back")
    kinds = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    rar = kinds.add_parser("official-rar", help="an official rar_*.bin generator file -> checkpoint folder")
    rar.add_argument(
        "file",
        help="rar_b.bin ... rar_xxl.bin (torch.save state dict) or .safetensors, a released name "
        "(rar-b) or hf://OWNER/REPO/FILE[@REV]",
    )
    rar.add_argument("--out", required=True, help="output checkpoint folder")
    rar.add_argument("--preset", default=None, help="check the inferred architecture against this preset")
    rar.set_defaults(run=_run_convert_official_rar)
    vqgan = kinds.add_parser("official-vqgan", help="maskgit-vqgan-imagenet-f16-256.bin -> tokenizer folder")
    vqgan.add_argument("file", help="the official .bin, the released name maskgit-vqgan, or hf://...")
    vqgan.add_argument("--out", required=True, help="output tokenizer folder")
    vqgan.set_defaults(run=_run_convert_official_vqgan)
    titok = kinds.add_parser("official-titok", help="a TiTok Hub snapshot folder -> tokenizer folder")
    titok.add_argument("snapshot", help="folder with config.json + model.safetensors (or pytorch_model.bin)")
    titok.add_argument("--out", required=True, help="output tokenizer folder")
    titok.set_defaults(run=_run_convert_official_titok)
    back = kinds.add_parser(
        "to-official", help="a rargen generator (-> .safetensors) or TiTok folder (-> snapshot folder)"
    )
    back.add_argument("checkpoint", help="rargen generator or TiTok checkpoint folder")
    back.add_argument("--out", required=True, help="output .safetensors file (generator) or folder (TiTok)")
    back.set_defaults(run=_run_convert_to_official)


def _run_convert_official_rar(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load_official, save
    from rargen.convert import check_against_preset
    from rargen.hub.releases import resolve

    model = load_official(resolve(args.file, convert=False), kind="rar")
    if args.preset is not None:
        check_against_preset(model.config, args.preset)
    save(model, args.out, extra={"converted_from": str(args.file)})
    cfg = model.config
    print(
        f"converted {args.file} -> {args.out}: {model.num_params():,} parameters, dim {cfg.dim}, "
        f"depth {cfg.depth}, heads {cfg.num_heads}, {cfg.num_image_tokens} tokens, {cfg.num_classes} classes"
    )


def _run_convert_official_vqgan(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load_official, save
    from rargen.hub.releases import resolve

    tokenizer = load_official(resolve(args.file, convert=False), kind="maskgit-vqgan")
    save(tokenizer, args.out, extra={"converted_from": str(args.file)})
    print(f"converted {args.file} -> {args.out}")


def _run_convert_official_titok(args: argparse.Namespace) -> None:
    from rargen.checkpoint import save
    from rargen.tokenizers.titok_convert import convert_official_titok

    tokenizer, notes = convert_official_titok(args.snapshot)
    save(tokenizer, args.out, extra={"converted_from": str(args.snapshot), "notes": notes})
    for note in notes:
        print(f"note: {note}")
    cfg = tokenizer.config
    print(
        f"converted {args.snapshot} -> {args.out}: {tokenizer.num_params():,} parameters, "
        f"{cfg.num_latent_tokens} tokens of {cfg.codebook_size} codes per {cfg.image_size}px image"
    )


def _run_convert_to_official(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load
    from rargen.convert import save_official
    from rargen.model import RAR
    from rargen.tokenizers.titok import TiTok

    model = load(args.checkpoint)
    if isinstance(model, TiTok):
        from rargen.tokenizers.titok_convert import save_official_snapshot

        save_official_snapshot(model, args.out)
        print(f"wrote the official snapshot layout of {args.checkpoint} to {args.out}")
        return
    if not isinstance(model, RAR):
        raise ValueError(f"{args.checkpoint!r} is a {type(model).__name__} checkpoint, not a RAR generator")
    save_official(model, args.out)
    print(f"wrote the official layout of {args.checkpoint} to {args.out}")


__all__ = ["build_parser", "describe_os_error", "main"]
