"""Exact, fast sampling from a RAR generator: one engine, per-sample settings, no host syncs.

Draws from exactly the distribution of the official ``RAR.generate`` (spec Sec. 3.2): raster
order; at step t the conditional and null logits are combined as ``u + (c - u) * w(t)`` with the
power-cosine weight ``w(t)``, divided by the temperature, then (optionally) top-k / top-p filtered.
What differs is only the cost (spec Sec. 3.4): ``Sampler`` drives a ``rargen.sampling.decoding``
batch (static KV cache, one cached position per row and step, adaLN modulations computed ahead,
weights prepacked for oneDNN on CPUs), no doubled batch when ``cfg_scale == 1``, and sampling by
an exponential race against noise drawn before the loop, so the loop never waits for the host.
Every sample has its own class, guidance schedule, temperature, top-k/top-p and noise, so samples
with different settings share one batch and may join and leave it at any step (the web server).
Two deliberate differences from the official code: scale 1 (not 0) means "no guidance", and
``w(t)`` is computed in float64 (the official float32 values differ by <= 1.2e-7).

Noise is drawn per sample: with ``seeds`` every row has its own generator, so a sample depends on
its seed only, never on the batch it was generated in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rargen.model import RAR
from rargen.sampling.any_order import check_permutations, is_raster, known_first
from rargen.sampling.decoding import DecodeBatch, Decoder, prepare_for_decoding
from rargen.sampling.next_token import (
    cfg_schedule,
    filter_settings,
    filtered_logits,
    guided_logits,
    sample_from_logits,
    upcast_logits,
)
from rargen.sampling.speculative import check_speculate, generate_speculative
from rargen.tokenizers.base import codes_from_sequence


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


class Sample:
    """One image being decoded by a ``Sampler``: its label, settings and tokens so far.

    ``tokens`` (L,) int64: tokens 0 .. ``done - 1`` of its generation order (raster unless added
    with ``orders``) are set (a view while decoding, a copy once finished). ``forced``:
    teacher-forced (``token_probs``), else sampled from the noise.
    """

    __slots__ = ("label", "config", "forced", "slots", "row", "done", "tokens", "finished", "tag")

    def __init__(self, label: int, config: SampleConfig, forced: bool, tag: Any = None) -> None:
        self.label, self.config, self.forced, self.tag = label, config, forced, tag
        self.slots: list[int] = []  # cache rows: [cond] or [cond, null]
        self.row = -1  # row of the sampler's tables
        self.done = 0
        self.tokens: Tensor | None = None
        self.finished = False


class Sampler:
    """The decoding engine: samples with their own class, settings and noise in one batch.

    Every caller drives this one step (``generate``, ``token_probs``, ``generate_images``,
    ``rargen sample``, the web server, the benchmarks). A sample joins with ``add`` (it decodes
    from the next step on), leaves when its last token is sampled or when ``remove``d, and its
    tokens depend only on its label, settings and noise, never on the other samples in the batch:
    each runs through the same per-row arithmetic whatever its companions.

    Per step, for every sample past its cls position: guidance (``guided_logits``) with its own
    schedule (a second cache row with the null label when ``config.guided``), its own
    temperature / top-k / top-p (``filtered_logits``), then its own noise (``sample_from_logits``)
    or its teacher-forced token.
    """

    def __init__(
        self, decoder: Decoder, max_samples: int, *, guided: bool = True, conditions: int | None = None
    ):
        model = decoder.model
        cfg = self.model_config = model.config
        L, V, device = cfg.num_image_tokens, cfg.codebook_size, model.device
        self.batch = DecodeBatch(decoder, max_samples * (2 if guided else 1), conditions)
        self.max_samples, self.guided_capacity = max_samples, guided
        self._noise = torch.ones(max_samples, L, V, device=device)
        self._tokens = torch.zeros(max_samples, L, dtype=torch.int64, device=device)
        self._weights = torch.ones(max_samples, L, dtype=torch.float64, device=device)
        self._free_rows = list(range(max_samples - 1, -1, -1))
        self.samples: list[Sample] = []
        self._plan: _StepPlan | None = None
        # Called with (samples, their filtered logits) whenever they get a token (token_probs).
        self.on_emit: Callable[[list[Sample], Tensor], None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def fits(self, count: int, guided: bool, reserved: Sequence[tuple[int, bool]] = ()) -> bool:
        """Whether ``count`` more samples fit now, after the ``reserved`` (count, guided) groups
        that are to be added first."""
        groups = [*reserved, (count, guided)]
        if any(g for _, g in groups) and not self.guided_capacity:
            return False
        samples = sum(n for n, _ in groups)
        rows = sum(n * (2 if g else 1) for n, g in groups)
        return samples <= len(self._free_rows) and rows <= self.batch.free

    def add(
        self,
        labels: Sequence[int],
        config: SampleConfig,
        *,
        noise: Tensor | None = None,
        tokens: Tensor | None = None,
        tags: Sequence[Any] | None = None,
        orders: Tensor | None = None,
        given: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Start one sample per label: sampled with ``noise`` (n, L, V) Exp(1) draws
        (``draw_noise``), or teacher-forced with ``tokens`` (n, L). Their cls and class
        positions are prefilled and token 0 drawn now; ``tags`` (one per label) are the
        caller's, kept on the samples. ``orders`` (n, L): each sample's generation order (None:
        raster); ``tokens`` and ``noise`` are then in that order. ``given`` (n,), with both
        ``noise`` and ``tokens``: sample ``i``'s first ``given[i]`` tokens are those of ``tokens``,
        fed in one pass after the prefill (``DecodeBatch.add``); the rest are sampled."""
        cfg = self.model_config
        labels = class_labels(labels, cfg.num_classes)
        n = len(labels)
        if (noise is not None, tokens is not None, given is not None) not in (
            (True, False, False), (False, True, False), (True, True, True)
        ):  # fmt: skip
            raise ValueError("pass noise (to sample), tokens (to teacher-force), or both and given")
        if not self.fits(n, config.guided):
            raise ValueError(f"{n} samples do not fit in this sampler ({len(self._free_rows)} free)")
        device = self._tokens.device
        schedule = cfg_schedule(cfg.num_image_tokens, config.cfg_scale, config.cfg_power, device)
        added = []
        for i, label in enumerate(labels):
            sample = Sample(int(label), config, forced=noise is None, tag=None if tags is None else tags[i])
            sample.row = row = self._free_rows.pop()
            sample.done = 0 if given is None else int(given[i])
            if tokens is not None:
                self._tokens[row] = tokens[i]
            if noise is not None:
                self._noise[row] = noise[i]
            self._weights[row] = schedule
            sample.tokens = self._tokens[row]
            added.append(sample)
        # One prefill for the new rows; with guidance the null rows follow: one [cond; null] block.
        nulls = [cfg.null_label] * n if config.guided else []
        per = 2 if config.guided else 1  # a null row is given its sample's order and tokens
        orders = None if orders is None else orders.repeat(per, 1)
        known, counts = (None, None) if given is None else (tokens.repeat(per, 1), list(given) * per)
        slots, logits = self.batch.add([s.label for s in added] + nulls, orders, known, counts)
        for i, sample in enumerate(added):
            sample.slots = [slots[i], slots[n + i]] if config.guided else [slots[i]]
        self._emit(_StepPlan(added, slots[0]), logits)  # the first token drawn, from the prefill
        self.samples += added
        self._plan = None
        finished = [s for s in added if s.done == cfg.num_image_tokens]  # all but one token given
        if finished:
            self._drop(finished)
        return added

    def remove(self, samples: Sequence[Sample]) -> None:
        """Stop ``samples`` now and free their rows (cancellation); finished ones are gone already."""
        samples = [s for s in samples if not s.finished and s in self.samples]
        if samples:
            self._drop(samples)

    def _drop(self, samples: Sequence[Sample]) -> None:
        gone = set(map(id, samples))
        moves = dict(self.batch.remove([slot for s in samples for slot in s.slots]))
        self.samples = [s for s in self.samples if id(s) not in gone]
        for s in self.samples:
            s.slots = [moves.get(slot, slot) for slot in s.slots]
        for s in samples:
            s.tokens = self._tokens[s.row].clone()
            s.finished = True
            self._free_rows.append(s.row)
        self._plan = None

    def step(self) -> tuple[list[Sample], Tensor]:
        """One decode step for the whole batch: every sample gets its next token.

        Returns the samples and their filtered logits (rows in that order; ``softmax`` gives the
        sampling distribution). Samples whose last token was drawn are finished and removed.
        """
        if not self.samples:
            raise ValueError("the sampler has no samples; add some first")
        if self._plan is None:
            self._plan = _StepPlan(self.samples)
        plan = self._plan
        out = self._emit(plan, self.batch.step())
        samples = plan.samples
        finished = [s for s in samples if s.done == self.model_config.num_image_tokens]
        if finished:
            self._drop(finished)
        return samples, out

    def _emit(self, plan: _StepPlan, logits: Tensor) -> Tensor:
        """Guidance, truncation and the token of every sample of ``plan`` from its rows' logits;
        the token goes to the sample and to its rows' next input. Returns the filtered logits."""
        logits = upcast_logits(logits)
        out = logits.index_select(0, plan.cond_slots)
        if plan.guided is not None:  # each guided sample with its own w(t)
            cond = out if plan.guided_all else out.index_select(0, plan.guided)
            null = logits.index_select(0, plan.null_slots)
            weight = self._weights[plan.rows, plan.done]
            weight = weight if plan.guided_all else weight.index_select(0, plan.guided)
            mixed = guided_logits(cond, null, weight)
            out = mixed if plan.guided_all else out.index_copy(0, plan.guided, mixed)
        if len(plan.groups) == 1:
            out = filtered_logits(out, plan.groups[0][0])
        else:
            filtered = torch.empty_like(out)
            for config, index in plan.groups:
                filtered.index_copy_(0, index, filtered_logits(out.index_select(0, index), config))
            out = filtered
        rows, done = plan.rows, plan.done
        if plan.forced is None:
            token = sample_from_logits(out, noise=self._noise[rows, done])
            self._tokens[rows, done] = token
        elif plan.all_forced:
            token = self._tokens[rows, done]
        else:
            token = sample_from_logits(out, noise=self._noise[rows, done])
            token = torch.where(plan.forced, self._tokens[rows, done], token)
            self._tokens[rows, done] = token
        feed = self.batch.feed
        feed.index_copy_(0, plan.cond_slots + plan.offset, token)
        if plan.guided is not None:
            feed.index_copy_(0, plan.null_slots + plan.offset, token.index_select(0, plan.guided))
        plan.done.add_(1)
        for sample in plan.samples:
            sample.done += 1
        if self.on_emit is not None:
            self.on_emit(plan.samples, out)
        return out


