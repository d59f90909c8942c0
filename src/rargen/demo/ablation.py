"""An ablation study: a grid of ordinary training runs on one store, all else equal, scored alike.

The grid is annealing windows (fractions of each run's steps: ``0/0`` raster only, ``1/1`` random
order throughout, ``0.5/0.75`` the paper's default) x final random-order probabilities ``r_end``
(0 as the paper; > 0 keeps some any-order skill, for inpainting) x budgets (steps) x seeds. Every
run is a plain ``rargen train`` run folder under ``out/runs/`` with evenly spaced checkpoints, so a
stopped study resumes where it stopped (finished runs are kept, a partial one continues from its
newest checkpoint) and ``shard=(i, n)`` splits the runs over processes or machines.

Every kept checkpoint of every run is evaluated the same way (``evaluation.json`` in its folder):
* negative log-likelihood in raster order, bits per token, through the model's own forward, on the
  held-out store and on the training store (their gap is memorisation in likelihood);
* with a tokenizer: the fraction of generated samples that are copies, i.e. whose nearest training
  image (decoded from the training store, grey pixels) is closer than the ``copy_quantile`` quantile
  of the real held-out images' nearest-training distances (a model that generalises like the real
  data scores about ``copy_quantile``; one that replays its training set scores near 1);
* with a classifier (the demo's digit classifier or a ``train-classifier`` folder): class accuracy and
  Fréchet distance in its features to its held-out split (``rargen.evaluation.classifier``, as
  ``rargen sweep``).

Two protocols: the fixed budget (the final checkpoint, as the paper's tables) and each run at its
best checkpoint by held-out NLL (early stopping). ``write_report`` gives ``table.md``/``table.json``
(mean and standard deviation over seeds) and ``curves.png`` (metrics against the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rargen.demo.study_report import METRICS, format_table, plot_curves
from rargen.evaluation.likelihood import raster_nll_bits, store_tokens
from rargen.sampling.engine import SampleConfig
from rargen.train.recipe import TrainConfig
from rargen.train.run_state import checkpoints


@dataclass(frozen=True)
class Window:
    """A randomness-annealing window: r = 1 before ``start``, 0 after ``end`` (fractions of steps)."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"annealing window {self.start}/{self.end}: need 0 <= start <= end <= 1")

    def __str__(self) -> str:
        return f"{self.start:g}/{self.end:g}"  # as parse_windows reads it

    @property
    def name(self) -> str:
        if self.end == 0.0:
            return "raster"
        if self.start == 1.0:
            return "random"
        return f"anneal-{self.start:.2f}-{self.end:.2f}"


# The paper's Table 2 trains RAR-L 400 epochs with windows in steps of 100 epochs (quarters).
WINDOW_PRESETS: dict[str, tuple[Window, ...]] = {
    "paper-table2": tuple(
        Window(s / 4, e / 4)
        for s, e in [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 3), (2, 4), (0, 4), (4, 4)]
    ),  # fmt: skip
    "raster-vs-rar": (Window(0.0, 0.0), Window(0.5, 0.75), Window(1.0, 1.0)),
}


