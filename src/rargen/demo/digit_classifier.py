"""The digit classifier: the embedded digits' stand-in for the Inception network.

Its accuracy on generated digits measures class fidelity; the Fréchet distance of its penultimate
features to the held-out split measures sample quality, through the same statistics code as FID.
It is ``rargen.evaluation.classifier``'s model and recipe under its own checkpoint kind, on the digits'
fixed split (``rargen.data.digits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from rargen.data.digits import load_digit_images
from rargen.evaluation.classifier import (
    ImageClassifier,
    ImageClassifierConfig,
    digit_heldout_stats,
    feature_stats,
    fit_classifier,
)
from rargen.evaluation.metrics import FeatureStats, frechet_distance


@dataclass(frozen=True)
class DigitClassifierConfig(ImageClassifierConfig):
    """The generic classifier's config (``rargen.evaluation.classifier``), RGB, at a size divisible by
    2**stages."""

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
    ours = digit_feature_stats(classifier, images, batch_size).gaussian()
    if reference is None:
        theirs = digit_heldout_stats(classifier, batch_size)
    else:
        theirs = digit_feature_stats(classifier, reference, batch_size).gaussian()
    return frechet_distance(ours, theirs)
