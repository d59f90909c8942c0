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
    "pretokenize": "augment batch-size data device heldout-fraction image-size max-pixels num-workers out "
    "shard-size split-seed threads tokenizer",
    "evaluate": "batch-size classifier device inception out reference threads",
    "sample": "batch-size bf16 cfg-power cfg-scale compile int8 labels model out per-class preset seed "
    "speculate temperature threads tokenizer top-k top-p",
    "train-tokenizer": "batch-size codebook-size data heldout-fraction image-size lr no-progress out preset "
    "resume seed split-seed steps threads",
    "train-classifier": "batch-size data epochs feature-dim heldout-fraction image-size lr max-pixels "
    "no-progress out seed split-seed threads",
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


# ---------------------------------------------------------------------------------------------
# Flags derived from the configs

# The configs each command exposes, and what it leaves out on purpose (a name: a field there).
CONFIGS = {
    "train": [("TrainConfig", ())],
    "demo": [("DemoConfig", ())],
    "ablate": [("StudyConfig", "PER_RUN"), ("StudyData", ())],
    "sweep": [("SweepConfig", "SWEPT")],
    "sample": [("SampleConfig", ())],
    "edit": [("SampleConfig", ())],
    "train-tokenizer": [("VQTokenizerConfig", ()), ("TokenizerTrainConfig", ())],
    "train-classifier": [("ClassifierTrainConfig", ())],
    "evaluate": [("EvalConfig", ())],
    "serve": [("ServeConfig", ())],
}
# Flags written by hand: arguments of the commands, not settings of the functions they call.
HAND_WRITTEN = {
    "train": {"--config"},
    "train-tokenizer": {"--preset"},
    "demo": {"--quick"},
    "ablate": {"--digits"},
    "sample": {"--model", "--tokenizer", "--labels", "--per-class", "--preset", "--int8"},
    "sweep": {"--model", "--tokenizer"},
    "edit": {"--model", "--tokenizer"},
    "evaluate": {"--reference", "--inception", "--classifier"},
    "serve": {"--model", "--tokenizer"},
}
RENAMED = {"model_overrides": "--model", "store": "--data", "heldout_store": "--heldout", "label": "--class"}


def _config_classes() -> dict[str, type]:
    from rargen.demo.ablation import StudyConfig, StudyData
    from rargen.demo.pipeline import DemoConfig
    from rargen.evaluation.classifier import ClassifierTrainConfig
    from rargen.evaluation.evaluate import EvalConfig
    from rargen.evaluation.sweep import SweepConfig
    from rargen.sampling.engine import SampleConfig
    from rargen.serve.engine import ServeConfig
    from rargen.tokenizers.vq import VQTokenizerConfig
    from rargen.train.recipe import TrainConfig
    from rargen.train.tokenizer import TokenizerTrainConfig

    classes = (StudyConfig, StudyData, DemoConfig, ClassifierTrainConfig, EvalConfig, SweepConfig,
               SampleConfig, ServeConfig, VQTokenizerConfig, TrainConfig, TokenizerTrainConfig)  # fmt: skip
    return {cls.__name__: cls for cls in classes}