def parse_windows(spec: str) -> tuple[Window, ...]:
    """A preset name (``WINDOW_PRESETS``) or a comma list of ``start/end`` fractions (``0/0,0.5/0.75``)."""
    if spec in WINDOW_PRESETS:
        return WINDOW_PRESETS[spec]
    windows = []
    for item in spec.split(","):
        try:
            start, end = (float(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(
                f"annealing window {item!r}: give start/end fractions like 0.5/0.75, or a preset "
                f"({', '.join(WINDOW_PRESETS)})"
            ) from None
        windows.append(Window(start, end))
    return tuple(windows)


# The TrainConfig fields each run sets itself (``Run.train_config``), from its window, budget and seed.
PER_RUN = ("steps", "anneal_start", "anneal_end", "r_end", "seed", "checkpoint_every", "keep_checkpoints",
           "sample_every")  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    """The grid and the evaluation. ``train`` holds everything that stays equal across runs (the
    ``PER_RUN`` fields are set per run); ``sample`` is how every checkpoint is sampled."""

    train: TrainConfig = TrainConfig(preset="rar-digits", batch_size=64, lr=1e-3, warmup=0.05, log_every=50)
    windows: tuple[Window, ...] = WINDOW_PRESETS["raster-vs-rar"]  # WINDOW_PRESETS name or list: 0/0,0.5/0.75
    budgets: tuple[int, ...] = (1500,)  # optimizer steps per run, e.g. 500,1500
    seeds: tuple[int, ...] = (0, 1, 2)
    evaluations: int = 6  # evenly spaced checkpoints per run (the last is the budget)
    samples_per_class: int = 20  # samples per class and checkpoint (copies, classifier scores)
    sample: SampleConfig = SampleConfig(cfg_scale=3.0)
    copy_quantile: float = 0.05  # a sample copies when nearer a training image than this share of held-out
    r_ends: tuple[float, ...] = (0.0,)  # TrainConfig.r_end of the runs: r anneals to it, not to 0

    def __post_init__(self) -> None:
        if not self.windows or not self.budgets or not self.seeds or not self.r_ends:
            raise ValueError("a study needs at least one window, one r_end, one budget and one seed")
        if len(set(self.r_ends)) != len(self.r_ends) or not all(0.0 <= r <= 1.0 for r in self.r_ends):
            raise ValueError(f"r_ends {list(self.r_ends)} must be distinct probabilities in [0, 1]")
        if self.evaluations < 1 or self.samples_per_class < 1:
            raise ValueError(
                f"evaluations ({self.evaluations}) and samples_per_class ({self.samples_per_class}) "
                "must be >= 1"
            )
        if len({w.name for w in self.windows}) != len(self.windows):
            raise ValueError(f"repeated annealing windows: {[w.name for w in self.windows]}")
        for budget in self.budgets:
            if not isinstance(budget, int) or budget < self.evaluations:
                raise ValueError(f"budget {budget!r} must be an int >= evaluations ({self.evaluations})")
        if not 0.0 < self.copy_quantile < 1.0:
            raise ValueError(f"copy_quantile {self.copy_quantile} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)  # nested: {"train": {...}, "sample": {...}, ...}
        values["windows"] = [[w.start, w.end] for w in self.windows]
        if self.r_ends == (0.0,):  # recorded only when set: studies of the paper's schedule resume
            del values["r_ends"]
        return json.loads(json.dumps(values))  # tuples -> lists, as read back from study.json


@dataclass(frozen=True)
class Run:
    window: Window
    budget: int
    seed: int
    r_end: float = 0.0

    @property
    def setting(self) -> str:
        """The window's name, and the final random-order probability when it is not 0."""
        return self.window.name + (f"-r{self.r_end:g}" if self.r_end else "")

    @property
    def name(self) -> str:
        return f"{self.setting}-b{self.budget}-s{self.seed}"

    def train_config(self, study: StudyConfig) -> TrainConfig:
        every = max(1, self.budget // study.evaluations)
        return dataclasses.replace(
            study.train, steps=self.budget, anneal_start=float(self.window.start), seed=self.seed,
            anneal_end=float(self.window.end), r_end=float(self.r_end), checkpoint_every=every,
            keep_checkpoints=-(-self.budget // every) + 1, sample_every=self.budget,
            log_every=min(study.train.log_every, every),
        )  # fmt: skip


def study_runs(config: StudyConfig) -> list[Run]:
    # Seed by seed: a study cut short still compares every window on its first seeds.
    c = config
    return [Run(w, b, s, r) for b in c.budgets for s in c.seeds for r in c.r_ends for w in c.windows]


@dataclass(frozen=True)
class StudyData:
    """The stores a study trains and evaluates on, and the optional sample scorers."""

    store: Path  # training token store
    heldout_store: Path  # held-out token store (the same tokenizer)
    tokenizer: Path | None = None  # tokenizer folder: sample and count copies
    classifier: Path | None = None  # classifier folder (the demo's or train-classifier's) to score samples

    def digests(self) -> dict[str, str | None]:
        """What identifies each input; recorded in study.json, so that a rerun on other data is refused."""
        from rargen.checkpoint import checkpoint_hash
        from rargen.data.token_store import store_digest

        stores = {name: store_digest(getattr(self, name)) for name in ("store", "heldout_store")}
        return stores | {
            n: checkpoint_hash(p) if (p := getattr(self, n)) else None for n in ("tokenizer", "classifier")
        }


def study_scorer(data: StudyData) -> Any:
    """The study's classifier loaded to score (``load_scorer``), refused (ValueError) if it cannot
    score the study's samples: classes other than the store's, or an image size or channels other
    than the tokenizer's."""
    from rargen.data.token_store import TokenStore
    from rargen.evaluation.classifier import check_matches, load_scorer
    from rargen.evaluation.sweep import check_classifier_for_tokenizer

    if data.classifier is None:
        raise ValueError("study_scorer needs a classifier folder (StudyData.classifier, --classifier DIR)")
    scorer, store = load_scorer(data.classifier), TokenStore(data.store)
    what = f"the store {str(data.store)!r}"
    check_matches(scorer, what=what, class_names=store.class_names or None, num_classes=store.num_classes)
    if data.tokenizer is not None:
        check_classifier_for_tokenizer(scorer, data.tokenizer, store.num_tokens)
    return scorer


# -------------------------------------------------------------------------------------------------
# Measurements


def grey_pixels(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H*W) grey values: the space copies are measured in."""
    return images.float().mean(dim=1).flatten(1)


def nearest_distances(images: Tensor, reference: Tensor) -> Tensor:
    """L2 distance of each row of ``images`` to its nearest row of ``reference`` (both grey pixels)."""
    return torch.cat([torch.cdist(images[i : i + 512], reference).min(dim=1).values
                      for i in range(0, len(images), 512)])  # fmt: skip


class Evaluator:
    """Scores checkpoints of one study; holds the data it needs once (stores, decoded references)."""

    def __init__(
        self,
        data: StudyData,
        samples_per_class: int = 20,
        sample: SampleConfig = StudyConfig.sample,  # the study's default (its field's default)
        copy_quantile: float = 0.05,
    ) -> None:
        from rargen.checkpoint import load

        self.samples_per_class, self.sample = samples_per_class, sample
        self.train_tokens, self.train_labels = store_tokens(data.store)
        self.heldout_tokens, self.heldout_labels = store_tokens(data.heldout_store)
        self.tokenizer = load(data.tokenizer).eval() if data.tokenizer else None
        # The scorer of `sweep`/`evaluate --classifier`: the reference statistics are computed once.
        self.scorer = study_scorer(data) if data.classifier else None
        if self.tokenizer is not None:
            self.train_pixels = grey_pixels(self.decode(self.train_tokens))
            heldout = nearest_distances(grey_pixels(self.decode(self.heldout_tokens)), self.train_pixels)
            self.copy_threshold = float(torch.quantile(heldout, copy_quantile))

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        from rargen.tokenizers.base import codes_from_sequence

        return torch.cat([self.tokenizer.decode(codes_from_sequence(self.tokenizer, tokens[i : i + 256]))
                          for i in range(0, len(tokens), 256)]).float().clamp(0, 1)  # fmt: skip

    def likelihood(self, model: Any) -> dict[str, float]:
        """Held-out and training NLL, bits per token in raster order."""
        return {
            "heldout_nll": raster_nll_bits(model, self.heldout_tokens, self.heldout_labels),
            "train_nll": raster_nll_bits(model, self.train_tokens, self.train_labels),
        }

    def copies(self, images: Tensor) -> float:
        """Fraction of ``images`` nearer to a training image than the copy threshold (module docstring)."""
        distances = nearest_distances(grey_pixels(images), self.train_pixels)
        return float((distances < self.copy_threshold).float().mean())

    def evaluate(self, model: Any) -> dict[str, float]:
        result = self.likelihood(model)
        if self.tokenizer is None:
            return result
        from rargen.sampling.engine import generate_images

        classes = max(1, model.config.num_classes)
        labels = torch.arange(classes).repeat_interleave(self.samples_per_class)
        # No guidance for an unconditional model: there is no class to guide towards.
        sample_config = (
            self.sample if model.config.num_classes else dataclasses.replace(self.sample, cfg_scale=1.0)
        )
        # The same seeds for every checkpoint and run: differences come from the models, not the noise.
        images = torch.cat([
            generate_images(model, self.tokenizer, labels[i : i + 100], sample_config,
                            seeds=list(range(i, min(i + 100, len(labels)))))
            for i in range(0, len(labels), 100)
        ])  # fmt: skip
        result["copy_fraction"] = self.copies(images)
        if self.scorer is not None:
            from rargen.evaluation.classifier import classifier_scores

            result |= classifier_scores(self.scorer.classifier, images, labels, self.scorer.heldout)
        return result


def evaluate_run(folder: Path, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Evaluate every kept checkpoint of a run (cached in ``evaluation.json``, one step at a time)."""
    from rargen.checkpoint import load

    record = folder / "evaluation.json"
    rows = json.loads(record.read_text()) if record.exists() else []
    done = {row["step"] for row in rows}
    for checkpoint in checkpoints(folder):
        step = int(checkpoint.name[5:])
        if step in done:
            continue
        torch.manual_seed(0)
        rows.append({"step": step, **evaluator.evaluate(load(checkpoint).eval())})
        rows.sort(key=lambda row: row["step"])
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(record)
    return rows


# -------------------------------------------------------------------------------------------------
# The study


def check_study_folder(out: Path, config: StudyConfig, data: StudyData | None = None) -> None:
    """A study folder records its grid and inputs; rerunning it resumes, others there are refused."""
    from rargen.train.run_state import check_settings_record

    settings = config.to_dict() | ({"data": data.digests()} if data is not None else {})
    check_settings_record(out / "study.json", settings, "a study", "pass another --out")


def run_study(
    out: str | os.PathLike,  # study folder (study.json, runs/, table.md)
    config: StudyConfig,
    data: StudyData,
    *,
    shard: tuple[int, int] = (0, 1),  # i/n: train and score runs i, i+n, ...
    progress: bool = True,  # progress bars
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train and evaluate this shard's runs (run ``i`` belongs to shard ``i % n``), then, once every
    run of the study is evaluated, write the report; returns it (None while other shards work)."""
    from rargen.train.generator import train

    out = Path(out)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    check_study_folder(out, config, data)
    # Built before any run trains: it refuses a classifier that cannot score the samples.
    evaluator = Evaluator(data, config.samples_per_class, config.sample, config.copy_quantile)
    runs = study_runs(config)
    for i, run in enumerate(runs):
        if i % count != index:
            continue
        folder = out / "runs" / run.name
        if not (folder / "final").exists():
            log(f"== run {i + 1}/{len(runs)}: {run.name}")
            train(run.train_config(config), data.store, folder, resume=True, device="cpu", progress=progress)
        rows = evaluate_run(folder, evaluator)
        log(f"   {run.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "step"))
    missing = [r.name for r in runs if not _evaluated(out / "runs" / r.name, r.budget)]
    if missing:
        log(f"{len(missing)} runs not evaluated yet (other shards): {', '.join(missing[:4])} ...")
        return None
    return write_report(out, config)


def _evaluated(folder: Path, budget: int) -> bool:
    record = folder / "evaluation.json"
    return record.exists() and any(row["step"] == budget for row in json.loads(record.read_text()))


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def summarise(out: Path, config: StudyConfig) -> dict[str, Any]:
    """Per (window, budget): both protocols' metrics over the evaluated seeds, and the curves."""
    groups: dict[tuple[str, int], list[list[dict[str, Any]]]] = {}
    for run in study_runs(config):  # runs not evaluated yet (other shards at work) are left out
        if not _evaluated(out / "runs" / run.name, run.budget):
            continue
        rows = json.loads((out / "runs" / run.name / "evaluation.json").read_text())
        groups.setdefault((run.setting, run.budget), []).append(rows)
    rows_out = []
    for (window, budget), per_seed in groups.items():
        final = [next(r for r in rows if r["step"] == budget) for rows in per_seed]
        best = [min(rows, key=lambda r: r["heldout_nll"]) for rows in per_seed]
        metrics = [m for m in METRICS if m in final[0]]
        steps = sorted(set.intersection(*({r["step"] for r in rows} for rows in per_seed)))
        curves = {
            m: [_mean_std([next(r[m] for r in rows if r["step"] == s) for rows in per_seed]) for s in steps]
            for m in metrics
        }
        rows_out.append({
            "window": window, "budget": budget, "seeds": len(per_seed),
            "fixed_budget": {m: _mean_std([r[m] for r in final]) for m in metrics},
            "best_checkpoint": {m: _mean_std([r[m] for r in best]) for m in metrics}
            | {"step": _mean_std([r["step"] for r in best])},
            "curve_steps": steps, "curves": curves,
        })  # fmt: skip
    for row in rows_out:  # separation from raster-only at the same budget, in standard deviations
        raster = next((r for r in rows_out if r["window"] == "raster" and r["budget"] == row["budget"]), None)
        for protocol in ("fixed_budget", "best_checkpoint"):
            if raster is None or row["window"] == "raster":
                continue
            ours, theirs = row[protocol]["heldout_nll"], raster[protocol]["heldout_nll"]
            spread = math.hypot(ours["std"], theirs["std"])
            gain = theirs["mean"] - ours["mean"]
            row[protocol]["nll_gain_over_raster_in_std"] = gain / spread if spread > 0 else math.inf
    return {"config": config.to_dict(), "rows": rows_out}


def write_report(out: str | os.PathLike, config: StudyConfig) -> dict[str, Any]:
    """``table.md``, ``table.json`` and ``curves.png`` of a study (of its evaluated runs: a partial
    table while shards work); returns the summary."""
    out = Path(out)
    summary = summarise(out, config)
    (out / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(format_table(summary))
    plot_curves(summary, out / "curves.png")
    return summary


__all__ = [
    "PER_RUN", "WINDOW_PRESETS", "Evaluator", "Run", "StudyConfig", "StudyData", "Window", "parse_windows",
    "run_study", "study_runs", "write_report",
]  # fmt: skip
