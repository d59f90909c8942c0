"""The ``rargen`` commands that make models: pretokenize, train, train-tokenizer, train-classifier,
demo and ablate. Their flags are the parameters and config fields of the function each one calls."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from rargen import distributed
from rargen.cli.flags import add_flags, call_args, command, given, positive_int, shard
from rargen.data.preprocess import AUGMENTS
from rargen.data.split import HELDOUT_FRACTION
from rargen.data.store import pretokenize
from rargen.demo.ablation import PER_RUN, StudyConfig, StudyData, parse_windows, run_study
from rargen.demo.own_data import data_budget_help
from rargen.demo.pipeline import DemoConfig, prepare_digits, run_demo
from rargen.demo.stages import training_precision
from rargen.demo.study_report import format_table
from rargen.evaluation.classifier import train_classifier
from rargen.evaluation.likelihood import describe_training
from rargen.tokenizers.vq import VQTokenizerConfig
from rargen.train.gates import describe_classifier
from rargen.train.generator import train
from rargen.train.recipe import config_for_store, store_default_help
from rargen.train.tokenizer import train_tokenizer


@command("pretokenize")
def _pretokenize(parser: argparse.ArgumentParser) -> Callable:
    """tokenize an image dataset into a memory-mapped token store (resumable, torchrun-aware)

    Tokenize every image (and its crops) once into the store OUT, the held-out split (the one of
    train-tokenizer and train-classifier) into OUT-heldout. Rerun to resume; torchrun splits shards."""
    counts = dict.fromkeys("image_size batch_size shard_size num_workers max_pixels".split(), positive_int)
    add_flags(parser, pretokenize, skip=("rank", "world_size"), source={"flag": "--data"}, **counts,
              augment={"choices": AUGMENTS}, heldout_fraction={"default": HELDOUT_FRACTION})  # fmt: skip

    def run(args: argparse.Namespace) -> None:
        kwargs = call_args(args, pretokenize)
        # gloo only for the final barrier; ranks can finish far apart, hence the long timeout.
        env = distributed.setup(kwargs.pop("device"), backend="gloo", timeout=timedelta(hours=12))
        try:
            pretokenize(**kwargs, device=env.device, log=print)  # log: what it read, skipped, wrote
        finally:
            distributed.teardown()

    return run


@command("train")
def _train(parser: argparse.ArgumentParser) -> Callable:
    """train a RAR generator on a token store (torchrun for many GPUs; see docs/training.md)

    Defaults come from the store (see each flag): without --preset or --config, under 100,000 images get the
    small-data recipe (rar-digits, 2,000 steps of batch 64), more the paper's (rar-b, 250,000 of 2,048)."""
    add_flags(parser, train, **store_default_help())
    parser.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")

    def run(args: argparse.Namespace) -> int | None:
        kwargs = given(args, train)
        config, note = config_for_store(kwargs.pop("config", {}), args.data, args.config)
        if note:
            print(f"note: {note}")
        try:
            final = train(config, **kwargs)
        except FloatingPointError as error:
            print(f"rargen train: stopped: {error}", file=sys.stderr)
            return 3
        finally:
            distributed.teardown()
        print(describe_training(config, final, args.data))  # with the held-out NLL, where there is one

    return run


@command("train-tokenizer")
def _train_tokenizer(parser: argparse.ArgumentParser) -> Callable:
    """train the small VQ tokenizer on the digits, an image folder or an .npz of images

    Writes DIR/tokenizer (a rargen.load-able checkpoint), DIR/samples/*.png (originals over
    reconstructions) and DIR/report.json (held-out PSNR, codebook usage, perplexity)."""
    positive = dict.fromkeys(("steps", "batch_size", "image_size", "codebook_size"), positive_int)
    add_flags(parser, train_tokenizer, skip=("stop_after",), out_dir={"flag": "--out"}, **positive)
    parser.add_argument("--preset", default="vq-digits", help="VQTokenizerConfig preset (vq-digits, vq-tiny)")

    def run(args: argparse.Namespace) -> None:
        # A resumed run keeps its own model config unless model fields are given.
        keep = args.resume and "model_config" not in given(args, train_tokenizer)
        model = None if keep else VQTokenizerConfig.from_name(args.preset)
        report = train_tokenizer(**call_args(args, train_tokenizer, model_config=model))
        print(json.dumps(report["heldout"], indent=2) + "\n" + report["verdict"])

    return run


