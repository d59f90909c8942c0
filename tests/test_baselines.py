"""Scores with context (issue 27): ``evaluate --classifier`` prints real-data rows beside the samples.

The rows are checked against direct computations: the held-out row, when the samples ask for at
least as many images of each class as are held out, is every held-out image, so its class accuracy
is the classifier's own held-out accuracy and its Fréchet distance to the held-out statistics 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rargen.checkpoint import load
from rargen.cli.main import main
from rargen.data.sources import FolderSource, read_images
from rargen.data.split import heldout_split
from rargen.evaluation.baselines import as_scored, pick_like, reconstruct
from rargen.evaluation.classifier import classifier_scores, load_scorer
from test_classifier import shapes_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pick_like_takes_the_samples_classes_without_repeats():
    indices, labels = np.arange(10, 20), np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    chosen = pick_like(indices, labels, np.array([0, 0, 2, 2, 2, 1, 1, 1]), seed=0)
    picked = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    assert sorted(picked[i] for i in chosen) == [0, 0, 1, 1, 2, 2, 2]  # class 1 has only 2
    assert len(set(chosen.tolist())) == len(chosen)
    assert np.array_equal(chosen, pick_like(indices, labels, np.array([0, 0, 2, 2, 2, 1, 1, 1]), seed=0))


@pytest.mark.slow
def test_evaluate_prints_the_baselines_with_their_counts_and_real_numbers(tmp_path, capsys):
    data = shapes_folder(tmp_path / "data", classes=3, per_class=10, size=16)  # + a broken file
    tok, clf = tmp_path / "tok", tmp_path / "clf"
    assert main(["train-tokenizer", "--data", str(data), "--out", str(tok), "--preset", "vq-tiny",
                 "--steps", "3", "--batch-size", "8", "--threads", "1"]) == 0  # fmt: skip
    assert main(["train-classifier", "--data", str(data), "--out", str(clf), "--epochs", "3",
                 "--feature-dim", "8", "--threads", "1"]) == 0  # fmt: skip
    report = json.loads((clf / "report.json").read_text())
    # Samples: 4 per class (more than the 2 held out of each class), noise, as rargen sample writes them.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    np.savez(
        tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 1), dtype=np.uint8), labels=labels
    )
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": str(tok / "tokenizer")}))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "samples.npz"), "--classifier", str(clf), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {row["what"]: row for row in metrics["baselines"]}
    assert list(rows) == ["real held-out images", "tokenizer reconstructions of them", "real training images"]
    assert metrics["baselines_note"] is None and metrics["num_samples"] == 12
    for line in ("samples", *rows):
        assert line in printed
    assert f"{'samples':<34} {12:>6}" in printed

    held = rows["real held-out images"]
    assert held["num_images"] == report["num_heldout"]  # every held-out image (2 + 2 + 2, or 5 if broken)
    assert held["class_accuracy"] == report["heldout_accuracy"]
    assert held["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert f"{'real held-out images':<34} {held['num_images']:>6}  {held['class_accuracy']:>14.4f}" in printed
    assert rows["real training images"]["num_images"] == 12  # 4 of each class, as the samples

    # The reconstruction row, recomputed directly: the held-out images through the tokenizer.
    source = FolderSource(data)
    _, heldout, _ = heldout_split(source, 0.2, 0)
    images, targets, _, _ = read_images(source, 16, heldout)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    decoded = as_scored(reconstruct(load(tok / "tokenizer").eval(), images), channels=1)
    scorer = load_scorer(clf)
    direct = classifier_scores(scorer.classifier, decoded, torch.from_numpy(targets), scorer.heldout)
    recon = rows["tokenizer reconstructions of them"]
    assert recon["num_images"] == len(images)
    assert recon["class_accuracy"] == direct["class_accuracy"]
    assert recon["frechet_distance"] == pytest.approx(direct["frechet_distance"], rel=1e-9)
