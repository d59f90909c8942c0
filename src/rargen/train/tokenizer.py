"""Train the small ``VQTokenizer`` on your own images: reconstruction + VQ losses, exact resume.

No perceptual or adversarial networks (nothing to download): L2 or L1 reconstruction plus the
codebook/commitment loss, AdamW with warm-up and cosine decay, dead-code restarts. The batch
order and the restart randomness are pure functions of ``(seed, step)``, so a checkpoint is the
model, the optimizer and the step; resuming gives bit-identical weights on CPU.

Output folder: ``tokenizer/`` (a ``rargen.load``-able checkpoint plus ``train_state.pt``, written
atomically), ``samples/recon_XXXXXX.png`` (top row originals, bottom row reconstructions) and
``report.json`` (held-out PSNR, codebook usage, perplexity, the gate, the classifier's recognition).

A quality gate (``rargen.train.gates``), not a fixed budget: the held-out PSNR is measured every
``eval_every`` steps and training stops after ``patience`` measurements without a gain of
``min_gain_db``, ``steps`` being the cap; the checkpoint's weights are the best measured (the
current ones, for the resume, are in ``train_state.pt``). ``patience`` 0 is the old fixed budget
(``steps`` exactly, the last weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rargen.checkpoint import config_from_dict, read_record, remove_stale_temporaries
from rargen.data.sources import DEFAULT_MAX_PIXELS
from rargen.data.split import HELDOUT_FRACTION, SPLIT_SEED, SplitImages, check_same_split, split_images
from rargen.tokenizers.base import channels_of_images
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig
from rargen.train.gates import Plateau, copy_weights, gate_report, tokenizer_verdict
from rargen.train.run_state import TRAIN_STATE, read_checkpoint, run_folder_lock, write_checkpoint

CHECKPOINT_DIR = "tokenizer"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class TokenizerTrainConfig:
    steps: int = 2000  # the cap (patience 0: exactly); issue 27's colour folder: 16.8 dB at 300, 24.6 at 1200
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    recon_loss: Literal["l2", "l1"] = "l2"
    seed: int = 0  # initialisation and data-order seed
    heldout_fraction: float = HELDOUT_FRACTION  # share of each class held out (the same in every stage)
    split_seed: int = SPLIT_SEED  # seed of the held-out split (the same in every stage)
    restart_every: int = 25  # check for dead codes every this many steps ...
    restart_until: float = 0.9  # ... during this fraction of training (let the last codes settle)
    log_every: int = 25
    sample_every: int = 100  # reconstruction grid PNG (0: only at the end)
    checkpoint_every: int = 100  # (0: only at the end)
    eval_every: int = 100  # held-out PSNR every this many steps: the gate
    patience: int = 3  # stop after this many evaluations without a gain of min_gain_db (0: a fixed budget)
    min_gain_db: float = 0.1  # a held-out PSNR gain (dB) smaller than this is no gain

    def __post_init__(self) -> None:
        if self.patience < 0 or self.min_gain_db < 0:
            raise ValueError(
                f"patience and min_gain_db must be >= 0, got {self.patience}, {self.min_gain_db}"
            )
        for name in ("steps", "batch_size", "restart_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.recon_loss not in ("l2", "l1"):
            raise ValueError(f"recon_loss must be 'l2' or 'l1', got {self.recon_loss!r}")


# --------------------------------------------------------------------------- data


def load_training_images(
    data: str | os.PathLike,
    image_size: int,
    *,
    heldout_fraction: float = HELDOUT_FRACTION,
    seed: int = SPLIT_SEED,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] | None = print,
) -> SplitImages:
    """The train and held-out images (N, 3, S, S) float32 in [0, 1] of any ``open_source`` spec, with
    labels and the split's record: ``rargen.data.split.split_images``, the split every stage shares
    (the digits' own for ``"digits"``; images centre-cropped to ``image_size`` as ``pretokenize``
    does, skipped files reported through ``log``). Contiguous copies: the layout the tokenizer has
    always trained on.
    """
    split = split_images(
        data, image_size, heldout_fraction=heldout_fraction, seed=seed, purpose="tokenizer",
        max_pixels=max_pixels, log=log,
    )  # fmt: skip
    return split._replace(train_images=split.train_images.contiguous(),
                          heldout_images=split.heldout_images.contiguous())  # fmt: skip


def batch_indices(num_images: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of batch ``step``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // num_images
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        mask = epochs == epoch
        out[mask] = order[positions[mask] % num_images]
    return out


def learning_rate(step: int, config: TokenizerTrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_tokenizer(model: VQTokenizer, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """Held-out PSNR (mean over images, peak 1.0), codebook usage fraction and code perplexity."""
    psnrs, counts = [], torch.zeros(model.codebook_size, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        codes = model.encode(x)
        recon = model.decode(codes)
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10.0 * torch.log10(1.0 / mse))
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "num_images": len(images),
    }


def preview_indices(labels: Tensor, count: int = 16, most: int = 64) -> Tensor:
    """Which held-out images (of ``labels``) a reconstruction grid shows: one of each class in turn
    (every class, up to ``most``), at least ``count`` in all. The first 16 showed 2 of 8 classes."""
    ranks = torch.zeros(len(labels), dtype=torch.int64)  # an image's place among its class's images
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        ranks[members] = torch.arange(len(members))
    order = sorted(range(len(labels)), key=lambda i: (int(ranks[i]), int(labels[i])))
    wanted = min(len(labels), max(count, min(most, len(labels.unique()))))
    return torch.tensor(order[:wanted], dtype=torch.int64)


@torch.no_grad()
def recognition(
    classifier: str | os.PathLike, model: VQTokenizer, split: SplitImages, channels: int
) -> dict[str, Any]:
    """How often ``classifier`` (a ``train-classifier`` folder, or the demo's digit classifier) gives
    the real held-out images, and the tokenizer's reconstructions of them, their class: the
    reconstructions' rate is the ceiling for any generator on these codes."""
    from rargen.evaluation.classifier import check_matches, classifier_accuracy, load_scorer
    from rargen.tokenizers.base import as_data_images

    scorer, images, labels = load_scorer(classifier), split.heldout_images, split.heldout_labels
    check_matches(scorer, what="the tokenizer's data", class_names=split.class_names or None,
                  image_size=images.shape[-1], image_channels=channels)  # fmt: skip
    rebuilt = torch.cat([as_data_images(model.decode(model.encode(x)), channels) for x in images.split(256)])
    real, recognised = (classifier_accuracy(scorer.classifier, x, labels) for x in (images, rebuilt))
    return {
        "classifier": str(classifier),
        "num_images": len(images),
        "real_accuracy": real,
        "reconstruction_accuracy": recognised,
        "relative": recognised / real if real else None,
    }


def save_reconstruction_grid(model: VQTokenizer, images: Tensor, path: Path) -> None:
    """PNG with the originals on the top row and their reconstructions below (``preview_indices``)."""
    from PIL import Image

    recon = model.decode(model.encode(images))
    rows = [torch.cat(list(row), dim=2) for row in (images, recon)]  # (3, S, n*S) each
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    path: Path,
    model: VQTokenizer,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TokenizerTrainConfig,
    channels: int = 3,
    split: dict[str, Any] | None = None,
    plateau: Plateau | None = None,
    best: dict[str, Tensor] | None = None,
) -> None:
    """The model's weights are the best measured (``best``; the current ones before any measurement),
    what ``rargen.load`` gives; the current weights and the gate's state go in ``train_state.pt``."""
    extra = {"step": step, "train_config": dataclasses.asdict(config), "image_channels": channels}
    extra["split"] = split  # the held-out split (rargen.data.split): pretokenize checks its own against it
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    if plateau is not None:
        extra["best_step"] = plateau.best_at or step
        state |= {"weights": copy_weights(model), "plateau": plateau.state()}
    write_checkpoint(path, model, state, extra=extra, state_dict=best)