class _StepPlan:
    """Index tensors of one batch composition (rebuilt only when it changes). Slots are
    relative to ``offset`` (the first slot of the logits they index)."""

    def __init__(self, samples: list[Sample], offset: int = 0) -> None:
        device = samples[0].tokens.device
        self.samples, self.offset = samples, offset

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        self.cond_slots = tensor([s.slots[0] - offset for s in samples])
        guided = [i for i, s in enumerate(samples) if len(s.slots) == 2]
        self.guided = tensor(guided) if guided else None
        self.guided_all = len(guided) == len(samples)
        if guided:
            self.null_slots = tensor([samples[i].slots[1] - offset for i in guided])
        self.rows = tensor([s.row for s in samples])
        self.done = tensor([s.done for s in samples])  # tokens so far, advanced in place
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(filter_settings(s.config), []).append(i)
        self.groups = [(samples[index[0]].config, tensor(index)) for index in groups.values()]
        forced = [s.forced for s in samples]
        self.all_forced = all(forced)
        self.forced = torch.tensor(forced, device=device) if any(forced) else None


def _decoder(model: RAR | Decoder, bf16: bool, compile: bool, quantize: str | None = None) -> Decoder:
    return prepare_for_decoding(model, bf16=bf16, compile=compile, quantize=quantize)


