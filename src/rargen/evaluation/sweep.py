"""Tuning the sampler: sample a grid of guidance scales and temperatures, score each setting.

Papers pick the guidance scale on a smaller sample count (e.g. 10k images) before the 50k
evaluation. ``sweep`` does that: every (scale, temperature) pair of a ``SweepConfig`` (on the
other settings of its ``SampleConfig``) is sampled class-balanced with
``rargen.sampling.images.sample_to_folder`` and scored either with the ADM metrics
(``rargen.evaluation.evaluate``: a reference batch and Inception weights) or with a classifier of the data
(``rargen.evaluation.classifier``, ``rargen train-classifier``): class accuracy and Fréchet distance in its
features to its held-out split. A classifier that does not fit the generator is refused first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rargen.sampling.engine import SampleConfig

# The SampleConfig fields a sweep varies (``SweepConfig.cfg_scales``, ``temperatures``).
SWEPT = ("cfg_scale", "temperature")


@dataclass(frozen=True)
class SweepConfig:
    """The grid: every guidance scale with every temperature, on ``sample``'s other settings."""

    cfg_scales: tuple[float, ...]  # comma-separated guidance scales, e.g. 1,2,4
    temperatures: tuple[float, ...] = (1.0,)  # comma-separated temperatures
    sample: SampleConfig = SampleConfig()  # shared by every setting; its cfg_scale and temperature are swept
    per_class: int = 10  # samples per class and setting
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        unset = SampleConfig()
        if any(getattr(self.sample, name) != getattr(unset, name) for name in SWEPT):
            raise ValueError(
                f"SweepConfig.sample sets {' or '.join(SWEPT)}, which the sweep varies: give them as "
                "cfg_scales and temperatures"
            )
        if not self.cfg_scales or not self.temperatures or self.per_class < 1 or self.batch_size < 1:
            raise ValueError(
                "a sweep needs a guidance scale, a temperature, per_class >= 1 and batch_size >= 1"
            )
        self.settings()  # SampleConfig's checks of every setting before any sampling

    def settings(self) -> list[SampleConfig]:
        return [
            dataclasses.replace(self.sample, cfg_scale=scale, temperature=temperature)
            for scale, temperature in itertools.product(self.cfg_scales, self.temperatures)
        ]


def setting_name(config: SampleConfig) -> str:
    """The folder of one setting: ``cfg3-pow0-t1``, with ``-k`` / ``-p`` when top-k / top-p is on."""
    name = f"cfg{config.cfg_scale:g}-pow{config.cfg_power:g}-t{config.temperature:g}"
    name += f"-k{config.top_k}" if config.top_k else ""
    return name + (f"-p{config.top_p:g}" if config.top_p < 1 else "")


def check_classifier_for(scorer: Any, checkpoint: str | os.PathLike, tokenizer: str | os.PathLike) -> None:
    """Refuse, before any sampling, a classifier whose classes, image size or channels are not those
    of the generator (class names, or count) and tokenizer (its training size and channels)."""
    from rargen.checkpoint import read_record
    from rargen.evaluation.classifier import check_matches

    record = read_record(checkpoint)
    names = record.get("extra", {}).get("class_names")
    what = f"the generator {str(checkpoint)!r}"
    check_matches(scorer, what=what, class_names=names, num_classes=record["config"]["num_classes"])
    check_classifier_for_tokenizer(scorer, tokenizer, record["config"]["num_image_tokens"])


