"""The training recipe of the RAR generator: ``TrainConfig`` (the paper's Table 6 by default), its
learning-rate schedule, the small-data recipe ``rargen train`` picks for a small store, and the
start-up summary of a run. ``rargen.train.generator`` runs it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rargen.checkpoint import config_from_dict, config_to_dict
from rargen.data.token_store import TokenStore
from rargen.evaluation.likelihood import refuse_heldout_store
from rargen.model import ModelConfig

# Fields that only change logistics (not the trajectory); a resumed run may change them.
LOGISTICS = (
    "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "compile", "sharding",
    "activation_checkpointing",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Defaults are the paper's (Table 6) at its global batch of 2048.

    ``warmup``, ``anneal_start`` and ``anneal_end`` are optimizer steps when given as ``int`` and
    fractions of ``steps`` when given as ``float`` in [0, 1] (paper: 100, 200 and 300 of 400 epochs).
    """

    preset: str = "rar-b"  # ModelConfig preset; codebook, tokens and classes come from the data
    model_overrides: tuple[tuple[str, Any], ...] = ()  # e.g. (("dim", 128), ("depth", 4))
    steps: int = 250_000  # optimizer steps
    batch_size: int = 2048  # global: images per optimizer step over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 4e-4
    end_lr: float = 1e-5
    warmup: int | float = 0.25
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.03
    grad_clip: float = 1.0  # global L2 norm; 0 = off
    anneal_start: int | float = 0.5  # random-order annealing starts (integer: steps; decimal: a fraction)
    anneal_end: int | float = 0.75  # ... and ends (then orders are raster, but r_end of them)
    r_end: float = 0.0  # random-order probability after anneal_end (paper: 0); > 0 keeps any-order skill
    label_dropout: float = 0.1  # class label -> null label (classifier-free guidance)
    seed: int = 0
    init_from: str | None = None  # checkpoint (or name) to fine-tune; grid tables resized to the data's
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA (as the official RAR); e.g. 0.9999
    sharding: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard per block; for large presets)
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    sample_every: int = 5000  # only with a tokenizer

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}: {rule}")

        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("warmup", "anneal_start", "anneal_end"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise bad(name, "a float is a fraction of steps and must be in [0, 1]; give steps as an int")
            if value < 0:
                raise bad(name, "must be >= 0")
        if self.resolve(self.anneal_end) < self.resolve(self.anneal_start):
            raise bad("anneal_end", f"must not come before anneal_start ({self.anneal_start})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise bad("precision", 'choose "auto", "bf16" or "fp32"')
        if self.sharding not in ("ddp", "fsdp"):
            raise bad("sharding", 'choose "ddp" or "fsdp"')
        if not 0.0 <= self.r_end <= 1.0:
            raise bad("r_end", "the random-order probability after anneal_end must be in [0, 1]")
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_dropout and ema_decay must be in [0, 1)")
        if self.lr <= 0 or self.end_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0; end_lr, weight_decay and grad_clip must be >= 0")
        ModelConfig.from_name(self.preset, **dict(self.model_overrides))  # unknown preset/field -> error

    def resolve(self, value: int | float) -> int:
        """Optimizer steps of a step-or-fraction setting."""
        return round(value * self.steps) if isinstance(value, float) else int(value)

    def to_dict(self) -> dict[str, Any]:
        values = config_to_dict(self)
        if not self.r_end:  # recorded only when set: records of the paper's schedule stay as they were
            del values["r_end"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        # Field by field against the annotations (a JSON list becomes a tuple), then __post_init__.
        return config_from_dict(cls, values, "train config")


# Below this many stored images a run without a preset gets ``small_data_recipe`` instead of the
# paper's ImageNet recipe (RAR-B, 250k steps of 2048), which on 600 images is ~850k epochs.
SMALL_DATA_IMAGES = 100_000


def small_data_recipe(num_images: int) -> dict[str, Any]:
    """TrainConfig fields for a small store: the README's own-data recipe (rar-digits, 2000 steps).

    The batch is at most the store (a 60-image store gets batch 60); checkpoints and sample grids
    every 500 steps. Used by ``rargen train`` when neither a preset nor a --config is given.
    """
    return {
        "preset": "rar-digits", "steps": 2000, "batch_size": max(1, min(64, num_images)), "lr": 1e-3,
        "warmup": 0.05, "log_every": 50, "checkpoint_every": 500, "sample_every": 500,
    }  # fmt: skip


def store_default_help() -> dict[str, dict[str, str]]:
    """``rargen train --help`` for the fields whose default the store chooses (``config_for_store``):
    both values and the rule, where the help listed only the ImageNet value (rar-b, 250,000 steps of
    2,048) that a small store never gets."""
    paper, small = TrainConfig(), small_data_recipe(SMALL_DATA_IMAGES)
    what = {"preset": "ModelConfig preset; codebook, tokens and classes come from the data",
            "steps": "optimizer steps", "batch_size": "global: images per optimizer step over all ranks",
            "lr": "peak learning rate", "warmup": "warm-up (steps, or a fraction of --steps)"}  # fmt: skip
    help = {}
    for name, value in small.items():
        shown = f"{value} (at most the store's size)" if name == "batch_size" else repr(value)
        given = "" if name == "preset" else f"; with --preset or --config, {getattr(paper, name)!r}"
        help[name] = {"help": f"{what.get(name, name.replace('_', ' '))}; default from the store: {shown} "
                      f"for fewer than {SMALL_DATA_IMAGES:,} images (the small-data recipe), else "
                      f"{getattr(paper, name)!r} (the paper's ImageNet recipe){given}"}  # fmt: skip
    return help


def config_for_store(
    flags: dict[str, Any], store: str | os.PathLike, file: str | os.PathLike | None = None
) -> tuple[TrainConfig, str | None]:
    """``rargen train``'s TrainConfig, and a note when it chose for the user: the fields of a JSON
    ``file`` with ``flags`` over them (``model_overrides`` merged key by key); without a preset, a
    store of fewer than ``SMALL_DATA_IMAGES`` images gets the small-data recipe under them (the
    same every time, so --resume matches). Bad values are refused before the store is read."""
    refuse_heldout_store(store)  # no command trains on held-out images
    values = json.loads(Path(file).read_text()) if file else {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {file}: expected a JSON object of TrainConfig fields, got a "
                         f"{type(values).__name__}")  # fmt: skip
    overrides = {**dict(values.get("model_overrides", ())), **dict(flags.get("model_overrides", ()))}
    values = {**values, **flags, "model_overrides": tuple(overrides.items())}
    config = TrainConfig.from_dict(values)
    if "preset" in values or (num_images := len(TokenStore(store))) >= SMALL_DATA_IMAGES:
        return config, None
    values = {**(recipe := small_data_recipe(num_images)), **values}
    chosen = ", ".join(f"{key} {values[key]}" for key in recipe)
    note = (
        f"no --preset for a store of {num_images:,} images (< {SMALL_DATA_IMAGES:,}); using the small-data "
        f"recipe ({chosen}) instead of the ImageNet one (rar-b, 250,000 steps of 2048)"
    )
    return TrainConfig.from_dict(values), note


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``end_lr``."""
    warmup, total = config.resolve(config.warmup), config.steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.end_lr + (config.lr - config.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def describe_run(config: TrainConfig, num_params: int, num_images: int | None, start: int) -> str:
    """The start-up summary: model size, data size, steps, batch and the epochs they make."""
    data = "an unsized source"
    if num_images:
        epochs = config.steps * config.batch_size / num_images
        data = f"{num_images:,} images, {epochs:,.1f} epochs"
    resumed = f", resuming at step {start}" if start else ""
    return (
        f"train: {config.init_from or config.preset} with {num_params:,} parameters; {data}; "
        f"{config.steps:,} steps of batch {config.batch_size}{resumed}"
    )


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
