"""The one-command demo: train, sample and score RAR on the embedded digits, on a laptop CPU.

``rargen demo --out runs/demo`` runs the whole pipeline of the library on scikit-learn's digits
(no download): a small VQ tokenizer, a token store, a small RAR trained with the full recipe
(randomness annealing, label dropout, warm-up + cosine), a labelled sample grid, and scores from
a digit classifier trained on the real training split (class accuracy of the generated digits and
a Fréchet distance in the classifier's feature space), beside the generator's held-out NLL and
the fraction of its samples that copy a training image (``rargen.demo.ablation``). ``--ablation`` adds
the study of BENCHMARKS.md's "Annealing ablation": raster only against RAR annealing on a
360-image subset, 3 seeds each, with error bars (``ablation_study``), as the paper's Table 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rargen.demo.stages import (
    Timer,
    copy_files,
    plot_training,
    sample_digits,
    train_demo_generator,
    training_precision,
)
from rargen.sampling.engine import SampleConfig
from rargen.train.recipe import TrainConfig

IMAGE_SIZE = 32  # 8x8 digits upscaled; the f4 tokenizer gives an 8x8 grid = 64 tokens


@dataclass(frozen=True)
class DemoConfig:
    """Budgets and settings of the demo (the defaults fit in about 10 minutes on 2 CPU cores).

    ``train`` is the generator's recipe: the paper's (randomness annealing over the middle quarter,
    label dropout, warm-up + cosine) at CPU scale, checkpointed at the end only (every 5000 steps
    is beyond the demo's budgets). Its ``seed`` seeds the whole demo (tokenizer, classifier,
    generator, samples), and its ``precision`` "auto" means bf16 autocast where the CPU has native
    bf16 matmuls (1.5x here), else fp32: the demo trains on the CPU (``training_precision``).
    """

    tokenizer_steps: int = 300
    classifier_epochs: int = 12
    train: TrainConfig = TrainConfig(
        preset="rar-digits", steps=500, batch_size=64, lr=1e-3, warmup=0.1, log_every=10, keep_checkpoints=1
    )
    sample: SampleConfig = SampleConfig(cfg_scale=3.0)
    grid_per_class: int = 8  # columns of samples.png
    eval_per_class: int = 50  # generated digits per class for the scores
    data: str | None = None  # your labelled images (class folders, .npz, digits); budgets from the data

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced budget for smoke tests (about a minute)."""
        train = dataclasses.replace(cls().train, steps=150)
        return cls(tokenizer_steps=150, classifier_epochs=4, train=train, grid_per_class=4, eval_per_class=10)


# -------------------------------------------------------------------------------------------------
# Pipeline steps


def train_demo_tokenizer(out: Path, config: DemoConfig, progress: bool) -> tuple[Any, dict[str, Any]]:
    from rargen.checkpoint import load, save
    from rargen.data.digits import load_digit_images
    from rargen.tokenizers.vq import VQTokenizerConfig
    from rargen.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    run = out / "tokenizer_training"
    if (run / "report.json").exists():  # finished by an earlier (interrupted) demo run
        report = json.loads((run / "report.json").read_text())["heldout"]
    else:
        data = (load_digit_images("train", IMAGE_SIZE)[0], load_digit_images("heldout", IMAGE_SIZE)[0])
        resume = (run / "tokenizer" / "train_state.pt").exists()
        report = train_tokenizer(
            run,
            data,
            model_config=None if resume else VQTokenizerConfig.from_name("vq-digits", image_size=IMAGE_SIZE),
            # A fixed budget (patience 0): the demo's numbers are measured at its steps.
            train_config=TokenizerTrainConfig(
                steps=config.tokenizer_steps, seed=config.train.seed, patience=0
            ),
            resume=resume,
            progress=progress,
        )["heldout"]
    tokenizer = load(run / "tokenizer")
    save(tokenizer, out / "tokenizer", extra={"image_size": IMAGE_SIZE, "report": report})
    return load(out / "tokenizer"), report


def train_demo_classifier(out: Path, config: DemoConfig, progress: bool) -> Any:
    from rargen.checkpoint import load, save
    from rargen.demo.digit_classifier import DigitClassifierConfig, train_digit_classifier

    if (out / "classifier").exists():
        return load(out / "classifier")
    classifier = train_digit_classifier(
        DigitClassifierConfig(image_size=IMAGE_SIZE), epochs=config.classifier_epochs, seed=config.train.seed,
        progress=progress,
    )  # fmt: skip
    save(classifier, out / "classifier")
    return classifier


