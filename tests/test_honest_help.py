"""Issue 27 part 5: what the commands say is what they do: help that names the defaults that apply,
mixed grey and colour folders reported, grid labels that fit."""

from __future__ import annotations

import contextlib
import io

import pytest

from rargen.cli.main import main
from rargen.demo import own_data
from rargen.train.recipe import SMALL_DATA_IMAGES, TrainConfig, small_data_recipe


def help_of(*command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(out.getvalue().split())


def test_train_help_names_both_defaults_and_the_rule_that_picks_one():
    text = help_of("train")
    small, paper = small_data_recipe(SMALL_DATA_IMAGES), TrainConfig()
    assert f"--steps STEPS optimizer steps; default from the store: {small['steps']} for fewer than " in text
    assert f"images (the small-data recipe), else {paper.steps} (the paper's ImageNet recipe)" in text
    assert f"default from the store: {small['preset']!r}" in text and f"else {paper.preset!r}" in text
    assert "default from the store: 64 (at most the store's size)" in text
    assert "--steps STEPS optimizer steps; default 250000" not in text  # the old help, a default never used


def test_the_gated_trainers_help_says_the_budget_is_a_cap():
    assert "--steps STEPS the cap (patience 0: exactly)" in help_of("train-tokenizer")
    assert "--patience PATIENCE stop after this many evaluations" in help_of("train-tokenizer")
    assert "--epochs EPOCHS the cap (patience 0: exactly)" in help_of("train-classifier")


def test_grid_labels_show_whole_class_names(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw

    from rargen.sampling.images import GRID_LABEL_WIDTH, save_grid

    names = ["astronaut", "cat", "a class name far longer than any column should be"]
    images = np.full((3, 16, 16, 3), 255, dtype=np.uint8)
    save_grid(images, [0, 1, 2], names, tmp_path / "g.png")
    grid = Image.open(tmp_path / "g.png").convert("L")
    label_width = grid.width - 16
    assert label_width > GRID_LABEL_WIDTH  # widened for the names, not cut at 8 characters
    for row, text in enumerate(["astronaut", "cat", "a class name far long..."]):
        alone = Image.new("L", (400, 16), "white")
        ImageDraw.Draw(alone).text((2, 2), text, fill="black")
        ink = np.asarray(alone) < 128
        assert not ink[:, label_width:].any()  # the whole name fits the column
        cell = np.asarray(grid)[row * 16 : (row + 1) * 16, :label_width] < 128
        np.testing.assert_array_equal(cell, ink[:, :label_width])


def test_a_grey_image_in_a_colour_folder_is_reported(tmp_path):
    import numpy as np
    from PIL import Image

    from rargen.data.split import split_images

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / "b" / "grey.png")
    logs: list[str] = []
    split_images(tmp_path, 8, heldout_fraction=0.3, seed=0, purpose="tokenizer", log=logs.append)
    mixed = "mixed channels: 1 of 7 images are grey (b/grey.png), the other 6 colour; all are used as colour"
    assert logs[-1].startswith(f"train-tokenizer: {tmp_path}: {mixed}")
    logs.clear()  # one kind only: nothing to report
    (tmp_path / "b" / "grey.png").unlink()
    split_images(tmp_path, 8, heldout_fraction=0.3, seed=0, purpose="tokenizer", log=logs.append)
    assert not any("mixed channels" in line for line in logs)


def test_the_grid_note_of_a_sweep_prints_once(tmp_path, capsys):
    from rargen.checkpoint import save
    from rargen.model import RAR, ModelConfig
    from rargen.sampling.engine import SampleConfig
    from rargen.sampling.images import sample_to_folder
    from test_sample_cli import TinyTokenizer, TinyTokenizerConfig

    save(RAR(ModelConfig.from_name("rar-tiny", num_classes=2)), tmp_path / "gen")
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    labels = [0] * 11 + [1]  # more than a grid's 10 columns: the grid says so
    for scale in (1.0, 2.0):  # as a sweep does: one folder per setting
        config = SampleConfig(cfg_scale=scale)
        sample_to_folder(
            tmp_path / "gen", tmp_path / "tok", labels, config, tmp_path / f"s{scale}", progress=False
        )
    assert capsys.readouterr().out.count("grid.png: at most 10 samples per class shown") == 1


def test_the_readme_sets_up_before_bare_commands_and_says_what_downloads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    first_bare = readme.index("\nrargen ")  # the first shell line that runs a bare `rargen`
    assert readme.index("make venv") < first_bare and readme.index(". .venv/bin/activate") < first_bare
    assert readme.count("## Set-up, and what downloads when") == 1
    for name in ("README.md", "docs/evaluation.md"):  # the first example downloads: never say it does not
        assert "never downloads anything" not in (root / name).read_text(), name


def test_demo_help_names_the_digits_default_and_the_rule_of_data():
    """--data chooses the budgets from the folder; the help showed only the digits values."""
    text = help_of("demo")
    grey, colour = own_data.TOKENIZER_STEPS[1], own_data.TOKENIZER_STEPS[3]
    assert (
        f"--tokenizer-steps TOKENIZER_STEPS tokenizer steps; default 300 on the digits; with --data, "
        f"chosen from the folder: {grey} for grey images, {colour} for colour, a cap" in text
    )
    assert (
        "--classifier-epochs CLASSIFIER_EPOCHS classifier epochs; default 12 on the digits; with --data"
        in text
    )
    steps = "--steps STEPS optimizer steps; default 500 on the digits; with --data, chosen from the folder: "
    assert f"{steps}{own_data.GENERATOR_EPOCHS} epochs" in text
    assert "--eval-per-class EVAL_PER_CLASS generated images per class for the scores; default 50" in text
