"""Inpainting and any-order generation on the digits (issue 28 part 5): what r_end > 0 buys and costs.

    PYTHONPATH=src python benchmarks/bench_inpaint.py --out runs/bench-inpaint --threads 2 \
        --seeds 0,1,2 --steps 800 --picture docs/inpaint_digits.png

Trains small digit generators (the ablation's RAR-digits narrowed to dim 96, depth 3, on all 1,438
training digits, the paper's annealing window 0.5/0.75) for each ``--r-ends`` value and seed, as
one ``rargen ablate`` study under ``OUT/study`` (a rerun skips the runs and scores it has), then on
the held-out digits, for each mask (defined here on the 8x8 code grid) and order:
* class accuracy of the completions: the known codes kept, the rest drawn with the true class and
  the demo's guidance, decoded and scored by the demo's digit classifier;
* the held-out NLL of the unknown codes given the known ones (bits/token) in that order (known
  positions first, then the unknown ones in raster or one random order per image), from
  ``token_probs(..., orders=)`` without guidance, i.e. the model's own conditional;
* the sampling wall time per image beside plain (unmasked, raster) sampling of the same images.
Plus the cost of r_end on plain generation (the study's class accuracy, held-out raster NLL) and a
picture of completions. Per-run results are cached in ``OUT/inpaint/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rargen.checkpoint import load
from rargen.demo.ablation import StudyConfig, Window, run_study, study_runs
from rargen.demo.pipeline import ablation_study, prepare_digits
from rargen.evaluation.classifier import classifier_accuracy
from rargen.evaluation.likelihood import raster_nll_bits, store_tokens
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, generate, token_probs
from rargen.tokenizers.base import codes_from_sequence
from rargen.train.run_state import checkpoints

GRID = 8  # the demo tokenizer's code grid: 32x32 digits -> 8x8 codes


def _rows(first: int, last: int) -> Tensor:
    cells = torch.zeros(GRID, GRID, dtype=torch.bool)
    cells[first:last] = True
    return cells


def _columns(first: int, last: int) -> Tensor:
    return _rows(first, last).T


def _centre_box() -> Tensor:
    cells = torch.zeros(GRID, GRID, dtype=torch.bool)
    cells[GRID // 4 : GRID - GRID // 4, GRID // 4 : GRID - GRID // 4] = True
    return cells


# True = regenerate (unknown), on the code grid in raster order. "border" is the complement of the
# centre box (a frame two cells wide), so the two ask opposite questions of the same cells.
MASKS: dict[str, Callable[[], Tensor]] = {
    "bottom-half": lambda: _rows(GRID // 2, GRID),
    "top-half": lambda: _rows(0, GRID // 2),
    "left-half": lambda: _columns(0, GRID // 2),
    "centre": _centre_box,
    "border": lambda: ~_centre_box(),
}
# A mask of its own per image: half of the cells, scattered (the one mask no raster prefix covers).
RANDOM_HALF = "random-half"
MASK_NAMES = (*MASKS, RANDOM_HALF)
ORDERS = ("raster", "random")
LIKELIHOOD = SampleConfig()  # no guidance, temperature 1: token_probs gives the model's conditional


def completion_orders(known_mask: Tensor, order: str, generator: torch.Generator) -> Tensor:
    """(N, L) permutations: each row's known positions in raster order, then its unknown ones in
    raster order or shuffled (one order per row from ``generator``): the order ``generate`` uses."""
    rows = []
    for known in known_mask:
        unknown = (~known).nonzero()[:, 0]
        if order == "random":
            unknown = unknown[torch.randperm(len(unknown), generator=generator)]
        rows.append(torch.cat([known.nonzero()[:, 0], unknown]))
    return torch.stack(rows)


def unknown_nll_bits(
    model: Any, tokens: Tensor, labels: Tensor, known_mask: Tensor, orders: Tensor
) -> Tensor:
    """Per image: the summed NLL in bits of its unknown tokens given its known ones, decoding in
    ``orders`` (known first). Step i of ``token_probs`` is the distribution of tokens[orders[i]]."""
    probs = token_probs(model, labels, tokens, LIKELIHOOD, orders=orders)  # (N, L, V), in order
    target = tokens.gather(1, orders)
    p = probs.gather(2, target[..., None])[..., 0].double()
    unknown_step = ~known_mask.gather(1, orders)
    return -(p.log2() * unknown_step).sum(dim=1)


def grid_mask(name: str, count: int) -> Tensor:
    """(count, GRID * GRID) masks, True = regenerate. Image i's random half depends on i alone (one
    generator drawn row after row), so every model, order and picture sees the same cells."""
    if name != RANDOM_HALF:
        return MASKS[name]().flatten().expand(count, GRID * GRID).clone()
    generator = torch.Generator().manual_seed(2)
    masks = torch.zeros(count, GRID * GRID, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(GRID * GRID, generator=generator)[: GRID * GRID // 2]] = True
    return masks


def pixel_masks(grid_masks: Tensor, image_size: int = 32) -> Tensor:
    """(N, image_size, image_size) masks on the pixels: each code covers a square of pixels."""
    scale = image_size // GRID
    cells = grid_masks.view(-1, GRID, GRID)
    return cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def timed_generate(
    decoder: Any, labels: Tensor, config: SampleConfig, batch: int, **kwargs: Any
) -> tuple[Tensor, float]:
    """Tokens of ``generate`` in batches of ``batch`` (``kwargs`` sliced alike) and seconds spent."""
    out, seconds = [], 0.0
    for start in range(0, len(labels), batch):
        part = {
            k: v[start : start + batch] if isinstance(v, (Tensor, list)) else v for k, v in kwargs.items()
        }
        begin = time.perf_counter()
        out.append(generate(decoder, labels[start : start + batch], config, **part))
        seconds += time.perf_counter() - begin
    return torch.cat(out), seconds


@torch.no_grad()
def decode(tokenizer: Any, tokens: Tensor) -> Tensor:
    return torch.cat([tokenizer.decode(codes_from_sequence(tokenizer, tokens[i : i + 256]))
                      for i in range(0, len(tokens), 256)]).float().clamp(0, 1)  # fmt: skip


def score_run(checkpoint: Path, data: Any, masks: list[str], images: int, batch: int,
              sample: SampleConfig, completions_for: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every mask x order of one generator on the first ``images`` held-out digits."""
    model = load(checkpoint).eval()
    decoder = prepare_for_decoding(model)
    tokenizer, classifier = load(data.tokenizer).eval(), load(data.classifier).eval()
    tokens, labels = (t[:images] for t in store_tokens(data.heldout_store))
    seeds = list(range(len(labels)))  # the same noise for every model, mask and order
    generate(decoder, labels[:batch], sample, seeds=seeds[:batch])  # warm-up: the first call is not timed
    plain, plain_seconds = timed_generate(decoder, labels, sample, batch, seeds=seeds)
    result: dict[str, Any] = {
        "raster_nll": raster_nll_bits(model, tokens, labels),
        "plain_accuracy": classifier_accuracy(classifier, decode(tokenizer, plain), labels),
        "plain_ms": 1000 * plain_seconds / len(labels),
        "reconstruction_accuracy": classifier_accuracy(classifier, decode(tokenizer, tokens), labels),
        "known_only_accuracy": {},
        "masks": {},
    }
    pictures = {}
    reconstructions = decode(tokenizer, tokens)
    for mask_name in masks:
        regenerate = grid_mask(mask_name, len(labels))
        known_mask = ~regenerate
        # The baseline a completion must beat: what the known part alone says of the class (the
        # regenerated cells black, the digits' background).
        known_only = reconstructions * ~pixel_masks(regenerate)[:, None]
        result["known_only_accuracy"][mask_name] = classifier_accuracy(classifier, known_only, labels)
        for order in ORDERS:
            orders = completion_orders(known_mask, order, torch.Generator().manual_seed(1))
            bits = unknown_nll_bits(decoder, tokens, labels, known_mask, orders)
            completed, seconds = timed_generate(decoder, labels, sample, batch, seeds=seeds, known=tokens,
                                                known_mask=known_mask, order=order)  # fmt: skip
            if not torch.equal(completed[known_mask], tokens[known_mask]):
                raise AssertionError(f"{mask_name}/{order}: the known codes changed")
            result["masks"][f"{mask_name}/{order}"] = {
                "accuracy": classifier_accuracy(classifier, decode(tokenizer, completed), labels),
                "nll": float(bits.sum() / (~known_mask).sum()),
                "ms": 1000 * seconds / len(labels),
                "unknown": int((~known_mask[0]).sum()),
            }
            if completions_for:
                pictures[f"{mask_name}/{order}"] = completed[completions_for]
    result["pictures"] = {k: v.tolist() for k, v in pictures.items()}
    return result


