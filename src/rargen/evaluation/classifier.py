"""An image classifier for any labelled source: the scorer of generated samples of your own data.

The digit classifier's recipe (``rargen.data.digits``: a small CNN, Adam, cosine LR, random shifts)
for any labelled image source, size and channel count. ``train_classifier`` holds out a seeded
stratified split, trains on the rest until a validation share of it stops improving
(``rargen.train.gates``) and saves a self-describing checkpoint folder: weights, config (image
size, channels, classes), in ``config.json``'s extra the class names and held-out accuracy, and
the Gaussian statistics of the held-out images' features (``heldout_features.safetensors``).
Samples are then scored without the data: the class accuracy (the fraction classified as the
class asked for) and the Fréchet distance of their features to the held-out images' (as FID, with
this network in place of Inception). ``check_matches`` refuses a classifier whose classes, image
size or channels are not those of the generator being scored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.data.sources import DEFAULT_MAX_PIXELS, open_source, source_image_size
from rargen.data.split import HELDOUT_FRACTION, SPLIT_SEED, SplitImages, split_images
from rargen.evaluation.metrics import FeatureStats, GaussianStats, frechet_distance
from rargen.train.gates import Plateau, copy_weights, gate_report

HELDOUT_STATS_NAME = "heldout_features.safetensors"  # mu and sigma of the held-out features
# The stop's bar: 0.5% less validation loss. At 1% the 64 validation images of issue 27's colour
# folder stopped training at epoch 21-33, still underfit (54% held-out accuracy, against 71-74%
# with this bar, patience 12 and a cap of 100; 70% for a fixed 40 epochs).
MIN_LOSS_GAIN = 0.005


@dataclass(frozen=True)
class ImageClassifierConfig:
    image_size: int = 32
    image_channels: int = 3  # 1 for grey data: RGB input is then averaged to grey
    channels: tuple[int, ...] = (16, 32, 32)  # one conv + 2x2 max-pool stage each
    feature_dim: int = 64  # penultimate features (the "pool" of the Fréchet distance)
    num_classes: int = 10

    def __post_init__(self) -> None:
        # Bounds far above any use, so that a bad config.json is refused before anything is built.
        name = type(self).__name__
        sizes = {"image_size": (self.image_size, 4096), "feature_dim": (self.feature_dim, 65536)}
        sizes |= {"num_classes": (self.num_classes, 65536), "channels": (len(self.channels), 8)}
        sizes |= {"channel width": (max(self.channels, default=1), 4096)}
        for what, (value, limit) in sizes.items():
            if not 1 <= value <= limit:
                raise ValueError(f"{name} {what} must be in [1, {limit}], got {value}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"{name} image_channels must be 1 (grey) or 3 (RGB), got {self.image_channels}")


def _pooled_side(size: int, stages: int) -> int:
    for _ in range(stages):  # MaxPool2d(2, ceil_mode=True): 28 -> 14 -> 7 -> 4
        size = -(-size // 2)
    return size


class ImageClassifier(nn.Module):
    """Small CNN: (conv 3x3 -> ReLU -> max-pool) per stage, then a hidden layer and the logits."""

    checkpoint_kind: ClassVar[str] = "image-classifier"
    config_class: ClassVar[type] = ImageClassifierConfig

    def __init__(self, config: ImageClassifierConfig = ImageClassifierConfig()):
        super().__init__()
        self.config = config
        stages, cin = [], config.image_channels
        for cout in config.channels:
            # ceil_mode: any size works (28 px images too); for sizes divisible by 2**stages it is
            # the plain 2x2 pooling of the digit classifier.
            stages += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = _pooled_side(config.image_size, len(config.channels))
        self.hidden = nn.Linear(cin * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, images: Tensor) -> Tensor:
        size, channels = self.config.image_size, self.config.image_channels
        if channels == 1 and images.ndim == 4 and images.shape[1] == 3:
            images = images.float().mean(dim=1, keepdim=True)  # RGB samples of grey data
        if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"expected images of shape (N, {channels}, {size}, {size}), got {tuple(images.shape)}"
            )
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    def features(self, images: Tensor) -> Tensor:
        """(N, C, S, S) images in [0, 1] (or uint8) -> (N, feature_dim) penultimate features."""
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


def fit_classifier(
    build: Callable[[], ImageClassifier],
    images: Tensor,
    labels: Tensor,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
    desc: str = "classifier",
    gate: tuple[Plateau, Tensor, Tensor] | None = None,
) -> ImageClassifier:
    """Build (after seeding) and train a classifier on ``images`` (Adam, cosine LR, random shifts):
    ``epochs`` of them, or with ``gate`` (a ``Plateau``, validation images and labels) until the
    validation loss after each epoch levels off (``epochs`` the cap), keeping the best epoch."""
    from rargen.progress import progress_bar

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, best = build().train(), None
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    max_shift = max(1, model.config.image_size // 16)
    for epoch in progress_bar(range(epochs), desc=desc, unit="epoch", enabled=progress):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            logits = model(_shift(images[index], max_shift, generator))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if gate is not None:
            with torch.no_grad():  # the loss, not the accuracy: smooth on a few validation images
                loss = float(F.cross_entropy(model.eval()(gate[1]), gate[2]))
            if gate[0].update(-math.log(max(loss, 1e-12)), epoch + 1):
                best = copy_weights(model)
            if gate[0].stop:
                break
            model.train()
    if best is not None:
        model.load_state_dict(best)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(
    classifier: ImageClassifier, images: Tensor, labels: Tensor, batch_size: int = 256
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
def feature_stats(classifier: ImageClassifier, images: Tensor, batch_size: int = 256) -> FeatureStats:
    """Streaming Gaussian statistics of the classifier's penultimate features (as for FID)."""
    stats = FeatureStats(classifier.config.feature_dim)
    for start in range(0, len(images), batch_size):
        stats.update(classifier.features(images[start : start + batch_size]))
    return stats


