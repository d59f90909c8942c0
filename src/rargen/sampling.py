"""Exact, fast sampling from a RAR generator: static KV cache, shared-adaLN CFG, no host syncs.

Draws from exactly the distribution of the official ``RAR.generate`` (spec Sec. 3.2): raster
order; at step t the conditional and null logits are combined as ``u + (c - u) * w(t)`` with the
power-cosine weight ``w(t)``, divided by the temperature, then (optionally) top-k / top-p filtered.
What differs is only the cost (spec Sec. 3.4): one cached one-row decode step per token (with
fixed shapes when compiled), the adaLN modulations of a chunk of future steps computed in one
product, one batch ``[cond; null]`` whose null rows share a single adaLN computation, no doubled
batch when ``cfg_scale == 1``, weights prepacked for oneDNN on CPUs (``rargen.cpu_decoding``),
and sampling by an exponential race against noise drawn before the loop, so the loop never
waits for the host. Two deliberate differences from the official code: scale 1
(not 0) means "no guidance", and ``w(t)`` is computed in float64 (the official float32 values
differ by <= 1.2e-7).

Noise is drawn per sample: with ``seeds`` every row has its own generator, so a sample depends on
its seed only, never on the batch it was generated in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rargen.cpu_decoding import is_packed, packed_for_cpu_decoding
from rargen.model import RAR
from rargen.tokenizer import codes_from_sequence


@dataclass(frozen=True)
class SampleConfig:
    """What distribution to sample (not how fast): guidance, temperature, truncation."""

    cfg_scale: float = 1.0  # g; 1.0 = no classifier-free guidance
    cfg_power: float = 0.0  # p of w(t) = (g-1)(1-cos(pi (t/L)^p))/2 + 1; 0 = constant g
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"SampleConfig.cfg_scale must be finite, got {self.cfg_scale}")
        if not (math.isfinite(self.cfg_power) and self.cfg_power >= 0):
            raise ValueError(
                f"SampleConfig.cfg_power must be >= 0 (0 = constant guidance), got {self.cfg_power}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SampleConfig.temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SampleConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SampleConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def guided(self) -> bool:
        """False when w(t) == 1 for every t: then the batch is not doubled."""
        return self.cfg_scale != 1.0

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SampleConfig:
        """The paper's settings for a model size (see ``PRESETS``) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown sampling preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, SampleConfig] = {
    # Paper Tab. 6 / README_RAR.md (spec Sec. 3.2), power-cosine guidance schedule.
    "rar-b": SampleConfig(cfg_scale=16.0, cfg_power=2.75, temperature=1.0),
    "rar-l": SampleConfig(cfg_scale=15.5, cfg_power=2.5, temperature=1.02),
    "rar-xl": SampleConfig(cfg_scale=6.9, cfg_power=1.5, temperature=1.02),
    "rar-xxl": SampleConfig(cfg_scale=8.0, cfg_power=1.2, temperature=1.02),
}


def cfg_schedule(num_tokens: int, scale: float, power: float, device: Any = None) -> Tensor:
    """w(t) for t = 0 .. L-1 as a float64 (L,) tensor, computed once per generation.

    ``torch.pow(0, 0) == 1``, so p = 0 gives the constant g at every step (t = 0 included), as
    in the official code.
    """
    t = torch.arange(num_tokens, dtype=torch.float64, device=device) / num_tokens
    return (scale - 1.0) * (1.0 - torch.cos(math.pi * t.pow(power))) / 2.0 + 1.0


