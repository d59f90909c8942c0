"""Generation orders and the randomness-annealing schedule (RAR paper Sec. 3.2, Eq. 5).

During training each sequence is factorised in a uniformly random order with probability ``r``
and in raster order otherwise; ``r`` anneals linearly from 1 to 0 between two optimizer steps (or
to a floor ``final`` > 0, so that a model keeps its any-order skill for inpainting).
The randomness is drawn here, by the caller, from an explicit ``torch.Generator``: the model's
``forward`` only consumes the resulting ``orders``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_order_prob(step: int, start: int, end: int, final: float = 0.0) -> float:
    """Probability ``r`` that a sequence uses a random order at optimizer step ``step``.

    ``r = 1`` before ``start``, ``final`` after ``end`` and linear in between; with ``final = 0``
    exactly the official schedule (steps are 0-based counts of optimizer steps already taken).
    With ``start == end`` the schedule is a step from 1 to ``final`` at ``start`` (where the
    official formula divides by zero), so ``start = end = 0`` is raster-only training and
    ``start = end = steps`` is random-order training throughout (paper Table 2, "0/0" and
    "400/400"). ``final > 0`` keeps some random orders to the end: the model keeps some of its
    any-order skill (inpainting other than completing the bottom from the top).
    """
    if start < 0 or end < start:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"the final random-order probability must be in [0, 1], got {final}")
    if step < start:
        return 1.0
    if step > end or end == start:
        return final
    # (1 - final) * x is x itself when final = 0: the official schedule's values, bit for bit.
    return 1.0 - (1.0 - final) * (step - start) / (end - start)


def raster_orders(batch_size: int, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """(B, L) int64: the raster (row-major) order ``0 .. L-1`` for every row."""
    return torch.arange(num_tokens, device=device).expand(batch_size, num_tokens).contiguous()


def sample_orders(
    batch_size: int,
    num_tokens: int,
    random_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, L) int64 orders: each row a uniform random permutation with probability
    ``random_prob``, else the raster order. Vectorised; all randomness from ``generator``.

    The coin flips and the permutations are drawn on the CPU (the generator's device) and then
    moved, so a seed gives the same orders on every device.
    """
    if not 0.0 <= random_prob <= 1.0:
        raise ValueError(f"random_prob must be in [0, 1], got {random_prob}")
    use_random = torch.rand(batch_size, generator=generator) < random_prob  # (B,)
    permutations = torch.rand(batch_size, num_tokens, generator=generator).argsort(dim=-1)  # (B, L)
    raster = torch.arange(num_tokens).expand(batch_size, num_tokens)
    orders = torch.where(use_random[:, None], permutations, raster)
    return orders.to(device) if device is not None else orders


def check_orders(orders: Tensor, batch_size: int, num_tokens: int) -> None:
    """Raise ValueError unless ``orders`` is a (B, L) int64 tensor of permutations of 0..L-1."""
    if orders.dtype != torch.int64:
        raise ValueError(f"orders must be int64, got {orders.dtype}")
    if tuple(orders.shape) != (batch_size, num_tokens):
        raise ValueError(f"orders must have shape {(batch_size, num_tokens)}, got {tuple(orders.shape)}")
    expected = torch.arange(num_tokens, device=orders.device)
    if not torch.equal(orders.sort(dim=-1).values, expected.expand_as(orders)):
        raise ValueError(f"every row of orders must be a permutation of 0..{num_tokens - 1}")
