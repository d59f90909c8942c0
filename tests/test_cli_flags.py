"""The command line's flags: none renamed or removed, and every command the documents show parses."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from rargen.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "BENCHMARKS.md"]

# Every command's flags before they were derived from the configs (issue 26): a user's scripts keep working.
FLAGS_BEFORE = {
    "convert official-rar": "out preset",
    "convert official-vqgan": "out",
    "convert official-titok": "out",
    "convert to-official": "out",
    "train": "activation-checkpointing anneal-end anneal-start batch-size betas checkpoint-every compile "
    "config data device ema-decay end-lr grad-accum grad-clip keep-checkpoints label-dropout log-every lr "
    "model no-activation-checkpointing no-compile no-progress out precision preset resume sample-every seed "
    "sharding steps threads tokenizer warmup weight-decay",
    "pretokenize": "augment batch-size data device image-size max-pixels num-workers out shard-size threads "
    "tokenizer",
    "evaluate": "batch-size classifier device inception out reference threads",
    "sample": "batch-size bf16 cfg-power cfg-scale compile int8 labels model out per-class preset seed "
    "speculate temperature threads tokenizer top-k top-p",
    "train-tokenizer": "batch-size codebook-size data image-size lr no-progress out preset resume seed steps "
    "threads",
    "train-classifier": "batch-size data epochs feature-dim heldout-fraction image-size lr max-pixels "
    "no-progress out seed threads",
    "serve": "device host max-batch-size max-queue max-rows model port rate-limit stream-every tokenizer",
    "demo": "ablation no-progress out quick seed steps threads",
    "sweep": "batch-size cfg-power cfg-scales classifier inception model out per-class reference seed "
    "temperatures threads tokenizer",
    "ablate": "batch-size budgets cfg-scale classifier data digits evaluations heldout lr model no-progress "
    "out precision preset samples-per-class seeds shard threads tokenizer train-images warmup windows",
}


def command_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """``{"train": its parser, "convert official-rar": ..., ...}`` (argparse keeps them in its actions)."""
    found = {prefix.strip(): parser} if prefix else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= command_parsers(sub, f"{prefix}{name} ")
    return found


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def test_no_flag_is_renamed_or_removed() -> None:
    parsers = command_parsers(build_parser())
    missing = {
        name: sorted({f"--{flag}" for flag in flags.split()} - flags_of(parsers[name]))
        for name, flags in FLAGS_BEFORE.items()
    }
    assert {name: flags for name, flags in missing.items() if flags} == {}


def documented_commands() -> list[list[str]]:
    """Every ``rargen ...`` (or ``torchrun ... -m rargen ...``) line of the documents' code blocks, as
    arguments after ``rargen`` (inline mentions in the text are often partial: their flags are in
    ``FLAGS_BEFORE``)."""
    found = []
    for path in DOCUMENTS:
        inside, block = False, []
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside:
                block.append(line)
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            if re.match(r"\s*(\S+=\S+\s+)*(rargen|torchrun .* -m rargen) ", line):
                words = shlex.split(line, comments=True)
                found.append(words[words.index("rargen") + 1 :])
    return found


def test_the_documents_show_commands() -> None:
    names = {argv[0] for argv in documented_commands()}
    assert {"sample", "train", "pretokenize", "demo", "ablate", "sweep", "evaluate", "serve"} <= names


@pytest.mark.parametrize("argv", documented_commands(), ids=" ".join)
def test_every_documented_command_parses(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # a renamed or removed flag exits here
    assert callable(args.run)
