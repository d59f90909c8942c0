"""Exact speculation inside the continuously batched engine, where it pays.

``SpeculatingSampler`` is the ``Sampler`` (same samples, per-row state, joins and leaves between
steps) whose ``step`` is, when its ``SpeculationPolicy`` says a pass is faster (few rows), one
speculative pass instead of a plain step: every sample feeds its last final token and up to ``K``
draft tokens (a causal window, ``DecodeBatch.feed_windows``), gets the guided, filtered
distribution of each window position, and keeps the prefix up to and including its first
position whose draft differs from the token drawn there. The token of a kept position is drawn
from the sample's own noise for that position (its ``Sampler`` noise row) by the same race as a
plain step, from a distribution whose inputs were all final: the token plain decoding draws
(``rargen.sampling.speculative`` argues the exactness; float64 makes it token-identical, float32
up to the rounding of a window against a one-position product). Drafts decide only how many
positions a pass keeps; they are the tokens the previous pass drew for positions it could not
keep (the Jacobi update), or the token above (left) for positions never predicted.

Speculation runs only when every sample can: sampled (not teacher-forced), raster order, an
eager decoder, no ``on_emit`` listener; otherwise, and whenever the policy prefers it, a plain step.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from rargen.sampling.decoding import Decoder
from rargen.sampling.engine import Sample, Sampler
from rargen.sampling.next_token import (
    filter_settings,
    filtered_logits,
    guided_logits,
    sample_from_logits,
    upcast_logits,
)
from rargen.sampling.speculation_policy import SpeculationPolicy


class SpeculatingSampler(Sampler):
    """A ``Sampler`` that runs speculative passes when ``policy`` (default: measured costs with
    ``K = DEFAULT_DRAFTS``) says they are faster; its samples are plain decoding's."""

    def __init__(
        self,
        decoder: Decoder,
        max_samples: int,
        *,
        guided: bool = True,
        conditions: int | None = None,
        policy: SpeculationPolicy | None = None,
    ) -> None:
        super().__init__(decoder, max_samples, guided=guided, conditions=conditions)
        self.policy = SpeculationPolicy(decoder) if policy is None else policy
        L = self.model_config.num_image_tokens
        self._above = math.isqrt(L) if math.isqrt(L) ** 2 == L else 1  # draft source for new positions
        self._reach = [0] * max_samples  # per sampler row: positions < reach hold a draft
        self._owner: list[Sample | None] = [None] * max_samples  # the sample the row's drafts are for

    def can_speculate(self) -> bool:
        batch = self.batch
        return (
            self.on_emit is None
            and not batch.compiled
            and batch.raster
            and all(not s.forced for s in self.samples)
        )

    def step(self) -> tuple[list[Sample], Tensor | None]:
        """A speculative pass (returns the samples and None: no single distribution per sample)
        when the policy says it is faster, else a plain ``Sampler.step``."""
        if not self.samples:
            raise ValueError("the sampler has no samples; add some first")
        if not self.can_speculate():
            return super().step()
        rows, capacity = len(self.batch), self.batch.capacity
        speculate, start = self.policy.speculate(rows, capacity), time.perf_counter()
        result = (self._speculative_pass(), None) if speculate else super().step()
        self.policy.record(rows, capacity, speculate, time.perf_counter() - start)  # what it cost in use
        return result

    def _drafts(self, sample: Sample, length: int) -> None:
        """Draft tokens for the positions a window of ``length`` feeds that hold none yet."""
        row, tokens = sample.row, self._tokens[sample.row]
        if self._owner[row] is not sample:
            self._owner[row], self._reach[row] = sample, sample.done
        for j in range(max(self._reach[row], sample.done), sample.done + length - 1):
            tokens[j] = tokens[j - self._above] if j >= self._above else tokens[j - 1]
        self._reach[row] = max(self._reach[row], sample.done + length - 1)

    def _speculative_pass(self) -> list[Sample]:
        L, K = self.model_config.num_image_tokens, self.policy.drafts
        samples, batch, device = self.samples, self.batch, self._tokens.device
        lengths = [min(K + 1, L - s.done) for s in samples]
        n = len(batch)
        slot_length, slot_sample = [1] * n, [0] * n
        for i, (s, length) in enumerate(zip(samples, lengths, strict=True)):
            self._drafts(s, length)
            for slot in s.slots:
                slot_length[slot], slot_sample[slot] = length, i
        # Each slot's drafts: its sample's tokens after the last final one (padding past L: unused).
        rows = torch.tensor([samples[i].row for i in slot_sample], device=device)
        done = torch.tensor([samples[i].done for i in slot_sample], device=device)
        ahead = (done[:, None] + torch.arange(K, device=device)).clamp(max=L - 1)
        logits = upcast_logits(batch.feed_windows(slot_length, self._tokens[rows[:, None], ahead]))
        starts = [0]
        for length in slot_length:
            starts.append(starts[-1] + length)

        # Every kept-or-not window position (entry), sample by sample: its logits rows, sampler
        # row, token index, and (guided samples) its null row.
        cond, null, guided, owner, steps, sample_of = [], [], [], [], [], []
        for i, (s, length) in enumerate(zip(samples, lengths, strict=True)):
            for w in range(length):
                if len(s.slots) == 2:
                    guided.append(len(cond))
                    null.append(starts[s.slots[1]] + w)
                cond.append(starts[s.slots[0]] + w)
                owner.append(s.row)
                steps.append(s.done + w)
                sample_of.append(i)

        def tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        owner_t, steps_t = tensor(owner), tensor(steps)
        out = logits.index_select(0, tensor(cond))
        if guided:
            index = tensor(guided)
            weight = self._weights[owner_t[index], steps_t[index]]
            mixed = guided_logits(out.index_select(0, index), logits.index_select(0, tensor(null)), weight)
            out = out.index_copy(0, index, mixed)
        groups: dict[tuple, list[int]] = {}
        for e, i in enumerate(sample_of):
            groups.setdefault(filter_settings(samples[i].config), []).append(e)
        filtered = torch.empty_like(out)
        for members in groups.values():
            index = tensor(members)
            config = samples[sample_of[members[0]]].config
            filtered.index_copy_(0, index, filtered_logits(out.index_select(0, index), config))
        owner, steps = owner_t, steps_t
        race = sample_from_logits(filtered, noise=self._noise[owner, steps])
        drafts = self._tokens[owner, steps]  # the draft each position held (fed after it in the window)
        self._tokens[owner, steps] = race  # final tokens, then the next pass's drafts
        same = (race == drafts).tolist()
        kept, e = [], 0
        for length in lengths:
            m = 1
            while m < length and same[e + m - 1]:
                m += 1
            kept.append(m)
            e += length
        batch.advance([kept[i] for i in slot_sample])
        for s, m in zip(samples, kept, strict=True):
            s.done += m
        feed_rows = torch.tensor([samples[i].row for i in slot_sample], device=device)
        feed_done = torch.tensor([samples[i].done - 1 for i in slot_sample], device=device)
        batch.feed[:n] = self._tokens[feed_rows, feed_done]
        self.policy.observe(sum(kept) / len(kept))
        self._plan = None
        finished = [s for s in samples if s.done == L]
        if finished:
            self._drop(finished)
        return samples


__all__ = ["SpeculatingSampler"]
