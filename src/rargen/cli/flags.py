"""Command-line flags: the registry of ``rargen`` subcommands, value types with one-line errors, and
flags derived from configs and signatures, so that a setting is written once: ``add_flags(parser,
SampleConfig)`` gives every field a flag (``top_k`` -> ``--top-k``) of its type, the comment beside it
as help; nested configs are flattened (the demo's ``--steps`` is ``DemoConfig.train.steps``) and a
function's parameters are read the same way. Unset flags stay None: ``given`` returns what was given,
nested as the configs are, for ``build``/``call_args`` to lay over the defaults (or a preset)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rargen.distributed import default_device

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register ``build(parser) -> run`` as subcommand ``name``: ``build`` adds the flags and returns
    the runner (``run(args)``: an int is the exit status, else 0); its docstring's first paragraph is the
    command's help, the rest its description. Every command takes ``--threads`` (set in ``main``)."""

    def register(build: Callable[[argparse.ArgumentParser], Callable]) -> Callable:
        help, _, description = inspect.cleandoc(build.__doc__).partition("\n\n")

        def add(subparsers: argparse._SubParsersAction) -> None:
            parser = subparsers.add_parser(name, help=help, description=description or None)
            parser.set_defaults(run=build(parser))
            parser.add_argument(
                "--threads", type=positive_int, help="torch CPU threads (default: torch's choice)"
            )

        COMMANDS[name] = add
        return build

    return register


# Value types: each refuses a bad value with a message naming it and the fix.
def bounded(low: float, high: float, refusal: str) -> Callable[[str], int]:
    """An integer in [low, high], else ``refusal`` (``{}``: the text given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(refusal.format(repr(text)))
        return value

    return parse


integer = bounded(-math.inf, math.inf, "")
positive_int = bounded(1, math.inf, "{} is not a positive integer; pass 1 or more")
non_negative_int = bounded(0, math.inf, "{} is negative; pass 0 or more")
port = bounded(0, 65535, "port {} is out of range; pass 0-65535 (0 = any free port)")


def step_or_fraction(text: str) -> int | float:
    """An optimizer step count (``100``) or a fraction of the run (``0.25``)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def list_of(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",")]
        except ValueError:
            refusal = f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. 1,2,4"
            raise argparse.ArgumentTypeError(refusal) from None

    return parse


def key_value(text: str) -> tuple[str, Any]:
    """``depth=12`` -> ("depth", 12): a number, true/false, or the text."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. --model depth=12")
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return key, kind(value)
    return key, {"true": True, "false": False}.get(value.lower(), value)


def shard(text: str) -> tuple[int, int]:
    """``i/n``: this process's share of work split ``n`` ways."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        fix = "e.g. 0/2 and 1/2 for two processes"
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n with i < n; {fix}")
    return int(index), int(count)


def device(text: str) -> str:
    """A torch device; ``auto``: cuda if available, else cpu."""
    return str(default_device(text))


# Flags from configs and signatures. Settings that read the same on every command: a device left out
# is cuda if available, else cpu (whatever the function's default); model_overrides are --model K=V.
COMMON: dict[str, dict[str, Any]] = {
    "device": {"type": device, "default": "auto", "help": "cpu, cuda, cuda:1 (default: cuda if available)"},
    "model_overrides": {"flag": "--model", "help": "a ModelConfig field of the preset, repeatable"},
}
_SCALARS: dict[Any, Callable[[str], Any]] = {int: integer, float: float, str: str, Path: Path}
_UNIONS = (typing.Union, types.UnionType)


def _without_none(kind: Any) -> Any:
    """``X | None`` -> ``X`` (``A | B | None`` -> ``A | B``)."""
    options = tuple(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) not in _UNIONS or len(options) == len(typing.get_args(kind)):
        return kind
    return options[0] if len(options) == 1 else typing.Union[options]  # noqa: UP007


def _comments(owner: Any) -> dict[str, str]:
    """The comment beside each field of a class (``name: type = default  # comment``), or beside each
    parameter of a function (in its signature: the text before the docstring)."""
    try:
        text = inspect.getsource(owner)
    except (OSError, TypeError):  # no source (a frozen app): flags without help
        return {}
    text = text if isinstance(owner, type) else text.split('"""')[0]
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", text, flags=re.MULTILINE)
    return {name: comment.strip() for name, comment in reversed(found)}  # a name's first comment wins


def settings(source: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any, str | None]]:
    """``(path, type, default, comment)`` of each field of a config class or instance (whose values
    are then the defaults), or each parameter of a function but callables; nested configs flattened:
    ``(("config", "train", "steps"), int, 500, "optimizer steps")``. Required: default ``MISSING``."""
    config = dataclasses.is_dataclass(source)
    owner = (source if isinstance(source, type) else type(source)) if config else source
    if config:
        items = [(f.name, getattr(source, f.name, f.default)) for f in dataclasses.fields(owner)]
    else:
        parameters = inspect.signature(source).parameters.values()
        items = [(p.name, dataclasses.MISSING if p.default is p.empty else p.default) for p in parameters]
    hints, comments, found = typing.get_type_hints(owner), _comments(owner), []
    for name, default in items:
        kind = _without_none(hints.get(name, Any))
        if dataclasses.is_dataclass(kind):
            found += settings(default if dataclasses.is_dataclass(default) else kind, (*path, name))
        elif typing.get_origin(kind) is not Callable and not (callable(default) and not config):
            found.append(((*path, name), kind, default, comments.get(name)))
    return found