def class_labels(labels: Tensor | Sequence[int], num_classes: int) -> list[int]:
    """``labels`` as a list of ints, refused (ValueError naming the bad ones) unless a 1-d list of
    classes in [0, ``num_classes`` - 1]: the null label is the sampler's own, never asked for.
    The one check of every sampling entry (``generate``, ``token_probs``, ``Sampler.add``, and
    through them ``sample_to_folder`` and the server)."""
    values = torch.as_tensor(labels, dtype=torch.int64)
    if values.dim() != 1:
        raise ValueError(f"labels must be a 1-d list of classes, got shape {tuple(values.shape)}")
    bad = values[(values < 0) | (values >= num_classes)].tolist()
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"labels must be classes in [0, {num_classes - 1}], got {bad[:10]}{more}")
    return values.tolist()


def run_to_end(
    sampler: Sampler, on_step: Callable[[list[Sample], Tensor | None], None] | None = None
) -> None:
    """Step until every sample is finished."""
    while sampler.samples:
        emitting, logits = sampler.step()
        if on_step is not None:
            on_step(emitting, logits)


def generate(
    model: RAR | Decoder,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    bf16: bool = False,
    compile: bool = False,
    speculate: int = 0,
    quantize: str | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    order: str | Tensor = "raster",
) -> Tensor:
    """Sample tokens (B, L) int64 (raster positions) for class ``labels`` (B,).

    Randomness: ``seeds`` (one int per sample: batch-split invariant) or ``generator``.
    ``model``: a RAR (prepared on its first call, then kept while its weights are unchanged) or a
    ``prepare_for_decoding(model)``.
    ``bf16`` runs a bf16 model (weights and activations; guidance in float32); ``compile``
    compiles the decode step (CUDA graphs on GPU). ``speculate=K`` verifies K draft tokens per
    forward pass (``rargen.sampling.speculative``: the same distribution, fewer passes; 0 = off).
    ``quantize="int8"`` multiplies with int8 weights (``rargen.sampling.int8``; faster, inexact).
    ``known`` (B, L) codes with ``known_mask`` (B, L) bool: each row's known tokens are fed first
    (one pass) and returned unchanged, the others drawn in ``order``: "raster" among the unknown,
    "random" (from the row's seed), or a permutation (``rargen.sampling.any_order``). The
    guidance weight w(t) follows the step t of the row's order, known steps included.
    """
    compiled = compile or (isinstance(model, Decoder) and model.compiled)
    check_speculate(speculate, compiled)  # before any work: the decoder, the noise
    if speculate and (known is not None or not is_raster(order)):
        raise ValueError(f"speculate={speculate} decodes in raster order; drop it to pass known or order")
    decoder = _decoder(model, bf16, compile, quantize)
    labels = class_labels(labels, decoder.config.num_classes)
    cfg, device, L = decoder.model.config, decoder.model.device, decoder.config.num_image_tokens
    plan = known_first(known, known_mask, order, len(labels), cfg, device, seeds, generator)  # None: raster
    noise = draw_noise((len(labels), L, cfg.codebook_size), device, generator, seeds)
    if not labels:
        return torch.empty(0, L, dtype=torch.int64, device=device)
    if speculate:
        return generate_speculative(decoder, labels, config, noise, speculate)[0]
    with torch.inference_mode():
        sampler = Sampler(decoder, len(labels), guided=config.guided, conditions=_conditions(labels, config))
        if plan is None:
            samples = sampler.add(labels, config, noise=noise)
            run_to_end(sampler)
            return torch.stack([s.tokens for s in samples])
        rows = [b for b, count in enumerate(plan.counts) if count < L]  # a wholly known row is done
        tokens, index = plan.tokens.clone(), torch.tensor(rows, dtype=torch.int64, device=device)
        given = dict(tokens=tokens[index], orders=plan.orders[index], given=[plan.counts[b] for b in rows])
        if rows:
            samples = sampler.add([labels[b] for b in rows], config, noise=noise[index], **given)
            run_to_end(sampler)
            tokens[index] = torch.stack([s.tokens for s in samples])
        return torch.empty_like(tokens).scatter_(1, plan.orders, tokens)  # back to raster positions


