"""Randomness annealing and order sampling (spec Sec. 2.3)."""

from __future__ import annotations

import pytest
import torch

from rargen.orders import check_orders, random_order_prob, sample_orders


def test_random_order_prob_matches_official_schedule() -> None:
    start, end = 125_000, 187_500
    assert random_order_prob(0, start, end) == 1.0
    assert random_order_prob(start - 1, start, end) == 1.0
    assert random_order_prob(start, start, end) == 1.0
    assert random_order_prob((start + end) // 2, start, end) == pytest.approx(0.5, abs=1e-5)
    assert random_order_prob(end, start, end) == 0.0
    assert random_order_prob(end + 1, start, end) == 0.0
    assert random_order_prob(150_000, start, end) == pytest.approx(1 - 25_000 / 62_500)


def test_random_order_prob_degenerate_windows() -> None:
    # start == end: a step from random to raster at `start` (pure raster when both are 0).
    assert [random_order_prob(s, 0, 0) for s in range(3)] == [0.0, 0.0, 0.0]
    assert [random_order_prob(s, 5, 5) for s in (4, 5, 6)] == [1.0, 0.0, 0.0]


def test_random_order_prob_validates() -> None:
    with pytest.raises(ValueError, match="start"):
        random_order_prob(0, 10, 5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        random_order_prob(0, 5, 10, final=1.5)


def test_random_order_prob_anneals_to_a_floor() -> None:
    """r_end > 0: 1 before the window, linear down to the floor, the floor after it; a floor of 0
    gives the official schedule's values bit for bit (every existing run unchanged)."""
    assert [random_order_prob(s, 10, 20, final=0.25) for s in (0, 10, 15, 20, 21, 99)] == [
        1.0, 1.0, 1.0 - 0.75 * 5 / 10, 0.25, 0.25, 0.25,
    ]  # fmt: skip
    assert [random_order_prob(s, 5, 5, final=0.1) for s in (4, 5, 6)] == [1.0, 0.1, 0.1]
    for step in range(0, 130_000, 997):
        official = 1.0 if step < 1000 else 0.0 if step > 125_000 else 1.0 - (step - 1000) / 124_000
        assert random_order_prob(step, 1000, 125_000, final=0.0) == official


@pytest.mark.parametrize("prob", [0.0, 0.25, 1.0])
def test_sample_orders_fraction_and_permutations(prob: float) -> None:
    generator = torch.Generator().manual_seed(0)
    orders = sample_orders(4000, 16, prob, generator)
    check_orders(orders, 4000, 16)
    permuted = (orders != torch.arange(16)).any(dim=1).float().mean().item()
    # A uniform permutation of 16 is the identity with probability 1/16!, so the permuted
    # fraction estimates prob (binomial standard error <= 0.008).
    assert permuted == pytest.approx(prob, abs=0.03)


def test_sample_orders_deterministic_and_uniform() -> None:
    a = sample_orders(8, 16, 0.5, torch.Generator().manual_seed(7))
    b = sample_orders(8, 16, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    first = sample_orders(20000, 4, 1.0, torch.Generator().manual_seed(1))[:, 0]
    counts = torch.bincount(first, minlength=4).float() / 20000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.015)
