"""`rargen demo --data SOURCE`: budgets from the data, the whole pipeline on a tiny colour folder,
and a run killed mid-stage (twice) that, rerun, gives the uninterrupted run's models and scores."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from rargen.checkpoint import checkpoint_hash
from rargen.data.split import SplitImages
from rargen.demo.own_data import choose_budgets
from rargen.demo.pipeline import DemoConfig, check_demo_folder, run_demo


def write_colour_folder(root: Path, per_class: int, size: int) -> Path:
    return load_benchmark("colour_folder").write_colour_folder(root, per_class=per_class, size=size)


def fake_split(num_train: int, num_heldout: int, classes: int, grey: bool) -> SplitImages:
    images = torch.rand(num_train + num_heldout, 3, 32, 32)
    if grey:
        images[:, 1:] = images[:, :1]
    labels = torch.arange(num_train + num_heldout) % classes
    names = tuple(f"c{i}" for i in range(classes))
    return SplitImages(
        images[:num_train], labels[:num_train], images[num_train:], labels[num_train:], names, [], (), {}
    )


def test_budgets_come_from_the_data_unless_given() -> None:
    # Issue 27's colour folder: 8 classes x 100, 80% for training: the budgets the issue found needed.
    colour = choose_budgets(DemoConfig(data="x"), fake_split(640, 160, 8, grey=False), 32)
    assert (colour.tokenizer_steps, colour.classifier_epochs, colour.train.steps) == (1200, 100, 1200)
    assert (colour.image_channels, colour.train.batch_size, colour.eval_per_class) == (3, 64, 50)
    assert colour.train.checkpoint_every == 300 and colour.train.preset == "rar-digits"
    grey = choose_budgets(DemoConfig(data="x"), fake_split(1438, 359, 10, grey=True), 32)
    assert (grey.tokenizer_steps, grey.classifier_epochs, grey.train.steps) == (400, 45, 1500)
    small = choose_budgets(DemoConfig(data="x"), fake_split(40, 10, 2, grey=False), 32)
    assert (small.train.batch_size, small.train.steps, small.classifier_epochs) == (40, 300, 100)
    # A value other than the digits demo's default is the user's and is kept.
    train = dataclasses.replace(DemoConfig().train, steps=77, batch_size=16)
    given = choose_budgets(
        DemoConfig(data="x", tokenizer_steps=5, train=train), fake_split(640, 160, 8, False), 32
    )
    assert (given.tokenizer_steps, given.train.steps, given.train.batch_size) == (5, 77, 16)
    assert "tokenizer_steps" not in given.chosen and "train.steps" not in given.chosen
    assert given.classifier_epochs == 100 and "classifier_epochs" in given.chosen


def test_the_digits_demo_records_its_settings_as_before(tmp_path: Path) -> None:
    """No --data: demo_config.json has no data field, so a folder of an earlier digits demo resumes."""
    check_demo_folder(tmp_path, DemoConfig())
    assert "data" not in json.loads((tmp_path / "demo_config.json").read_text())
    check_demo_folder(tmp_path, DemoConfig())  # the same settings: accepted
    with pytest.raises(ValueError, match="other fields"):
        check_demo_folder(tmp_path, DemoConfig(data="digits"))


TINY_MODEL = (("dim", 32), ("depth", 1), ("num_heads", 2), ("mlp_dim", 64))


def tiny_config(data: Path) -> DemoConfig:
    train = dataclasses.replace(DemoConfig().train, steps=6, batch_size=16, model_overrides=TINY_MODEL)
    return DemoConfig(tokenizer_steps=8, classifier_epochs=2, train=train, grid_per_class=2, eval_per_class=3,
                      data=str(data))  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoConfig, dict]:
    root = tmp_path_factory.mktemp("own-demo")
    config = tiny_config(write_colour_folder(root / "images", per_class=6, size=16))
    summary = run_demo(root / "run", config, progress=False, log=lambda line: None)
    return root / "run", config, summary


@pytest.mark.slow
def test_one_command_runs_the_pipeline_on_a_colour_folder(uninterrupted) -> None:
    import rargen
    from rargen.evaluation.classifier import load_scorer
    from rargen.model import RAR

    out, _, summary = uninterrupted
    for name in ("report.md", "samples.png", "reconstructions.png", "training.png", "results.json"):
        assert (out / name).is_file(), name
    assert [item["name"] for item in summary["skipped"]] == ["china_bottom_left/corrupt.png"]
    budgets = summary["budgets"]
    # 6 readable images per class (the grey one among them), one of each class held out.
    assert (budgets["num_train"], budgets["num_heldout"], budgets["image_size"]) == (40, 8, 16)
    assert budgets["image_channels"] == 3 and budgets["tokenizer_steps"] == 8
    real, generated = summary["real"], summary["generated"]
    numbers = [real["heldout_accuracy"], real["reconstruction_accuracy"], real["train_frechet"],
               generated["class_accuracy"], generated["frechet_distance"], generated["heldout_nll"],
               summary["tokenizer"]["psnr"]]  # fmt: skip
    assert all(math.isfinite(x) for x in numbers) and generated["num_samples"] == 8 * 3
    assert 0 < generated["heldout_nll"] < 8  # bits per token; the codebook has 128 codes (7 bits is chance)
    report = (out / "report.md").read_text()
    assert (
        f"{generated['class_accuracy']:.1%}" in report and f"{summary['tokenizer']['psnr']:.2f} dB" in report
    )
    assert "![samples](samples.png)" in report and "| tokenizer reconstructions" in report
    # The checkpoints are the library's: the scorer is `evaluate --classifier`'s, the generator has the names.
    scorer = load_scorer(out / "classifier")
    assert scorer.class_names == tuple(summary["class_names"]) and len(scorer.class_names) == 8
    generator = rargen.load(out / "generator")
    assert isinstance(generator, RAR) and generator.checkpoint_extra["class_names"] == summary["class_names"]


class Killed(KeyboardInterrupt):
    """What ^C raises, at a chosen checkpoint."""


def kill_at_checkpoint(monkeypatch: pytest.MonkeyPatch, module: str, name: str, call: int) -> None:
    """Let the ``call``-th checkpoint of ``module.name`` be written, then stop the process there."""
    import importlib

    target = importlib.import_module(module)
    real, calls = getattr(target, name), []

    def save_then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return result

    monkeypatch.setattr(target, name, save_then_die)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path: Path) -> None:
    reference, config, expected = uninterrupted
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:  # killed mid-tokenizer (after step 2 of 8)
        kill_at_checkpoint(patch, "rargen.train.tokenizer", "_save_checkpoint", call=1)
        with pytest.raises(Killed):
            run_demo(out, config, progress=False, log=lambda line: None)
    assert not (out / "tokenizer").exists() and (out / "tokenizer_training" / "tokenizer").exists()
    with pytest.MonkeyPatch.context() as patch:  # rerun, killed mid-generator (after step 3 of 6)
        kill_at_checkpoint(patch, "rargen.train.generator", "save_checkpoint", call=3)
        with pytest.raises(Killed):
            run_demo(out, config, progress=False, log=lambda line: None)
    assert (out / "classifier").exists() and not (out / "runs" / "rar" / "final").exists()
    resumed = run_demo(out, config, progress=False, log=lambda line: None)

    for name in ("tokenizer", "classifier", "generator"):
        assert checkpoint_hash(out / name) == checkpoint_hash(reference / name), name
    assert resumed["generated"] == expected["generated"] and resumed["real"] == expected["real"]
    assert resumed["tokenizer"] == expected["tokenizer"]


def test_unlabelled_data_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"1 class\(es\); the demo needs labelled images of at least 2"):
        choose_budgets(DemoConfig(data="x.npz"), fake_split(20, 4, 1, grey=False), 32)
