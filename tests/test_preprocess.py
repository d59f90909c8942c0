"""Crop geometry of the pretokenization transforms, against direct PIL / numpy crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rargen.data.preprocess import center_crop, image_variants, num_variants, to_tensor


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_halves_with_box_then_bicubic_then_crops_the_middle():
    image = _noise(300, 200)
    # Short side 200 >= 2*64: one BOX halving to 150x100 (100 < 128 stops), then BICUBIC to 96x64,
    # then the middle 64 columns start at (96 - 64) // 2 = 16.
    expected = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC).crop((16, 0, 80, 64))
    np.testing.assert_array_equal(np.asarray(center_crop(image, 64)), np.asarray(expected))


def test_center_crop_halves_repeatedly_for_large_images():
    image = _noise(520, 1040)
    # 520 -> 260 -> 130 (130 >= 128 halves once more) -> 65, then BICUBIC 65 -> 64 (65x130 -> 64x128).
    halved = image.resize((260, 520), Image.BOX).resize((130, 260), Image.BOX).resize((65, 130), Image.BOX)
    expected = halved.resize((64, 128), Image.BICUBIC).crop((0, 32, 64, 96))
    np.testing.assert_array_equal(np.asarray(center_crop(image, 64)), np.asarray(expected))


def test_center_crop_upscales_small_images_bicubic():
    image = _noise(20, 30)
    expected = image.resize((64, 96), Image.BICUBIC).crop((0, 16, 64, 80))
    np.testing.assert_array_equal(np.asarray(center_crop(image, 64)), np.asarray(expected))


def test_center_crop_of_an_image_of_the_target_size_is_the_identity():
    image = _noise(32, 32)
    np.testing.assert_array_equal(np.asarray(center_crop(image, 32)), np.asarray(image))


def test_flip_is_the_centre_crop_and_its_mirror():
    image = _noise(50, 40)
    crop, mirror = image_variants(image, 32, "flip")
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(center_crop(image, 32)))
    np.testing.assert_array_equal(np.asarray(mirror), np.asarray(crop)[:, ::-1])


def test_ten_crop_takes_corners_and_centre_of_the_image_and_its_mirror():
    size, large = 256, int(1.1 * 256)  # 281: the ten-crop margin of the official pipeline
    image = _noise(large, large)  # already the 1.1x size, so the first centre crop is the identity
    array = np.asarray(image)
    d, c = large - size, round((large - size) / 2)  # 25, 12 (torchvision rounds 12.5 to even)
    crops = [np.asarray(crop) for crop in image_variants(image, size, "ten-crop")]
    assert len(crops) == num_variants("ten-crop") == 10
    for half, source in enumerate([array, array[:, ::-1]]):
        expected = [
            source[:size, :size],
            source[:size, d : d + size],
            source[d : d + size, :size],
            source[d : d + size, d : d + size],
            source[c : c + size, c : c + size],
        ]
        for k, reference in enumerate(expected):
            np.testing.assert_array_equal(crops[5 * half + k], reference, err_msg=f"crop {5 * half + k}")


def test_ten_crop_first_centre_crops_to_110_percent():
    image = _noise(400, 300)
    crops = image_variants(image, 64, "ten-crop")
    large = np.asarray(center_crop(image, int(1.1 * 64)))  # 70x70
    np.testing.assert_array_equal(np.asarray(crops[0]), large[:64, :64])
    np.testing.assert_array_equal(np.asarray(crops[3]), large[6:, 6:])
    assert all(crop.size == (64, 64) for crop in crops)


def test_to_tensor_scales_to_unit_range_channels_first():
    image = _noise(8, 6)
    tensor = to_tensor([image])
    assert tensor.shape == (1, 3, 6, 8)
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy() * 255, np.asarray(image), atol=1e-4)


def test_unknown_augment_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="ten-crop"):
        num_variants("random-crop")
