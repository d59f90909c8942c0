"""The embedded dataset: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes).

It ships inside scikit-learn (no download), so the demo and the tests have real data on any
machine. Images are upscaled to RGB squares the tokenizers can work with; the train/held-out
split is fixed (a seeded permutation), so every run and every user sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rargen.classifier import (  # noqa: F401 - classifier_accuracy: the digits' name for it
    ImageClassifier,
    ImageClassifierConfig,
    classifier_accuracy,
    feature_stats,
    fit_classifier,
)
from rargen.metrics import FeatureStats, frechet_distance

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


# ---------------------------------------------------------------------------------------------
# A digit classifier: the embedded-data stand-in for the Inception network. Its accuracy on
# generated digits measures class fidelity; the Fréchet distance of its penultimate features to
# the held-out split measures sample quality, through the same statistics code as FID.


@dataclass(frozen=True)
class DigitClassifierConfig(ImageClassifierConfig):
    """The generic classifier's config (``rargen.classifier``), RGB, at a size divisible by 2**stages."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % (2 ** len(self.channels)) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(channels) = "
                f"{2 ** len(self.channels)}; change image_size or the number of channels"
            )


class DigitClassifier(ImageClassifier):
    """The generic classifier under its own checkpoint kind: the demo's scorer of the digits."""

    checkpoint_kind: ClassVar[str] = "digit-classifier"
    config_class: ClassVar[type] = DigitClassifierConfig


def train_digit_classifier(
    config: DigitClassifierConfig = DigitClassifierConfig(),
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> DigitClassifier:
    """Train a DigitClassifier on the fixed train split (Adam, cosine LR, random shifts)."""
    images, labels = load_digit_images("train", config.image_size)
    build = lambda: DigitClassifier(config)  # noqa: E731 - built after fit_classifier seeds torch
    return fit_classifier(build, images, labels, epochs, batch_size, lr, seed, progress, "digit classifier")


def digit_feature_stats(classifier: DigitClassifier, images: Tensor, batch_size: int = 256) -> FeatureStats:
    """Streaming Gaussian statistics of the classifier's penultimate features (as for FID)."""
    return feature_stats(classifier, images, batch_size)


def digit_frechet_distance(
    classifier: DigitClassifier, images: Tensor, reference: Tensor | None = None, batch_size: int = 256
) -> float:
    """Fréchet distance of ``images`` to ``reference`` (default: held-out real digits) in feature space."""
    if reference is None:
        reference, _ = load_digit_images("heldout", classifier.config.image_size)
    ours = digit_feature_stats(classifier, images, batch_size).gaussian()
    theirs = digit_feature_stats(classifier, reference, batch_size).gaussian()
    return frechet_distance(ours, theirs)