# -------------------------------------------------------------------------------------------------
# Report


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def cell(values: list[float], digits: int, scale: float = 1.0) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def tables(results: dict[float, list[dict[str, Any]]], study: dict[str, Any], masks: list[str]) -> str:
    """Markdown: the completions (one column group per r_end) and the study's plain-generation scores."""
    r_ends = sorted(results)
    head = ["mask", "unknown codes", "order", "known part alone: class accuracy %"]
    for r in r_ends:
        head += [
            f"r_end {r:g}: class accuracy %",
            f"r_end {r:g}: NLL unknown (bits/token)",
            f"r_end {r:g}: ms/image",
        ]
    lines = [
        "### Completions (mean ± std over seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    row = ["none (plain sampling)", "64", "raster", ""]
    for r in r_ends:
        runs = results[r]
        row += [
            cell([x["plain_accuracy"] for x in runs], 1, 100),
            cell([x["raster_nll"] for x in runs], 3) + " (all codes)",
            cell([x["plain_ms"] for x in runs], 1),
        ]
    lines.append("| " + " | ".join(row) + " |")
    first = results[r_ends[0]][0]
    for mask in masks:
        for order in ORDERS:
            key = f"{mask}/{order}"
            alone = f"{100 * first['known_only_accuracy'][mask]:.1f}"
            row = [mask, str(first["masks"][key]["unknown"]), order, alone]  # random-half: 32 each
            for r in r_ends:
                runs = [x["masks"][key] for x in results[r]]
                row += [
                    cell([x[m] for x in runs], d, s)
                    for m, d, s in (("accuracy", 1, 100), ("nll", 3, 1), ("ms", 1, 1))
                ]
            lines.append("| " + " | ".join(row) + " |")
    reconstruction = 100 * first["reconstruction_accuracy"]
    lines += [
        "",
        f"Reconstructions of these held-out digits (all codes known): {reconstruction:.1f}% class accuracy.",
        "",
        "### Plain generation: the cost of r_end (the study's scores at the budget, mean ± std over seeds)",
        "",
        "| r_end | seeds | class accuracy % | held-out NLL (bits/token, raster) | training NLL "
        "| Fréchet distance | copies % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row_ in study["rows"]:
        fixed = row_["fixed_budget"]
        r_end = float(row_["window"].rsplit("-r", 1)[1]) if "-r" in row_["window"] else 0.0
        cells = [f"{r_end:g}", str(row_["seeds"])]
        for name, digits, scale in (("class_accuracy", 1, 100), ("heldout_nll", 3, 1), ("train_nll", 3, 1),
                                    ("frechet_distance", 1, 1), ("copy_fraction", 1, 100)):  # fmt: skip
            cells.append(
                f"{fixed[name]['mean'] * scale:.{digits}f} ± {fixed[name]['std'] * scale:.{digits}f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_picture(path: Path, tokenizer: Any, heldout: Tensor, chosen: list[int],
                 pictures: dict[float, dict[str, Any]], masks: list[str]) -> None:  # fmt: skip
    """Rows: held-out digits; columns: the digit, then per mask the known part (blue = regenerated)
    and each model's completion in each order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns: list[tuple[str, Tensor]] = [("held-out", decode(tokenizer, heldout[chosen]))]
    for mask in masks:
        regenerate = pixel_masks(grid_mask(mask, len(heldout))[chosen])[:, None]
        blue = torch.tensor([0.25, 0.45, 0.9])[None, :, None, None]
        known = torch.where(regenerate, blue, columns[0][1])
        columns.append((f"{mask}\nknown", known))
        for r_end, by_key in sorted(pictures.items()):
            for order in ORDERS:
                columns.append(
                    (f"r_end {r_end:g}\n{order}", decode(tokenizer, torch.tensor(by_key[f"{mask}/{order}"])))
                )
    fig, axes = plt.subplots(
        len(chosen), len(columns), figsize=(0.62 * len(columns), 0.62 * len(chosen) + 0.5)
    )
    for j, (title, images) in enumerate(columns):
        for i in range(len(chosen)):
            axes[i, j].imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i, j].axis("off")
        axes[0, j].set_title(title, fontsize=5)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.05)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    # A palette of 64 colours holds the greys and the mask's blue: a PNG small enough for the docs.
    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-inpaint", help="data, runs and cached scores")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds per r_end")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per generator (batch 32)")
    parser.add_argument("--r-ends", default="0,0.25", help="TrainConfig.r_end values to compare")
    parser.add_argument("--masks", default=",".join(MASK_NAMES), help=f"of {', '.join(MASK_NAMES)}")
    parser.add_argument("--images", type=int, default=359, help="held-out digits to complete (359: all)")
    parser.add_argument("--batch", type=int, default=128, help="images per generate call")
    parser.add_argument("--picture", default=None, help="PNG of completions (default OUT/inpaint_digits.png)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    masks = args.masks.split(",")
    if unknown := [m for m in masks if m not in MASK_NAMES]:
        parser.error(f"unknown masks {unknown}; choose from {', '.join(MASK_NAMES)}")
    started = time.perf_counter()
    data = prepare_digits(out / "data", progress=False)
    # The ablation's small RAR and recipe (dim 96, depth 3, batch 32), the paper's window, all digits.
    seeds, r_ends = (
        tuple(int(s) for s in args.seeds.split(",")),
        tuple(float(r) for r in args.r_ends.split(",")),
    )
    study = dataclasses.replace(
        ablation_study(), windows=(Window(0.5, 0.75),), budgets=(args.steps,), evaluations=1, seeds=seeds,
        r_ends=r_ends,
    )  # fmt: skip
    summary = run_study(out / "study", study, data, progress=False, log=lambda line: print(line, flush=True))
    trained = time.perf_counter()
    sample = StudyConfig.sample  # the demo's and the study's guidance (3.0)
    heldout_tokens, heldout_labels = store_tokens(data.heldout_store)
    chosen = [int((heldout_labels == c).nonzero()[0, 0]) for c in (0, 2, 3, 5, 6, 9)]
    results: dict[float, list[dict[str, Any]]] = {}
    pictures: dict[float, dict[str, Any]] = {}
    settings = {
        "masks": masks,
        "images": args.images,
        "batch": args.batch,
        "sample": dataclasses.asdict(sample),
    }
    for run in study_runs(study):
        cache = out / "inpaint" / f"{run.name}.json"
        record = json.loads(cache.read_text()) if cache.exists() else None
        if record is None or record["settings"] != settings:
            print(f"== completions: {run.name}", flush=True)
            folder = out / "study" / "runs" / run.name
            scores = score_run(checkpoints(folder)[-1], data, masks, args.images, args.batch, sample, chosen)
            record = {"settings": settings, "threads": torch.get_num_threads(), **scores}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(record) + "\n")
        results.setdefault(run.r_end, []).append(record)
        pictures.setdefault(run.r_end, record["pictures"])  # the first seed's completions
    finished = time.perf_counter()
    picture = Path(args.picture) if args.picture else out / "inpaint_digits.png"
    save_picture(picture, load(data.tokenizer).eval(), heldout_tokens, chosen, pictures, masks)
    threads = torch.get_num_threads()
    print(
        f"\n# {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads; "
        f"{len(seeds)} seeds x r_end {list(r_ends)}, {args.steps} steps of batch {study.train.batch_size}; "
        f"{args.images} held-out digits; guidance {sample.cfg_scale}"
    )
    print(
        f"# wall time: data, training and study scores {(trained - started) / 60:.1f} min, completions "
        f"{(finished - trained) / 60:.1f} min (cached parts take none); picture {picture}\n"
    )
    print(tables(results, summary, masks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
