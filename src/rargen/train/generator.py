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

Launch: ``rargen train`` or ``torchrun ... -m rargen train``; see docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen import distributed
from rargen.model import RAR
from rargen.orders import random_order_prob, sample_orders
from rargen.sampling.images import image_grid_hook, run_sample_hook
from rargen.train.recipe import LOGISTICS, TrainConfig, describe_run, format_duration, lr_at
from rargen.train.run_state import (
    MetricsLogger,
    keep_last,
    open_run_folder,
    read_checkpoint,
    read_weights,
    run_folder_lock,
    step_folder,
    write_checkpoint,
    write_final,
)
from rargen.train.start import initial_weights, start_model

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# ------------------------------------------------------------------------------------------------
# Pure helpers


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


# ------------------------------------------------------------------------------------------------
# Data


def open_data(data: Any, batch_size: int, rank: int, world_size: int, seed: int) -> Any:
    """A loader for this rank. ``data`` is a token-store folder or a factory
    ``(batch_size, rank, world_size, seed) -> loader``. A loader iterates over the rest of its epoch
    yielding ``(tokens (B, L) int64, labels (B,) int64)``, has ``state_dict()/load_state_dict()`` and a
    ``store`` with ``codebook_size``, ``num_tokens``, ``num_classes`` (and optionally ``meta``)."""
    if callable(data):
        return data(batch_size, rank, world_size, seed)
    from rargen.data.loader import TokenLoader

    return TokenLoader(data, batch_size, seed=seed, rank=rank, world_size=world_size, prefetch=True)


def _forever(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


def check_run_folder(out: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Validate the output folder before any work; return the checkpoint to resume from, if any
    (its recipe must be this one, up to the ``LOGISTICS`` fields)."""
    newest = open_run_folder(out, resume)
    if newest is None:
        return None
    saved = TrainConfig.from_dict(json.loads((newest / "train_config.json").read_text()))
    differing = [f for f in saved.to_dict() if f not in LOGISTICS and getattr(saved, f) != getattr(config, f)]
    if differing:
        pairs = ", ".join(f"{f}: {getattr(saved, f)!r} saved, {getattr(config, f)!r} now" for f in differing)
        raise ValueError(f"cannot resume {out} with a different recipe ({pairs}); use the saved settings")
    return newest


# ------------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    data: Any,  # token store folder (rargen pretokenize)
    out: str | os.PathLike,  # run folder: checkpoints/, final/, metrics.jsonl
    *,
    resume: bool = False,  # continue from the newest checkpoint in out
    device: str | torch.device | None = None,
    tokenizer: str | os.PathLike | None = None,  # tokenizer folder: draw labelled sample grids
    sample_hook: Callable[[RAR, int, Path], None] | None = None,
    progress: bool = True,  # a progress bar
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
    with contextlib.ExitStack() as held:
        checked: Path | str | None = None
        if env.is_main:  # resume needs a folder all ranks share (one machine, or a network file system)
            try:
                held.enter_context(run_folder_lock(out))  # one process trains a run folder
                checked = check_run_folder(out, config, resume)
            except ValueError as error:
                checked = f"error: {error}"
        checked = distributed.broadcast_object(checked)
        if isinstance(checked, str):
            raise ValueError(checked[len("error: ") :])
        resume_from = checked
        loader = open_data(data, micro, rank, world, config.seed)
        store = loader.store
        mcfg, source = start_model(config, store)
        if store.num_classes and hasattr(store, "labels") and int(store.labels.max()) >= store.num_classes:
            raise ValueError(
                f"the data has labels up to {int(store.labels.max())} but {store.num_classes} classes"
            )
        if sample_hook is None and tokenizer is not None:
            sample_hook = image_grid_hook(tokenizer, store)

        # Model, EMA and optimizer; weights are loaded before wrapping so every sharding sees full tensors.
        torch.manual_seed(config.seed)  # the initial weights: the same on every rank
        raw = RAR(mcfg)
        initial_weights(raw, source if resume_from is None else None)  # resume: the checkpoint's weights
        generator = torch.Generator().manual_seed(config.seed)  # orders + label dropout, same on all ranks
        torch.manual_seed(config.seed * 1_000_003 + rank)  # model dropout, per rank
        state: dict[str, Any] | None = None
        if resume_from is not None:
            record, weights, state = read_checkpoint(resume_from)
            raw.load_state_dict(weights)
        raw.to(env.device)
        ema = None
        if config.ema_decay > 0:
            source = read_weights(resume_from, "ema.safetensors", record) if resume_from else raw.state_dict()
            ema = {
                name: source[name].detach().to(env.device, torch.float32).clone()
                for name, _ in raw.named_parameters()
            }
        if config.activation_checkpointing:
            enable_activation_checkpointing(raw)
        model, shard = distributed.wrap_for_training(
            raw, env, sharding=config.sharding, compile=config.compile
        )
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
        anneal = (config.resolve(config.anneal_start), config.resolve(config.anneal_end), config.r_end)
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

        from rargen.progress import on_terminal

        terminal = on_terminal()  # a log file gets plain lines at log steps, no carriage returns
        bar = tqdm(
            total=config.steps,
            initial=start,
            disable=not (progress and env.is_main and terminal),
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
            orders_all, drop_all = draw_step_randomness(
                generator, config.batch_size, L, r, config.label_dropout
            )
            step_loss = torch.zeros((), device=env.device)
            for j in range(config.grad_accum):
                tokens, labels = next(batches)
                rows = slice((j * world + rank) * micro, (j * world + rank + 1) * micro)
                tokens = tokens.to(env.device, non_blocking=True)
                labels = torch.where(drop_all[rows], null_label, labels).to(env.device, non_blocking=True)
                orders = orders_all[rows].to(env.device, non_blocking=True)
                if step == start and j == 0:
                    raw.check_inputs(tokens, labels, orders)  # one host sync: bad data fails before training
                reduce_now = j == config.grad_accum - 1 or world == 1  # all-reduce on the last only
                with (
                    contextlib.nullcontext()
                    if reduce_now
                    else distributed.no_sync(model, raw, config.sharding)
                ):
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
                    if progress and env.is_main and not terminal:
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
                run_sample_hook(sample_hook, raw, done, out)
            bar.update(1)
            if done == timing_step and env.is_main and progress and done < config.steps:
                per_step = (time.perf_counter() - run_began) / (done - start)
                left = format_duration(per_step * (config.steps - done))
                print(f"expected time: {per_step:.3f} s/step, about {left} to go", flush=True)
        bar.close()
        logger.close()
        if env.is_main:
            write_final(out)
        distributed.barrier()
        return out / "final"


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
    path = step_folder(out, step)
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
        # Class names travel with the weights: `rargen sample` grids and `rargen serve` use them.
        names = list(getattr(getattr(loader, "store", None), "class_names", None) or ())
        extra = {"step": step, "train_config": config.to_dict()} | ({"class_names": names} if names else {})
        write_checkpoint(
            path, raw, train_state, extra=extra, state_dict=weights,
            extra_weights={"ema.safetensors": ema_full} if ema is not None else {},
            files={"train_config.json": json.dumps(config.to_dict(), indent=2) + "\n"},
        )  # fmt: skip
        keep_last(out, config.keep_checkpoints)
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
