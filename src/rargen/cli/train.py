"""The ``rargen`` commands that make models: pretokenize, train, train-tokenizer, train-classifier,
demo and ablate (a study of training runs).

Each command is a parser builder registered with ``@command`` and a runner calling one library
function (imported lazily: ``rargen --help`` imports no torch); see ``rargen.cli.main`` for the rest.
"""

from __future__ import annotations

import argparse
import sys

from rargen.cli.flags import (
    add_config_flags,
    add_threads,
    command,
    config_values,
    list_of,
    positive_int,
    step_or_fraction,
)


@command("pretokenize")
def _pretokenize_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretokenize",
        help="tokenize an image dataset into a memory-mapped token store (resumable, torchrun-aware)",
        description="Tokenize every image (and its crops) once, into a token store folder. Rerun the same "
        "command to resume after a crash; launch with torchrun to split shards across ranks.",
    )
    parser.add_argument(
        "--data", required=True, help="'digits[:train|heldout|all]', an image folder or an .npz"
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (rargen.load)")
    parser.add_argument("--out", required=True, help="token store folder to write (or resume)")
    parser.add_argument("--augment", choices=["none", "flip", "ten-crop"], default="none")
    parser.add_argument(
        "--image-size", type=positive_int, default=None,
        help="square crop size fed to the tokenizer (default: the size the tokenizer was trained at)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=64, help="crops per tokenizer call")
    parser.add_argument(
        "--shard-size", type=positive_int, default=10_000, help="images per shard (resume unit)"
    )
    parser.add_argument("--num-workers", type=positive_int, default=4, help="image decoding threads")
    parser.add_argument(
        "--max-pixels", type=positive_int, default=None,
        help="skip (and report) images with more pixels (default 40,000,000; decompression bombs)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="tokenizer device (default: cuda if available, else cpu)"
    )
    add_threads(parser)
    parser.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from rargen import distributed
    from rargen.data.store import pretokenize

    # gloo only for the final barrier; ranks can finish far apart, hence the long timeout.
    env = distributed.setup(args.device, backend="gloo", timeout=timedelta(hours=12))
    try:
        out = pretokenize(
            args.data,
            args.tokenizer,
            args.out,
            augment=args.augment,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            device=env.device,
            log=print,  # the folder's summary (classes, what was left out), from rank 0 only
            **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
        )
    finally:
        distributed.teardown()
    if env.is_main:
        import json

        from rargen.data.sources import describe_read

        report = json.loads((out / "report.json").read_text())
        skipped = report["skipped"]
        print(
            describe_read(f"pretokenize: {args.data}", report["num_images"], skipped, listed_in="report.json")
        )
        print(f"token store written to {out}")


@command("train")
def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.train.recipe import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a RAR generator on a token store (torchrun for many GPUs; see docs/training.md)",
        description="Every TrainConfig field is a flag (--batch-size 2048, --anneal-start 0.5 ...). "
        "warmup/anneal-start/anneal-end: an integer is optimizer steps, a decimal a fraction of --steps.",
    )
    parser.add_argument("--data", required=True, help="token store folder (rargen pretokenize)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/, final/, metrics.jsonl")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags override it)")
    parser.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override, repeatable"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder: draw labelled sample grids")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser, TrainConfig, skip=("model_overrides",))
    add_threads(parser)
    parser.set_defaults(run=_run_train)