@command("demo")
def _demo(parser: argparse.ArgumentParser) -> Callable:
    """train, sample and score RAR on the embedded digits, or your own images with --data (CPU)

    Trains a VQ tokenizer, a classifier (the scorer) and a small RAR on scikit-learn's digits (~10
    min) or --data (budgets from it), samples a labelled grid and writes report.md. Every DemoConfig
    field is a flag, TrainConfig's and SampleConfig's too (--steps, --cfg-scale, ...)."""
    add_flags(
        parser, run_demo, precision={"help": training_precision.__doc__}, **data_budget_help(DemoConfig())
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced budget (about a minute; a smoke test)"
    )
    quick = DemoConfig.quick()
    return lambda args: run_demo(**call_args(args, run_demo, config=quick if args.quick else None))


@command("train-classifier")
def _train_classifier(parser: argparse.ArgumentParser) -> Callable:
    """train a small image classifier on labelled images: the scorer for sweep/evaluate --classifier

    Holds out a seeded share of each class, trains on the rest and writes DIR (a checkpoint folder with
    the class names, image size and channels, the held-out features' statistics) and DIR/report.json;
    prints the held-out accuracy."""
    positive = ("image_size", "epochs", "batch_size", "feature_dim", "max_pixels")
    add_flags(parser, train_classifier, **dict.fromkeys(positive, positive_int))
    return lambda args: print(describe_classifier(train_classifier(**call_args(args, train_classifier)),
                                                  args.out))  # fmt: skip


@command("ablate")
def _ablate(parser: argparse.ArgumentParser) -> Callable:
    """an ablation study: annealing windows x r_ends x budgets x seeds, trained and scored alike

    Trains one ordinary run folder per (window, r_end, budget, seed) under --out/runs/ (resumable; --shard i/n
    splits the runs over processes), evaluates every checkpoint (held-out and training NLL in raster
    order, copies among samples, classifier scores) and writes table.md, table.json and curves.png.
    Every StudyConfig field is a flag, its TrainConfig's (but those set per run) and SampleConfig's too."""
    parser.add_argument("--digits", action="store_true", help="the embedded digits (data made under --out)")
    # Trained on the CPU: precision "auto" is resolved as the flag is read, before study.json records it.
    precision = {"type": training_precision, "default": "auto", "help": training_precision.__doc__}
    add_flags(parser, run_study, skip=PER_RUN, windows=parse_windows, shard=shard, precision=precision,
              store={"flag": "--data", "required": False},
              heldout_store={"flag": "--heldout", "required": False})  # fmt: skip
    add_flags(parser, prepare_digits, skip=("out", "progress"), train_images=positive_int)

    def run(args: argparse.Namespace) -> None:
        data = given(args, run_study).get("data", {})
        if args.digits == ("store" in data):
            raise ValueError("give the study's data once: --digits, or --data STORE with --heldout STORE")
        if not args.digits and "heldout_store" not in data:
            raise ValueError("--data needs --heldout (a token store of held-out images, the same tokenizer)")
        if args.digits:  # a --tokenizer or --classifier given replaces the digits' own
            progress = args.progress is not False
            data = prepare_digits(Path(args.out) / "data", **given(args, prepare_digits), progress=progress)
        data = data if args.digits else StudyData(**data)
        summary = run_study(**call_args(args, run_study, config=StudyConfig(), data=data))
        if summary is not None:
            print(format_table(summary) + f"\ntable.md, table.json and curves.png are in {args.out}/")

    return run
