"""Issue 29 part 4 on the embedded digits: a 32-px generator (8x8 tokens) fine-tuned to 64 px (16x16
tokens, ``rargen train --init-from``) for N steps, against the same model trained from scratch at
64 px for N and for 4N steps. Per run: class accuracy of class-balanced samples (a classifier
trained at 64 px), held-out NLL in raster order (bits per token) and wall time; one line of JSON per
run and seed, then a markdown table of means over the seeds.

The demo tokenizer is trained at 32 px and tokenizes 64 px digits as it is (it is convolutional:
a 64x64 image is a 16x16 grid). Everything goes through the ``rargen`` commands.

    PYTHONPATH=src python benchmarks/bench_grid_finetune.py --work /tmp/grid-ft --seeds 0,1,2 --steps 50 \
        --base-steps 600 --batch-size 16 --per-class 10 --picture docs/grid_finetune_digits.png
    PYTHONPATH=src python benchmarks/bench_grid_finetune.py --work /tmp/grid-ft-smoke --smoke  # minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

import rargen
from rargen.cli.main import main as rargen_main


def run(argv: list[str], threads: int) -> float:
    """One ``rargen`` command; its wall time in seconds."""
    start = time.perf_counter()
    if rargen_main([*argv, "--threads", str(threads)]) != 0:
        raise SystemExit(f"rargen {' '.join(argv)} failed")
    return time.perf_counter() - start


def scores(run_folder: Path, work: Path, per_class: int, seed: int) -> tuple[dict[str, float], Tensor]:
    """Held-out NLL and class accuracy of ``per_class`` samples of every class (guidance 2), and the
    samples ((N, 3, 64, 64) in [0, 1], class after class)."""
    from rargen.evaluation.classifier import classifier_accuracy, load_scorer
    from rargen.evaluation.likelihood import raster_nll_bits, store_tokens
    from rargen.sampling.engine import SampleConfig, generate_images

    model = rargen.load(run_folder / "final").eval()
    tokenizer = rargen.load(work / "tok" / "tokenizer").eval()
    tokens, labels = store_tokens(work / "store64-heldout")
    nll = raster_nll_bits(model, tokens, labels)
    wanted = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    seeds = [seed * 1_000_003 + i for i in range(len(wanted))]
    images = generate_images(model, tokenizer, wanted, SampleConfig(cfg_scale=2.0), seeds=seeds)
    scorer = load_scorer(work / "clf64")
    accuracy = classifier_accuracy(scorer.classifier, images, wanted)
    return {"heldout_nll_bits": nll, "class_accuracy": accuracy}, images


def training_seconds(run_folder: Path) -> float:
    """Seconds spent in optimizer steps, from the run's metrics.jsonl (each line's seconds per
    step times the steps since the line before): the command's wall time less start-up, the
    checkpoints and the final NLL evaluation, which are the same for every run."""
    seconds, last = 0.0, 0
    for line in (run_folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "seconds_per_step" in record:
            seconds += record["seconds_per_step"] * (record["step"] - last)
            last = record["step"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500, help="N: fine-tuning steps (scratch: N and 4N)")
    parser.add_argument("--base-steps", type=int, default=1000, help="steps of the 32-px model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=20, help="samples per class for the accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--picture", type=Path, default=None, help="PNG: one sample per class and run")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the path)")
    args = parser.parse_args()
    work, t = args.work, args.threads
    if args.smoke:
        args.seeds, args.steps, args.base_steps, args.per_class, args.batch_size = "0", 2, 2, 2, 8
    tok_steps, clf_epochs = ("5", "1") if args.smoke else ("300", "12")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tok").exists():
        run(["train-tokenizer", "--data", "digits", "--out", str(work / "tok"), "--steps", tok_steps], t)
    for size in (32, 64):  # OUT and OUT-heldout: the tokenizer's split of the digits
        if not (work / f"store{size}").exists():
            run(["pretokenize", "--data", "digits", "--tokenizer", str(work / "tok" / "tokenizer"),
                 "--out", str(work / f"store{size}"), "--image-size", str(size), "--device", "cpu",
                 "--no-progress"], t)  # fmt: skip
    if not (work / "clf64").exists():
        run(["train-classifier", "--data", "digits", "--out", str(work / "clf64"), "--image-size", "64",
             "--epochs", clf_epochs], t)  # fmt: skip
    common = ["--preset", "rar-digits", "--batch-size", str(args.batch_size), "--no-progress"]
    rows: list[dict] = []
    pictures: dict[str, Tensor] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        base = work / f"base32-s{seed}"
        if not (base / "final").exists():
            run(["train", "--data", str(work / "store32"), "--out", str(base), *common,
                 "--steps", str(args.base_steps), "--seed", str(seed)], t)  # fmt: skip
        base_s = training_seconds(base)
        plans = {
            f"fine-tune {args.steps}": ["--init-from", str(base / "final"), "--steps", str(args.steps)],
            f"scratch {args.steps}": ["--steps", str(args.steps)],
            f"scratch {4 * args.steps}": ["--steps", str(4 * args.steps)],
        }
        for name, extra in plans.items():
            out = work / f"{name.replace(' ', '-')}-s{seed}"
            if not (out / "final").exists():
                argv = ["train", "--data", str(work / "store64"), "--out", str(out), *common, *extra]
                run([*argv, "--seed", str(seed)], t)
            row = {"run": name, "seed": seed, "train_s": training_seconds(out), "base32_s": base_s}
            measured, images = scores(out, work, args.per_class, seed)
            row |= measured
            rows.append(row)
            pictures.setdefault(name, images[:: args.per_class])  # the first seed's: one per class
            print(json.dumps(row), flush=True)
    print("\n| run (64 px, 16x16 tokens) | seeds | class accuracy | held-out NLL (bits/token) | train s |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        cells = [f"{name} | {len(mine)}"]
        for key, digits in (("class_accuracy", 3), ("heldout_nll_bits", 3), ("train_s", 0)):
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}")
        print(f"| {' | '.join(cells)} |")
    base = [r["base32_s"] for r in rows]
    if base:
        print(f"\nthe 32-px models (--base-steps {args.base_steps}): {statistics.fmean(base):.0f} s each")
    if args.picture is not None:
        save_picture(args.picture, pictures)


def save_picture(path: Path, pictures: dict[str, Tensor]) -> None:
    """One row per run (the first seed's samples), one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(next(iter(pictures.values())))
    fig, axes = plt.subplots(len(pictures), columns, figsize=(0.8 * columns + 1.2, 0.8 * len(pictures) + 0.2),
                             squeeze=False)  # fmt: skip
    for i, (name, images) in enumerate(pictures.items()):
        for j in range(columns):
            axes[i, j].imshow(images[j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.17, right=0.99, bottom=0.01, top=0.99, wspace=0.05, hspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