def check_classifier_for_tokenizer(scorer: Any, tokenizer: str | os.PathLike, num_image_tokens: int) -> None:
    """Refuse a classifier whose image size or channels are not those of the images ``tokenizer``
    decodes from ``num_image_tokens`` tokens (its training size and channels)."""
    from rargen.evaluation.classifier import check_matches

    if Path(tokenizer).is_dir():  # official files and released names are checked on the samples
        from rargen.checkpoint import load

        model = load(tokenizer, verify=False)
        size = getattr(getattr(model, "config", None), "image_size", None)
        shape = model.token_shape(size, size) if size and hasattr(model, "token_shape") else ()
        if int(np.prod(shape)) != num_image_tokens:
            size = None  # tokenized at another size: the samples' own size is checked after sampling
        channels = getattr(model, "checkpoint_extra", {}).get("image_channels")
        what = f"the tokenizer {str(tokenizer)!r}"
        check_matches(scorer, what=what, image_size=size, image_channels=channels)
        from rargen.data.split import check_same_split
        from rargen.evaluation.baselines import classifier_split

        tokenizer_split = getattr(model, "checkpoint_extra", {}).get("split")
        check_same_split(classifier_split(scorer), f"--classifier {scorer.path!r}", tokenizer_split, what)


def sweep(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,  # output folder (one sample folder per setting, sweep.json)
    config: SweepConfig,
    *,
    reference: str | os.PathLike | None = None,  # ADM reference batch .npz (with the Inception weights)
    inception: str | os.PathLike | None = None,  # Inception weights file (with the reference batch)
    classifier: str | os.PathLike | None = None,  # classifier folder (rargen train-classifier), not Inception
    progress: bool = True,  # progress bars
) -> dict[str, Any]:
    """Sample and score every setting of ``config``; returns ``{"rows": one per setting (also
    ``out/sweep.json``), "baselines": real-data rows scored alike (with a classifier; also
    ``out/baselines.json``, see ``rargen.evaluation.baselines``), "note": what was not scored}``."""
    import torch

    from rargen.checkpoint import load, read_record
    from rargen.sampling.images import class_balanced_labels, sample_to_folder

    if classifier is None and (reference is None or inception is None):
        raise ValueError(
            "score with --reference and --inception (ADM metrics) or with --classifier DIR "
            "(rargen train-classifier)"
        )
    out = Path(out)
    labels = class_balanced_labels(read_record(checkpoint)["config"]["num_classes"], config.per_class)
    scorer, baselines, note = None, [], None
    if classifier is not None:
        from rargen.evaluation.baselines import baseline_rows
        from rargen.evaluation.classifier import load_scorer, score_samples
        from rargen.tokenizers.base import image_channels

        scorer = load_scorer(classifier)
        check_classifier_for(scorer, checkpoint, tokenizer)
        channels = image_channels(load(tokenizer, verify=False)) if Path(tokenizer).is_dir() else 3
        baselines, note = baseline_rows(scorer, torch.as_tensor(labels), channels, tokenizer, config.seed)
    rows = []
    unset = SampleConfig()
    for setting in config.settings():
        npz = sample_to_folder(
            checkpoint, tokenizer, labels, setting, out / setting_name(setting), seed=config.seed,
            batch_size=config.batch_size, progress=progress,
        )  # fmt: skip
        if scorer is not None:
            scores = score_samples(npz, scorer)
        else:
            from rargen.evaluation.evaluate import evaluate

            result = evaluate(npz, reference, inception, progress=progress)
            scores = {k: result[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")}
            scores["num_samples"] = result["record"]["num_samples"]
        # A row names its setting: scale, power and temperature, and top-k / top-p where they are on.
        named = dataclasses.asdict(setting)
        named = {k: v for k, v in named.items() if k in (*SWEPT, "cfg_power") or v != getattr(unset, k)}
        rows.append({**named, **scores})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    if scorer is not None:
        (out / "baselines.json").write_text(json.dumps({"rows": baselines, "note": note}, indent=2) + "\n")
    return {"rows": rows, "baselines": baselines, "note": note}


def format_sweep(result: dict[str, Any]) -> str:
    """A markdown table of the sweep's rows, then the real-data rows scored alike."""
    rows = result["rows"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    if result["baselines"]:
        from rargen.evaluation.baselines import format_rows

        lines += [
            "",
            "scored alike (the same classifier, classes and counts):",
            *format_rows(result["baselines"]),
        ]
    return "\n".join(lines + ([result["note"]] if result["note"] else []))
