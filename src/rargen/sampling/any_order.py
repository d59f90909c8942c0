"""Generation orders for sampling: any order, and the known tokens of an image first.

RAR trains on random orders (paper Sec. 3.2): at each step the target-aware embedding tells the
model which image position it predicts next, and the adaLN conditioning depends on the step, not
on the position. So a RAR model decodes the positions of an image in any order, and can be given
some of an image's tokens first and asked for the rest (inpainting, outpainting, completion).
``generate(..., known=codes, known_mask=mask, order=...)`` reads the orders made here: each row
starts with its known positions (fed in one pass after the class token,
``rargen.sampling.decoding.DecodeBatch.add``), then its unknown ones in the chosen order:

* ``"raster"``: known and unknown each in raster order;
* ``"random"``: known in raster order, unknown in a uniformly random order drawn from the row's
  seed (``order_seed``) or the caller's generator;
* a permutation (L,) or (B, L) of the image positions: its known positions first, then its
  unknown ones, each in the order the permutation lists them.

Which masks work: completing the bottom of an image from its top (known = a raster prefix) is
the raster order itself, so every RAR model does it as well as it samples. Every other mask asks
for an order the model met only while its training order was random, so it needs a model that
kept some of that skill (trained with ``r_end > 0``); a model annealed to raster gives valid
samples of its own (poorer) conditionals there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rargen.model import ModelConfig


@dataclass(frozen=True, eq=False)  # eq=False: holds tensors (compare by identity)
class KnownFirst:
    """Each row's generation order with its known positions first."""

    orders: Tensor  # (B, L) int64: the image position of each step
    counts: list[int]  # known tokens per row: steps 0 .. counts[b] - 1 are given
    tokens: Tensor  # (B, L) int64: the known codes in generation order (0 after the known ones)


def order_seed(seed: int) -> int:
    """The seed of a row's random order. Not the row's own seed: ``draw_noise`` seeds the row's
    noise with it, and one stream for both would tie the order to the noise (and bias the draw)."""
    digest = hashlib.blake2b(f"rargen:order:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_raster(order: str | Tensor) -> bool:
    return isinstance(order, str) and order == "raster"


def check_permutations(order: Tensor, batch: int, num_tokens: int, name: str = "order") -> Tensor:
    """``order`` (L,) or (B, L) as a (B, L) int64 tensor of permutations of 0 .. L-1, or a
    ValueError naming the bad row."""
    if order.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor of image positions, got {order.dtype}")
    if order.dim() == 1:
        order = order.expand(batch, -1)
    if tuple(order.shape) != (batch, num_tokens):
        raise ValueError(
            f"{name} must have shape ({num_tokens},) or ({batch}, {num_tokens}), got {tuple(order.shape)}"
        )
    order = order.to(torch.int64)
    expected = torch.arange(num_tokens, device=order.device)
    bad = (order.sort(dim=-1).values != expected).any(-1).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(
            f"{name} row {bad[0]} is not a permutation of the image positions 0..{num_tokens - 1} "
            f"(each position exactly once): {order[bad[0]].tolist()}"
        )
    return order


def check_known(known: Tensor, known_mask: Tensor, batch: int, config: ModelConfig) -> tuple[Tensor, Tensor]:
    """``known`` (B, L) integer codes and ``known_mask`` (B, L) bool (True = known), refused with a
    ValueError naming the bad value; codes are read only where the mask is True."""
    L, V = config.num_image_tokens, config.codebook_size
    known, known_mask = torch.as_tensor(known), torch.as_tensor(known_mask)
    if tuple(known.shape) != (batch, L):
        raise ValueError(
            f"known must have shape ({batch}, {L}): the codes of one image per label in raster "
            f"order, got {tuple(known.shape)}"
        )
    if known.dtype.is_floating_point or known.dtype == torch.bool or known.is_complex():
        raise ValueError(f"known must hold integer codes, got {known.dtype}")
    if tuple(known_mask.shape) != tuple(known.shape):
        raise ValueError(
            f"known_mask must have the shape of known ({batch}, {L}), got {tuple(known_mask.shape)}"
        )
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be bool (True = known token), got {known_mask.dtype}")
    known = known.to(torch.int64)
    outside = known_mask & ((known < 0) | (known >= V))
    if outside.any():
        b, i = outside.nonzero()[0].tolist()
        raise ValueError(
            f"known codes must be in [0, {V - 1}] where known_mask is True; known[{b}, {i}] is "
            f"{int(known[b, i])}: encode the images with the tokenizer the generator was trained with"
        )
    return known, known_mask


def known_first(
    known: Tensor | None,
    known_mask: Tensor | None,
    order: str | Tensor,
    batch: int,
    config: ModelConfig,
    device: Any,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> KnownFirst | None:
    """Each row's order (see the module docstring): known positions first, then the unknown ones
    in ``order``. ``known``/``known_mask`` None: nothing known (the whole image in ``order``);
    None when nothing is known and the order is raster (plain sampling)."""
    L = config.num_image_tokens
    if known is None and known_mask is None and is_raster(order):
        return None
    if (known is None) != (known_mask is None):
        raise ValueError("pass known and known_mask together (codes, and where they are known)")
    if known is None:
        known = torch.zeros(batch, L, dtype=torch.int64)
        known_mask = torch.zeros(batch, L, dtype=torch.bool)
    known, known_mask = check_known(known, known_mask, batch, config)
    known, known_mask = known.to(device), known_mask.to(device)
    positions = torch.arange(L, device=device).expand(batch, L)
    # A rank per position (its place among its kind), known ones ranked before every unknown one.
    if isinstance(order, Tensor):
        permutation = check_permutations(order.to(device), batch, L)
        known_rank = unknown_rank = torch.empty_like(permutation).scatter_(1, permutation, positions)
    elif order == "raster":
        known_rank = unknown_rank = positions
    elif order == "random":
        if seeds is not None:
            if len(seeds) != batch:
                raise ValueError(f"got {len(seeds)} seeds for {batch} labels; pass one seed per sample")
            draws = [
                torch.randperm(L, generator=torch.Generator().manual_seed(order_seed(int(s)))) for s in seeds
            ]
        else:
            where = None if generator is None else generator.device
            draws = [torch.randperm(L, generator=generator, device=where) for _ in range(batch)]
        known_rank, unknown_rank = positions, torch.stack(draws).to(device)
    else:
        raise ValueError(f"order must be 'raster', 'random' or a permutation tensor, got {order!r}")
    orders = torch.where(known_mask, known_rank, L + unknown_rank).argsort(dim=1)
    tokens = torch.where(known_mask, known, 0).gather(1, orders)
    return KnownFirst(orders, known_mask.sum(1).tolist(), tokens)


__all__ = ["KnownFirst", "check_known", "check_permutations", "is_raster", "known_first", "order_seed"]
