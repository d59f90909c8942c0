"""The ablation study tool on a tiny grid (2 windows x 2 seeds x 1 budget of rar-tiny, seconds):
end to end, resumed after an interruption, and its NLL and sample scores against direct computations."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import rargen.sampling.engine
from rargen.checkpoint import load, save
from rargen.data.store import write_store
from rargen.data.token_store import TokenStore
from rargen.demo.ablation import (
    Evaluator,
    StudyConfig,
    StudyData,
    Window,
    parse_windows,
    run_study,
    study_runs,
)
from rargen.demo.digit_classifier import DigitClassifier, DigitClassifierConfig, digit_frechet_distance
from rargen.evaluation.classifier import classifier_accuracy
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig
from rargen.train.recipe import TrainConfig

BUDGET = 8


def _tokens(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class one 4x4 prototype of 32 codes, a third of the tokens replaced at random."""
    prototypes = np.random.default_rng(0).integers(0, 32, size=(10, 4, 4))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num)
    tokens = prototypes[labels]
    noise = rng.random(tokens.shape) < 0.33
    tokens[noise] = rng.integers(0, 32, size=int(noise.sum()))
    return tokens, labels


@pytest.fixture(scope="module")
def study_data(tmp_path_factory, one_torch_thread) -> StudyData:
    root = tmp_path_factory.mktemp("ablation-data")
    names = [str(i) for i in range(10)]
    stores = [
        write_store(root / name, *_tokens(num, seed), codebook_size=32, class_names=names, image_size=16)
        for name, num, seed in (("train", 64, 1), ("heldout", 32, 2))
    ]
    torch.manual_seed(0)  # a random-weight f4 VQ tokenizer: 16 px images <-> 4x4 codes
    tokenizer = VQTokenizer(VQTokenizerConfig(image_size=16, codebook_size=32, hidden_channels=8))
    save(tokenizer.eval(), root / "tokenizer")
    return StudyData(stores[0], stores[1], root / "tokenizer")


def _config() -> StudyConfig:
    train = TrainConfig(preset="rar-tiny", batch_size=16, lr=1e-3, warmup=0.1, log_every=4)
    windows = (Window(0.0, 0.0), Window(0.5, 0.75))
    return StudyConfig(train, windows, budgets=(BUDGET,), seeds=(0, 1), evaluations=2, samples_per_class=1)


