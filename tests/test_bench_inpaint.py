"""The pieces of benchmarks/bench_inpaint.py that are more than calls into rargen: its masks, the
orders it scores in, and its NLL of the unknown tokens given the known ones (float64, against the
model's own forward in that order). No training: a tiny random-weight model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_benchmark
from rargen.model import RAR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_inpaint")


def test_masks_regenerate_the_cells_they_name(bench) -> None:
    masks = {name: make().reshape(8, 8) for name, make in bench.MASKS.items()}
    assert {name: int(m.sum()) for name, m in masks.items()} == {
        "bottom-half": 32, "top-half": 32, "left-half": 32, "centre": 16, "border": 48,
    }  # fmt: skip
    assert masks["bottom-half"][4:].all() and not masks["bottom-half"][:4].any()
    assert torch.equal(masks["top-half"], ~masks["bottom-half"])
    assert masks["left-half"][:, :4].all() and not masks["left-half"][:, 4:].any()
    assert masks["centre"][2:6, 2:6].all() and torch.equal(masks["border"], ~masks["centre"])


def test_random_half_is_half_of_each_image_and_its_own(bench) -> None:
    """32 of 64 cells per image, different across images, and image i's cells do not depend on how
    many images are asked for (the picture and the scores see the same masks)."""
    masks = bench.grid_mask("random-half", 50)
    assert masks.shape == (50, 64) and (masks.sum(dim=1) == 32).all()
    assert len({tuple(row.tolist()) for row in masks}) == 50
    assert torch.equal(bench.grid_mask("random-half", 7), masks[:7])


def test_pixel_masks_cover_each_cell_with_its_square(bench) -> None:
    cells = bench.grid_mask("random-half", 3)
    pixels = bench.pixel_masks(cells)
    assert pixels.shape == (3, 32, 32)
    for image in range(3):
        for cell in range(64):
            row, column = divmod(cell, 8)
            square = pixels[image, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
            assert bool(square.all()) if cells[image, cell] else not bool(square.any())


@pytest.mark.parametrize("order", ["raster", "random"])
def test_completion_orders_put_the_known_positions_first(bench, order) -> None:
    known_mask = torch.rand(5, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    orders = bench.completion_orders(known_mask, order, torch.Generator().manual_seed(1))
    for known, row in zip(known_mask, orders, strict=True):
        count = int(known.sum())
        assert torch.equal(row[:count], known.nonzero()[:, 0])  # known: raster, as generate feeds them
        unknown = (~known).nonzero()[:, 0]
        assert torch.equal(row[count:].sort().values, unknown)
        if order == "raster":
            assert torch.equal(row[count:], unknown)


def test_unknown_nll_is_the_forward_in_that_order(bench, tiny_model: RAR) -> None:
    """float64: the summed bits of the unknown steps equal -log2 softmax of RAR.forward(orders)."""
    L, generator = 16, torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 32, (4, L), generator=generator)
    labels = torch.tensor([1, 7, 7, 0])
    known_mask = torch.rand(4, L, generator=generator) < 0.5
    known_mask[3] = False  # nothing known: the whole image in that order
    orders = bench.completion_orders(known_mask, "random", generator)
    bits = bench.unknown_nll_bits(tiny_model, tokens, labels, known_mask, orders)
    with torch.no_grad():
        log_probs = tiny_model(tokens, labels, orders).log_softmax(-1)  # step i predicts tokens[orders[i]]
    step_bits = -log_probs.gather(2, tokens.gather(1, orders)[..., None])[..., 0] / math.log(2)
    expected = (step_bits * ~known_mask.gather(1, orders)).sum(dim=1)
    torch.testing.assert_close(bits, expected, rtol=0, atol=1e-10)


def test_bottom_half_in_raster_order_is_the_tail_of_plain_raster_nll(bench, tiny_model: RAR) -> None:
    """Completing the bottom from the top in raster order asks exactly the raster order's last steps."""
    L = 16
    tokens = torch.randint(0, 32, (3, L), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 5, 9])
    known_mask = torch.arange(L).expand(3, L) < L // 2
    orders = bench.completion_orders(known_mask, "raster", torch.Generator())
    assert torch.equal(orders, torch.arange(L).expand(3, L))
    with torch.no_grad():
        log_probs = tiny_model(tokens, labels).log_softmax(-1)
    tail = -log_probs.gather(2, tokens[..., None])[:, L // 2 :, 0].sum(dim=1) / math.log(2)
    bits = bench.unknown_nll_bits(tiny_model, tokens, labels, known_mask, orders)
    torch.testing.assert_close(bits, tail, rtol=0, atol=1e-10)
