"""Command-line flags: the registry of ``rargen`` subcommands, the value types with one-line errors,
and flags derived from config dataclasses, so that a config field is written once.

``add_config_flags(parser, SampleConfig)`` gives every field a flag (``top_k`` -> ``--top-k``) with
the field's type and, as its help, the comment written beside the field; unset flags stay None,
so ``config_values(args, SampleConfig)`` returns only what was given, for the config (or its
preset) to fill in the rest. A new field of such a config is a new flag without touching the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register ``fn(subparsers)`` as the builder of subcommand ``name``."""

    def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Value types: each refuses a bad value with a message naming it and the fix.


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; pass 1 or more")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; pass 0 or more")
    return value


def port(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is out of range; pass 0-65535 (0 = any free port)")
    return value


def step_or_fraction(text: str) -> int | float:
    """An optimizer step count (``100``) or a fraction of the run (``0.25``)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def list_of(kind: type, example: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. {example}"
            ) from None

    return parse


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads for this command (set once, in ``rargen.cli.main.main``)."""
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


# ---------------------------------------------------------------------------------------------
# Flags from config dataclasses

_TYPES: dict[str, Callable[[str], Any]] = {
    "int": integer, "float": float, "str": str, "int | float": step_or_fraction,
}  # fmt: skip


def field_comments(config_cls: type) -> dict[str, str]:
    """The comment written beside each field of a dataclass (``name: type = default  # comment``)."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):  # no source (a frozen app): flags without help
        return {}
    found = re.finditer(r"^\s+(\w+):[^=\n]*=[^\n]*?#\s*(.+)$", source, flags=re.MULTILINE)
    return {m.group(1): m.group(2).strip() for m in found}


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    types: dict[str, Callable[[str], Any]] | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``config_cls`` (or of ``only``), default None (= not given).

    ``types`` gives a stricter parser for a field (``{"port": port}``), ``names`` another flag
    (``{"generator_steps": "--steps"}``); bools are ``--x/--no-x``, a 2-tuple takes two values.
    """
    comments, types, names = field_comments(config_cls), types or {}, names or {}
    wanted = set(only) if only is not None else None
    for field in dataclasses.fields(config_cls):
        if field.name in skip or (wanted is not None and field.name not in wanted):
            continue
        flag = names.get(field.name, "--" + field.name.replace("_", "-"))
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = "; ".join(filter(None, [comments.get(field.name), f"default {default!r}"]))
        kind = str(field.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind.startswith("tuple[") and kind.count(",") == 1:
            item = _TYPES[kind[len("tuple[") :].split(",")[0].strip()]
            parser.add_argument(flag, type=item, nargs=2, default=None, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=types[field.name] if field.name in types else _TYPES[kind],
                default=None,
                help=help_text,
            )
        parser.set_defaults(**{f"_flag_{field.name}": flag.lstrip("-").replace("-", "_")})


def config_values(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The fields of ``config_cls`` given as flags (see ``add_config_flags``); 2-tuples as tuples."""
    values = {}
    for field in dataclasses.fields(config_cls):
        dest = getattr(args, f"_flag_{field.name}", None)
        given = getattr(args, dest, None) if dest is not None else None
        if given is not None:
            values[field.name] = tuple(given) if isinstance(given, list) else given
    return values
