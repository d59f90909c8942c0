"""rargen train-classifier and scoring with it: any labelled folder, size and channel count."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.checkpoint import load, read_record
from rargen.cli.main import main
from rargen.data.sources import FolderSource, read_images
from rargen.data.split import heldout_split, source_digest
from rargen.evaluation.classifier import (
    HELDOUT_STATS_NAME,
    ImageClassifier,
    ImageClassifierConfig,
    check_matches,
    feature_stats,
    load_scorer,
    score_samples,
)
from rargen.evaluation.metrics import frechet_distance
from rargen.progress import PlainProgress, progress_bar


def shapes_folder(root, classes=3, per_class=12, size=12, corrupt=True):
    """Grey images: class c is a bright square at corner c on a dark noisy background."""
    rng = np.random.default_rng(0)
    half = size // 2
    for c in range(classes):
        folder = root / f"shape_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (size, size)).astype(np.uint8)
            y, x = divmod(c % 4, 2)
            image[y * half : (y + 1) * half, x * half : (x + 1) * half] = 200 + rng.integers(0, 50)
            Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
    if corrupt:
        (root / "shape_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    data = shapes_folder(root / "data")
    args = ["train-classifier", "--data", str(data), "--out", str(root / "clf"), "--epochs", "40",
            "--heldout-fraction", "0.25", "--feature-dim", "8", "--threads", "1"]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(args) == 0
    return root, data, out.getvalue()


def test_train_classifier_writes_a_self_describing_folder(trained):
    root, data, printed = trained
    assert "read 36 image(s), skipped 1" in printed and "shape_0/broken.png" in printed
    assert "3 classes, 37 image files (shape_0 13, shape_1 12, shape_2 12)" in printed  # the folder's scan
    record = read_record(root / "clf")
    assert record["kind"] == "image-classifier"
    assert record["config"]["image_size"] == 12 and record["config"]["image_channels"] == 1
    assert record["config"]["num_classes"] == 3
    extra = record["extra"]
    assert extra["class_names"] == ["shape_0", "shape_1", "shape_2"] and extra["excluded"] == []
    # 3 of each class held out; of the 27 left, 1 of each class decides when to stop (validation).
    assert (extra["num_train"], extra["num_validation"], extra["num_heldout"]) == (24, 3, 9)
    assert f"held-out accuracy {extra['heldout_accuracy']:.2%}" in printed
    assert extra["heldout_accuracy"] == 1.0  # the squares are far apart: an easy task
    # The validation loss still fell at the cap of 40 epochs: the best weights are the last, and said so.
    gate = extra["gate"]
    assert (gate["stopped_early"], gate["ran"], gate["best_at"]) == (False, 40, 40)
    verdict = "verdict (best at epoch 40 of 40; reached the cap of 40 epochs): held-out accuracy 100.0%: good"
    assert verdict in printed
    assert json.loads((root / "clf" / "report.json").read_text()) == extra

    # The held-out split is the seeded stratified one, and its statistics are the stored ones.
    # The split is of the folder's entries (rargen.data.split), recorded with the data's digest.
    source = FolderSource(data)
    _, heldout, split = heldout_split(source, 0.25, seed=0)
    assert extra["split"] == split and split["source_digest"] == source_digest(source)
    images, _, _, _ = read_images(source, 12, heldout)
    classifier = load(root / "clf")
    assert isinstance(classifier, ImageClassifier)
    held = torch.from_numpy(images[..., :1]).permute(0, 3, 1, 2).float() / 255
    scorer = load_scorer(root / "clf")
    assert frechet_distance(feature_stats(classifier, held).gaussian(), scorer.heldout) == pytest.approx(
        0.0, abs=1e-6
    )
    assert (root / "clf" / HELDOUT_STATS_NAME).is_file()


def test_a_classifier_that_levels_off_stops_early_and_keeps_its_best_epoch():
    from rargen.evaluation.classifier import fit_classifier
    from rargen.train.gates import Plateau

    rng = torch.Generator().manual_seed(0)
    images, labels = torch.rand(48, 1, 8, 8, generator=rng), torch.randint(0, 3, (48,), generator=rng)
    check_x, check_y = torch.rand(12, 1, 8, 8, generator=rng), torch.randint(0, 3, (12,), generator=rng)
    config = ImageClassifierConfig(8, image_channels=1, channels=(4,), feature_dim=4, num_classes=3)
    plateau = Plateau(patience=3, min_gain=0.0)
    # Noise labels: nothing to learn that carries over, so the validation loss soon rises.
    model = fit_classifier(lambda: ImageClassifier(config), images, labels, 50, 16, 1e-2, 0,
                           gate=(plateau, check_x, check_y))  # fmt: skip
    ran = plateau.history[-1][0]
    assert ran < 50 and plateau.stop and ran == plateau.best_at + 3
    with torch.no_grad():  # the weights returned are the best epoch's, not the last one's
        loss = float(torch.nn.functional.cross_entropy(model(check_x), check_y))
    assert -math.log(loss) == plateau.best == max(value for _, value in plateau.history)
    assert plateau.history[-1][1] < plateau.best


def test_plateau_counts_evaluations_without_a_real_gain():
    from rargen.train.gates import Plateau

    plateau = Plateau(patience=2, min_gain=0.5)
    assert plateau.update(10.0, 100) and not plateau.stop
    assert plateau.update(10.3, 200) and not plateau.stop  # a new best, but no real gain (< 0.5)
    assert not plateau.update(10.1, 300) and plateau.stop  # two evaluations without a gain: stop
    assert (plateau.best, plateau.best_at) == (10.3, 200)
    assert Plateau.from_state(plateau.state()) == plateau  # saved with a run, read back the same
    assert not Plateau(patience=0, min_gain=0.0).stop  # patience 0: a fixed budget


def _samples(folder, images, labels, class_names=None):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "samples.npz", arr_0=images, labels=np.asarray(labels))
    if class_names is not None:
        (folder / "meta.json").write_text(json.dumps({"class_names": class_names}))
    return folder / "samples.npz"


def test_evaluate_with_the_classifier_scores_real_and_wrong_samples(trained, tmp_path, capsys):
    root, data, _ = trained
    source = FolderSource(data)
    images, labels, _, _ = read_images(source, 12)
    names = ["shape_0", "shape_1", "shape_2"]
    real = _samples(tmp_path / "real", images[..., :1], labels, names)  # grey, one channel
    assert main(["evaluate", str(real), "--classifier", str(root / "clf")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert metrics["class_accuracy"] == 1.0 and f"{metrics['frechet_distance']:.4f}" in printed
    assert metrics["record"]["class_names"] == names and metrics["num_samples"] == 36
    # RGB samples of grey data score the same as the grey ones.
    rgb = score_samples(_samples(tmp_path / "rgb", images, labels), load_scorer(root / "clf"))
    assert rgb["class_accuracy"] == 1.0
    assert rgb["frechet_distance"] == pytest.approx(metrics["frechet_distance"], rel=1e-5)
    # Wrong labels are counted wrong; noise is far from the held-out features.
    wrong = score_samples(_samples(tmp_path / "w", images, (labels + 1) % 3), load_scorer(root / "clf"))
    assert wrong["class_accuracy"] == 0.0
    noise = np.random.default_rng(1).integers(0, 256, (36, 12, 12, 1)).astype(np.uint8)
    far = score_samples(_samples(tmp_path / "n", noise, labels), load_scorer(root / "clf"))
    assert far["frechet_distance"] > 10 * metrics["frechet_distance"]


def test_a_classifier_that_does_not_fit_is_refused_naming_both_values(trained, tmp_path, capsys):
    root, _, _ = trained
    scorer = load_scorer(root / "clf")
    with pytest.raises(ValueError, match=r"shape_0.*but the generator 'g' has the classes \['cat'"):
        check_matches(scorer, what="the generator 'g'", class_names=["cat", "dog", "owl"])
    with pytest.raises(ValueError, match="has 3 classes but the generator 'g' has 10"):
        check_matches(scorer, what="the generator 'g'", num_classes=10)
    with pytest.raises(ValueError, match="takes 12 px images but the tokenizer 't' gives 32 px"):
        check_matches(scorer, what="the tokenizer 't'", image_size=32)
    samples = _samples(tmp_path / "big", np.zeros((4, 16, 16, 1), np.uint8), [0, 1, 2, 0])
    assert main(["evaluate", str(samples), "--classifier", str(root / "clf")]) == 2
    assert "takes 12 px images but the samples" in capsys.readouterr().err
    samples = _samples(tmp_path / "names", np.zeros((4, 12, 12, 1), np.uint8), [0, 1, 2, 0], ["a", "b", "c"])
    assert main(["evaluate", str(samples), "--classifier", str(root / "clf")]) == 2
    assert "has the classes ['a', 'b', 'c']" in capsys.readouterr().err
    assert main(["evaluate", str(samples)]) == 2  # neither scorer
    assert "--reference REF (ADM metrics) or --classifier DIR" in capsys.readouterr().err
    # An RGB classifier refuses grey samples.
    rgb = ImageClassifier(ImageClassifierConfig(image_size=12, channels=(4,), feature_dim=4, num_classes=3))
    with pytest.raises(ValueError, match=r"\(N, 3, 12, 12\)"):
        rgb(torch.zeros(2, 1, 12, 12))


def test_the_classifier_takes_any_size():
    """28 px images (not divisible by 2**3) work: the pooling rounds up (28 -> 14 -> 7 -> 4)."""
    model = ImageClassifier(ImageClassifierConfig(image_size=28, image_channels=1, num_classes=4))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    assert model.hidden.in_features == 32 * 4 * 4
    with pytest.raises(ValueError, match="image_channels must be 1"):
        ImageClassifierConfig(image_channels=2)


def test_plain_progress_writes_whole_lines_not_carriage_returns(capsys):
    bar = progress_bar(range(3), desc="sampling", unit="batch")  # stderr is captured: not a terminal
    assert isinstance(bar, PlainProgress)
    assert list(bar) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and err.rstrip().splitlines()[-1].startswith("sampling: 3/3 (100%) batch")
    with progress_bar(total=10, desc="quiet", enabled=False) as silent:
        silent.update(10)
    assert capsys.readouterr().err == ""


def test_sweep_refuses_a_classifier_of_other_classes_before_sampling(trained, tmp_path, capsys):
    from rargen.checkpoint import save
    from rargen.model import RAR, ModelConfig
    from test_sample_cli import TinyTokenizer, TinyTokenizerConfig

    root, _, _ = trained
    model = RAR(ModelConfig.from_name("rar-tiny", num_classes=3))
    save(model, tmp_path / "gen", extra={"class_names": ["cat", "dog", "owl"]})
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    argv = ["sweep", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--cfg-scales", "1",
            "--per-class", "2", "--classifier", str(root / "clf"), "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "['shape_0', 'shape_1', 'shape_2']" in err and "['cat', 'dog', 'owl']" in err
    assert not (tmp_path / "s").exists()  # refused before any sampling
    # The same classes, but images of another size than the classifier's 12 px: refused too.
    save(model, tmp_path / "gen", extra={"class_names": ["shape_0", "shape_1", "shape_2"]})
    assert main(argv) == 2
    assert "takes 12 px images but the samples" in capsys.readouterr().err


def test_train_tokenizer_reports_how_well_the_classifier_recognises_its_reconstructions(trained, tmp_path):
    from rargen.checkpoint import read_record
    from rargen.tokenizers.vq import VQTokenizerConfig
    from rargen.train.tokenizer import TokenizerTrainConfig, preview_indices, train_tokenizer

    root, data, _ = trained
    config = TokenizerTrainConfig(
        steps=20, batch_size=8, warmup_steps=2, sample_every=0, eval_every=10, heldout_fraction=0.25
    )  # the classifier's split (the fixture)
    report = train_tokenizer(
        tmp_path / "tok", data, model_config=VQTokenizerConfig.from_name("vq-tiny", image_size=12),
        train_config=config, progress=False, classifier=root / "clf",
    )  # fmt: skip
    seen = report["recognition"]
    # One split for both: the tokenizer's held-out images are the classifier's, so the real images
    # score exactly the classifier's own held-out accuracy.
    scorer = read_record(root / "clf")["extra"]
    assert seen["num_images"] == report["heldout"]["num_images"] == scorer["num_heldout"]
    assert (
        seen["real_accuracy"] == scorer["heldout_accuracy"] and 0.0 <= seen["reconstruction_accuracy"] <= 1.0
    )
    assert f"recognises {seen['reconstruction_accuracy']:.1%} of the reconstructions" in report["verdict"]
    # The preview shows every class, one of each in turn (the first 16 images showed 2 of 8 classes).
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10)
    assert torch.bincount(labels[preview_indices(labels, count=4)]).tolist() == [1, 1, 1, 1]
    many = torch.arange(100).repeat_interleave(2)
    assert len(set(many[preview_indices(many)].tolist())) == 64  # every class, up to 64


@pytest.mark.parametrize(
    ("patience", "stopped_early", "fix"),
    [
        (0, False, "a fixed budget (--patience 0): drop that"),
        (8, False, "it was still improving at the cap: raise --epochs (e.g. 24)"),
        (8, True, "it levelled off: more images per class, or a wider net"),
    ],
)
def test_a_weak_classifier_is_told_what_to_change(patience, stopped_early, fix):
    from rargen.train.gates import classifier_verdict

    gate = {"patience": patience, "cap": 12, "ran": 12, "best_at": 4, "stopped_early": stopped_early}
    verdict = classifier_verdict({"heldout_accuracy": 0.73, "gate": gate})
    assert "held-out accuracy 73.0%: LOW (below 90%)" in verdict and fix in verdict
    assert "good enough" in classifier_verdict({"heldout_accuracy": 0.956, "gate": gate})
