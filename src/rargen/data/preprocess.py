"""Image preprocessing for pre-tokenization: the ADM centre crop and the flip / ten-crop variants.

Follows spec §2.5 (the official ``scripts/pretokenization.py``): ADM-style centre crop (BOX halving
while the short side is at least twice the target, then a BICUBIC resize of the short side, then a
centre crop); ``flip`` adds the mirror of that crop; ``ten-crop`` centre-crops to ``int(1.1 * size)``
and takes the four corners and the centre, of the image and of its mirror (torchvision's TenCrop
geometry, written here without torchvision). Images smaller than the target are resized *up* by the
same BICUBIC step.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Augment = Literal["none", "flip", "ten-crop"]
AUGMENTS: tuple[str, ...] = ("none", "flip", "ten-crop")
# ten-crop first centre-crops to this multiple of the target so the corner crops still show most of the image.
TEN_CROP_MARGIN = 1.1


def num_variants(augment: str) -> int:
    """How many token grids each image becomes under ``augment``."""
    counts = {"none": 1, "flip": 2, "ten-crop": 10}
    if augment not in counts:
        raise ValueError(f"augment must be one of {list(AUGMENTS)}, got {augment!r}")
    return counts[augment]


def crop_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a crop given as a side (square) or as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """ADM centre crop of an RGB image to ``size`` x ``size`` (or ``size`` = (height, width): the
    same, scaled to cover both sides; a square is exactly ADM's).

    BOX halving first keeps the final BICUBIC step from aliasing on large photos (it only ever
    shrinks by less than 2x); the final offsets round down, as in ADM.
    """
    height, width = crop_shape(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(width / image.width, height / image.height)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new_size, resample=Image.BICUBIC)
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def five_crop(image: Image.Image, size: int | tuple[int, int]) -> list[Image.Image]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops (torchvision's order and offsets)."""
    (h, w), (width, height) = crop_shape(size), image.size
    if w > width or h > height:
        raise ValueError(f"crop size {size} is larger than the image {width}x{height}")
    # torchvision rounds the centre offset half-to-even (Python's round), not down as ADM does.
    center_left, center_top = int(round((width - w) / 2.0)), int(round((height - h) / 2.0))
    corners = [(0, 0), (width - w, 0), (0, height - h), (width - w, height - h)]
    boxes = [*corners, (center_left, center_top)]
    return [image.crop((left, top, left + w, top + h)) for left, top in boxes]


def image_variants(
    image: Image.Image, size: int | tuple[int, int], augment: str = "none"
) -> list[Image.Image]:
    """The ``num_variants(augment)`` crops of one image, each ``size`` x ``size`` (or (height, width)) RGB.

    Order: ``none`` -> [centre]; ``flip`` -> [centre, mirrored centre]; ``ten-crop`` -> the five
    crops of the image, then the five crops of its mirror.
    """
    num_variants(augment)  # validates augment
    image = image.convert("RGB")
    if augment == "none":
        return [center_crop(image, size)]
    if augment == "flip":
        crop = center_crop(image, size)
        return [crop, crop.transpose(Image.FLIP_LEFT_RIGHT)]
    large = center_crop(image, tuple(int(TEN_CROP_MARGIN * side) for side in crop_shape(size)))
    return five_crop(large, size) + five_crop(large.transpose(Image.FLIP_LEFT_RIGHT), size)


def to_tensor(images: list[Image.Image]) -> Tensor:
    """RGB PIL images -> (N, 3, H, W) float32 in [0, 1] (no normalisation, as the tokenizers expect)."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)