def score(classifier: Any, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Class accuracy and Fréchet distance of generated digits against the held-out digits (the
    scores ``rargen sweep``/``evaluate --classifier`` give with the demo's ``classifier/``)."""
    from rargen.evaluation.classifier import classifier_scores, digit_heldout_stats

    return classifier_scores(classifier, images, labels, digit_heldout_stats(classifier))


def save_sample_grid(images: Tensor, labels: Tensor, per_class: int, path: Path, scale: int = 3) -> None:
    """Rows = classes, columns = seeds, each digit upscaled ``scale`` times, label on the left
    (``rargen sample``'s grid, with a narrower label column)."""
    from rargen.sampling.images import save_grid, to_uint8

    large = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest upscaling
    save_grid(to_uint8(large), labels.tolist(), None, path, max_per_class=per_class, label_width=24)


# -------------------------------------------------------------------------------------------------


def prepare_digits(
    out: str | Path,
    train_images: int | None = None,  # train on a subset of this many images (a tenth from each class)
    progress: bool = True,
) -> Any:
    """The embedded digits as ``rargen ablate`` study data (an ``ablation.StudyData``): the demo's
    VQ tokenizer and classifier, and token stores of the fixed held-out split and of the training
    split (its first ``train_images // 10`` images of each class when given: less data, earlier
    memorisation), made once under ``out`` and reused."""
    import numpy as np

    from rargen.data.sources import ArraySource, digit_source
    from rargen.data.store import pretokenize
    from rargen.demo.ablation import StudyData

    out = Path(out)
    tokenizer, _ = train_demo_tokenizer(out, DemoConfig(), progress)
    train_demo_classifier(out, DemoConfig(), progress)
    sources = {"heldout": digit_source("heldout", IMAGE_SIZE), "train": digit_source("train", IMAGE_SIZE)}
    if train_images is not None:
        full = sources.pop("train")
        labels = np.asarray(full.labels)
        keep = np.sort(np.concatenate([np.nonzero(labels == c)[0][: train_images // 10] for c in range(10)]))
        description = {**full.description, "images": len(keep)}
        sources[f"train-{len(keep)}"] = ArraySource(
            full.images[keep], labels[keep], full.class_names, description
        )
    stores = {
        split: pretokenize(source, tokenizer, out / f"store-{split}", image_size=IMAGE_SIZE, num_workers=1,
                           progress=progress)
        for split, source in sources.items()
    }  # fmt: skip
    train = next(path for split, path in stores.items() if split != "heldout")
    return StudyData(train, stores["heldout"], out / "tokenizer", out / "classifier")


def ablation_study() -> Any:
    """The setting where annealing's gain shows at CPU scale (BENCHMARKS.md, "Annealing ablation")."""
    from rargen.demo.ablation import StudyConfig, Window

    model = (("dim", 96), ("depth", 3), ("num_heads", 4), ("mlp_dim", 384))
    train = TrainConfig(preset="rar-digits", model_overrides=model, batch_size=32, lr=1e-3, warmup=0.05,
                        precision=training_precision("auto"), log_every=50)  # fmt: skip
    windows = (Window(0.0, 0.0), Window(0.5, 0.75))  # raster only; the paper's default window
    return StudyConfig(train, windows, budgets=(600,), seeds=(0, 1, 2), evaluations=6)


ABLATION_TRAIN_IMAGES = 360  # 36 per class: memorisation within the budget, where annealing helps


def run_demo(
    out: str | Path = "runs/demo",  # output folder
    config: DemoConfig = DemoConfig(),
    ablation: bool = False,  # also the annealing ablation (raster vs RAR, 3 seeds each)
    progress: bool = True,  # progress bars
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return its results (also written to ``results.json``)."""
    from rargen.checkpoint import atomic_write_dir, load
    from rargen.data.digits import load_digit_images
    from rargen.data.sources import digit_source
    from rargen.data.store import pretokenize
    from rargen.demo.ablation import Evaluator, StudyData, run_study
    from rargen.demo.digit_classifier import digit_frechet_distance
    from rargen.evaluation.classifier import classifier_accuracy

    out = Path(out)
    if config.data is not None and ablation:
        raise ValueError(
            "--ablation studies the digits only; drop --data (or run `rargen ablate` on a store)"
        )
    check_demo_folder(out, config)
    torch.manual_seed(config.train.seed)
    if config.data is not None:
        from rargen.demo.own_data import run_own_demo

        return run_own_demo(out, config, progress, log)
    timer = Timer(log)
    started = time.perf_counter()
    heldout, heldout_labels = load_digit_images("heldout", IMAGE_SIZE)

    with timer.section("1/6 VQ tokenizer (32x32 digits -> 8x8 codes)"):
        tokenizer, tokenizer_report = train_demo_tokenizer(out, config, progress)
    with timer.section("2/6 digit classifier (the scorer, trained on the real training split)"):
        classifier = train_demo_classifier(out, config, progress)
        with torch.no_grad():
            reconstructions = tokenizer.decode(tokenizer.encode(heldout))
        real = {
            "heldout_accuracy": classifier_accuracy(classifier, heldout, heldout_labels),
            "reconstruction_accuracy": classifier_accuracy(classifier, reconstructions, heldout_labels),
            "real_vs_real_frechet": digit_frechet_distance(
                classifier, heldout[0::2], reference=heldout[1::2]
            ),
        }
    log(
        f"   tokenizer held-out PSNR {tokenizer_report['psnr']:.2f} dB, codebook usage "
        f"{tokenizer_report['codebook_usage']:.0%}; classifier accuracy on held-out digits "
        f"{real['heldout_accuracy']:.1%}, on their reconstructions {real['reconstruction_accuracy']:.1%}"
    )
    with timer.section("3/6 pretokenize the training split"):
        source = digit_source("train", IMAGE_SIZE)
        store = pretokenize(source, tokenizer, out / "store", image_size=IMAGE_SIZE, progress=progress)
        heldout_store = pretokenize(digit_source("heldout", IMAGE_SIZE), tokenizer, out / "store-heldout",
                                    image_size=IMAGE_SIZE, progress=progress)  # fmt: skip
        evaluator = Evaluator(StudyData(store, heldout_store, out / "tokenizer"))

    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, Path] = {}
    for name, short in [("RAR annealing", "rar")]:
        runs[name] = out / "runs" / short
        with timer.section(f"4/6 train RAR, {name} ({config.train.steps} steps)"):
            final = train_demo_generator(runs[name], store, config.train, progress)
        generator = load(final).eval()
        with timer.section(f"5/6 sample {config.eval_per_class} digits per class ({name})"):
            images, labels = sample_digits(generator, tokenizer, config.eval_per_class, config)
        with timer.section(f"6/6 score ({name})"):
            results[name] = score(classifier, images, labels) | evaluator.likelihood(generator)
            results[name]["copy_fraction"] = evaluator.copies(images)
        log(
            f"   {name}: class accuracy {results[name]['class_accuracy']:.1%}, Fréchet distance "
            f"{results[name]['frechet_distance']:.2f} (real vs real {real['real_vs_real_frechet']:.2f}), "
            f"held-out NLL {results[name]['heldout_nll']:.3f} bits/token (training "
            f"{results[name]['train_nll']:.3f}), copies {results[name]['copy_fraction']:.1%}"
        )
        if short == "rar":
            atomic_write_dir(out / "generator", functools.partial(copy_files, final))
            grid_images, grid_labels = sample_digits(
                generator, tokenizer, config.grid_per_class, config, seed_offset=10_000_000
            )
            save_sample_grid(grid_images, grid_labels, config.grid_per_class, out / "samples.png")
    plot_training(runs, out / "training.png")
    study = None
    if ablation:
        with timer.section("ablation: raster only vs RAR annealing, 3 seeds each"):
            data = prepare_digits(out, ABLATION_TRAIN_IMAGES, progress=progress)
            study = run_study(out / "ablation", ablation_study(), data, progress=progress, log=log)
    total = time.perf_counter() - started
    summary = {
        "config": dataclasses.asdict(config),
        "tokenizer": tokenizer_report,
        "real": real,
        "generated": results,
        "seconds": timer.seconds,
        "total_seconds": total,
        "threads": torch.get_num_threads(),
        "ablation": study,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(render_report(summary))
    log(f"\nDone in {total / 60:.1f} min. Everything is in {out}/:")
    for name, what in [
        ("report.md", "numbers, settings, timings"),
        ("samples.png", "class-conditional samples (rows = classes)"),
        ("training.png", "loss, r and lr curves"),
        ("generator/", "the RAR checkpoint (rargen.load, rargen sample)"),
        ("tokenizer/", "the VQ tokenizer checkpoint"),
        ("classifier/", "the digit classifier used for scoring"),
        ("store/", "the token store"),
    ]:
        log(f"  {str(out / name):<40} {what}")
    return summary


def check_demo_folder(out: Path, config: DemoConfig) -> None:
    """A demo folder records its settings; a rerun with the same settings picks up where an
    interrupted run stopped, one with other settings is refused before any work."""
    from rargen.train.run_state import check_settings_record

    settings = dataclasses.asdict(config)  # nested: {"train": {...}, "sample": {...}, ...}
    if settings["data"] is None:  # the digits demo's record, as before there was --data
        del settings["data"]
    check_settings_record(out / "demo_config.json", settings, "a demo run", "delete it or pass another --out")


def render_report(summary: dict[str, Any]) -> str:
    config, real, generated = summary["config"], summary["real"], summary["generated"]
    tok = summary["tokenizer"]
    lines = [
        "# rargen demo: RAR on the embedded digits",
        "",
        f"Total time {summary['total_seconds'] / 60:.1f} min on {summary['threads']} CPU threads.",
        "",
        "![samples](samples.png)",
        "",
        f"Rows are the requested classes 0-9, columns independent seeds; guidance scale "
        f"{config['sample']['cfg_scale']}, power {config['sample']['cfg_power']}, temperature "
        f"{config['sample']['temperature']}.",
        "",
        "## Scores",
        "",
        "| what | class accuracy | Fréchet distance (classifier features) | held-out NLL (training) "
        "| copies |",
        "| --- | --- | --- | --- | --- |",
        f"| real held-out digits (359) | {real['heldout_accuracy']:.1%} | "
        f"{real['real_vs_real_frechet']:.2f} (real vs real: two held-out halves of ~180) | | "
        "5% (by definition) |",
        f"| tokenizer reconstructions of them | {real['reconstruction_accuracy']:.1%} | | | |",
    ]
    for name, result in generated.items():
        lines.append(
            f"| generated, {name} ({10 * config['eval_per_class']}) | {result['class_accuracy']:.1%} | "
            f"{result['frechet_distance']:.2f} | {result['heldout_nll']:.3f} ({result['train_nll']:.3f}) "
            f"bits/token | {result['copy_fraction']:.1%} |"
        )
    lines += [
        "",
        "Class accuracy: the fraction of generated digits that rargen's digit classifier (trained on "
        "the real training split) recognises as the requested class. The Fréchet distance uses the same "
        "streaming statistics as FID, against the held-out split, in the classifier's penultimate "
        "features. It is biased upwards by small samples: the real-vs-real row compares two halves of "
        "~180 digits, the generated rows 500 digits with all 359, so it is a reference point, not a "
        "floor; compare the generated rows with each other. Held-out NLL: bits per token of the held-out "
        "digits' codes in raster order under the generator (training NLL beside it: a large gap is "
        "memorisation). Copies: the fraction of generated digits nearer to a training digit (decoded "
        "codes, grey pixels) than 95% of the real held-out digits are to theirs; about 5% means no copying.",
        "",
        "## Tokenizer",
        "",
        f"Held-out PSNR {tok['psnr']:.2f} dB, codebook usage {tok['codebook_usage']:.0%}, perplexity "
        f"{tok['perplexity']:.1f}.",
        "",
        "## Training",
        "",
        "![training](training.png)",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "## Timings",
        "",
        "| step | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in summary["seconds"].items()]
    if summary.get("ablation"):
        from rargen.demo.study_report import format_table

        lines += [
            "",
            "## Ablation (paper Table 2 in miniature)",
            "",
            "A smaller RAR (dim 96, depth 3) on 360 training digits, 600 steps of batch 32, trained "
            "two ways, 3 seeds each; mean ± std over seeds, at the fixed budget and at each run's best "
            "checkpoint by held-out NLL. All models are sampled in raster order.",
            "",
            format_table(summary["ablation"]),
            "![ablation](ablation/curves.png)",
        ]
    return "\n".join(lines) + "\n"


__all__ = ["DemoConfig", "run_demo"]
