"""The README's own-data commands, as written, on a folder rargen has not been tuned on.

Writes ``WORK/my_images``: 10 class folders of 60 grey 28x28 PNGs (scikit-learn's digits, taken
class by class in file order and upscaled bicubically from 8x8, named ``digit_0`` ...) plus one
corrupt file, then runs every ``rargen`` command of README.md's "The pipeline on your own data"
block in ``WORK`` (through ``rargen.cli.main.main``, with ``--threads`` appended) and prints the time of
each and the scores: the classifier's held-out accuracy and its train-vs-held-out Fréchet distance
(the real-data baseline), then the sweep's and evaluate's scores of the generated samples.

    PYTHONPATH=src python benchmarks/bench_own_data.py --work /tmp/own --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(readme: Path = README) -> list[list[str]]:
    """The ``rargen`` commands of the README's own-data bash block (continuations joined, comments cut)."""
    section = readme.read_text().split("## The pipeline on your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("rargen ")]


def write_folder(root: Path, per_class: int = 60, size: int = 28) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        folder = root / f"digit_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(digits.target == c)[:per_class]):
            pixels = (digits.images[index] * 255.0 / 16.0).round().astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
            image.save(folder / f"{i:03d}.png")
    (root / "digit_3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/own-data", help="working folder (made fresh)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--train-steps", type=int, default=None, help="append --steps N to rargen train (a shorter run)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="skip train-tokenizer / pretokenize when their output exists"
    )
    args = parser.parse_args()
    from rargen.cli.main import main as rargen

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and (work / "my_images").exists()):
        write_folder(work / "my_images")
    os.chdir(work)
    times = []
    for argv in readme_commands():
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        if args.reuse and argv[1] in ("train-tokenizer", "pretokenize") and out and Path(out).exists():
            times.append((f"{argv[1]} (reused)", float("nan")))
            continue
        extra = ["--steps", str(args.train_steps)] if argv[1] == "train" and args.train_steps else []
        began = time.perf_counter()
        code = rargen([*argv[1:], *extra, "--threads", str(args.threads)])
        times.append((argv[1], time.perf_counter() - began))
        if code != 0:
            raise SystemExit(f"{shlex.join(argv)} exited with {code}")
    clf = json.loads((work / "runs/clf/report.json").read_text())
    sweep = json.loads((work / "sweeps/gen/sweep.json").read_text())
    evaluated = json.loads((work / "out/metrics.json").read_text())
    print("\n| command | seconds |\n| --- | --- |")
    for name, seconds in times:
        print(f"| rargen {name} | {seconds:.0f} |")
    print(f"| total | {sum(s for _, s in times if s == s):.0f} |")
    print("\n| images | class accuracy | Fréchet distance (classifier features, vs held-out) |")
    print("| --- | --- | --- |")
    baseline = clf["train_vs_heldout_frechet"]
    print(f"| real held-out ({clf['num_heldout']}) / real train ({clf['num_train']}) | "
          f"{clf['heldout_accuracy']:.3f} | {baseline:.3f} (train) |")  # fmt: skip
    for row in sweep:
        print(f"| sweep cfg {row['cfg_scale']:g} ({row['num_samples']}) | {row['class_accuracy']:.3f} | "
              f"{row['frechet_distance']:.3f} |")  # fmt: skip
    print(f"| sample --cfg-scale 3 ({evaluated['num_samples']}) | {evaluated['class_accuracy']:.3f} | "
          f"{evaluated['frechet_distance']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
