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
from torch import Tensor, nn

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
class DigitClassifierConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 32)  # one conv + 2x2 max-pool stage each
    feature_dim: int = 64  # penultimate features (the "pool" of this metric)
    num_classes: int = 10

    def __post_init__(self) -> None:
        # Bounds far above any use, so that a bad config.json is refused before anything is built.
        sizes = {"image_size": (self.image_size, 4096), "feature_dim": (self.feature_dim, 65536)}
        sizes |= {"num_classes": (self.num_classes, 65536), "channels": (len(self.channels), 8)}
        sizes |= {"channel width": (max(self.channels, default=1), 4096)}
        for name, (value, limit) in sizes.items():
            if not 1 <= value <= limit:
                raise ValueError(f"DigitClassifierConfig {name} must be in [1, {limit}], got {value}")
        if self.image_size % (2 ** len(self.channels)) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(channels) = "
                f"{2 ** len(self.channels)}; change image_size or the number of channels"
            )


class DigitClassifier(nn.Module):
    """Small CNN: (conv 3x3 -> ReLU -> max-pool) per stage, then a hidden layer and the logits."""

    checkpoint_kind: ClassVar[str] = "digit-classifier"
    config_class: ClassVar[type] = DigitClassifierConfig

    def __init__(self, config: DigitClassifierConfig = DigitClassifierConfig()):
        super().__init__()
        self.config = config
        stages, cin = [], 3
        for cout in config.channels:
            stages += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = config.image_size // 2 ** len(config.channels)
        self.hidden = nn.Linear(cin * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape (N, 3, {size}, {size}), got {tuple(images.shape)}")
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) images in [0, 1] (or uint8) -> (N, feature_dim) penultimate features."""
        x = self.stages(self._check(images).to(self.head.weight.device) * 2 - 1)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): the only augmentation."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_digit_classifier(
    config: DigitClassifierConfig = DigitClassifierConfig(),
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> DigitClassifier:
    """Train a DigitClassifier on the fixed train split (Adam, cosine LR, random shifts)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = load_digit_images("train", config.image_size)
    model = DigitClassifier(config).train()
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    max_shift = max(1, config.image_size // 16)
    for _ in tqdm(range(epochs), desc="digit classifier", disable=not progress):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            logits = model(_shift(images[index], max_shift, generator))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 256
) -> float:
    """Fraction of ``images`` the classifier assigns to the requested ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    correct = 0
    for start in range(0, len(images), batch_size):
        predicted = classifier(images[start : start + batch_size]).argmax(1).cpu()
        correct += int((predicted == labels[start : start + batch_size].cpu()).sum())
    return correct / len(images)


@torch.no_grad()
def digit_feature_stats(classifier: DigitClassifier, images: Tensor, batch_size: int = 256) -> FeatureStats:
    """Streaming Gaussian statistics of the classifier's penultimate features (as for FID)."""
    stats = FeatureStats(classifier.config.feature_dim)
    for start in range(0, len(images), batch_size):
        stats.update(classifier.features(images[start : start + batch_size]))
    return stats


def digit_frechet_distance(
    classifier: DigitClassifier, images: Tensor, reference: Tensor | None = None, batch_size: int = 256
) -> float:
    """Fréchet distance of ``images`` to ``reference`` (default: held-out real digits) in feature space."""
    if reference is None:
        reference, _ = load_digit_images("heldout", classifier.config.image_size)
    ours = digit_feature_stats(classifier, images, batch_size).gaussian()
    theirs = digit_feature_stats(classifier, reference, batch_size).gaussian()
    return frechet_distance(ours, theirs)
