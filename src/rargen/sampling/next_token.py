"""The distribution of the next token, as every decoder in rargen computes it (spec Sec. 3.2).

The power-cosine guidance weight ``w(t)`` and the guidance mix ``u + (c - u) * w(t)``
(``guided_logits``), temperature and top-k / top-p filtering (``filtered_logits``), and the
exponential race that draws a token from ``softmax(logits)`` against noise drawn ahead. Plain
decoding (``rargen.sampling.engine``, and through it the server) and speculative decoding
(``rargen.sampling.speculative``) call these, so all draw from one definition of each position's
distribution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: the engine imports this module
    from rargen.sampling.engine import SampleConfig


def cfg_schedule(num_tokens: int, scale: float, power: float, device: Any = None) -> Tensor:
    """w(t) for t = 0 .. L-1 as a float64 (L,) tensor, computed once per generation.

    ``torch.pow(0, 0) == 1``, so p = 0 gives the constant g at every step (t = 0 included), as
    in the official code.
    """
    t = torch.arange(num_tokens, dtype=torch.float64, device=device) / num_tokens
    return (scale - 1.0) * (1.0 - torch.cos(math.pi * t.pow(power))) / 2.0 + 1.0


def upcast_logits(logits: Tensor) -> Tensor:
    """Logits in float32 when the model computes in less (bf16): guidance, filtering and the race
    run in float32 (float64 stays float64)."""
    return logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits


def guided_logits(cond: Tensor, null: Tensor, weight: Tensor) -> Tensor:
    """Classifier-free guidance ``u + (c - u) * w`` of conditional ``cond`` and unconditional
    ``null`` logits (n, V), each row with its own weight ``w`` (n,) (``cfg_schedule``: float64,
    rounded to the logits' dtype here)."""
    return null + (cond - null) * weight.to(cond.dtype)[:, None]


def filter_settings(config: SampleConfig) -> tuple[float, int, float]:
    """What filtering reads of a ``SampleConfig``: samples with equal settings are filtered together."""
    return (config.temperature, config.top_k, config.top_p)


def filtered_logits(logits: Tensor, config: SampleConfig) -> Tensor:
    """``filter_logits`` with ``config``'s temperature, top-k and top-p."""
    return filter_logits(logits, *filter_settings(config))


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p (smallest set with mass >= p); removed = -inf.

    Returns a new tensor; ``logits`` is never modified. Any temperature > 0 and top_p > 0 give a
    valid distribution: a tiny temperature is the argmax (ties shared), a tiny top_p keeps the top
    token; never inf - inf = NaN.
    """
    # Shifted so the row maximum is 0 (softmax is shift-invariant): the quotient cannot overflow to
    # +inf. A temperature below the dtype's smallest normal number would round to 0 in the
    # division (0 / 0 = NaN); there the distribution is already the argmax, so it is clamped.
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the top token always stays (top_p may round to 0 in float32)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_from_logits(
    logits: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """One token per row, exactly distributed as ``softmax(logits)``, without a host sync.

    Exponential race: ``argmax(p_i / E_i)`` with E_i ~ Exp(1) picks i with probability p_i.
    ``noise`` (same shape, Exp(1) draws) replaces the draw from ``generator``.
    """
    if noise is None:
        noise = torch.empty_like(logits).exponential_(generator=generator)
    return (logits.softmax(-1) / noise.clamp_min(1e-30)).argmax(-1)
