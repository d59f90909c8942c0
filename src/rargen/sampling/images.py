"""Write sampled images to a folder: PNGs, a labelled grid, an ADM-style ``samples.npz`` and ``meta.json``.

Runs on one process or across ranks under ``torchrun`` (gloo/nccl). Sample ``i`` of a run always
has label ``labels[i]`` and noise from ``sample_seed(seed, i)``, so any rank count and any batch
size give the same image set; fixed-size chunks of samples go to ranks round-robin, every rank
writes its PNGs, and rank 0 gathers them into the npz.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from rargen import distributed
from rargen.model import RAR
from rargen.progress import notice_once, progress_bar
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, class_labels, generate_images, sample_seed
from rargen.sampling.prepared import release_prepared
from rargen.sampling.speculation_policy import DEFAULT_DRAFTS, SpeculationPolicy
from rargen.sampling.speculative import check_speculate
from rargen.tokenizers.base import as_data_images, check_pair, image_channels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, ROUNDED to the nearest level.

    The official code truncates (``(x * 255).to(uint8)``, spec Sec. 7 item 8), which shifts every
    pixel down by half a level on average and biases FID; rounding is the unbiased quantisation.
    """
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_balanced_labels(num_classes: int, per_class: int) -> list[int]:
    """``per_class`` samples of each class, in class order (0, 0, ..., 1, 1, ...)."""
    return [c for c in range(num_classes) for _ in range(per_class)]


# A grid shows at most this many classes (rows) and samples per class (columns); the rest is noted.
GRID_MAX_CLASSES = 32
GRID_MAX_PER_CLASS = 10
GRID_LABEL_WIDTH = 48  # pixels of the left column holding each row's class name, at least
GRID_LABEL_CHARS = 24  # longer class names are shortened to this many characters, ending in "..."