def _argument(kind: Any) -> dict[str, Any]:
    """argparse keywords for a setting of type ``kind`` (empty when no flag can give one)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in _SCALARS or kind is Any or (origin in _UNIONS and str in args):  # paths and specs are text
        return {"type": _SCALARS.get(kind, str)}
    if origin in _UNIONS and set(args) == {int, float}:
        return {"type": step_or_fraction}
    if origin is typing.Literal:
        return {"choices": list(args)}
    many = origin is tuple and args[-1] is Ellipsis  # tuple[X, ...]
    if many and typing.get_origin(args[0]) is tuple:  # ((key, value), ...): --model KEY=VALUE, repeated
        return {"type": key_value, "action": "append", "metavar": "KEY=VALUE"}
    if many and args[0] in (int, float):
        return {"type": list_of(args[0])}
    if origin is tuple and len(set(args)) == 1 and args[0] in (int, float):
        return {"type": _SCALARS[args[0]], "nargs": len(args)}
    return {}


def add_flags(parser: argparse.ArgumentParser, source: Any, /, skip: Iterable = (), **tweaks: Any) -> None:
    """One flag per setting of ``source`` (``settings``) but those in ``skip`` (names or dotted paths),
    default None: not given. ``tweaks`` by setting name: a parser (``port=port``), or argparse keywords
    with ``flag`` for another name (``source={"flag": "--data"}``); the help is the setting's comment."""
    for path, kind, default, comment in settings(source):
        name, dotted = path[-1], ".".join(path)
        if name in skip or dotted in skip:
            continue
        tweak = {"type": tweaks[name]} if callable(tweaks.get(name)) else tweaks.get(name, {})
        options = {"default": None, **({} if "type" in tweak else _argument(kind))}
        options |= {**COMMON.get(name, {}), **tweak}
        if not {"type", "action", "choices"} & options.keys():
            raise TypeError(f"no flag for {dotted} ({kind}): give add_flags a parser for it")
        shown = None if default in (None, dataclasses.MISSING) else repr(default)
        if isinstance(default, tuple):  # as typed: "0.9 0.96", "0,1,2"; a tweaked parser's syntax is its own
            separator = " " if options.get("nargs") else ","
            shown = None if "type" in tweak else separator.join(map(str, default))
        options.setdefault("help", "; ".join(filter(None, [comment, shown and f"default {shown}"])))
        options["help"] = options["help"] and options["help"].replace("%", "%%")  # argparse formats help
        options.setdefault("required", default is dataclasses.MISSING)
        action = parser.add_argument(options.pop("flag", "--" + name.replace("_", "-")), **options)
        parser.set_defaults(**{f"_flag {source.__module__}.{source.__qualname__} {dotted}": action.dest})


def given(args: argparse.Namespace, source: Any) -> dict[str, Any]:
    """The settings of ``source`` given as flags, nested as its configs are: ``{"train": {"steps": 9}}``;
    lists (``--betas 0.9 0.95``, ``--budgets 1,2``) as tuples, as the configs hold them."""
    key, values = f"_flag {source.__module__}.{source.__qualname__} ", {}
    for name, dest in vars(args).items():
        if name.startswith(key) and (value := getattr(args, dest)) is not None:
            *parents, leaf = name[len(key) :].split(".")
            node = functools.reduce(lambda inner, parent: inner.setdefault(parent, {}), parents, values)
            node[leaf] = tuple(value) if isinstance(value, list) else value
    return values


def build(base: Any, values: dict[str, Any]) -> Any:
    """``base`` (a config, or a config class for its defaults) with ``values`` (``given``) laid over it,
    a nested dict into the nested config; the config's own checks refuse bad values."""
    hints, changes = typing.get_type_hints(base if isinstance(base, type) else type(base)), dict(values)
    for name, value in values.items():
        if isinstance(value, dict):
            inner = getattr(base, name, None)
            inner = inner if dataclasses.is_dataclass(inner) else _without_none(hints[name])
            changes[name] = build(inner, value)
    return base(**changes) if isinstance(base, type) else dataclasses.replace(base, **changes)


def call_args(args: argparse.Namespace, fn: Callable, **bases: Any) -> dict[str, Any]:
    """Keyword arguments for ``fn`` from its flags: the values given, each config parameter built
    (``build``) on ``bases[name]`` (None: on the parameter's default, else on its class's defaults)."""
    values, hints = given(args, fn), typing.get_type_hints(fn)
    for name, parameter in inspect.signature(fn).parameters.items():
        base = bases.get(name) or parameter.default
        if isinstance(values.get(name), dict):
            base = base if dataclasses.is_dataclass(base) else _without_none(hints[name])
            values[name] = build(base, values[name])
        elif bases.get(name) is not None:
            values[name] = bases[name]
    return values