@pytest.fixture(scope="module")
def finished(study_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(out, _config(), study_data, progress=False, log=lambda _: None)


def _direct_nll(model, tokens: np.ndarray, labels: np.ndarray) -> float:
    """Bits per token, one image at a time, from log-softmax of the model's own raster forward."""
    total = 0.0
    with torch.no_grad():
        for image, label in zip(tokens, labels, strict=True):
            x = torch.from_numpy(image.reshape(1, -1).astype(np.int64))
            logits = model.eval()(x, torch.tensor([int(label)]))[0]
            total -= float(torch.log_softmax(logits.double(), -1)[torch.arange(x.shape[1]), x[0]].sum())
    return total / tokens.size / math.log(2)


def test_study_end_to_end(finished, study_data):
    out, summary = finished
    assert (out / "table.md").is_file() and (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(summary))
    assert [(row["window"], row["budget"], row["seeds"]) for row in summary["rows"]] == [
        ("raster", BUDGET, 2), ("anneal-0.50-0.75", BUDGET, 2)
    ]  # fmt: skip
    for run in study_runs(_config()):
        steps = [row["step"] for row in json.loads((out / "runs" / run.name / "evaluation.json").read_text())]
        assert steps == [4, 8]  # both kept checkpoints of every run were scored
        saved = json.loads((out / "runs" / run.name / "final" / "config.json").read_text())
        assert saved["extra"]["train_config"]["seed"] == run.seed
        assert saved["extra"]["train_config"]["anneal_start"] == run.window.start
    row = summary["rows"][1]
    assert 0.0 <= row["fixed_budget"]["copy_fraction"]["mean"] <= 1.0
    assert "nll_gain_over_raster_in_std" in row["fixed_budget"]
    assert row["best_checkpoint"]["heldout_nll"]["mean"] <= row["fixed_budget"]["heldout_nll"]["mean"]


def test_study_nll_is_the_direct_computation(finished, study_data):
    out, summary = finished
    heldout = TokenStore(study_data.heldout_store)
    tokens, labels = (
        np.asarray(heldout.gather(np.arange(len(heldout)), np.zeros(len(heldout), int))),
        heldout.labels,
    )
    for row in summary["rows"]:
        per_seed = [
            _direct_nll(load(out / "runs" / f"{row['window']}-b{BUDGET}-s{seed}" / "final"), tokens, labels)
            for seed in (0, 1)
        ]
        assert row["fixed_budget"]["heldout_nll"]["mean"] == pytest.approx(np.mean(per_seed), rel=1e-5)
        assert row["fixed_budget"]["heldout_nll"]["std"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-3)


def test_interrupted_study_resumes(finished, study_data, tmp_path):
    reference, _ = finished
    out = tmp_path / "study"
    config = _config()
    runs = [out / "runs" / run.name for run in study_runs(config)]
    # Shard 0 of 4 trains run 0 only; run 1 is then left as a run killed after its step-4 checkpoint.
    assert run_study(out, config, study_data, shard=(0, 4), progress=False, log=lambda _: None) is None
    run_study(out, config, study_data, shard=(1, 4), progress=False, log=lambda _: None)
    shutil.rmtree(runs[1] / "final")
    shutil.rmtree(runs[1] / "checkpoints" / f"step-{BUDGET:07d}")
    (runs[1] / "evaluation.json").unlink()
    files = [
        runs[0] / "final" / "model.safetensors",
        runs[1] / "checkpoints" / "step-0000004" / "model.safetensors",
    ]
    kept = {p: p.stat().st_mtime_ns for p in files}

    summary = run_study(out, config, study_data, progress=False, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing finished was trained again
    for ours, theirs in zip(runs, (reference / "runs" / run.name for run in study_runs(config)), strict=True):
        assert json.loads((ours / "evaluation.json").read_text()) == json.loads(
            (theirs / "evaluation.json").read_text()
        )  # the resumed run is the uninterrupted one, to the bit
    assert summary["rows"] == json.loads((reference / "table.json").read_text())["rows"]
    with pytest.raises(ValueError, match="other settings"):
        run_study(out, StudyConfig(config.train, config.windows, (BUDGET,), (0,)), study_data, progress=False)


def test_a_rerun_on_other_inputs_is_refused(finished, study_data, tmp_path):
    """Issue 25 item 7: study.json recorded the grid but not the data, the held-out store, the
    tokenizer or the classifier, so a rerun on other inputs rewrote the table from old evaluations
    (or, half finished, mixed data). The inputs' digests are recorded; a rerun on others is refused
    naming them, before any work; the same inputs moved elsewhere still resume."""
    out, _ = finished
    recorded = json.loads((out / "study.json").read_text())["data"]
    assert set(recorded) == {"store", "heldout_store", "tokenizer", "classifier"}
    assert recorded["classifier"] is None and len(recorded["tokenizer"]) == 64
    names = [str(i) for i in range(10)]
    other = write_store(tmp_path / "other", *_tokens(32, 3), codebook_size=32, class_names=names,
                        image_size=16)  # fmt: skip
    swapped = {
        "data.heldout_store": dataclasses.replace(study_data, heldout_store=other),
        "data.tokenizer": dataclasses.replace(study_data, tokenizer=None),
    }
    for field, data in swapped.items():
        with pytest.raises(ValueError, match=rf"other settings \({field}\); pass another --out"):
            run_study(out, _config(), data, progress=False, log=lambda _: None)
    moved = tmp_path / "moved"
    shutil.copytree(study_data.heldout_store, moved)
    summary = run_study(out, _config(), dataclasses.replace(study_data, heldout_store=moved), progress=False,
                        log=lambda _: None)  # fmt: skip
    assert summary["rows"] == json.loads((out / "table.json").read_text())["rows"]


def test_samples_are_scored_as_the_digit_classifier_scores_them(finished, study_data, tmp_path, monkeypatch):
    """A classifier folder scores each checkpoint's samples: class accuracy and the Fréchet distance
    to the held-out digits, the numbers of classifier_accuracy and digit_frechet_distance."""
    out, _ = finished
    torch.manual_seed(0)
    save(DigitClassifier(DigitClassifierConfig(image_size=16)).eval(), tmp_path / "clf")
    evaluator = Evaluator(dataclasses.replace(study_data, classifier=tmp_path / "clf"), samples_per_class=2)
    sampled, generate = [], rargen.sampling.engine.generate_images

    def generate_and_keep(*args, **kwargs):  # the evaluator's own samples, to be scored here too
        sampled.append(generate(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(rargen.sampling.engine, "generate_images", generate_and_keep)
    result = evaluator.evaluate(load(out / "runs" / f"{_config().windows[0].name}-b{BUDGET}-s0" / "final"))

    images, labels = torch.cat(sampled), torch.arange(10).repeat_interleave(2)
    classifier = load(tmp_path / "clf")
    assert result["class_accuracy"] == classifier_accuracy(classifier, images, labels)
    assert result["frechet_distance"] == digit_frechet_distance(classifier, images)


def test_a_classifier_that_cannot_score_the_samples_is_refused_before_training(study_data, tmp_path):
    torch.manual_seed(0)
    save(DigitClassifier(DigitClassifierConfig(image_size=8)).eval(), tmp_path / "clf")
    data = dataclasses.replace(study_data, classifier=tmp_path / "clf")
    with pytest.raises(ValueError, match="takes 8 px images but the tokenizer .* gives 16 px"):
        run_study(tmp_path / "study", _config(), data, progress=False, log=lambda _: None)
    assert not (tmp_path / "study" / "runs").exists()  # nothing was trained


def test_window_presets_and_names():
    table2 = parse_windows("paper-table2")
    assert (table2[0].name, table2[-1].name) == ("raster", "random")
    assert Window(0.5, 0.75).name in [w.name for w in table2]
    assert [w.name for w in parse_windows("0/0,0.25/0.5,1/1")] == ["raster", "anneal-0.25-0.50", "random"]
    with pytest.raises(ValueError, match="start/end"):
        parse_windows("half")
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        Window(0.75, 0.5)


def test_r_end_is_an_axis_of_the_study():
    train = TrainConfig(preset="rar-tiny")
    config = StudyConfig(train, parse_windows("0/0,0.5/0.75"), (60,), (0,), r_ends=(0.0, 0.25))
    runs = study_runs(config)
    assert [run.name for run in runs] == [
        "raster-b60-s0", "anneal-0.50-0.75-b60-s0", "raster-r0.25-b60-s0", "anneal-0.50-0.75-r0.25-b60-s0",
    ]  # fmt: skip
    assert [run.train_config(config).r_end for run in runs] == [0.0, 0.0, 0.25, 0.25]
    assert "r_ends" not in StudyConfig(train).to_dict() and config.to_dict()["r_ends"] == [0.0, 0.25]
    with pytest.raises(ValueError, match="must be distinct probabilities"):
        StudyConfig(train, r_ends=(0.1, 0.1))