def save_grid(
    images: np.ndarray,
    labels: Sequence[int],
    names: Sequence[str] | None,
    path: Path,
    max_classes: int = GRID_MAX_CLASSES,
    max_per_class: int = GRID_MAX_PER_CLASS,
    label_width: int = GRID_LABEL_WIDTH,
) -> str | None:
    """A grid PNG with one row per class (its name on the left) and that class's samples as columns.

    Every class present in ``labels`` gets a row, in class order, up to ``max_classes`` rows of
    ``max_per_class`` samples (the first ones of each class); a grid of the first 64 images dropped
    whole classes. The label column widens to the longest name shown (names over ``GRID_LABEL_CHARS``
    shortened), where a fixed column cut "astronaut" to "astronau". Returns a note saying what was
    left out, or None when everything is shown.
    """
    labels = [int(label) for label in labels]
    classes = sorted(set(labels))
    shown = classes[:max_classes]
    rows = {c: [i for i, label in enumerate(labels) if label == c][:max_per_class] for c in shown}
    cols = max(len(members) for members in rows.values())
    _, h, w, channels = images.shape
    grey = channels == 1  # a grey grid for grey samples
    texts = {c: _short(names[c] if names and c < len(names) else str(c)) for c in shown}
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_width = max(label_width, *(math.ceil(measure.textlength(t)) + 6 for t in texts.values()))
    grid = Image.new("L" if grey else "RGB", (label_width + cols * w, len(shown) * h), "white")
    draw = ImageDraw.Draw(grid)
    for row, c in enumerate(shown):
        draw.text((2, row * h + max(0, h // 2 - 6)), texts[c], fill="black")
        for col, i in enumerate(rows[c]):
            tile = Image.fromarray(images[i][..., 0] if grey else images[i])
            grid.paste(tile.convert(grid.mode), (label_width + col * w, row * h))
    grid.save(path)
    notes = []
    if len(classes) > len(shown):
        hidden = len(classes) - len(shown)
        notes.append(f"{hidden} of {len(classes)} classes not shown (max {max_classes} rows)")
    if any(labels.count(c) > max_per_class for c in shown):
        notes.append(f"at most {max_per_class} samples per class shown")
    return "; ".join(notes) or None


def _short(name: str) -> str:
    return name if len(name) <= GRID_LABEL_CHARS else name[: GRID_LABEL_CHARS - 3] + "..."


def sample_to_folder(
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    labels: Sequence[int],
    config: SampleConfig,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    batch_size: int = 16,
    bf16: bool = False,
    compile: bool = False,
    speculate: int | None = None,
    quantize: str | None = None,
    progress: bool = True,
) -> Path:
    """Sample one image per entry of ``labels`` into ``out`` and return the npz path (rank 0).
    ``speculate``: draft tokens verified per pass (``rargen.sampling.speculative``; the same
    images) in the batches where a pass measures faster than the plain steps it replaces (small
    batches; ``rargen.sampling.speculation_policy``); None: ``DEFAULT_DRAFTS`` unless compiled; 0 = off;
    ``quantize="int8"``: int8 weights (``rargen.sampling.int8``; faster, inexact)."""
    from rargen.checkpoint import checkpoint_hash, load
    from rargen.version import __version__

    check_speculate(speculate or 0, compile)  # before loading anything
    drafts = DEFAULT_DRAFTS if speculate is None and not compile else speculate or 0
    env = distributed.setup()  # one process, or the torchrun ranks (nccl on GPUs, gloo on CPUs)
    rank, world, device = env.rank, env.world_size, env.device
    model = load(checkpoint).to(device).eval().requires_grad_(False)
    tokenizer = load(tokenizer_path).to(device).eval().requires_grad_(False)
    check_pair(model, tokenizer, checkpoint, tokenizer_path)  # before sampling, not after it
    if bf16:
        model = model.to(torch.bfloat16)
    decoder = prepare_for_decoding(model, bf16=bf16, compile=compile, quantize=quantize)  # once
    policy = SpeculationPolicy(decoder, drafts)
    channels = image_channels(tokenizer)  # 1: grey data, grey PNGs and a (N, H, W, 1) samples.npz
    labels = class_labels(labels, model.config.num_classes)  # before any sampling
    if not labels:
        raise ValueError("no labels: pass at least one class to sample")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chunks = [range(a, min(a + batch_size, len(labels))) for a in range(0, len(labels), batch_size)]
    mine = chunks[rank::world]
    for chunk in progress_bar(mine, desc=f"sampling (rank {rank})", unit="batch", enabled=progress):
        batch_labels = torch.tensor([labels[i] for i in chunk], device=device)
        seeds = [sample_seed(seed, i) for i in chunk]
        rows = len(chunk) * (2 if config.guided else 1)
        k = drafts if policy.speculate(rows, rows) else 0  # measured once per batch size
        images = generate_images(
            decoder, tokenizer, batch_labels, config, seeds=seeds, speculate=k, quantize=quantize
        )
        for i, image in zip(chunk, to_uint8(as_data_images(images, channels)), strict=True):
            picture = Image.fromarray(image)
            (picture.convert("L") if channels == 1 else picture).save(out / "images" / f"{i:06d}.png")
    distributed.barrier()
    npz = out / "samples.npz"
    if rank == 0:
        # samples.npz is (N, H, W, 3) (ADM's layout), or (N, H, W, 1) for a grey tokenizer: the
        # scorers take both (rargen evaluate repeats grey to RGB for the Inception network).
        pngs = [out / "images" / f"{i:06d}.png" for i in range(len(labels))]
        mode = "L" if channels == 1 else "RGB"
        arr = np.stack([np.asarray(Image.open(png).convert(mode)) for png in pngs])
        arr = arr[..., None] if channels == 1 else arr
        np.savez(npz, arr_0=arr, labels=np.asarray(labels, dtype=np.int64))
        names = getattr(model, "checkpoint_extra", {}).get("class_names")
        grid_note = save_grid(arr, labels, names, out / "grid.png")
        if grid_note:  # the same for every folder of a sweep: said once
            notice_once(f"grid.png: {grid_note}")
        meta = {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_hash(checkpoint),
            "tokenizer": str(tokenizer_path),
            "tokenizer_sha256": checkpoint_hash(tokenizer_path),
            "sample_config": dataclasses.asdict(config),
            "seed": seed,
            "num_samples": len(labels),
            "class_names": list(names) if names else None,
            "image_channels": channels,
            "world_size": world,
            "bf16": bf16,
            "compile": compile,
            "speculate": drafts,
            "quantize": quantize,
            "pixels": "rounded: (x * 255).round()",
            "versions": {
                "rargen": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    distributed.barrier()
    return npz


__all__ = ["class_balanced_labels", "sample_to_folder", "save_grid", "to_uint8"]


# ------------------------------------------------------------------------------------------------
# Sample grids during training


def run_sample_hook(hook: Callable, raw: RAR, step: int, out: Path) -> None:
    """Call ``hook(raw, step, out/samples/step-XXXXXXX.png)`` in eval mode without gradients; a
    failing preview is a warning, never the end of a training run."""
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
        release_prepared(raw)  # the next preview sees new weights: no packed copy kept meanwhile


def image_grid_hook(
    tokenizer_path: str | os.PathLike, store: Any, per_class: int = 4, classes: int = 32
) -> Callable:
    """A training sample hook drawing ``per_class`` images of each of the first ``classes`` classes
    (one row each) with the tokenizer the token store was made with (checked)."""
    from rargen.checkpoint import load, state_sha256

    tokenizer = load(tokenizer_path)
    if int(getattr(tokenizer, "codebook_size", store.codebook_size)) != store.codebook_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has codebook size {tokenizer.codebook_size}, the data "
            f"{store.codebook_size}; pass the tokenizer the store was made with"
        )
    expected = ((getattr(store, "meta", None) or {}).get("tokenizer") or {}).get("state_sha256")
    if expected is not None and state_sha256(tokenizer) != expected:
        raise ValueError(f"tokenizer {tokenizer_path} is not the one the token store was made with")
    names = list(getattr(store, "class_names", ())) or None
    channels = image_channels(tokenizer)

    def hook(model: RAR, step: int, path: Path) -> None:
        device = next(model.parameters()).device
        count = min(classes, max(1, model.config.num_classes))
        labels = torch.arange(count, device=device).repeat_interleave(per_class)
        config = SampleConfig(cfg_scale=3.0) if model.config.num_classes else SampleConfig()
        images = generate_images(
            model, tokenizer.to(device), labels, config, torch.Generator(device).manual_seed(step)
        )
        save_grid(to_uint8(as_data_images(images, channels)), labels.tolist(), names, path)

    return hook