def guided_logits(logits: Tensor, weight: Tensor, guided: bool) -> Tensor:
    """Combine rows ``[cond; null]`` (2B, V) as ``u + (c - u) * w``; identity when not guided.

    float32 at least: bf16 logits are upcast before the subtraction (it cancels).
    """
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    if not guided:
        return logits
    cond, null = logits.chunk(2)
    return null + (cond - null) * weight.to(logits.dtype)


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


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run with ``seed`` (independent of batching)."""
    digest = hashlib.blake2b(f"rargen:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_noise(shape: tuple[int, int, int], device: Any, generator=None, seeds: Sequence[int] | None = None):
    """Exp(1) noise (B, L, V) float32 for the race; row b from its own generator when ``seeds``."""
    B = shape[0]
    if seeds is None:
        return torch.empty(shape, device=device).exponential_(generator=generator)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} labels; pass one seed per sample")
    noise = torch.empty(shape, device=device)
    for row, seed in zip(noise, seeds, strict=True):
        row.exponential_(generator=torch.Generator(device=device).manual_seed(int(seed)))
    return noise


def prefill(model: RAR, rows: Tensor, cond_labels: Tensor, cond_index: Tensor, weight: Tensor, guided: bool):
    """Guided logits (B, V) of token 0 (fills the cache)."""
    return guided_logits(model.prefill(rows, cond_labels, cond_index), weight, guided)


def decode(model: RAR, tokens: Tensor, step: Tensor | int, modulation: Tensor, weight: Tensor, guided: bool):
    """Guided logits (B, V) of token ``step`` after feeding ``tokens`` (rows, repeated for CFG);
    ``modulation`` (rows, 6 * depth + 2, D) is the step's slice of ``RAR.decode_modulations``."""
    return guided_logits(model.decode_step(tokens, step, modulation), weight, guided)


def decode_fixed_shapes(
    model: RAR,
    tokens: Tensor,
    step: Tensor,
    cond_labels: Tensor,
    cond_index: Tensor,
    weight: Tensor,
    guided: bool,
) -> Tensor:
    """``decode`` with the step's modulation computed inside: one graph with the same shapes at
    every step (``step`` a 0-d tensor), for ``torch.compile`` and CUDA graphs."""
    modulation = model.decode_modulations(cond_labels, step, 1)[cond_index, 0]
    return decode(model, tokens, step, modulation, weight, guided)


# Budget for the adaLN modulations computed ahead for a chunk of eager decode steps.
MODULATION_CHUNK_BYTES = 128 * 2**20


def modulation_chunk(model: RAR, num_conditions: int) -> int:
    """Decode steps whose adaLN modulations are computed in one product (within the budget)."""
    cfg = model.config
    row_bytes = num_conditions * (6 * cfg.depth + 2) * cfg.dim * model.head.weight.element_size()
    return max(1, min(cfg.num_image_tokens - 1, MODULATION_CHUNK_BYTES // row_bytes))


_COMPILED: dict[str, Callable] = {}


def _compiled_decode(device: torch.device) -> Callable:
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
    key = str(mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_fixed_shapes, fullgraph=True, mode=mode)
    return _COMPILED[key]


def decode_loop(
    model: RAR,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    choose: Callable[[int, Tensor], Tensor],
    bf16: bool = False,
    compile: bool = False,
    steps: int | None = None,
) -> Iterator[int]:
    """The sampling loop of ``generate``, ``token_probs`` and the web page, as an iterator.

    ``choose(t, guided_logits) -> tokens (B,)`` picks token ``t``; the loop yields ``t`` after
    each pick (the caller may stop early). ``steps`` stops after that many tokens (benchmarks).
    """
    cfg = model.config
    labels = torch.as_tensor(labels, dtype=torch.int64, device=model.head.weight.device)
    if labels.dim() != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes)):
        raise ValueError(f"labels must be a 1-d list of classes in [0, {cfg.num_classes - 1}], got {labels}")
    device, guided = labels.device, config.guided
    rows = torch.cat([labels, torch.full_like(labels, cfg.null_label)]) if guided else labels
    # Distinct labels once, before the loop: all null rows (and repeated classes) share one adaLN.
    cond_labels, cond_index = rows.unique(return_inverse=True)
    weights = cfg_schedule(cfg.num_image_tokens, config.cfg_scale, config.cfg_power, device)
    step_ids = torch.arange(cfg.num_image_tokens, device=device)
    if not compile:
        # Eager CPU decoding runs the Linear layers through oneDNN with prepacked weights
        # (a per-call view: the caller's model is untouched and may change later).
        model = packed_for_cpu_decoding(model)
    dtype = torch.bfloat16 if bf16 else model.head.weight.dtype
    cache = model.blocks[0].attn.kv_cache
    if cache is None or cache.k.shape[0] != rows.shape[0] or cache.k.dtype != dtype:
        model.setup_cache(rows.shape[0], dtype)  # reused when possible: no recompiles
    compiled_step = _compiled_decode(device) if compile else None
    chunk = modulation_chunk(model, cond_labels.shape[0])
    try:
        with torch.inference_mode():
            token = choose(0, prefill(model, rows, cond_labels, cond_index, weights[0], guided))
        yield 0
        for t in range(1, steps or cfg.num_image_tokens):
            # inference_mode per step, not across the yield: the caller's code runs in between.
            with torch.inference_mode():
                fed = torch.cat([token, token]) if guided else token
                if compiled_step is not None:  # identical shapes every step: a tensor step
                    step = step_ids[t]
                    logits = compiled_step(model, fed, step, cond_labels, cond_index, weights[t], guided)
                else:  # eager: a Python step (attention reads only the filled cache) and the
                    # adaLN modulations of `chunk` steps at once (one pass over those weights)
                    if (t - 1) % chunk == 0:
                        count = min(chunk, cfg.num_image_tokens - t)
                        tables = model.decode_modulations(cond_labels, t, count)
                    # (rows, 6 * depth + 2, D); index_select copies whole rows (6x faster than
                    # advanced indexing here)
                    modulation = tables[:, (t - 1) % chunk].index_select(0, cond_index)
                    logits = decode(model, fed, t, modulation, weights[t], guided)
                token = choose(t, logits)
            yield t
    finally:
        if not compile:
            model.clear_cache()