def _parse_value(text: str) -> int | float | str | bool:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from rargen import distributed
    from rargen.train.generator import train
    from rargen.train.recipe import TrainConfig

    values = json.loads(open(args.config).read()) if args.config else {}
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {args.config}: expected a JSON object of TrainConfig fields, "
            f"got a {type(values).__name__}"
        )
    values.update(config_values(args, TrainConfig))
    overrides = dict(values.get("model_overrides", ()))
    for item in args.model:
        if "=" not in item:
            raise ValueError(f"--model {item!r}: expected KEY=VALUE, e.g. --model depth=12")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    values["model_overrides"] = tuple(overrides.items())
    config = TrainConfig.from_dict(values)  # bad flag values are refused before the store is read
    if "preset" not in values:  # the same store gives the same recipe, so --resume matches
        from rargen.data.token_store import TokenStore
        from rargen.train.recipe import SMALL_DATA_IMAGES, small_data_recipe

        num_images = len(TokenStore(args.data))
        if num_images < SMALL_DATA_IMAGES:
            recipe = small_data_recipe(num_images)
            values = {**recipe, **values}
            chosen = ", ".join(f"{key} {values[key]}" for key in recipe)
            print(
                f"note: no --preset for a store of {num_images:,} images (< {SMALL_DATA_IMAGES:,}); using "
                f"the small-data recipe ({chosen}) instead of the ImageNet one (rar-b, 250,000 steps of 2048)"
            )
    config = TrainConfig.from_dict(values)
    try:
        final = train(
            config, args.data, args.out, resume=args.resume, device=args.device,
            tokenizer=args.tokenizer, progress=not args.no_progress,
        )  # fmt: skip
    except FloatingPointError as error:
        print(f"rargen train: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        distributed.teardown()
    print(f"trained {config.preset} for {config.steps} steps; final weights in {final}")
    return 0


@command("train-tokenizer")
def _train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.train.tokenizer import TokenizerTrainConfig

    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train the small VQ tokenizer on the digits, an image folder or an .npz of images",
        description="Writes DIR/tokenizer (a rargen.load-able checkpoint), DIR/samples/*.png "
        "(originals over reconstructions) and DIR/report.json (held-out PSNR, codebook usage, perplexity).",
    )
    parser.add_argument(
        "--data", default="digits",
        help="'digits', a class-folder tree (root/<class>/<image>), an unlabelled folder or an .npz "
        "(arr_0 (N, H, W, C), optional labels); 10%% of each class is held out (seeded shuffle)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="vq-digits", help="VQTokenizerConfig preset (vq-digits, vq-tiny)")
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="square training size (default: preset)"
    )
    parser.add_argument("--codebook-size", type=positive_int, default=None, help="codes (default: preset)")
    add_config_flags(
        parser, TokenizerTrainConfig, only=("steps", "batch_size", "lr", "seed"),
        types={"steps": positive_int, "batch_size": positive_int},
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (exact)")
    add_threads(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    import json

    from rargen.tokenizers.vq import VQTokenizerConfig
    from rargen.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    overrides = {"image_size": args.image_size, "codebook_size": args.codebook_size}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model_config = (
        None if args.resume and not overrides else VQTokenizerConfig.from_name(args.preset, **overrides)
    )
    train_config = TokenizerTrainConfig(**config_values(args, TokenizerTrainConfig))
    report = train_tokenizer(
        args.out, args.data, model_config=model_config, train_config=train_config,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(report["heldout"], indent=2))
    return 0


@command("demo")
def _demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.demo.pipeline import DemoConfig

    parser = subparsers.add_parser(
        "demo",
        help="train, sample and score RAR on the embedded digits (CPU, ~10 min, no download)",
        description="Trains a VQ tokenizer, a digit classifier (the scorer) and a small RAR on "
        "scikit-learn's digits, samples a labelled grid and writes report.md.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--ablation", action="store_true", help="also the annealing ablation (raster vs RAR, 3 seeds each)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced budget (about a minute; a smoke test)"
    )
    add_config_flags(
        parser, DemoConfig, only=("generator_steps", "seed"), types={"generator_steps": positive_int},
        names={"generator_steps": "--steps"},
    )  # fmt: skip
    add_threads(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    import dataclasses

    from rargen.demo.pipeline import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    run_demo(
        args.out,
        dataclasses.replace(config, **config_values(args, DemoConfig)),
        ablation=args.ablation,
        progress=not args.no_progress,
    )


@command("train-classifier")
def _train_classifier_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.evaluation.classifier import ClassifierTrainConfig

    parser = subparsers.add_parser(
        "train-classifier",
        help="train a small image classifier on labelled images: the scorer for sweep/evaluate --classifier",
        description="Holds out a seeded share of each class, trains on the rest and writes DIR (a "
        "checkpoint folder with the class names, image size and channels, the held-out features' "
        "statistics) and DIR/report.json; prints the held-out accuracy.",
    )
    parser.add_argument("--data", required=True, help="'digits', a class-folder tree or an .npz with labels")
    parser.add_argument("--out", required=True, help="classifier folder to write")
    add_config_flags(
        parser, ClassifierTrainConfig, skip=("channels",),
        types={name: positive_int for name in ("image_size", "epochs", "batch_size", "feature_dim")},
    )  # fmt: skip
    parser.add_argument("--max-pixels", type=positive_int, default=None, help="skip larger images")
    parser.add_argument("--no-progress", action="store_true", help="no progress report")
    add_threads(parser)
    parser.set_defaults(run=_run_train_classifier)


def _run_train_classifier(args: argparse.Namespace) -> None:
    from rargen.evaluation.classifier import ClassifierTrainConfig, describe_classifier, train_classifier

    config = ClassifierTrainConfig(**config_values(args, ClassifierTrainConfig))
    report = train_classifier(
        args.data, args.out, config, max_pixels=args.max_pixels, progress=not args.no_progress
    )
    print(describe_classifier(report, args.out))


@command("ablate")
def _ablate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="an ablation study: annealing windows x r_ends x budgets x seeds, trained and scored alike",
        description="Trains one ordinary run folder per (window, r_end, budget, seed) under --out/runs/ "
        "(resumable; --shard i/n splits the runs over processes), evaluates every checkpoint (held-out "
        "and training NLL in raster order, copies among samples, classifier scores) and writes "
        "table.md, table.json and curves.png.",
    )
    parser.add_argument("--out", required=True, help="study folder (study.json, runs/, table.md)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--digits", action="store_true", help="the embedded digits (data made under --out)")
    data.add_argument("--data", help="training token store (with --heldout)")
    parser.add_argument(
        "--train-images", type=positive_int, default=None, help="--digits: a subset, per class"
    )
    parser.add_argument("--heldout", help="held-out token store (the same tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer folder: sample and count copies")
    parser.add_argument(
        "--classifier",
        help="classifier folder (the demo's, or train-classifier's): class accuracy, Fréchet distance",
    )
    parser.add_argument("--windows", default="raster-vs-rar", help="preset or start/end list (0/0,0.5/0.75)")
    parser.add_argument(
        "--budgets", type=list_of(int, "500,1500"), default=[1500], help="steps, e.g. 500,1500"
    )
    parser.add_argument("--seeds", type=list_of(int, "0,1,2"), default=[0, 1, 2])
    parser.add_argument(
        "--r-ends",
        type=list_of(float, "0,0.1"),
        default=[0.0],
        help="random-order probability after the window",
    )
    parser.add_argument("--evaluations", type=positive_int, default=6, help="checkpoints scored per run")
    parser.add_argument("--samples-per-class", type=positive_int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--preset", default="rar-digits")
    parser.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override"
    )
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=step_or_fraction, default=0.05)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has it) | bf16 | fp32")
    parser.add_argument("--shard", default="0/1", help="i/n: train and score runs i, i+n, ... (default 0/1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads(parser)
    parser.set_defaults(run=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rargen.demo.ablation import StudyConfig, StudyData, format_table, parse_windows, run_study
    from rargen.demo.pipeline import training_precision
    from rargen.train.recipe import TrainConfig

    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2
    except (ValueError, AssertionError):
        raise ValueError(f"--shard {args.shard!r}: give i/n, e.g. 0/2 and 1/2 for two processes") from None
    if args.digits:
        from rargen.demo.pipeline import prepare_digits

        data = prepare_digits(Path(args.out) / "data", args.train_images, progress=not args.no_progress)
    elif not args.heldout:
        raise ValueError("--data needs --heldout (a token store of held-out images, the same tokenizer)")
    else:
        paths = [args.data, args.heldout, args.tokenizer, args.classifier]
        data = StudyData(*(Path(p) if p else None for p in paths))
    overrides = tuple((k, _parse_value(v)) for k, v in (item.split("=", 1) for item in args.model))
    train = TrainConfig(preset=args.preset, model_overrides=overrides, batch_size=args.batch_size,
                        lr=args.lr, warmup=args.warmup, precision=training_precision(args.precision),
                        log_every=50)  # fmt: skip
    config = StudyConfig(
        train, parse_windows(args.windows), tuple(args.budgets), tuple(args.seeds), args.evaluations,
        args.samples_per_class, args.cfg_scale, r_ends=tuple(args.r_ends),
    )  # fmt: skip
    summary = run_study(args.out, config, data, shard=shard, progress=not args.no_progress)
    if summary is not None:
        print(format_table(summary) + f"\ntable.md, table.json and curves.png are in {args.out}/")
