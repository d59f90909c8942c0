"""Issue 29 part 4 on the embedded digits: a 32-px generator (8x8 tokens) fine-tuned to 64 px (16x16
tokens, ``rargen train --init-from``) for N steps, against the same model trained from scratch at
64 px for N and for 4N steps. Per run: class accuracy of class-balanced samples (a classifier
trained at 64 px), held-out NLL in raster order (bits per token) and wall time; one line of JSON per
run and seed, then a markdown table of means over the seeds.

The demo tokenizer is trained at 32 px and tokenizes 64 px digits as it is (it is convolutional:
a 64x64 image is a 16x16 grid). Everything goes through the ``rargen`` commands.

    PYTHONPATH=src python benchmarks/bench_grid_finetune.py --work /tmp/grid-ft --seeds 0,1,2 --steps 500
    PYTHONPATH=src python benchmarks/bench_grid_finetune.py --work /tmp/grid-ft-smoke --smoke  # minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import rargen
from rargen.cli.main import main as rargen_main


def run(argv: list[str], threads: int) -> float:
    """One ``rargen`` command; its wall time in seconds."""
    start = time.perf_counter()
    if rargen_main([*argv, "--threads", str(threads)]) != 0:
        raise SystemExit(f"rargen {' '.join(argv)} failed")
    return time.perf_counter() - start


def scores(run_folder: Path, work: Path, per_class: int, seed: int) -> dict[str, float]:
    from rargen.evaluation.classifier import classifier_accuracy, load_scorer
    from rargen.evaluation.likelihood import raster_nll_bits, store_tokens
    from rargen.sampling.engine import SampleConfig, generate_images

    model = rargen.load(run_folder / "final").eval()
    tokenizer = rargen.load(work / "tok" / "tokenizer").eval()
    tokens, labels = store_tokens(work / "heldout64")
    nll = raster_nll_bits(model, tokens, labels)
    wanted = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    seeds = [seed * 1_000_003 + i for i in range(len(wanted))]
    images = generate_images(model, tokenizer, wanted, SampleConfig(cfg_scale=2.0), seeds=seeds)
    scorer = load_scorer(work / "clf64")
    return {"heldout_nll_bits": nll, "class_accuracy": classifier_accuracy(scorer.classifier, images, wanted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500, help="N: fine-tuning steps (scratch: N and 4N)")
    parser.add_argument("--base-steps", type=int, default=1000, help="steps of the 32-px model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=20, help="samples per class for the accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the path)")
    args = parser.parse_args()
    work, t = args.work, args.threads
    if args.smoke:
        args.seeds, args.steps, args.base_steps, args.per_class, args.batch_size = "0", 2, 2, 2, 8
    tok_steps, clf_epochs = ("5", "1") if args.smoke else ("300", "12")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tok").exists():
        run(["train-tokenizer", "--data", "digits", "--out", str(work / "tok"), "--steps", tok_steps], t)
    for size in (32, 64):
        for split, name in (("train", f"train{size}"), ("heldout", f"heldout{size}")):
            if not (work / name).exists():
                tokenizer = str(work / "tok" / "tokenizer")
                run(["pretokenize", "--data", f"digits:{split}", "--tokenizer", tokenizer,
                     "--out", str(work / name), "--image-size", str(size), "--device", "cpu",
                     "--no-progress"], t)  # fmt: skip
    if not (work / "clf64").exists():
        run(["train-classifier", "--data", "digits", "--out", str(work / "clf64"), "--image-size", "64",
             "--epochs", clf_epochs], t)  # fmt: skip
    common = ["--preset", "rar-digits", "--batch-size", str(args.batch_size), "--no-progress"]
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = work / f"base32-s{seed}"
        base_s = 0.0
        if not (base / "final").exists():
            base_s = run(["train", "--data", str(work / "train32"), "--out", str(base), *common,
                          "--steps", str(args.base_steps), "--seed", str(seed)], t)  # fmt: skip
        plans = {
            f"fine-tune {args.steps}": ["--init-from", str(base / "final"), "--steps", str(args.steps)],
            f"scratch {args.steps}": ["--steps", str(args.steps)],
            f"scratch {4 * args.steps}": ["--steps", str(4 * args.steps)],
        }
        for name, extra in plans.items():
            out = work / f"{name.replace(' ', '-')}-s{seed}"
            seconds = float("nan")  # a run already there (a rerun) is scored, not timed
            if not (out / "final").exists():
                argv = ["train", "--data", str(work / "train64"), "--out", str(out), *common, *extra]
                seconds = run([*argv, "--seed", str(seed)], t)
            row = {"run": name, "seed": seed, "train_s": seconds, "base32_s": base_s}
            row |= scores(out, work, args.per_class, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| run (64 px, 16x16 tokens) | seeds | class accuracy | held-out NLL (bits/token) | train s |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        mean = {
            k: statistics.fmean(r[k] for r in mine) for k in ("class_accuracy", "heldout_nll_bits", "train_s")
        }
        print(f"| {name} | {len(mine)} | {mean['class_accuracy']:.3f} | {mean['heldout_nll_bits']:.3f} "
              f"| {mean['train_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
