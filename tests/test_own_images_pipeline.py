"""From a folder of your own grey images to scored samples, through the CLI alone (issue 19).

A generated class-folder tree (3 classes of 16x16 grey shapes, one corrupt file) goes through
train-tokenizer, pretokenize (no --image-size), train (no preset), sample, train-classifier and
sweep --classifier, with no file made by hand in between. Tiny sizes and few steps: the point is
that every stage takes the previous one's output as it is, not the quality of the samples.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from rargen.cli.main import main
from rargen.sampling.images import GRID_LABEL_WIDTH
from test_classifier import shapes_folder

TINY_MODEL = ["--model", "dim=32", "--model", "depth=1", "--model", "num_heads=2", "--model", "mlp_dim=64"]


@pytest.mark.slow
def test_a_folder_of_grey_images_to_scored_samples(tmp_path, capsys, one_torch_thread):
    data = shapes_folder(tmp_path / "data", classes=3, per_class=16, size=16)

    def run(*argv: str) -> str:
        assert main([*argv, "--threads", "1"]) == 0, argv
        captured = capsys.readouterr()
        assert "\r" not in captured.err  # no progress bar redraws off a terminal
        return captured.out

    printed = run("train-tokenizer", "--data", str(data), "--out", str(tmp_path / "tok"),
                  "--preset", "vq-tiny", "--steps", "30", "--batch-size", "16")  # fmt: skip
    assert "read 48 image(s), skipped 1" in printed and "shape_0/broken.png" in printed
    tokenizer = str(tmp_path / "tok" / "tokenizer")

    store = str(tmp_path / "store")
    printed = run("pretokenize", "--data", str(data), "--tokenizer", tokenizer, "--out", store)
    assert "read 48 image(s), skipped 1" in printed and "shape_0/broken.png" in printed
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["image_size"] == 16 and meta["class_names"] == ["shape_0", "shape_1", "shape_2"]

    printed = run("train", "--data", store, "--out", str(tmp_path / "gen"),
                  "--steps", "40", *TINY_MODEL)  # fmt: skip
    assert "small-data recipe" in printed
    generator = str(tmp_path / "gen" / "final")

    run("sample", generator, "--tokenizer", tokenizer, "--per-class", "4", "--out", str(tmp_path / "s"))
    samples = np.load(tmp_path / "s" / "samples.npz")
    assert samples["arr_0"].shape == (12, 16, 16, 1)  # grey in, grey out
    assert samples["labels"].tolist() == [c for c in range(3) for _ in range(4)]
    assert Image.open(tmp_path / "s" / "images" / "000000.png").mode == "L"
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["class_names"] == ["shape_0", "shape_1", "shape_2"] and meta["image_channels"] == 1
    grid = np.asarray(Image.open(tmp_path / "s" / "grid.png"))
    assert grid.shape == (3 * 16, GRID_LABEL_WIDTH + 4 * 16)  # one grey row per class, 4 columns
    for c in range(3):  # each row holds that class's samples, in order
        row = grid[c * 16 : (c + 1) * 16, GRID_LABEL_WIDTH:]
        tiles = np.concatenate([samples["arr_0"][4 * c + i, :, :, 0] for i in range(4)], axis=1)
        np.testing.assert_array_equal(row, tiles)

    printed = run("train-classifier", "--data", str(data), "--out", str(tmp_path / "clf"), "--epochs", "30",
                  "--feature-dim", "8")  # fmt: skip
    assert "shape_0/broken.png" in printed and "held-out accuracy" in printed
    report = json.loads((tmp_path / "clf" / "report.json").read_text())
    assert report["image_size"] == 16 and report["image_channels"] == 1
    assert report["heldout_accuracy"] >= 0.9  # corner squares: an easy task

    printed = run("sweep", generator, "--tokenizer", tokenizer, "--cfg-scales", "1,3", "--per-class", "4",
                  "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / "sweep"))  # fmt: skip
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["cfg_scale"] for row in rows] == [1, 3] and "class_accuracy" in printed
    # Beside the samples, real data scored alike: 12 images (4 per class) where the data has them.
    baselines = json.loads((tmp_path / "sweep" / "baselines.json").read_text())
    counts = {row["what"]: row["num_images"] for row in baselines["rows"]}
    assert counts["real training images"] == 12 and baselines["note"] is None
    assert counts["real held-out images"] == counts["tokenizer reconstructions of them"] == 9  # 3 per class
    for what in counts:
        assert what in printed
    for row in rows:
        assert 0.0 <= row["class_accuracy"] <= 1.0 and row["num_samples"] == 12
        assert math.isfinite(row["frechet_distance"]) and row["frechet_distance"] >= -1e-6