def leaf_fields(cls: type) -> list[str]:
    """The names of a config's fields, the fields of the configs it holds in their place."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [
        name
        for field in dataclasses.fields(cls)
        for name in (
            leaf_fields(hints[field.name]) if dataclasses.is_dataclass(hints[field.name]) else [field.name]
        )
    ]


def test_every_config_field_is_a_flag_and_no_flag_restates_one() -> None:
    """Derive the flags from the config classes here and compare: each command has one flag per field
    (but the ones left out by name) and no hand-written flag beyond its own arguments."""
    import rargen.demo.ablation
    import rargen.evaluation.sweep

    classes, parsers = _config_classes(), command_parsers(build_parser())
    left_out = {"PER_RUN": rargen.demo.ablation.PER_RUN, "SWEPT": rargen.evaluation.sweep.SWEPT}
    for name, configs in CONFIGS.items():
        parser = parsers[name]
        expected = {
            RENAMED.get(field, "--" + field.replace("_", "-"))
            for cls, skip in configs
            for field in leaf_fields(classes[cls])
            if field not in left_out.get(skip, skip)  # type: ignore[arg-type]
        }
        derived = {dest for key, dest in parser._defaults.items() if key.startswith("_flag ")}
        flags = {
            s: a for a in parser._actions for s in a.option_strings if s.startswith("--") and "--no-" not in s
        }
        assert expected <= flags.keys(), (name, sorted(expected - flags.keys()))
        hand = {flag for flag, action in flags.items() if action.dest not in derived}
        assert hand == HAND_WRITTEN.get(name, set()) | {"--help", "--threads"}, name


def test_help_is_the_comment_beside_the_field() -> None:
    parsers = command_parsers(build_parser())
    helps = {(name, s): a.help for name, p in parsers.items() for a in p._actions for s in a.option_strings}
    assert helps["sample", "--top-k"] == "0 = off; default 0"  # SampleConfig.top_k's comment
    # TrainConfig's comment, the demo's default, and what --data does to it
    assert helps["demo", "--steps"].startswith("optimizer steps; default 500 on the digits; with --data")
    assert helps["serve", "--max-rows"].startswith("images decoding at once in the shared batch")
    assert helps["ablate", "--budgets"] == "optimizer steps per run, e.g. 500,1500; default 1500"
    assert helps["train", "--betas"] == "default 0.9 0.96"


def _captured(monkeypatch, target: str) -> list[dict]:
    """Replace ``module.function`` (where the command line imported it) by a stand-in of the same
    signature (the flags are read from it) that records its arguments."""
    import functools
    import importlib
    import inspect

    module, name = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    calls: list[dict] = []

    @functools.wraps(original)
    def record(*args, **kwargs):
        calls.append(inspect.signature(original).bind(*args, **kwargs).arguments)

    monkeypatch.setattr(target, record)
    return calls


def test_demo_flags_fill_its_nested_configs(monkeypatch) -> None:
    import dataclasses

    from rargen.cli.main import main
    from rargen.demo.pipeline import DemoConfig

    calls = _captured(monkeypatch, "rargen.cli.train.run_demo")
    argv = ["demo", "--steps", "200", "--seed", "3", "--model", "depth=2", "--betas", "0.8", "0.9",
            "--cfg-scale", "2", "--top-k", "5", "--eval-per-class", "7", "--no-progress"]  # fmt: skip
    assert main(argv) == 0 and main(["demo", "--quick", "--lr", "0.002"]) == 0
    default, quick = DemoConfig(), DemoConfig.quick()
    train = dataclasses.replace(
        default.train, steps=200, seed=3, model_overrides=(("depth", 2),), betas=(0.8, 0.9)
    )
    sample = dataclasses.replace(default.sample, cfg_scale=2.0, top_k=5)
    assert calls[0]["config"] == dataclasses.replace(default, train=train, sample=sample, eval_per_class=7)
    assert calls[0]["progress"] is False and "out" not in calls[0]  # not given: run_demo's default
    assert calls[1]["config"] == dataclasses.replace(quick, train=dataclasses.replace(quick.train, lr=0.002))


def test_ablate_flags_fill_the_study_config(monkeypatch, tmp_path) -> None:
    import dataclasses
    from pathlib import Path

    from rargen.cli.main import main
    from rargen.demo.ablation import StudyConfig, StudyData, parse_windows
    from rargen.demo.stages import training_precision

    calls = _captured(monkeypatch, "rargen.cli.train.run_study")
    argv = ["ablate", "--data", "a", "--heldout", "b", "--out", str(tmp_path), "--cfg-scale", "2",
            "--batch-size", "16", "--budgets", "8,16", "--windows", "0/0,1/1", "--shard", "1/2",
            "--model", "dim=48", "--copy-quantile", "0.1"]  # fmt: skip
    assert main(argv) == 0
    default = StudyConfig()
    train = dataclasses.replace(default.train, batch_size=16, model_overrides=(("dim", 48),),
                                precision=training_precision("auto"))  # fmt: skip
    assert calls[0]["config"] == dataclasses.replace(
        default, train=train, budgets=(8, 16), windows=parse_windows("0/0,1/1"), copy_quantile=0.1,
        sample=dataclasses.replace(default.sample, cfg_scale=2.0),
    )  # fmt: skip
    assert calls[0]["data"] == StudyData(Path("a"), Path("b")) and calls[0]["shard"] == (1, 2)


def test_a_study_config_round_trips_through_study_json(tmp_path) -> None:
    from rargen.demo.ablation import StudyConfig, check_study_folder
    from rargen.sampling.engine import SampleConfig

    config = StudyConfig()
    check_study_folder(tmp_path, config)
    check_study_folder(tmp_path, config)  # the same settings, read back from JSON: accepted
    with pytest.raises(ValueError, match=r"other settings \(sample.cfg_scale\); pass another --out"):
        check_study_folder(tmp_path, StudyConfig(sample=SampleConfig(cfg_scale=2.0)))


def test_a_demo_folder_of_flat_settings_is_refused_by_name(tmp_path) -> None:
    """Before its configs nested, the demo wrote flat settings (generator_steps, cfg_scale, ...): such a
    folder is refused, naming the folder and the fix, before any work."""
    import json

    from rargen.demo.pipeline import DemoConfig, check_demo_folder

    flat = {"tokenizer_steps": 300, "classifier_epochs": 12, "generator_preset": "rar-digits", "seed": 0}
    (tmp_path / "demo_config.json").write_text(json.dumps(flat))
    with pytest.raises(ValueError) as refused:
        check_demo_folder(tmp_path, DemoConfig())
    assert str(tmp_path) in str(refused.value) and "another version of rargen" in str(refused.value)
    assert "delete it or pass another --out" in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ablate", "--digits", "--out", "o", "--shard", "2/2"], ["--shard", "'2/2' is not i/n"]),
        (["ablate", "--digits", "--out", "o", "--shard", "x"], ["--shard", "'x'"]),
        (["ablate", "--digits", "--data", "s", "--out", "o"], ["--digits, or --data"]),
        (["ablate", "--out", "o"], ["--digits, or --data"]),
        (["ablate", "--data", "s", "--out", "o"], ["--data needs --heldout"]),
        (["demo", "--model", "depth"], ["--model", "'depth' is not KEY=VALUE"]),
        (["demo", "--steps", "0"], ["steps", "positive integer"]),
        (["demo", "--cfg-scale", "inf"], ["cfg_scale must be finite"]),
    ],
)
def test_bad_values_are_one_clear_line(argv: list[str], words: list[str], capsys) -> None:
    from rargen.cli.main import main

    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's errors
        code = int(stop.code)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), (words, err)


def test_a_study_without_a_classifier_has_no_scorer_and_says_so(tmp_path) -> None:
    from rargen.demo.ablation import StudyData, study_scorer

    with pytest.raises(ValueError, match="needs a classifier folder"):
        study_scorer(StudyData(tmp_path / "store", tmp_path / "heldout"))


def test_a_sweep_refuses_a_sample_config_that_sets_what_it_sweeps() -> None:
    from rargen.evaluation.sweep import SweepConfig
    from rargen.sampling.engine import SampleConfig

    with pytest.raises(ValueError, match="give them as cfg_scales and temperatures"):
        SweepConfig(cfg_scales=(1.0,), sample=SampleConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="temperature must be > 0"):  # every setting checked up front
        SweepConfig(cfg_scales=(1.0, 2.0), temperatures=(1.0, 0.0))
    assert [s.cfg_scale for s in SweepConfig(cfg_scales=(1.0, 2.0)).settings()] == [1.0, 2.0]


def test_user_input_is_never_checked_with_assert() -> None:
    """``assert`` vanishes under ``python -O`` and says nothing to a user: the command line, the demo
    and the evaluation check what they are given with errors that name the value and the fix."""
    import ast

    package = ROOT / "src" / "rargen"
    found = [
        f"{path.relative_to(package)}:{node.lineno}"
        for wing in ("cli", "demo", "evaluation")
        for path in sorted((package / wing).glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []
