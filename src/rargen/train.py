"""Training the RAR generator: the paper's recipe (Table 6, spec §2) in one loop, one CPU to many GPU nodes.

Per optimizer step: set the LR and the random-order probability ``r`` (randomness annealing), draw the
orders and the class-label dropout of the whole *global* batch from one explicit generator, run ``k``
micro-batches (gradient accumulation), clip the global gradient norm, step AdamW, update the EMA.

Randomness. The orders and dropped labels of a step are drawn for all ``batch_size`` rows from one
``torch.Generator`` seeded with ``seed`` (the same on every rank); rank ``q`` takes rows
``(j * world_size + q) * micro`` .. ``+ micro`` of micro-step ``j``, exactly the rows the loader gives
it. A run is then a function of the global batch alone: 1 GPU with 4 accumulation steps, 4 GPUs, or 2
nodes give the same orders for the same images (up to float reduction order), and resume is exact.
Model dropout uses each rank's default torch RNG, seeded from ``(seed, rank)`` and checkpointed.

Deliberate differences from the official trainer (spec §2, §7):
* Weight decay applies to the 2-D weights of ``nn.Linear`` layers only: never to norms, biases,
  embeddings, positional tables or the cls token. The official groups (name substrings) also decay
  ``cls_token`` and every block's adaLN weight but *not* the final adaLN weight (its module name
  ``adaln_before_head`` contains "ln"); here all adaLN weights, the final one included, are decayed.
* Warm-up is ``lr * (k + 1) / W`` for optimizer step ``k < W``: the official ``k / W`` spends the
  first step at lr 0 (spec §7.12). From ``W`` on both are the same cosine decay to ``end_lr``.
* Orders are drawn vectorised from an explicit generator (official: Python ``random`` per sample).

Launch: ``rargen train`` or ``torchrun ... -m rargen.cli train``; see docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen import distributed
from rargen.checkpoint import (
    WEIGHTS_NAME,
    atomic_write_dir,
    config_from_dict,
    config_to_dict,
    read_record,
    read_weights_file,
    remove_stale_temporaries,
    save,
    verify_weights,
)
from rargen.model import RAR, ModelConfig
from rargen.orders import random_order_prob, sample_orders

# Fields that only change logistics (not the trajectory); a resumed run may change them.
LOGISTICS = (
    "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "compile", "sharding",
    "activation_checkpointing",
)  # fmt: skip
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


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
    anneal_start: int | float = 0.5
    anneal_end: int | float = 0.75
    label_dropout: float = 0.1  # class label -> null label (classifier-free guidance)
    seed: int = 0
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
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_dropout and ema_decay must be in [0, 1)")
        if self.lr <= 0 or self.end_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0; end_lr, weight_decay and grad_clip must be >= 0")
        ModelConfig.from_name(self.preset, **dict(self.model_overrides))  # unknown preset/field -> error

    def resolve(self, value: int | float) -> int:
        """Optimizer steps of a step-or-fraction setting."""
        return round(value * self.steps) if isinstance(value, float) else int(value)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        # Field by field against the annotations (a JSON list becomes a tuple), then __post_init__.
        return config_from_dict(cls, values, "train config")


# ------------------------------------------------------------------------------------------------
# Pure helpers


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


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``end_lr``."""
    warmup, total = config.resolve(config.warmup), config.steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.end_lr + (config.lr - config.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay the 2-D weights of Linear layers, nothing else (see the module docstring)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


def draw_step_randomness(
    generator: torch.Generator, batch_size: int, num_tokens: int, r: float, label_dropout: float
) -> tuple[Tensor, Tensor]:
    """Orders (B, L) and the label-dropout mask (B,) of one optimizer step's global batch (on the CPU)."""
    orders = sample_orders(batch_size, num_tokens, r, generator=generator)
    drop = torch.rand(batch_size, generator=generator) < label_dropout
    return orders, drop


def token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over all B*L tokens (fp32) and the number of argmax-correct tokens."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, correct


def enable_activation_checkpointing(model: RAR) -> None:
    """Recompute each block in the backward pass. Patches the instances' forward, so parameter names
    (and checkpoints) stay exactly those of the plain model."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU); None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are hidden dot-names)."""
    folder = run / "checkpoints"
    found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)] if folder.is_dir() else []
    return sorted((p for p in found if (p / "train_state.pt").is_file()), key=lambda p: int(p.name[5:]))


# ------------------------------------------------------------------------------------------------
# Data


def open_data(data: Any, batch_size: int, rank: int, world_size: int, seed: int) -> Any:
    """A loader for this rank. ``data`` is a token-store folder or a factory
    ``(batch_size, rank, world_size, seed) -> loader``. A loader iterates over the rest of its epoch
    yielding ``(tokens (B, L) int64, labels (B,) int64)``, has ``state_dict()/load_state_dict()`` and a
    ``store`` with ``codebook_size``, ``num_tokens``, ``num_classes`` (and optionally ``meta``)."""
    if callable(data):
        return data(batch_size, rank, world_size, seed)
    from rargen.loader import TokenLoader

    return TokenLoader(data, batch_size, seed=seed, rank=rank, world_size=world_size, prefetch=True)


def _forever(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


def model_config_for(config: TrainConfig, store: Any) -> ModelConfig:
    """The preset with the data's codebook size, token count and class count (checked if overridden)."""
    data = {"codebook_size": store.codebook_size, "num_image_tokens": store.num_tokens}
    data["num_classes"] = store.num_classes
    overrides = dict(config.model_overrides)
    for key, value in data.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                f"model override {key}={overrides[key]} does not match the data ({key} = {value}); "
                "drop the override or use a store made for that model"
            )
    return ModelConfig.from_name(config.preset, **{**overrides, **data})


def check_run_folder(out: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Validate the output folder before any work; return the checkpoint to resume from, if any."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write to the output folder {str(out)!r} ({error}); pass another --out"
        ) from None
    # Half-written checkpoint folders of a killed run (only rank 0 writes them, and it is here).
    remove_stale_temporaries(out / "checkpoints")
    remove_stale_temporaries(out)
    found = checkpoints(out)
    if found and not resume:
        raise ValueError(
            f"{out} already holds checkpoints (newest {found[-1].name}); pass --resume or another --out"
        )
    if not found:
        return None
    saved = TrainConfig.from_dict(json.loads((found[-1] / "train_config.json").read_text()))
    differing = [f for f in saved.to_dict() if f not in LOGISTICS and getattr(saved, f) != getattr(config, f)]
    if differing:
        pairs = ", ".join(f"{f}: {getattr(saved, f)!r} saved, {getattr(config, f)!r} now" for f in differing)
        raise ValueError(f"cannot resume {out} with a different recipe ({pairs}); use the saved settings")
    return found[-1]


# ------------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    data: Any,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    tokenizer: str | os.PathLike | None = None,
    sample_hook: Callable[[RAR, int, Path], None] | None = None,
    progress: bool = True,
) -> Path:
    """Train a RAR generator on ``data`` (see ``open_data``) into the run folder ``out``.

    Writes ``out/checkpoints/step-XXXXXXX/`` every ``checkpoint_every`` steps and at the end (the last
    ``keep_checkpoints`` kept), ``out/final/`` (loadable with ``rargen.load``), ``out/metrics.jsonl``
    and, with a ``tokenizer`` folder (or a ``sample_hook(model, step, png_path)``), sample grids in
    ``out/samples/``. ``resume=True`` continues from the newest complete checkpoint, bit-exactly on
    CPU at the same thread count and world size (on another world size the all-reduce order
    differs, ~1e-6). Half-written checkpoint folders of a killed run are removed first.
    Returns ``out/final``. Under torchrun every rank calls this.
    """
    out = Path(out)
    env = distributed.setup(device)
    world, rank = env.world_size, env.rank
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by world_size x grad_accum "
            f"({world} x {config.grad_accum}); change batch_size or grad_accum"
        )
    micro = config.batch_size // (world * config.grad_accum)
    checked: Path | str | None = None
    if env.is_main:  # resume needs a folder all ranks share (one machine, or a network file system)
        try:
            checked = check_run_folder(out, config, resume)
        except ValueError as error:
            checked = f"error: {error}"
    checked = distributed.broadcast_object(checked)
    if isinstance(checked, str):
        raise ValueError(checked[len("error: ") :])
    resume_from = checked
    loader = open_data(data, micro, rank, world, config.seed)
    store = loader.store
    mcfg = model_config_for(config, store)
    if store.num_classes and hasattr(store, "labels") and int(store.labels.max()) >= store.num_classes:
        raise ValueError(
            f"the data has labels up to {int(store.labels.max())} but {store.num_classes} classes"
        )
    if sample_hook is None and tokenizer is not None:
        sample_hook = image_grid_hook(tokenizer, store)

    # Model, EMA and optimizer; weights are loaded before wrapping so every sharding sees full tensors.
    torch.manual_seed(config.seed)  # the initial weights: the same on every rank
    raw = RAR(mcfg)
    generator = torch.Generator().manual_seed(config.seed)  # orders + label dropout, same on all ranks
    torch.manual_seed(config.seed * 1_000_003 + rank)  # model dropout, per rank
    state: dict[str, Any] | None = None
    if resume_from is not None:
        record = read_record(resume_from)
        weights = read_weights_file(resume_from / WEIGHTS_NAME)
        verify_weights(resume_from / WEIGHTS_NAME, record)
        raw.load_state_dict(weights)
        state = torch.load(resume_from / "train_state.pt", weights_only=True)
    raw.to(env.device)
    ema = None
    if config.ema_decay > 0:
        ema_file = resume_from / "ema.safetensors" if resume_from is not None else None
        source = read_weights_file(ema_file) if ema_file is not None else raw.state_dict()
        if ema_file is not None:
            verify_weights(ema_file, record)
        ema = {
            name: source[name].detach().to(env.device, torch.float32).clone()
            for name, _ in raw.named_parameters()
        }
    if config.activation_checkpointing:
        enable_activation_checkpointing(raw)
    model, shard = distributed.wrap_for_training(raw, env, sharding=config.sharding, compile=config.compile)
    ema = shard(ema) if ema is not None else None  # the EMA laid out like the parameters
    fused = env.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(raw, config.weight_decay), lr=config.lr, betas=config.betas, fused=fused
    )
    start = 0
    if state is not None:
        _load_train_state(state, raw, optimizer, generator, loader, env, config)
        start = int(state["step"])
    params = [p for p in raw.parameters() if p.requires_grad]
    ema_pairs = (list(ema.values()), [p for n, p in raw.named_parameters()]) if ema is not None else None

    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    anneal = (config.resolve(config.anneal_start), config.resolve(config.anneal_end))
    L, null_label = mcfg.num_image_tokens, mcfg.null_label
    check_every_step = env.device.type == "cpu"  # a host sync is free on the CPU
    train_flops = 3 * raw.flops_per_token()  # forward + backward ~ 3x forward
    peak = peak_flops(env.device)
    logger = MetricsLogger(out, enabled=env.is_main, resume_step=start)
    batches = _forever(loader)

    num_images = len(store) if hasattr(store, "__len__") else None
    if env.is_main and progress:
        print(describe_run(config, raw.num_params(), num_images, start), flush=True)
    timing_step = start + min(10, config.steps - start)  # the expected time is printed after it
    run_began = time.perf_counter()
    from tqdm import tqdm

    on_terminal = sys.stderr.isatty()  # a log file gets plain lines at log steps, no carriage returns
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (progress and env.is_main and on_terminal),
        unit="step",
        dynamic_ncols=True,
    )
    sums = torch.zeros(4, device=env.device, dtype=torch.float64)  # loss, correct, grad norm, micro-steps
    window_start, window_steps, last_saved = time.perf_counter(), 0, resume_from
    model.train()
    for step in range(start, config.steps):
        r = random_order_prob(step, *anneal)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        orders_all, drop_all = draw_step_randomness(generator, config.batch_size, L, r, config.label_dropout)
        step_loss = torch.zeros((), device=env.device)
        for j in range(config.grad_accum):
            tokens, labels = next(batches)
            rows = slice((j * world + rank) * micro, (j * world + rank + 1) * micro)
            tokens = tokens.to(env.device, non_blocking=True)
            labels = torch.where(drop_all[rows], null_label, labels).to(env.device, non_blocking=True)
            orders = orders_all[rows].to(env.device, non_blocking=True)
            if step == start and j == 0:
                raw.check_inputs(tokens, labels, orders)  # one host sync: bad data fails before training
            reduce_now = j == config.grad_accum - 1 or world == 1  # all-reduce on the last micro-step only
            with contextlib.nullcontext() if reduce_now else distributed.no_sync(model, raw, config.sharding):
                with autocast:
                    logits = model(tokens, labels, orders, check=False)  # (micro, L, V)
                loss, correct = token_loss(logits, tokens.gather(1, orders))
                (loss / config.grad_accum).backward()
            step_loss += loss.detach()
            sums[1] += correct
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        grad_norm = distributed.full_tensor(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_pairs is not None:
            torch._foreach_lerp_(
                ema_pairs[0], [p.detach().float() for p in ema_pairs[1]], 1.0 - config.ema_decay
            )
        sums[0] += step_loss
        sums[2] += grad_norm.detach().double()
        sums[3] += config.grad_accum
        window_steps += 1
        done = step + 1
        if check_every_step:
            values = distributed.all_reduce_sum(torch.stack([step_loss.double(), grad_norm.double()]))
            _check_finite(values, done, last_saved)
        is_log = done % config.log_every == 0 or done == config.steps
        is_ckpt = done % config.checkpoint_every == 0 or done == config.steps
        if is_log or is_ckpt:  # the only host syncs of the loop
            totals = distributed.all_reduce_sum(sums.clone()).tolist()
            _check_finite(torch.tensor([totals[0], totals[2]]), done, last_saved)
            if is_log:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * config.batch_size * L / elapsed
                row = {
                    "step": done,
                    "loss": totals[0] / totals[3],
                    "accuracy": totals[1] / (totals[3] * micro * L),
                    "lr": lr,
                    "r": r,
                    "grad_norm": totals[2] / (window_steps * world),
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * train_flops / (peak * world) if peak else None,
                    "seconds_per_step": elapsed / window_steps,
                }
                logger.log(row)
                if progress and env.is_main and not on_terminal:
                    print(
                        f"step {done}/{config.steps} loss {row['loss']:.4f} acc {row['accuracy']:.3f} "
                        f"lr {lr:.2e} {row['seconds_per_step']:.3f} s/step",
                        flush=True,
                    )
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", r=f"{r:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.3g}"
                )
                sums.zero_()
                window_start, window_steps = time.perf_counter(), 0
        if is_ckpt:
            last_saved = save_checkpoint(out, done, raw, ema, optimizer, generator, loader, config, env)
        if (
            sample_hook is not None
            and env.is_main
            and (done % config.sample_every == 0 or done == config.steps)
        ):
            _run_sample_hook(sample_hook, raw, done, out, ema)
        bar.update(1)
        if done == timing_step and env.is_main and progress and done < config.steps:
            per_step = (time.perf_counter() - run_began) / (done - start)
            left = per_step * (config.steps - done)
            print(f"expected time: {per_step:.3f} s/step, about {_duration(left)} to go", flush=True)
    bar.close()
    logger.close()
    final = out / "final"
    newest = checkpoints(out)[-1] if env.is_main else None
    if env.is_main:
        names = [n for n in ("config.json", "model.safetensors", "ema.safetensors") if (newest / n).is_file()]
        atomic_write_dir(final, lambda tmp: [shutil.copy2(newest / n, tmp / n) for n in names])
    distributed.barrier()
    return final


