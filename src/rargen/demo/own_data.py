"""``rargen demo --data SOURCE``: the demo's whole pipeline on your own labelled images.

Any ``open_source`` spec (a folder of class folders, an ``.npz`` with labels, ``digits``) goes
through the digits demo's stages (``rargen.demo.stages``): a VQ tokenizer, a classifier (the
scorer), training and held-out token stores, a RAR generator, class-balanced samples, scores
beside real-data baselines, and ``report.md`` with pictures. One seeded split (``split_source``)
serves every stage: no stage trains on a held-out image.

Budgets come from the data (``choose_budgets``): a DemoConfig field left at the digits demo's
default is chosen from the image count, size, colour and classes; a field given another value is
kept. They are a pure function of the data and the settings, never of the machine's speed, so a
run is reproducible and a resumed run continues the same trajectory; the machine (its threads)
only sets the expected time printed at the start (``expected_seconds``). Every stage is skipped
when its output exists and resumed exactly from its last checkpoint when it was cut short, so a
killed run rerun with the same command gives the uninterrupted result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rargen.data.split import HELDOUT_FRACTION, SplitImages
from rargen.train.recipe import TrainConfig

if TYPE_CHECKING:  # run_demo calls run_own_demo: a run-time import would be a circle
    from rargen.demo.pipeline import DemoConfig

MAX_IMAGE_SIZE = 32  # larger images are downscaled: 8x8 codes keep the generator CPU-sized
# Budget rules, from issue 27's colour folder (8 classes x 100 crops of 32x32): the tokenizer
# reached 16.8 dB held-out PSNR at 300 steps and 24.6 dB at 1200; grey digits reach 34 dB at 300.
TOKENIZER_STEPS = {1: 400, 3: 1200}  # by image channels
CLASSIFIER_STEPS = 1000  # the cap, in optimizer steps (it stops when it levels off) ...
CLASSIFIER_BATCH = 64  # ... of ClassifierTrainConfig's batch ...
CLASSIFIER_EPOCHS = (30, 100)  # ... in the epochs those steps make, clamped
GENERATOR_EPOCHS = 120  # passes over the training store ...
GENERATOR_STEPS = (300, 1500)  # ... clamped to these optimizer steps (1200 for 640 images)
EVAL_SAMPLES = 1000  # at most this many generated images are scored ...
EVAL_PER_CLASS = (2, 50)  # ... per class, clamped

# Seconds per unit on the 2-core host of BENCHMARKS.md ("The demo"), at 2 threads, for 32x32
# images, 64 tokens, batch 64: the expected time is these scaled by size and threads.
SECONDS_PER = {
    "tokenizer_step": 0.20,
    "generator_step": 0.89,
    "classifier_image_epoch": 2.3e-4,
    "sample": 0.02,
}


def data_budget_help(digits: DemoConfig) -> dict[str, dict[str, str]]:
    """``rargen demo --help`` for the budgets ``--data`` chooses (``choose_budgets``): the digits
    default (``digits``, the demo's config) and the rule, where the help showed only the digits
    value (300 tokenizer steps beside a colour folder's 1,200)."""
    grey, colour = TOKENIZER_STEPS[1], TOKENIZER_STEPS[3]
    rules = {
        "tokenizer_steps": (
            "tokenizer steps",
            digits.tokenizer_steps,
            f"{grey} for grey images, {colour} for colour, a cap (it stops when held-out PSNR levels off)",
        ),
        "classifier_epochs": (
            "classifier epochs",
            digits.classifier_epochs,
            f"the epochs of {CLASSIFIER_STEPS} steps of {CLASSIFIER_BATCH} images, within "
            f"{CLASSIFIER_EPOCHS}, a cap (it stops on validation loss)",
        ),
        "steps": (
            "optimizer steps",
            digits.train.steps,
            f"{GENERATOR_EPOCHS} epochs of the folder's training images, within {GENERATOR_STEPS}, "
            "with the small-data recipe's batch and learning rate",
        ),
        "eval_per_class": (
            "generated images per class for the scores",
            digits.eval_per_class,
            f"{EVAL_SAMPLES} over the classes, {EVAL_PER_CLASS[0]} to {EVAL_PER_CLASS[1]} each",
        ),
    }
    return {
        name: {
            "help": f"{what}; default {value} on the digits; with --data, chosen from the folder: "
            f"{rule} (a value other than {value} is kept)"
        }
        for name, (what, value, rule) in rules.items()
    }


@dataclass(frozen=True)
class Budgets:
    """What the run will do, chosen from the data (``choose_budgets``) and recorded in budgets.json."""

    image_size: int
    image_channels: int
    num_classes: int
    num_train: int
    num_heldout: int
    tokenizer_steps: int
    classifier_epochs: int
    train: TrainConfig
    eval_per_class: int
    grid_per_class: int
    chosen: tuple[str, ...]  # the settings chosen from the data (the others were given)


def split_source(data: str, image_size: int, seed: int, log: Callable[[str], None] | None) -> SplitImages:
    """The one held-out split of the run: every stage trains on ``train`` and scores on ``heldout``.

    The digits keep their own fixed split (as the digits demo); anything else is read once and split
    by ``rargen.data.split`` (seeded, ``HELDOUT_FRACTION`` of each class), as every command splits."""
    from rargen.data.split import split_images

    return split_images(
        data, image_size, heldout_fraction=HELDOUT_FRACTION, seed=seed, purpose="demo", log=log
    )


def choose_image_size(data: str) -> int:
    """The source's shorter side (its first readable image) down to a multiple of 4 (the
    tokenizer's downsampling), at most ``MAX_IMAGE_SIZE``."""
    from rargen.data.sources import open_source, source_image_size

    if data == "digits" or data.startswith("digits:"):
        return MAX_IMAGE_SIZE
    side = min(MAX_IMAGE_SIZE, source_image_size(open_source(data)))
    if side < 8:
        raise ValueError(f"{data!r}: images of {side} px are too small for the demo's tokenizer; use >= 8 px")
    return side // 4 * 4


def choose_budgets(config: DemoConfig, split: SplitImages, image_size: int) -> Budgets:
    """Budgets from the data for each DemoConfig field left at the digits demo's default."""
    from rargen.tokenizers.base import channels_of_images
    from rargen.train.recipe import small_data_recipe

    default, chosen = type(config)(), []  # the digits demo's defaults
    num_train, classes = len(split.train_images), len(split.class_names)
    if classes < 2:
        raise ValueError(
            f"demo --data {config.data}: {classes} class(es); the demo needs labelled images of at least 2 "
            "classes (a folder of class folders root/<class>/<image>, or an .npz with labels)"
        )
    channels = channels_of_images(split.train_images)

    def pick(name: str, value: Any, given: Any, default_value: Any) -> Any:
        if given != default_value:
            return given
        chosen.append(name)
        return value

    epochs = round(CLASSIFIER_STEPS * CLASSIFIER_BATCH / num_train)
    epochs = min(max(epochs, CLASSIFIER_EPOCHS[0]), CLASSIFIER_EPOCHS[1])
    recipe = small_data_recipe(num_train)
    steps = round(GENERATOR_EPOCHS * num_train / recipe["batch_size"])
    recipe |= {
        "steps": min(max(steps, GENERATOR_STEPS[0]), GENERATOR_STEPS[1]),
        "log_every": 25,
        "keep_checkpoints": 1,
    }
    # A checkpoint every quarter (a killed run loses at most that), unless the steps were given.
    train_values = {
        name: pick(f"train.{name}", value, getattr(config.train, name), getattr(default.train, name))
        for name, value in recipe.items()
        if name != "checkpoint_every"
    }
    checkpoint_every = max(1, train_values["steps"] // 4)
    train_values["checkpoint_every"] = pick(
        "train.checkpoint_every",
        checkpoint_every,
        config.train.checkpoint_every,
        default.train.checkpoint_every,
    )
    per_class = max(EVAL_PER_CLASS[0], min(EVAL_PER_CLASS[1], EVAL_SAMPLES // max(1, classes)))
    return Budgets(
        image_size=image_size,
        image_channels=channels,
        num_classes=classes,
        num_train=num_train,
        num_heldout=len(split.heldout_images),
        tokenizer_steps=pick(
            "tokenizer_steps", TOKENIZER_STEPS[channels], config.tokenizer_steps, default.tokenizer_steps
        ),
        classifier_epochs=pick(
            "classifier_epochs", epochs, config.classifier_epochs, default.classifier_epochs
        ),
        train=dataclasses.replace(config.train, **train_values),
        eval_per_class=pick("eval_per_class", per_class, config.eval_per_class, default.eval_per_class),
        grid_per_class=config.grid_per_class,
        chosen=tuple(chosen),
    )


def expected_seconds(budgets: Budgets, threads: int) -> dict[str, float]:
    """Rough seconds per stage on this machine: the 2-thread costs of ``SECONDS_PER`` scaled by the
    pixels, tokens, batch and the thread count (linear below 2 threads, sub-linear above)."""
    from rargen.model import ModelConfig

    speed = 2.0 / threads if threads < 2 else (2.0 / threads) ** 0.7
    pixels = (budgets.image_size / 32) ** 2
    train = budgets.train
    model = ModelConfig.from_name(train.preset, **dict(train.model_overrides))
    width = (
        (model.dim / ModelConfig.from_name("rar-digits").dim) ** 2
        * model.depth
        / ModelConfig.from_name("rar-digits").depth
    )
    tokens = pixels  # 8x8 codes at 32 px: tokens scale as pixels
    samples = budgets.num_classes * (budgets.eval_per_class + budgets.grid_per_class)
    return {
        "tokenizer": budgets.tokenizer_steps * SECONDS_PER["tokenizer_step"] * pixels * speed,
        "classifier": budgets.classifier_epochs
        * budgets.num_train
        * SECONDS_PER["classifier_image_epoch"]
        * pixels
        * speed,
        "generator": train.steps
        * SECONDS_PER["generator_step"]
        * tokens
        * width
        * train.batch_size
        / 64
        * speed,
        "samples and scores": samples * SECONDS_PER["sample"] * tokens * width * speed,
    }


def describe_budgets(data: str, budgets: Budgets, seconds: dict[str, float], threads: int) -> str:
    from rargen.train.recipe import format_duration

    train = budgets.train
    kind = "colour" if budgets.image_channels == 3 else "grey"
    epochs = train.steps * train.batch_size / budgets.num_train
    marks = {
        name: " (chosen)" if name in budgets.chosen else " (given)"
        for name in ("tokenizer_steps", "classifier_epochs", "train.steps", "eval_per_class")
    }
    return "\n".join(
        [
            f"demo on {data}: {budgets.num_train} training and {budgets.num_heldout} held-out images (one "
            f"seeded split for every stage), {budgets.num_classes} classes, {kind}, at {budgets.image_size}x"
            f"{budgets.image_size}",
            f"  tokenizer {budgets.tokenizer_steps} steps{marks['tokenizer_steps']}; classifier "
            f"{budgets.classifier_epochs} epochs{marks['classifier_epochs']}; generator {train.preset}, "
            f"{train.steps} steps of batch {train.batch_size} ({epochs:.0f} epochs){marks['train.steps']}; "
            f"{budgets.eval_per_class} samples per class scored{marks['eval_per_class']}",
            f"  expected time on {threads} threads: about {format_duration(sum(seconds.values()))} ("
            + ", ".join(f"{name} {format_duration(s)}" for name, s in seconds.items())
            + f"; scaled from this project's 2-core host when idle){busy_note(threads)}",
        ]
    )


def busy_note(threads: int) -> str:
    """What the machine's load average says about the estimate (others' jobs share the cores)."""
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    slower = (load + threads) / max(cores, threads)
    if slower < 1.5:
        return ""
    return f"\n  the machine is busy (load {load:.1f} on {cores} cores): expect about {slower:.0f}x longer"


# -------------------------------------------------------------------------------------------------
# Stages: each skipped when its output exists, resumed exactly when it was cut short


def train_tokenizer_stage(out: Path, split: SplitImages, budgets: Budgets, seed: int, progress: bool) -> Any:
    from rargen.checkpoint import load, save
    from rargen.tokenizers.vq import VQTokenizerConfig
    from rargen.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    if (out / "tokenizer").exists():
        return load(out / "tokenizer").eval()
    run = out / "tokenizer_training"
    if (run / "report.json").exists():
        report = json.loads((run / "report.json").read_text())["heldout"]
    else:
        resume = (run / "tokenizer" / "train_state.pt").exists()
        model = VQTokenizerConfig.from_name("vq-digits", image_size=budgets.image_size)
        steps = budgets.tokenizer_steps
        report = train_tokenizer(
            run,
            (split.train_images.contiguous(), split.heldout_images.contiguous()),
            model_config=None if resume else model,
            train_config=TokenizerTrainConfig(steps=steps, seed=seed, checkpoint_every=max(1, steps // 4)),
            resume=resume,
            progress=progress,
        )["heldout"]
    extra = {"image_size": budgets.image_size, "image_channels": budgets.image_channels, "report": report}
    save(load(run / "tokenizer"), out / "tokenizer", extra=extra)
    return load(out / "tokenizer").eval()


def train_classifier_stage(out: Path, split: SplitImages, budgets: Budgets, seed: int, progress: bool) -> Any:
    """The scorer, trained on the training split only; saved as ``train-classifier`` saves one (with
    the held-out features' statistics), so ``rargen evaluate --classifier`` and ``sweep`` take it."""
    from rargen.checkpoint import load
    from rargen.evaluation.classifier import ClassifierTrainConfig, fit_scorer

    if not (out / "classifier").exists():
        config = ClassifierTrainConfig(epochs=budgets.classifier_epochs, seed=seed, split_seed=seed)
        data = split.split["source"]
        fit_scorer(split, budgets.image_size, out / "classifier", config, progress=progress, data=data)
    return load(out / "classifier").eval().requires_grad_(False)


def write_stores(
    out: Path, split: SplitImages, tokenizer: Any, size: int, progress: bool
) -> tuple[Path, Path]:
    """Token stores of the training and the held-out split (the held-out one only for the NLL)."""
    from rargen.data.sources import ArraySource
    from rargen.data.store import pretokenize

    stores = []
    for name, images, labels in (
        ("store", split.train_images, split.train_labels),
        ("store-heldout", split.heldout_images, split.heldout_labels),
    ):
        array = images.permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).numpy()
        source = ArraySource(array, labels.numpy(), split.class_names, {"type": "demo split", "split": name})
        stores.append(
            pretokenize(source, tokenizer, out / name, image_size=size, num_workers=1, progress=progress)
        )
    return stores[0], stores[1]


@torch.no_grad()
def real_baselines(classifier: Any, tokenizer: Any, split: SplitImages) -> dict[str, Any]:
    """The rows generated images are read against: real held-out images, the tokenizer's
    reconstructions of them (the ceiling for any generator on these codes), and as many real
    training images, scored the same way."""
    from rargen.evaluation.classifier import classifier_accuracy, feature_stats
    from rargen.evaluation.metrics import frechet_distance

    held, labels = split.heldout_images, split.heldout_labels
    reconstructions = torch.cat(
        [
            tokenizer.decode(tokenizer.encode(held[i : i + 256])).float().clamp(0, 1)
            for i in range(0, len(held), 256)
        ]
    )
    count = min(len(held), len(split.train_images))
    train = split.train_images[
        torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(0))[:count]
    ]
    reference = feature_stats(classifier, held).gaussian()
    return {
        "num_heldout": len(held),
        "heldout_accuracy": classifier_accuracy(classifier, held, labels),
        "reconstruction_accuracy": classifier_accuracy(classifier, reconstructions, labels),
        "reconstruction_frechet": frechet_distance(
            feature_stats(classifier, reconstructions).gaussian(), reference
        ),
        "train_frechet": frechet_distance(feature_stats(classifier, train).gaussian(), reference),
        "num_train_compared": count,
    }


def save_reconstructions(tokenizer: Any, split: SplitImages, path: Path, per_class: int = 4) -> None:
    """Held-out originals (top of each pair of rows) over their reconstructions, every class shown."""
    from PIL import Image

    picks = [
        i
        for c in range(len(split.class_names))
        for i in torch.nonzero(split.heldout_labels == c).flatten()[:per_class].tolist()
    ]
    images = split.heldout_images[picks]
    with torch.no_grad():
        recon = tokenizer.decode(tokenizer.encode(images)).float().clamp(0, 1)
    rows = []
    for start in range(0, len(picks), 16):
        rows += [torch.cat(list(batch[start : start + 16]), dim=2) for batch in (images, recon)]
    width = max(row.shape[2] for row in rows)
    rows = [torch.nn.functional.pad(row, (0, width - row.shape[2]), value=1.0) for row in rows]
    grid = torch.cat(rows, dim=1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def run_own_demo(
    out: Path, config: DemoConfig, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """``run_demo`` for ``config.data``: every stage on one split, with budgets from the data."""
    from rargen.checkpoint import atomic_write_dir, load
    from rargen.demo.ablation import Evaluator, StudyData
    from rargen.demo.own_report import render_own_report
    from rargen.demo.stages import Timer, copy_files, plot_training, sample_digits, train_demo_generator
    from rargen.evaluation.classifier import classifier_scores
    from rargen.evaluation.metrics import GaussianStats
    from rargen.sampling.images import save_grid, to_uint8
    from rargen.train.gates import classifier_verdict
    from rargen.train.run_state import check_settings_record
    from rargen.weight_files import read_weights_file

    data, seed = str(config.data), config.train.seed
    size = choose_image_size(data)
    split = split_source(data, size, seed, log)
    budgets = choose_budgets(config, split, size)
    check_settings_record(
        out / "budgets.json",
        json.loads(json.dumps(dataclasses.asdict(budgets), default=str)),
        "a demo run whose data gave other budgets (the data, or the rules that choose budgets, changed)",
        "delete it or pass another --out",
    )
    threads = torch.get_num_threads()
    expected = expected_seconds(budgets, threads)
    log(describe_budgets(data, budgets, expected, threads))
    run_config = dataclasses.replace(config, train=budgets.train)  # the seeds and sampling of the samples
    timer, started = Timer(log), time.perf_counter()

    with timer.section(f"1/6 VQ tokenizer ({size}x{size} -> {size // 4}x{size // 4} codes)"):
        tokenizer = train_tokenizer_stage(out, split, budgets, seed, progress)
    with timer.section("2/6 classifier (the scorer, trained on the training split)"):
        classifier = train_classifier_stage(out, split, budgets, seed, progress)
        real = real_baselines(classifier, tokenizer, split)
    tokenizer_report = tokenizer.checkpoint_extra["report"]
    log(
        f"   tokenizer held-out PSNR {tokenizer_report['psnr']:.2f} dB; classifier accuracy on held-out "
        "images "
        f"{real['heldout_accuracy']:.1%}, on their reconstructions {real['reconstruction_accuracy']:.1%}"
    )
    log("   classifier " + classifier_verdict(classifier.checkpoint_extra))
    with timer.section("3/6 pretokenize the training and held-out splits"):
        store, heldout_store = write_stores(out, split, tokenizer, size, progress)
        evaluator = Evaluator(StudyData(store, heldout_store, out / "tokenizer"))
    with timer.section(f"4/6 train RAR ({budgets.train.steps} steps)"):
        final = train_demo_generator(out / "runs" / "rar", store, budgets.train, progress)
    generator = load(final).eval()
    with timer.section(f"5/6 sample {budgets.eval_per_class} images per class"):
        images, labels = sample_digits(generator, tokenizer, budgets.eval_per_class, run_config)
    with timer.section("6/6 score"):
        stats = read_weights_file(out / "classifier" / "heldout_features.safetensors")
        heldout = GaussianStats(stats["mu"].double().numpy(), stats["sigma"].double().numpy())
        generated = classifier_scores(classifier, images, labels, heldout) | evaluator.likelihood(generator)
        generated["copy_fraction"] = evaluator.copies(images)
        generated["num_samples"] = len(images)
        generated["relative_accuracy"] = generated["class_accuracy"] / max(real["heldout_accuracy"], 1e-9)
    atomic_write_dir(out / "generator", functools.partial(copy_files, final))
    grid, grid_labels = sample_digits(
        generator, tokenizer, budgets.grid_per_class, run_config, seed_offset=10_000_000
    )
    large = grid.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    save_grid(
        to_uint8(large),
        grid_labels.tolist(),
        split.class_names,
        out / "samples.png",
        max_per_class=budgets.grid_per_class,
        label_width=64,
    )
    save_reconstructions(tokenizer, split, out / "reconstructions.png")
    plot_training({"RAR": out / "runs" / "rar"}, out / "training.png")
    total = time.perf_counter() - started
    summary = {
        "data": data,
        "budgets": dataclasses.asdict(budgets),
        "config": dataclasses.asdict(run_config),
        "tokenizer": tokenizer_report,
        "real": real,
        "generated": generated,
        "seconds": timer.seconds,
        "expected_seconds": expected,
        "total_seconds": total,
        "threads": threads,
        "class_names": list(split.class_names),
        "skipped": split.skipped,
        "excluded": list(split.excluded),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_own_report(summary))
    log(
        f"   samples: class accuracy {generated['class_accuracy']:.1%} "
        f"({generated['relative_accuracy']:.0%} of real held-out images' {real['heldout_accuracy']:.1%}), "
        f"Fréchet distance {generated['frechet_distance']:.2f} "
        f"(real training images {real['train_frechet']:.2f}), held-out NLL {generated['heldout_nll']:.3f} "
        f"bits/token, copies {generated['copy_fraction']:.1%}"
    )
    log(
        f"\nDone in {total / 60:.1f} min (expected about {sum(expected.values()) / 60:.0f}). "
        f"Everything is in {out}/: report.md, samples.png, reconstructions.png, training.png, generator/, "
        "tokenizer/, classifier/, store/"
    )
    return summary


__all__ = ["Budgets", "choose_budgets", "data_budget_help", "run_own_demo", "split_source"]
