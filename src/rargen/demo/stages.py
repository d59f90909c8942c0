"""Stages the demos share (the digits demo, ``rargen.demo.pipeline``, and ``demo --data``,
``rargen.demo.own_data``): timed sections, the generator's training on the CPU, class-balanced
samples with the demo's seeds, the training curves and the copy of a finished checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rargen.train.recipe import TrainConfig

if TYPE_CHECKING:
    from rargen.demo.pipeline import DemoConfig


class Timer:
    """Named wall-clock sections (``with timer.section(name):``), announced and timed."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.log = log

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.log(f"\n== {name}")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.log(f"   ({self.seconds[name]:.1f} s)")


def train_demo_generator(out: Path, store: Path, config: TrainConfig, progress: bool) -> Path:
    from rargen.train.generator import train

    if (out / "final").exists():  # finished by an earlier (interrupted) demo run
        return out / "final"
    config = dataclasses.replace(config, precision=training_precision(config.precision))  # on the CPU
    return train(config, store, out, resume=True, device="cpu", progress=progress)


def training_precision(precision: str) -> str:
    """auto: bf16 autocast where oneDNN has native bf16 kernels (as the paper trains), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@torch.no_grad()
def sample_digits(
    generator: Any, tokenizer: Any, per_class: int, config: DemoConfig, seed_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Class-balanced samples: images (10 * per_class, 3, S, S) and their requested labels."""
    from rargen.sampling.engine import generate_images

    labels = torch.arange(generator.config.num_classes).repeat_interleave(per_class)
    images = []
    for start in range(0, len(labels), 100):
        batch = labels[start : start + 100]
        seeds = [config.train.seed * 1_000_003 + seed_offset + i for i in range(start, start + len(batch))]
        images.append(generate_images(generator, tokenizer, batch, config.sample, seeds=seeds))
    return torch.cat(images), labels


def plot_training(runs: dict[str, Path], path: Path) -> None:
    """Loss (and token accuracy) of every run, with the schedules r and lr of the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_sched) = plt.subplots(1, 2, figsize=(11, 4))
    lr_axis = ax_sched.twinx()
    for i, (name, run) in enumerate(runs.items()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        (line,) = ax_loss.plot(steps, [r["loss"] for r in rows], label=name)
        r_label = "r (random-order probability)" if len(runs) == 1 else f"r, {name}"
        ax_sched.plot(steps, [r["r"] for r in rows], color=line.get_color(), linestyle="--", label=r_label)
        if i == 0:
            lr_axis.plot(steps, [r["lr"] for r in rows], color="tab:gray", label="learning rate")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (cross-entropy)", title="loss")
    ax_loss.legend()
    ax_sched.set(xlabel="optimizer step", ylabel="r", title="randomness annealing and learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = ax_sched.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    ax_sched.legend(handles, [h.get_label() for h in handles], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_files(source: Path, target: Path) -> None:
    for file in source.iterdir():
        shutil.copy2(file, target / file.name)