def describe_run(config: TrainConfig, num_params: int, num_images: int | None, start: int) -> str:
    """The start-up summary: model size, data size, steps, batch and the epochs they make."""
    data = "an unsized source"
    if num_images:
        epochs = config.steps * config.batch_size / num_images
        data = f"{num_images:,} images, {epochs:,.1f} epochs"
    resumed = f", resuming at step {start}" if start else ""
    return (
        f"train: {config.preset} with {num_params:,} parameters; {data}; {config.steps:,} steps of "
        f"batch {config.batch_size}{resumed}"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _check_finite(values: Tensor, step: int, last_saved: Path | None) -> None:
    if not bool(torch.isfinite(values).all()):
        keep = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
        raise FloatingPointError(
            f"non-finite loss or gradient norm by step {step} ({values.tolist()}); stopping. {keep}. "
            "Lower the lr, check the data, or resume from that checkpoint with another seed"
        )


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(env: distributed.Dist) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def save_checkpoint(
    out: Path,
    step: int,
    raw: RAR,
    ema: dict[str, Tensor] | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loader: Any,
    config: TrainConfig,
    env: distributed.Dist,
) -> Path:
    """Write ``out/checkpoints/step-XXXXXXX`` atomically (rank 0) and prune old ones; all ranks call."""
    weights, optim_state = distributed.full_state(raw, optimizer)
    ema_full = {k: distributed.full_tensor(v).cpu() for k, v in (ema or {}).items()}
    rng = distributed.all_gather_object(_rng_state(env))
    path = out / "checkpoints" / f"step-{step:07d}"
    if env.is_main:
        train_state = {
            "step": step,
            "optimizer": optim_state,
            "generator": generator.get_state(),
            "rng": rng,
            "loader": dict(loader.state_dict()),
            "world_size": env.world_size,
            "config": config.to_dict(),
        }

        def write(tmp: Path) -> None:
            # Class names travel with the weights: `rargen sample` grids and `rargen serve` use them.
            names = list(getattr(getattr(loader, "store", None), "class_names", None) or ())
            extra = {"step": step, "train_config": config.to_dict()} | (
                {"class_names": names} if names else {}
            )
            more = {"ema.safetensors": ema_full} if ema is not None else {}
            save(raw, tmp, state_dict=weights, extra=extra, extra_weights=more)
            torch.save(train_state, tmp / "train_state.pt")
            (tmp / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

        atomic_write_dir(path, write)
        for old in checkpoints(out)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def _load_train_state(state, raw, optimizer, generator, loader, env, config) -> None:
    distributed.load_optimizer_state(raw, optimizer, state["optimizer"])
    generator.set_state(state["generator"])
    loader.load_state_dict(state["loader"])
    if state["world_size"] == env.world_size:
        torch.set_rng_state(state["rng"][env.rank]["cpu"])
        if env.device.type == "cuda" and "cuda" in state["rng"][env.rank]:
            torch.cuda.set_rng_state(state["rng"][env.rank]["cuda"], env.device)
    else:  # dropout streams cannot carry over to another world size; the rest of the run is still exact
        warnings.warn(
            f"resuming on {env.world_size} ranks a run saved on {state['world_size']}; reseeding dropout",
            stacklevel=2,
        )
        torch.manual_seed((config.seed * 1_000_003 + env.rank) ^ int(state["step"]))


# ------------------------------------------------------------------------------------------------
# Watching a run


class MetricsLogger:
    """Scalars to ``metrics.jsonl`` (and TensorBoard when it is installed); rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        if self.path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _run_sample_hook(hook: Callable, raw: RAR, step: int, out: Path, ema: dict[str, Tensor] | None) -> None:
    path = out / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = raw.training
    raw.eval()
    try:
        with torch.no_grad():
            hook(raw, step, path)
    except Exception as error:  # noqa: BLE001 - a failed preview must never end a training run
        warnings.warn(
            f"sample grid at step {step} failed ({type(error).__name__}: {error}); training goes on",
            stacklevel=2,
        )
    finally:
        raw.train(was_training)


def image_grid_hook(
    tokenizer_path: str | os.PathLike, store: Any, per_class: int = 4, classes: int = 32
) -> Callable:
    """A sample hook drawing ``per_class`` images of each of the first ``classes`` classes (one row
    each) with
    ``rargen.sampling.generate`` (imported lazily: training works without the sampler)."""
    from rargen.checkpoint import load

    tokenizer = load(tokenizer_path)
    if int(getattr(tokenizer, "codebook_size", store.codebook_size)) != store.codebook_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has codebook size {tokenizer.codebook_size}, the data "
            f"{store.codebook_size}; pass the tokenizer the store was made with"
        )
    expected = ((getattr(store, "meta", None) or {}).get("tokenizer") or {}).get("state_sha256")
    if expected is not None:
        from rargen.store import _state_sha256

        if _state_sha256(tokenizer) != expected:
            raise ValueError(f"tokenizer {tokenizer_path} is not the one the token store was made with")
    names = list(getattr(store, "class_names", ())) or None
    channels = int(getattr(tokenizer, "checkpoint_extra", {}).get("image_channels", 3))

    def hook(model: RAR, step: int, path: Path) -> None:
        from rargen.sample_images import save_grid, to_uint8
        from rargen.sampling import SampleConfig, generate_images

        device = next(model.parameters()).device
        count = min(classes, max(1, model.config.num_classes))
        labels = torch.arange(count, device=device).repeat_interleave(per_class)
        config = SampleConfig(cfg_scale=3.0) if model.config.num_classes else SampleConfig()
        images = generate_images(
            model, tokenizer.to(device), labels, config, torch.Generator(device).manual_seed(step)
        )
        if channels == 1:  # a tokenizer trained on grey images: grey previews, as rargen sample
            images = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        save_grid(to_uint8(images), labels.tolist(), names, path)

    return hook