def _load_checkpoint(path: Path) -> tuple[VQTokenizer, dict[str, Any], dict[str, Tensor]]:
    """(the model with the weights to go on from, the training state, the checkpoint's weights)."""
    if read_record(path)["kind"] != VQTokenizer.checkpoint_kind:  # before reading any weights
        raise ValueError(
            f"{path} holds a {read_record(path)['kind']!r} checkpoint, not a VQ tokenizer training run"
        )
    record, weights, state = read_checkpoint(path, map_location="cpu")
    model = VQTokenizer(config_from_dict(VQTokenizerConfig, record["config"], str(path / "config.json")))
    model.load_state_dict(state.get("weights", weights), strict=True)
    return model, state, weights


# --------------------------------------------------------------------------- training


def train_tokenizer(
    out_dir: str | os.PathLike,  # output folder
    data: str | os.PathLike | tuple[Tensor, Tensor] = "digits",  # digits, an image folder or an .npz
    *,
    model_config: VQTokenizerConfig | None = None,
    train_config: TokenizerTrainConfig | None = None,
    resume: bool = False,  # continue the run in out_dir (exact)
    progress: bool = True,  # a progress bar
    stop_after: int | None = None,
    classifier: str | os.PathLike | None = None,  # a train-classifier folder: how it sees reconstructions
) -> dict[str, Any]:
    """Train a ``VQTokenizer`` into ``out_dir`` and return the held-out report (also ``report.json``).

    ``data`` is ``"digits"``, an image folder or ``.npz`` (see ``load_training_images``) or a
    ``(train, heldout)`` pair of (N, 3, S, S) image tensors in [0, 1]. With ``resume`` the run
    continues from ``out_dir/tokenizer`` (its model config wins; ``model_config`` must then be
    None or equal) up to ``train_config.steps``. ``stop_after`` ends the run (with a checkpoint)
    after that many steps of the same schedule, as an interruption would. ``report["verdict"]`` is
    what a newcomer reads (``tokenizer_verdict``): the held-out PSNR and, with ``classifier``, how
    often the classifier recognises the reconstructions against the real images.
    """
    from tqdm import tqdm

    from rargen.progress import on_terminal

    train_config = train_config or TokenizerTrainConfig()
    out_dir = Path(out_dir)
    with run_folder_lock(out_dir):  # one process trains a run folder (its temporaries are its own)
        ckpt_path = out_dir / CHECKPOINT_DIR
        remove_stale_temporaries(out_dir)  # half-written checkpoints of a killed run
        if resume:
            if not (ckpt_path / TRAIN_STATE).exists():
                raise FileNotFoundError(f"nothing to resume: {str(ckpt_path)!r} has no {TRAIN_STATE}")
            model, state, saved = _load_checkpoint(ckpt_path)
            if model_config is not None and model_config != model.config:
                raise ValueError(
                    f"--resume: the checkpoint's model config {model.config} differs from the requested "
                    f"{model_config}; drop the model flags or train into a new --out"
                )
            start_step, gate_state = int(state["step"]), state.get("plateau")
            # The loop draws nothing from the global generator; restored for code that wraps it.
            torch.set_rng_state(state["torch_rng"])
        else:
            if ckpt_path.exists():
                raise ValueError(
                    f"{str(ckpt_path)!r} already holds a training run; pass --resume to continue it "
                    "or choose another --out"
                )
            model_config = model_config or VQTokenizerConfig.from_name("vq-digits")
            torch.manual_seed(train_config.seed)
            model, state, saved, start_step, gate_state = VQTokenizer(model_config), None, None, 0, None
        config = model.config

        split = None  # images given in memory: split by the caller
        if isinstance(data, tuple):
            train_images, heldout_images = data
            split = SplitImages(train_images, None, heldout_images, None, (), [], (), None)
        else:
            split = load_training_images(
                data, config.image_size, heldout_fraction=train_config.heldout_fraction,
                seed=train_config.split_seed,
            )  # fmt: skip
            train_images, heldout_images = split.train_images, split.heldout_images
        if resume and split.split is not None:
            recorded = read_record(ckpt_path)["extra"].get("split")
            check_same_split(recorded, f"the run in {str(out_dir)!r}", split.split, "the data given now")
        for name, images in (("train", train_images), ("heldout", heldout_images)):
            if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
                raise ValueError(
                    f"{name} images must be a non-empty (N, 3, S, S) tensor, got {tuple(images.shape)}"
                )
            model.grid_shape(images.shape[2], images.shape[3])  # raises for sizes the model cannot tile
        labels = split.heldout_labels
        if classifier is not None and labels is None:
            raise ValueError("--classifier needs labelled data (class folders, an .npz with labels, digits)")
        preview = heldout_images[:16] if labels is None else heldout_images[preview_indices(labels)]
        channels = channels_of_images(train_images)
        plateau = Plateau(train_config.patience, train_config.min_gain_db)
        if gate_state is not None:  # the measurements so far, under this run's patience and gain
            plateau = Plateau.from_state(
                {**gate_state, "patience": plateau.patience, "min_gain": plateau.min_gain}
            )
        # The best weights so far: the checkpoint's (when one was measured), else none yet.
        best = saved if gate_state is not None and plateau.history else None

        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            (decay if parameter.ndim > 1 and "embedding" not in name else no_decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train_config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train_config.lr,
            betas=(0.9, 0.99),
        )
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        # Channels-last speeds up the CPU convolutions of this net by about 1.5x.
        model.to(memory_format=torch.channels_last).train()
        recon_fn = F.mse_loss if train_config.recon_loss == "l2" else F.l1_loss

        running = torch.zeros(3)  # recon, vq, count (summed on the device, read at log steps only)
        bar = tqdm(
            range(start_step, train_config.steps),
            initial=start_step,
            total=train_config.steps,
            disable=not (progress and on_terminal()),  # plain lines at log steps in a log file (below)
            desc="tokenizer",
        )
        end = train_config.steps if stop_after is None else min(stop_after, train_config.steps)
        for step in bar:
            if step >= end or plateau.stop:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, train_config)
            x = train_images[
                batch_indices(len(train_images), train_config.batch_size, step, train_config.seed)
            ]
            x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            recon_loss = recon_fn(out.reconstruction, x)
            loss = recon_loss + out.vq_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.quantizer.update_usage(out.codes)
            done = step + 1
            if (
                done % train_config.restart_every == 0
                and done <= train_config.restart_until * train_config.steps
            ):
                generator = torch.Generator().manual_seed(train_config.seed * 100_003 + step)
                model.quantizer.restart_dead_codes(out.latents, generator)
            running += torch.stack([recon_loss.detach(), out.vq_loss.detach(), torch.tensor(1.0)])
            if done % train_config.log_every == 0:
                recon_avg, vq_avg, n = running.tolist()
                bar.set_postfix(recon=f"{recon_avg / n:.4f}", vq=f"{vq_avg / n:.4f}")
                if progress and bar.disable:
                    losses = f"recon {recon_avg / n:.4f} vq {vq_avg / n:.4f}"
                    print(f"tokenizer step {done}/{train_config.steps} {losses}", flush=True)
                running.zero_()
            if train_config.patience and (done % train_config.eval_every == 0 or done == train_config.steps):
                model.eval()  # the gate: held-out PSNR, the best weights kept
                if plateau.update(evaluate_tokenizer(model, heldout_images)["psnr"], done):
                    best = copy_weights(model)
                model.train()
            last = done == end or plateau.stop
            if (train_config.sample_every and done % train_config.sample_every == 0) or last:
                model.eval()
                save_reconstruction_grid(model, preview, out_dir / "samples" / f"recon_{done:06d}.png")
                model.train()
            if (train_config.checkpoint_every and done % train_config.checkpoint_every == 0) or last:
                gated = plateau if train_config.patience else None
                _save_checkpoint(
                    ckpt_path, model, optimizer, done, train_config, channels, split.split, gated, best
                )

        if best is not None:
            model.load_state_dict(best)  # the report is of the checkpoint's weights: the best measured
        model.eval()
        report = {
            "heldout": evaluate_tokenizer(model, heldout_images),
            "train_subset": evaluate_tokenizer(model, train_images[:512]),
            "steps": max(start_step, end) if not plateau.stop else plateau.history[-1][0],
            "gate": gate_report(plateau, train_config.steps),
            "image_channels": channels,
            "model_config": dataclasses.asdict(config),
            "train_config": dataclasses.asdict(train_config),
            "checkpoint": str(ckpt_path),
            "split": split.split,
        }
        if classifier is not None:
            report["recognition"] = recognition(classifier, model, split, channels)
        report["verdict"] = tokenizer_verdict(report)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        return report