# ---------------------------------------------------------------------------------------------
# Training on a source, and the checkpoint folder


@dataclass(frozen=True)
class ClassifierTrainConfig:
    image_size: int | None = None  # default: the data's size; give the tokenizer's size to score its samples
    epochs: int = 100  # the cap (patience 0: exactly)
    patience: int = 12  # stop after this many epochs without 0.5% less validation loss (0: a fixed budget)
    validation_fraction: float = 0.1  # share of each class's training images that decides the stop
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0  # initialisation and data order
    heldout_fraction: float = HELDOUT_FRACTION  # share of each class held out (the same in every stage)
    split_seed: int = SPLIT_SEED  # seed of the held-out split (the same in every stage)
    channels: tuple[int, ...] = (16, 32, 32)
    feature_dim: int = 64  # features the Fréchet distance uses

    def __post_init__(self) -> None:
        lowest = {"epochs": 1, "batch_size": 1, "feature_dim": 1, "image_size": 1, "patience": 0}
        for name, low in lowest.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"ClassifierTrainConfig {name} must be >= {low}, got {getattr(self, name)}")
        for name in ("heldout_fraction", "validation_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"ClassifierTrainConfig lr must be positive, got {self.lr}")


def _labelled_images(
    data: str | os.PathLike, config: ClassifierTrainConfig, max_pixels: int | None, log: Callable | None
) -> tuple[SplitImages, int]:
    """``data`` split into train and held-out (``split_images``), and the image size it was read at.
    Labels are needed (at least 2 classes), checked before any image is read; the size defaults to
    the source's own (its first readable image's shorter side; 32 for the digits)."""
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    source = open_source(data, image_size=config.image_size or 32, max_pixels=max_pixels)
    if source.num_classes < 2:
        raise ValueError(
            f"{str(data)!r} has {source.num_classes} class(es); a classifier needs labelled data with at "
            "least 2 classes (a folder of class folders root/<class>/<image>, or an .npz with labels)"
        )
    size = config.image_size or source_image_size(source)
    split = split_images(
        data, size, heldout_fraction=config.heldout_fraction, seed=config.split_seed, purpose="classifier",
        max_pixels=max_pixels, log=log, source=source, listed_in="report.json",
    )  # fmt: skip
    return split, size


def train_classifier(
    data: str | os.PathLike,  # 'digits', a class-folder tree or an .npz with labels
    out: str | os.PathLike,  # classifier folder to write
    config: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    max_pixels: int | None = None,  # skip larger images
    progress: bool = True,  # a progress report
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train a classifier on ``data`` (any ``open_source`` spec with labels) and save it to ``out``.

    Returns the report (also in ``out``'s ``config.json`` extra): class names, image size and
    channels, train/held-out counts, held-out accuracy, the Fréchet distance of the training
    images to the held-out ones (the real-data baseline for samples' scores), skipped files, the
    entries a folder's scan left out (``excluded``), time.
    """
    split, size = _labelled_images(data, config, max_pixels, log)
    return fit_scorer(split, size, out, config, progress=progress, data=str(data))


def fit_scorer(
    split: SplitImages,  # rargen.data.split's training and held-out images
    size: int,  # the image size they were read at
    out: str | os.PathLike,  # classifier folder to write
    config: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    progress: bool = True,
    data: str = "",  # where the images came from, for the report
) -> dict[str, Any]:
    """Train a classifier on ``split``'s training images (stopping on a validation share of them
    unless ``config.patience`` is 0) and save it, with its report, to ``out``: the one way
    ``train-classifier`` and ``rargen demo --data`` train a scorer."""
    from rargen.checkpoint import save
    from rargen.data.split import stratified_split
    from rargen.tokenizers.base import channels_of_images

    began = time.perf_counter()
    train_x, train_y, held_x, held_y, names, skipped, excluded, _ = split
    channels = channels_of_images(torch.cat([train_x, held_x]))
    if channels == 1:
        train_x, held_x = train_x[:, :1].contiguous(), held_x[:, :1].contiguous()
    model_config = ImageClassifierConfig(
        image_size=size, image_channels=channels, channels=config.channels,
        feature_dim=config.feature_dim, num_classes=len(names),
    )  # fmt: skip
    # The stop is decided on a validation share of the training images, so that the held-out
    # accuracy reported (and the scorer's reference) is not the maximum of many looks at it.
    plateau, gate, fit_x, fit_y = Plateau(config.patience, MIN_LOSS_GAIN), None, train_x, train_y
    if config.patience and len(train_x) >= 4:
        fit, check = stratified_split(train_y.numpy(), config.validation_fraction, config.seed + 1)
        fit_x, fit_y, gate = train_x[fit], train_y[fit], (plateau, train_x[check], train_y[check])
    model = fit_classifier(
        lambda: ImageClassifier(model_config), fit_x, fit_y, config.epochs,
        min(config.batch_size, len(fit_x)), config.lr, config.seed, progress, "train-classifier", gate,
    )  # fmt: skip
    held_stats = feature_stats(model, held_x)
    gaussian = held_stats.gaussian() if held_stats.count >= 2 else None
    train_stats = feature_stats(model, train_x).gaussian()
    baseline = None if gaussian is None else frechet_distance(train_stats, gaussian)
    report = {
        "data": data,
        "split": split.split,  # the held-out split (rargen.data.split): evaluate's baselines re-read it
        "class_names": list(names),
        "image_size": size,
        "image_channels": channels,
        "num_train": len(fit_x),
        "num_validation": len(train_x) - len(fit_x),  # decided when to stop
        "num_heldout": len(held_x),
        "heldout_fraction": config.heldout_fraction,
        "seed": config.seed,
        "heldout_accuracy": classifier_accuracy(model, held_x, held_y),
        "train_accuracy": classifier_accuracy(model, fit_x, fit_y),
        "train_vs_heldout_frechet": baseline,
        "skipped": skipped,
        "excluded": list(excluded),  # what the folder scan left out, and why
        "gate": gate_report(plateau, config.epochs),  # when it stopped; -ln(validation loss) per epoch
        "train_config": dataclasses.asdict(config),
        "seconds": round(time.perf_counter() - began, 2),
    }
    stats = {} if gaussian is None else {
        HELDOUT_STATS_NAME: {"mu": torch.from_numpy(gaussian.mu), "sigma": torch.from_numpy(gaussian.sigma),
                             "count": torch.tensor([held_stats.count], dtype=torch.int64)}
    }  # fmt: skip
    save(model, out, extra=report, extra_weights=stats)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------
# Scoring samples


# eq=False: arrays inside; compared by identity (see tests/test_structure.py)
@dataclass(frozen=True, eq=False)
class Scorer:
    """A loaded classifier with what it was trained on: class names and the held-out statistics."""

    classifier: ImageClassifier
    path: str
    class_names: tuple[str, ...]
    heldout: GaussianStats

    @property
    def image_size(self) -> int:
        return self.classifier.config.image_size

    @property
    def image_channels(self) -> int:
        return self.classifier.config.image_channels


def digit_heldout_stats(classifier: ImageClassifier, batch_size: int = 256) -> GaussianStats:
    """The digit classifier's reference: its features' statistics on the digits' fixed held-out split.

    Computed, not stored beside the weights (the digits ship with scikit-learn), by the demo and the
    ablation in memory and by ``load_scorer`` for the demo's ``classifier/`` folder alike.
    """
    from rargen.data.digits import load_digit_images

    heldout, _ = load_digit_images("heldout", classifier.config.image_size)
    return feature_stats(classifier, heldout, batch_size).gaussian()


def load_scorer(path: str | os.PathLike) -> Scorer:
    """A classifier folder (``train-classifier``'s, or the demo's digit classifier) ready to score."""
    from rargen.checkpoint import load, read_record, verify_weights
    from rargen.weight_files import read_weights_file

    path = Path(path)
    model = load(path)
    if not isinstance(model, ImageClassifier):
        raise ValueError(
            f"--classifier {str(path)!r} holds a {type(model).__name__} checkpoint, not an image "
            "classifier; pass a folder written by `rargen train-classifier` (or the demo's classifier/)"
        )
    model = model.eval().requires_grad_(False)
    extra = getattr(model, "checkpoint_extra", {})
    if model.checkpoint_kind == "digit-classifier":  # the demo's: the digits and their held-out split
        from rargen.data.digits import DIGIT_CLASS_NAMES

        names, heldout = DIGIT_CLASS_NAMES, digit_heldout_stats(model)
    else:
        names = tuple(extra.get("class_names") or (str(i) for i in range(model.config.num_classes)))
        stats_file = path / HELDOUT_STATS_NAME
        if not stats_file.is_file():
            raise FileNotFoundError(
                f"--classifier {str(path)!r} has no {HELDOUT_STATS_NAME} (the held-out statistics); "
                "retrain it with `rargen train-classifier`"
            )
        verify_weights(stats_file, read_record(path))
        tensors = read_weights_file(stats_file)
        heldout = GaussianStats(tensors["mu"].double().numpy(), tensors["sigma"].double().numpy())
    return Scorer(model, str(path), tuple(names), heldout)


def check_matches(
    scorer: Scorer,
    *,
    what: str,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    image_channels: int | None = None,
) -> None:
    """Refuse (ValueError naming both values) a classifier that cannot score ``what``'s images.

    Each given value is compared: class names when ``what`` has them (else the class count), the
    image size, the channels (a grey classifier takes RGB samples of grey data; an RGB classifier
    does not take grey ones).
    """
    mine = f"--classifier {scorer.path!r}"
    if class_names and tuple(class_names) != scorer.class_names:
        raise ValueError(
            f"{mine} knows the classes {list(scorer.class_names)[:12]} but {what} has the classes "
            f"{list(class_names)[:12]}; train a classifier on the generator's data (rargen train-classifier)"
        )
    if num_classes is not None and num_classes != len(scorer.class_names):
        raise ValueError(
            f"{mine} has {len(scorer.class_names)} classes but {what} has {num_classes}; train a "
            "classifier on the generator's data (rargen train-classifier)"
        )
    if image_size is not None and image_size != scorer.image_size:
        raise ValueError(
            f"{mine} takes {scorer.image_size} px images but {what} gives {image_size} px; train the "
            f"classifier at {image_size} px (rargen train-classifier --image-size {image_size})"
        )
    if image_channels is not None and scorer.image_channels == 3 and image_channels == 1:
        raise ValueError(
            f"{mine} takes 3-channel (RGB) images but {what} gives 1-channel (grey) ones; train the "
            "classifier on the generator's data (rargen train-classifier)"
        )


def classifier_scores(
    classifier: ImageClassifier, images: Tensor, labels: Tensor, heldout: GaussianStats
) -> dict[str, float]:
    """Class accuracy and Fréchet distance (classifier features, vs ``heldout``) of images
    (N, C, S, S) in [0, 1] generated for ``labels`` (N,).

    The one scoring of samples: in memory (the demo and the ablation, with ``digit_heldout_stats``
    or a ``Scorer``'s statistics) and of a samples.npz (``score_samples``).
    """
    if len(images) < 2:
        raise ValueError(f"scoring needs at least 2 samples for a covariance, got {len(images)}")
    return {
        "class_accuracy": classifier_accuracy(classifier, images, labels),
        "frechet_distance": frechet_distance(feature_stats(classifier, images).gaussian(), heldout),
    }


def read_samples(samples: str | os.PathLike) -> tuple[Tensor, Tensor, dict[str, Any] | None]:
    """(images (N, C, H, W) in [0, 1], labels (N,), the meta.json beside them or None) of a samples.npz."""
    samples = Path(samples)
    if not samples.is_file():
        raise FileNotFoundError(f"no samples .npz at {str(samples)!r}")
    with np.load(samples) as data:
        if "arr_0" not in data or "labels" not in data:
            raise ValueError(
                f"{str(samples)!r} needs arr_0 (images) and labels to be scored by a classifier; "
                f"found {list(data)} (rargen sample writes both)"
            )
        array, labels = data["arr_0"], data["labels"]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(
            f"{str(samples)!r}: arr_0 must be uint8 (N, H, W, 1 or 3), got {array.dtype} {array.shape}"
        )
    meta_file = samples.parent / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    images = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    return images, torch.from_numpy(labels).long().reshape(-1), meta


def score_samples(samples: str | os.PathLike, scorer: Scorer) -> dict[str, Any]:
    """Score a ``samples.npz`` (checked against the classifier first: classes, size, channels)."""
    images, labels, meta = read_samples(samples)
    if len(labels) != len(images):
        raise ValueError(f"{str(samples)!r} has {len(images)} images but {len(labels)} labels")
    names = (meta or {}).get("class_names")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(scorer.class_names)):
        raise ValueError(
            f"{str(samples)!r} has labels up to {int(labels.max())} but --classifier {scorer.path!r} has "
            f"{len(scorer.class_names)} classes; train a classifier on the generator's data"
        )
    if images.shape[2] != images.shape[3]:
        raise ValueError(
            f"{str(samples)!r} holds {images.shape[3]}x{images.shape[2]} images; the classifier takes squares"
        )
    check_matches(
        scorer, what=f"the samples {str(samples)!r}", class_names=names,
        image_size=images.shape[-1], image_channels=images.shape[1],
    )  # fmt: skip
    scores: dict[str, Any] = classifier_scores(scorer.classifier, images, labels, scorer.heldout)
    return scores | {"num_samples": len(images)}
