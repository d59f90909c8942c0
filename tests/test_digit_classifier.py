"""The embedded-data metrics: digit classifier accuracy and Fréchet distance in its feature space."""

from __future__ import annotations

import pytest
import torch

import rargen
from rargen.data.digits import load_digit_images
from rargen.demo.digit_classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    digit_feature_stats,
    digit_frechet_distance,
    train_digit_classifier,
)
from rargen.evaluation.classifier import classifier_accuracy
from rargen.evaluation.metrics import frechet_distance


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return train_digit_classifier(DigitClassifierConfig(image_size=32), seed=0)


@pytest.mark.slow
def test_classifier_accuracy_and_feature_distance(classifier, tmp_path):
    heldout, labels = load_digit_images("heldout", 32)
    accuracy = classifier_accuracy(classifier, heldout, labels)
    assert accuracy >= 0.975, accuracy  # measured 0.98-0.99 on the 359 held-out digits
    # Wrong labels are counted as wrong.
    assert classifier_accuracy(classifier, heldout, (labels + 1) % 10) <= 1 - accuracy + 1e-9

    train_images, _ = load_digit_images("train", 32)
    assert abs(digit_frechet_distance(classifier, heldout)) < 1e-6  # a set against itself
    real = digit_frechet_distance(classifier, train_images)
    noise = digit_frechet_distance(
        classifier, torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    )
    blurred = digit_frechet_distance(classifier, torch.nn.functional.avg_pool2d(train_images, 5, 1, 2))
    assert real < blurred < noise  # real digits are closest, degraded ones farther, noise farthest
    # The same streaming statistics as FID: chunked == one shot.
    chunked = digit_feature_stats(classifier, heldout, batch_size=50).gaussian()
    whole = digit_feature_stats(classifier, heldout, batch_size=1000).gaussian()
    assert abs(frechet_distance(chunked, whole)) < 1e-6

    rargen.save(classifier, tmp_path / "clf")
    loaded = rargen.load(tmp_path / "clf")
    assert isinstance(loaded, DigitClassifier) and loaded.config == classifier.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(heldout[:16]), classifier(heldout[:16]), rtol=0, atol=0)


def test_classifier_shapes_and_errors():
    model = DigitClassifier(DigitClassifierConfig(image_size=16, channels=(8, 8), feature_dim=12))
    images = torch.rand(5, 3, 16, 16)
    assert model.features(images).shape == (5, 12) and model(images).shape == (5, 10)
    as_uint8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(as_uint8), model(as_uint8.float() / 255))
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\)"):
        model(torch.rand(5, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        DigitClassifierConfig(image_size=20, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        classifier_accuracy(model, images, torch.zeros(4, dtype=torch.int64))
