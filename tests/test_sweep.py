"""`rargen sweep`: every (guidance scale, temperature) is sampled class-balanced and scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import randomize
from rargen.checkpoint import save
from rargen.cli.main import main
from rargen.demo.digit_classifier import DigitClassifier, DigitClassifierConfig, digit_frechet_distance
from rargen.evaluation.classifier import classifier_accuracy
from rargen.model import RAR, ModelConfig
from test_sample_cli import TinyTokenizer, TinyTokenizerConfig


def test_sweep_scores_every_setting_with_the_digit_classifier(tmp_path, capsys) -> None:
    # 64 tokens of 4x4 pixels: 32x32 images, the digit classifier's input size.
    config = ModelConfig.from_name("rar-tiny", num_image_tokens=64, dropout=0.0, attn_dropout=0.0)
    save(randomize(RAR(config), std=0.2).eval(), tmp_path / "gen")
    save(TinyTokenizer(TinyTokenizerConfig(grid=8, patch=4)), tmp_path / "tok")
    torch.manual_seed(0)
    save(DigitClassifier(DigitClassifierConfig(image_size=32)).eval(), tmp_path / "clf")
    argv = ["sweep", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "s"), "--cfg-scales", "1,3", "--temperatures", "1,0.5",
            "--per-class", "2", "--classifier", str(tmp_path / "clf")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| cfg_scale |" in printed
    # Real digits scored alike, 2 of each class as the samples; this stand-in tokenizer cannot encode.
    baselines = json.loads((tmp_path / "s" / "baselines.json").read_text())
    assert [(r["what"], r["num_images"]) for r in baselines["rows"]] == [
        ("real held-out images", 20),
        ("real training images", 20),
    ]
    assert "no reconstruction row" in baselines["note"] and "real held-out images" in printed

    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(r["cfg_scale"], r["temperature"]) for r in rows] == [(1, 1), (1, 0.5), (3, 1), (3, 0.5)]
    from rargen.checkpoint import load

    classifier = load(tmp_path / "clf")
    for row in rows:
        folder = tmp_path / "s" / f"cfg{row['cfg_scale']:g}-pow0-t{row['temperature']:g}"
        data = np.load(folder / "samples.npz")
        assert data["arr_0"].shape == (20, 32, 32, 3)
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).float() / 255
        labels = torch.from_numpy(data["labels"])
        assert row["class_accuracy"] == classifier_accuracy(classifier, images, labels)
        assert row["frechet_distance"] == pytest.approx(digit_frechet_distance(classifier, images))
    first, guided = (np.load(tmp_path / "s" / f"cfg{s}-pow0-t1" / "samples.npz")["arr_0"] for s in (1, 3))
    assert not np.array_equal(first, guided)  # the settings really differ


def test_sweep_needs_a_scorer(tmp_path, capsys) -> None:
    save(RAR(ModelConfig.from_name("rar-tiny")), tmp_path / "gen")
    code = main(["sweep", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "gen"),
                 "--out", str(tmp_path / "s"), "--cfg-scales", "1"])  # fmt: skip
    assert code == 2 and "--classifier" in capsys.readouterr().err
