"""The embedded dataset: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes).

It ships inside scikit-learn (no download), so the demo and the tests have real data on any
machine. Images are upscaled to RGB squares the tokenizers can work with; the train/held-out
split is fixed (a seeded permutation), so every run and every user sees the same split. The digit
classifier that scores generated digits is ``rargen.demo.digit_classifier``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_CLASS_NAMES = tuple(str(i) for i in range(10))
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0

Split = Literal["train", "heldout", "all"]


def _raw_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install 'rargen[demo]'"
        ) from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


def split_indices(num_images: int, split: Split) -> Tensor:
    """Indices of ``split`` in a fixed seeded permutation (the last 20% are held out)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_heldout = round(num_images * HELDOUT_FRACTION)
    if split == "train":
        return order[: num_images - num_heldout].sort().values
    if split == "heldout":
        return order[num_images - num_heldout :].sort().values
    if split == "all":
        return torch.arange(num_images)
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def upscale(images: Tensor, image_size: int) -> Tensor:
    """(N, 8, 8) grey digits in [0, 1] -> (N, 3, S, S) RGB in [0, 1] (bicubic, clamped)."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the digits are 8x8), got {image_size}")
    x = images[:, None]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def load_digit_images(split: Split = "train", image_size: int = 32) -> tuple[Tensor, Tensor]:
    """Images (N, 3, S, S) float32 in [0, 1] and labels (N,) int64 of one fixed split."""
    images, labels = _raw_digits()
    index = split_indices(len(images), split)
    return upscale(images[index], image_size), labels[index]
