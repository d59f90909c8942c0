"""Edit an image file (``rargen edit``): regenerate its masked part, keep the rest, and write the
edited images, a before/after grid and ``meta.json`` to a folder.

The mask is a picture (white = regenerate) or a named mask (``named_mask``). An image of another
size than the tokenizer's is centre-cropped and resized as ``rargen pretokenize`` does
(``rargen.data.preprocess.center_crop``), and so is its mask. Image ``i`` is drawn with the seed
``sample_seed(seed, i)``, as ``rargen sample`` and the web server draw theirs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from rargen.data.preprocess import center_crop, to_tensor
from rargen.sampling.engine import SampleConfig, sample_seed
from rargen.sampling.images import to_uint8
from rargen.sampling.inpaint import inpaint_codes
from rargen.tokenizers.base import as_data_images, check_pair, codes_from_sequence, image_channels

MASK_NAMES = ("bottom-half", "top-half", "left-half", "right-half", "centre", "border")
OVERLAY = (230, 40, 40)  # the colour the grid tints the regenerated cells with


def named_mask(name: str, height: int, width: int) -> Tensor:
    """The named mask (H, W) bool, True = regenerate: a half of the image, ``centre`` (the middle
    box of half the height and width: inpainting) or ``border`` (all but that box: outpainting)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    top, left = height // 4, width // 4
    boxes = {
        "bottom-half": (height // 2, height, 0, width), "top-half": (0, height // 2, 0, width),
        "left-half": (0, height, 0, width // 2), "right-half": (0, height, width // 2, width),
        "centre": (top, height - top, left, width - left), "border": (top, height - top, left, width - left),
    }  # fmt: skip
    if name not in boxes:
        raise ValueError(f"unknown mask name {name!r}; pass a mask image or one of {', '.join(MASK_NAMES)}")
    y0, y1, x0, x1 = boxes[name]
    mask[y0:y1, x0:x1] = True
    return ~mask if name == "border" else mask


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except UnidentifiedImageError:
        raise ValueError(f"{what} {os.fspath(path)!r} is not an image PIL can read (PNG, JPEG...)") from None


def read_image_and_mask(image: str | os.PathLike, mask: str, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The picture (3, H, W) float in [0, 1] and its mask (H, W) bool (True = regenerate): a named
    mask, or a mask image of the picture's size (white, >= 128 of 255, = regenerate), both
    centre-cropped and resized alike (a square ``size``; other sizes must be given exactly)."""
    (height, side), picture = size, _open(image, "image").convert("RGB")
    if height != side and picture.size != (side, height):
        raise ValueError(
            f"the model makes {side}x{height} images but {os.fspath(image)!r} is {picture.width}x"
            f"{picture.height}; crop and resize it to {side}x{height} (width x height) first"
        )
    if mask in MASK_NAMES or not Path(mask).exists() and not any(c in mask for c in "./\\"):
        pixels = named_mask(mask, height, side)  # a name: drawn at the final size (no resampling)
    else:
        drawn = _open(mask, "mask").convert("L")
        if drawn.size != picture.size:
            raise ValueError(
                f"the mask {mask!r} is {drawn.width}x{drawn.height} but the image is {picture.width}x"
                f"{picture.height}; draw the mask at the image's size (white = regenerate)"
            )
        drawn = drawn if drawn.size == (side, height) else center_crop(drawn, side)
        pixels = torch.from_numpy(np.asarray(drawn) >= 128)
    picture = picture if picture.size == (side, height) else center_crop(picture, side)
    return to_tensor([picture])[0], pixels


def save_edit_grid(original: np.ndarray, cells: Tensor, results: np.ndarray, path: Path) -> None:
    """One row: the original (H, W, 3) uint8, it with the regenerated ``cells`` (h, w) bool tinted,
    then the ``results`` (N, H, W, 3)."""
    H, W, _ = original.shape
    h, w = cells.shape
    covered = cells.repeat_interleave(H // h, 0).repeat_interleave(W // w, 1).numpy()[..., None]
    tinted = np.where(covered, (original * 0.45 + np.asarray(OVERLAY) * 0.55).round(), original)
    tiles = [original, tinted.astype(np.uint8), *results]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def edit_to_folder(
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    image: Path,  # the picture to edit; another size than the tokenizer's is centre-cropped and resized
    mask: str,  # mask image (white = regenerate) or bottom-half/top-half/left-half/right-half/centre/border
    label: int,  # the class to draw the regenerated part as
    config: SampleConfig,
    out: Path,  # output folder: images/000000.png ..., grid.png (original, mask, results), meta.json
    *,
    count: int = 1,  # edited images, each from its own seed
    seed: int = 0,
    order: Literal["raster", "random"] = "raster",  # of the regenerated cells: raster among them, or random
    bf16: bool = False,
    device: str = "cpu",
) -> list[Path]:
    """Regenerate the masked part of ``image`` ``count`` times into ``out``; returns the PNG paths.
    The kept cells' codes come back unchanged (``rargen.sampling.inpaint.inpaint_codes``)."""
    from rargen.checkpoint import checkpoint_hash, load
    from rargen.version import __version__

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    model = load(checkpoint, device=device).eval().requires_grad_(False)
    tokenizer = load(tokenizer_path, device=device).eval().requires_grad_(False)
    check_pair(model, tokenizer, checkpoint, tokenizer_path)
    probe = torch.zeros(1, model.config.num_image_tokens, dtype=torch.int64, device=device)
    with torch.inference_mode():  # the image size the tokenizer decodes the generator's tokens to
        size = tuple(tokenizer.decode(codes_from_sequence(tokenizer, probe, model.config.grid)).shape[-2:])
    picture, pixels = read_image_and_mask(image, mask, size)
    if not pixels.any():
        raise ValueError(f"the mask {mask!r} marks nothing to regenerate; paint white what should change")
    if bf16:
        model = model.to(torch.bfloat16)
    images, masks = picture[None].expand(count, -1, -1, -1), pixels[None].expand(count, -1, -1)
    seeds = [sample_seed(seed, i) for i in range(count)]
    _, tokens, regenerate = inpaint_codes(
        model, tokenizer, images, masks, [label] * count, config, seeds=seeds, order=order, bf16=bf16
    )
    channels = image_channels(tokenizer)
    with torch.inference_mode():
        decoded = (
            tokenizer.decode(codes_from_sequence(tokenizer, tokens, model.config.grid)).float().clamp(0, 1)
        )
    results = to_uint8(as_data_images(decoded, channels))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = [out / "images" / f"{i:06d}.png" for i in range(count)]
    for path, pixels_out in zip(paths, results, strict=True):
        picture_out = Image.fromarray(pixels_out)
        (picture_out.convert("L") if channels == 1 else picture_out).save(path)
    h, w = tokenizer.grid_shape(*size)
    original = to_uint8(as_data_images(picture[None], channels))[0]
    save_edit_grid(original, regenerate[0].view(h, w).cpu(), results, out / "grid.png")
    names = getattr(model, "checkpoint_extra", {}).get("class_names")
    meta = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_hash(checkpoint),
        "tokenizer": str(tokenizer_path), "tokenizer_sha256": checkpoint_hash(tokenizer_path),
        "image": str(image), "mask": str(mask), "label": label,
        "class_name": names[label] if names and 0 <= label < len(names) else None,
        "regenerated_cells": int(regenerate[0].sum()), "cells": h * w,
        "image_size": size[1] if size[0] == size[1] else list(size),
        "sample_config": dataclasses.asdict(config), "seed": seed, "count": count, "order": order,
        "bf16": bf16, "pixels": "rounded: (x * 255).round()",
        "versions": {"rargen": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths


__all__ = ["MASK_NAMES", "edit_to_folder", "named_mask", "read_image_and_mask", "save_edit_grid"]