def _check_model(model: RAR, bf16: bool, compile: bool) -> None:
    if compile and is_packed(model):
        raise ValueError("compile=True needs the model itself, not a packed_for_cpu_decoding view")
    if model.training:
        raise ValueError("the model is in training mode (dropout on); call model.eval() before sampling")
    if bf16 and model.head.weight.dtype != torch.bfloat16:
        raise ValueError("bf16=True needs bf16 weights: call model.to(torch.bfloat16) first")


def generate(
    model: RAR,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    bf16: bool = False,
    compile: bool = False,
) -> Tensor:
    """Sample tokens (B, L) int64 in raster order for class ``labels`` (B,).

    Randomness: ``seeds`` (one int per sample: batch-split invariant) or ``generator``.
    ``bf16`` runs a bf16 model (weights and activations; guidance in float32); ``compile``
    compiles the decode step (CUDA graphs on GPU). Both keep the cache between calls.
    """
    _check_model(model, bf16, compile)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=model.head.weight.device)
    cfg = model.config
    noise = draw_noise(
        (labels.shape[0], cfg.num_image_tokens, cfg.codebook_size), labels.device, generator, seeds
    )
    out = torch.empty(labels.shape[0], cfg.num_image_tokens, dtype=torch.int64, device=labels.device)

    def choose(t: int, logits: Tensor) -> Tensor:
        logits = filter_logits(logits, config.temperature, config.top_k, config.top_p)
        out[:, t] = token = sample_from_logits(logits, noise=noise[:, t])
        return token

    for _ in decode_loop(model, labels, config, choose, bf16, compile):
        pass
    return out


def token_probs(
    model: RAR,
    labels: Tensor | Sequence[int],
    tokens: Tensor,
    config: SampleConfig,
    *,
    bf16: bool = False,
    compile: bool = False,
) -> Tensor:
    """The exact per-step sampling distributions (B, L, V) of ``generate``, ``tokens`` teacher-forced.

    Same cached decode path, guidance, temperature and truncation as ``generate``.
    """
    _check_model(model, bf16, compile)
    tokens = torch.as_tensor(tokens, device=model.head.weight.device)
    out: list[Tensor] = []

    def choose(t: int, logits: Tensor) -> Tensor:
        out.append(filter_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1))
        return tokens[:, t]

    for _ in decode_loop(model, labels, config, choose, bf16, compile):
        pass
    return torch.stack(out, dim=1)


def generate_images(
    model: RAR,
    tokenizer: torch.nn.Module,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Tensor:
    """Sample and decode: images (B, 3, H, W) float in [0, 1]. ``kwargs`` go to ``generate``."""
    tokens = generate(model, labels, config, generator, **kwargs)
    codes = codes_from_sequence(tokenizer, tokens)  # (B, L) for 1D tokenizers, else the square grid
    with torch.inference_mode():
        images = tokenizer.decode(codes)
    return images.float().clamp(0, 1)


__all__ = [
    "PRESETS",
    "SampleConfig",
    "cfg_schedule",
    "decode",
    "decode_fixed_shapes",
    "decode_loop",
    "draw_noise",
    "filter_logits",
    "generate",
    "generate_images",
    "guided_logits",
    "prefill",
    "sample_from_logits",
    "sample_seed",
    "token_probs",
]