def _conditions(labels: Sequence[int], config: SampleConfig) -> int:
    """Distinct adaLN conditions of a batch (its labels, and the null label with guidance)."""
    return len(set(labels)) + (1 if config.guided else 0)


def token_probs(
    model: RAR | Decoder,
    labels: Tensor | Sequence[int],
    tokens: Tensor,
    config: SampleConfig,
    *,
    bf16: bool = False,
    compile: bool = False,
    quantize: str | None = None,
    orders: Tensor | None = None,
) -> Tensor:
    """The exact per-step sampling distributions (B, L, V) of ``generate``, ``tokens`` teacher-forced.

    Same engine, guidance, temperature and truncation (and ``quantize``) as ``generate``.
    ``orders`` (B, L) or (L,): decode each row in that order; step ``i`` is then the distribution
    of ``tokens[b, orders[b, i]]`` (as ``RAR.forward(tokens, labels, orders)``'s logits).
    """
    decoder = _decoder(model, bf16, compile, quantize)
    labels = class_labels(labels, decoder.config.num_classes)
    cfg = decoder.model.config
    tokens, L = torch.as_tensor(tokens, device=decoder.model.device), cfg.num_image_tokens
    if orders is not None:  # teacher-forced in that order
        orders = check_permutations(torch.as_tensor(orders, device=tokens.device), len(labels), L)
        tokens = tokens.gather(1, orders)
    dtype = torch.float64 if decoder.model.dtype == torch.float64 else torch.float32
    out = torch.empty(len(labels), cfg.num_image_tokens, cfg.codebook_size, dtype=dtype, device=tokens.device)
    with torch.inference_mode():
        sampler = Sampler(decoder, len(labels), guided=config.guided, conditions=_conditions(labels, config))

        def record(samples: list[Sample], logits: Tensor) -> None:  # rows: samples in label order
            out[[s.tag for s in samples], [s.done - 1 for s in samples]] = logits.softmax(-1).to(dtype)

        sampler.on_emit = record
        sampler.add(labels, config, tokens=tokens, tags=range(len(labels)), orders=orders)  # tag: row of out
        run_to_end(sampler)
    return out


def generate_images(
    model: RAR | Decoder,
    tokenizer: torch.nn.Module,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Tensor:
    """Sample and decode: images (B, 3, H, W) float in [0, 1]. ``kwargs`` go to ``generate``."""
    tokens = generate(model, labels, config, generator, **kwargs)
    codes = codes_from_sequence(tokenizer, tokens, model.config.grid)  # (B, L) 1D, else (B, h, w)
    with torch.inference_mode():
        images = tokenizer.decode(codes)
    return images.float().clamp(0, 1)


__all__ = [
    "PRESETS",
    "SampleConfig",
    "Sample",
    "Sampler",
    "class_labels",
    "draw_noise",
    "generate",
    "generate_images",
    "run_to_end",
    "sample_seed",
    "token_probs",
]
