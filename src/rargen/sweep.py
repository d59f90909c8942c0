"""Tuning the sampler: sample a grid of guidance scales and temperatures, score each setting.

Papers pick the guidance scale on a smaller sample count (e.g. 10k images) before the 50k
evaluation. ``sweep`` does that: every (scale, temperature) pair is sampled class-balanced with
``rargen.sample_images.sample_to_folder`` and scored either with the ADM metrics
(``rargen.evaluate``: a reference batch and Inception weights) or, for the embedded digits, with
rargen's digit classifier (class accuracy and Fréchet distance in its features).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rargen.sampling import SampleConfig


def score_with_classifier(samples: Path, classifier_path: str | os.PathLike) -> dict[str, float]:
    """Class accuracy and Fréchet distance (classifier features, vs held-out digits) of a samples.npz."""
    from rargen.checkpoint import load

    classifier = load(classifier_path)
    with np.load(samples) as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(data["labels"]).long()
    return classifier_scores(classifier, images, labels)


def classifier_scores(
    classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Class accuracy and Fréchet distance (classifier features, vs held-out digits) of images
    (N, 3, H, W) in [0, 1] generated for ``labels`` (N,)."""
    from rargen.digits import classifier_accuracy, digit_frechet_distance

    return {
        "class_accuracy": classifier_accuracy(classifier, images, labels),
        "frechet_distance": digit_frechet_distance(classifier, images),
    }


def sweep(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    cfg_scales: Sequence[float],
    temperatures: Sequence[float] = (1.0,),
    *,
    cfg_power: float = 0.0,
    per_class: int = 10,
    reference: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    classifier: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample and score every (scale, temperature); returns the rows (also ``out/sweep.json``)."""
    from rargen.checkpoint import read_record
    from rargen.sample_images import class_balanced_labels, sample_to_folder

    if classifier is None and (reference is None or inception is None):
        raise ValueError("score with --reference and --inception (ADM metrics) or with --classifier (digits)")
    out = Path(out)
    labels = class_balanced_labels(read_record(checkpoint)["config"]["num_classes"], per_class)
    rows = []
    for scale, temperature in itertools.product(cfg_scales, temperatures):
        config = SampleConfig(cfg_scale=scale, cfg_power=cfg_power, temperature=temperature)
        folder = out / f"cfg{scale:g}-pow{cfg_power:g}-t{temperature:g}"
        npz = sample_to_folder(
            checkpoint, tokenizer, labels, config, folder, seed=seed, batch_size=batch_size, progress=progress
        )
        if classifier is not None:
            scores = score_with_classifier(npz, classifier)
        else:
            from rargen.evaluate import evaluate

            result = evaluate(npz, reference, inception, progress=progress)
            scores = {k: result[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")}
        rows.append({"cfg_scale": scale, "cfg_power": cfg_power, "temperature": temperature, **scores})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the sweep rows."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
