"""Scores with context: real-data rows beside the samples' class accuracy and Fréchet distance.

A class accuracy of 80% or a Fréchet distance of 25 says little alone. ``rargen evaluate
--classifier`` and ``rargen sweep --classifier`` print, beside the samples and scored the same way
(the same classifier and reference, the same classes and counts as the samples where the data has
that many images, through the same uint8 and channel conversion as samples.npz):

- **real held-out images** (the classifier's held-out split): the class accuracy a perfect generator
  would reach. They are part of the Fréchet distance's reference, so their distance is only the
  floor that the sample count alone gives, not a target;
- **tokenizer reconstructions of those images** (encode, decode): the ceiling for any generator
  that draws these codes; far below the real row, the tokenizer limits quality (train it longer);
- **real training images** (the other side of the split): a Fréchet distance of real images that
  are not the reference, at the samples' count: samples near it are as close as real data gets.

The images are read again from the data the classifier was trained on, by the split it recorded
(``rargen.data.split``; a changed folder is reported, not scored). ``evaluate_with_classifier`` and
``format_scores`` are ``rargen evaluate --classifier``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rargen.data.sources import open_source, read_images
from rargen.data.split import check_same_split, heldout_split
from rargen.evaluation.classifier import Scorer, classifier_scores, load_scorer, score_samples
from rargen.tokenizers.base import as_data_images

BASELINES = ("real held-out images", "tokenizer reconstructions of them", "real training images")


def pick_like(indices: np.ndarray, labels: np.ndarray, wanted: np.ndarray, seed: int = 0) -> np.ndarray:
    """From ``indices`` (with ``labels``), as many of each class as ``wanted`` (the samples' labels)
    asks for, seeded, without repeats (fewer where a class has fewer)."""
    rng, chosen = np.random.default_rng(seed), []
    for label, count in zip(*np.unique(wanted, return_counts=True), strict=True):
        members = indices[labels == label]
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def as_scored(images: Tensor, channels: int) -> Tensor:
    """Images (N, 3, S, S) in [0, 1] as ``rargen sample`` stores them and the scorer reads them back:
    rounded to uint8, and for grey data (``channels`` 1) one grey channel as PNG's "L" makes it."""
    from rargen.sampling.images import to_uint8

    array = to_uint8(as_data_images(images.float().clamp(0, 1), channels))  # (N, S, S, 3) uint8
    if channels == 1:
        array = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in array])[..., None]
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def reconstruct(tokenizer: Any, images: Tensor, batch_size: int = 64) -> Tensor:
    """``tokenizer.decode(tokenizer.encode(images))``, in batches."""
    return torch.cat([tokenizer.decode(tokenizer.encode(images[i : i + batch_size])).float()
                      for i in range(0, len(images), batch_size)])  # fmt: skip


def classifier_split(scorer: Scorer) -> dict[str, Any] | None:
    """The split a classifier was trained with: recorded by train-classifier; the demo's digit
    classifier learnt the digits' fixed training split."""
    if scorer.classifier.checkpoint_kind == "digit-classifier":
        return heldout_split(open_source("digits", image_size=scorer.image_size))[2]
    return getattr(scorer.classifier, "checkpoint_extra", {}).get("split")


def baseline_rows(
    scorer: Scorer, labels: Tensor, channels: int, tokenizer: str | os.PathLike | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of the module docstring for samples of ``labels`` with ``channels`` channels, and a
    note on what could not be scored (None when all could)."""
    from rargen.checkpoint import load

    record = classifier_split(scorer)
    if record is None:
        return [], "no baselines: the classifier records no held-out split (retrain it with train-classifier)"
    try:
        source = open_source(record["source"], image_size=scorer.image_size)
        train, heldout, now = heldout_split(source, record["heldout_fraction"], record["seed"])
        check_same_split(record, f"--classifier {scorer.path!r}", now, f"its data {record['source']!r} now")
    except (OSError, ValueError) as error:
        return [], f"no baselines: {error}"
    wanted = labels.numpy()
    all_labels = np.asarray([source.label(i) for i in range(len(source))])
    rows, note = [], None
    for what, indices in ((BASELINES[0], heldout), (BASELINES[2], train)):
        chosen = pick_like(indices, all_labels[indices], wanted, seed)
        images, real_labels, _, _ = read_images(source, scorer.image_size, chosen)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if len(images) < 2:
            return rows, f"no baselines: fewer than 2 readable images in {record['source']!r}"
        targets = torch.from_numpy(real_labels)
        row = {"what": what, "num_images": len(images)}
        rows.append(row | scores_of(scorer, as_scored(images, channels), targets))
        if what == BASELINES[0]:
            try:
                if tokenizer is None or not Path(tokenizer).is_dir():
                    raise ValueError(f"the tokenizer {tokenizer!r} is not a checkpoint folder")
                decoded = as_scored(reconstruct(load(tokenizer, verify=False).eval(), images), channels)
            except (OSError, ValueError, RuntimeError, AttributeError) as error:  # e.g. decode-only
                note = f"no reconstruction row: {error}"
                continue
            row = {"what": BASELINES[1], "num_images": len(images)}
            rows.append(row | scores_of(scorer, decoded, targets))
    return rows, note


def scores_of(scorer: Scorer, images: Tensor, labels: Tensor) -> dict[str, float]:
    return classifier_scores(scorer.classifier, images, labels, scorer.heldout)


def evaluate_with_classifier(
    samples: str | os.PathLike, classifier: str | os.PathLike, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """``rargen evaluate --classifier``: the scores of a samples.npz beside the real-data rows (the
    tokenizer of the reconstructions: the one in the samples' meta.json), written to ``out``
    (default ``metrics.json`` beside the samples) with what was scored against what."""
    from rargen.checkpoint import checkpoint_hash
    from rargen.evaluation.classifier import read_samples

    scorer = load_scorer(classifier)
    result: dict[str, Any] = score_samples(samples, scorer)
    images, labels, meta = read_samples(samples)
    result["baselines"], result["baselines_note"] = baseline_rows(
        scorer, labels, images.shape[1], (meta or {}).get("tokenizer")
    )
    result["record"] = {
        "samples": str(samples),
        "classifier": str(classifier),
        "classifier_sha256": checkpoint_hash(classifier),
        "class_names": list(scorer.class_names),
        "reference": "the classifier's held-out split",
    }
    out = Path(out) if out is not None else Path(samples).parent / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Table lines: what, images, class accuracy, Fréchet distance."""
    lines = [f"{'':<34} {'images':>6}  {'class accuracy':>14}  {'Fréchet distance':>16}"]
    for row in rows:
        lines.append(
            f"{row['what']:<34} {row['num_images']:>6}  {row['class_accuracy']:>14.4f}  "
            f"{row['frechet_distance']:>16.4f}"
        )
    return lines


def format_scores(result: dict[str, Any]) -> str:
    """``rargen evaluate --classifier``'s table: the samples, then the real-data rows."""
    samples = {"what": "samples", "num_images": result["num_samples"]} | result
    lines = format_rows([samples, *result.get("baselines", [])])
    if result.get("baselines_note"):
        lines.append(result["baselines_note"])
    return "\n".join(lines)
