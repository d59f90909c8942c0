"""Exact speculative (Jacobi) decoding: each forward pass verifies a window of draft tokens.

``generate(..., speculate=K)`` runs this instead of one token per pass. Every pass feeds, per
sample, its last final token followed by ``K`` draft tokens for the next positions (a causal
window over the KV cache, written in place) and gets the guided, filtered distribution of each
of those ``K + 1`` positions at once. A prefix of them becomes final; the rest become the next
drafts (the Jacobi update of Song et al. 2021 and SJD, Teng et al. arXiv 2410.01699, with the
drafts of successive passes coupled through one fixed noise per position as in MC-SJD, So et al.
arXiv 2510.24211, here through its Gumbel (exponential race) form).

Why the output distribution is exactly plain decoding's
-------------------------------------------------------
Plain decoding (``rargen.sampling.engine``) draws token ``j`` as the exponential race
``x_j = argmax_v p_j(v | x_<j) / E_j[v]`` with ``E_j`` Exp(1) noise drawn for position ``j``
before the loop (``draw_noise``), ``p_j`` the guided (power-cosine ``w(j)``), temperature-scaled,
top-k / top-p filtered distribution. Speculation uses the same noise ``E_j`` for both roles:

* a draft for position ``j`` is ``argmax_v q_j(v) / E_j[v]``, where ``q_j`` is the guided,
  filtered distribution the previous pass computed for ``j`` from its (draft) context;
* the pass in which every input before ``j`` is final computes ``p_j(. | x_<j)`` exactly (same
  guidance weight of position ``j``, same temperature, top-k, top-p), and the token written for
  ``j`` is then ``argmax_v p_j(v) / E_j[v]``: by definition the token plain decoding draws.

The draft is "accepted" when it equals that token (the Gumbel coupling of the draft and the
target: the race on ``q`` and the race on ``p`` agree with probability near ``1 - TV(p, q)``);
otherwise it is replaced by it and the positions after ``j`` are re-drafted. Drafts never decide
a token, they only decide which positions can be checked in one pass (a position can be final
only when all inputs before it are). So the tokens are those of plain decoding with the same
noise, token for token (up to the float rounding of a window pass against a one-token pass), and
the distribution is exactly the plain one: given the final tokens before ``j``, ``E_j`` is
independent of everything that decided them (causality: no position before ``j`` reads position
``j``'s noise or input), so ``x_j`` is distributed as ``p_j(. | x_<j)``. This is the residual
rule of speculative sampling in another form: there a rejection resamples from the normalised
``max(0, p - q)`` with fresh randomness; here the race on ``p`` with the position's own noise
is a draw from ``p`` directly, correlated with the draft so that acceptances are frequent.

Per-sample seeds: each sample's noise comes from its own generator (``seeds``), its window
length depends only on its own progress, and the batch only groups samples at the same progress
into one attention call, so a sample's tokens do not depend on the batch it is drawn in.

Cost: a pass reads the weights once for ``K + 1`` positions per row, so at small batches (where
a step streams the weights from memory) a pass costs about one plain step and the speed-up is
about the tokens made final per pass. At large batches a step is bound by arithmetic, which a
window multiplies by ``K + 1``: speculation does not pay there (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rargen.kv_cache import CacheAt, CacheWindow, KVCache
from rargen.model import MAX_SIZES
from rargen.sampling.decoding import Decoder, ModulationTables
from rargen.sampling.next_token import (
    cfg_schedule,
    filtered_logits,
    guided_logits,
    sample_from_logits,
    upcast_logits,
)


@dataclass(frozen=True)
class SpeculationStats:
    """What a speculative run did: forward passes (the prefill included) and tokens made."""

    passes: int  # forward passes of the whole batch
    sample_passes: int  # sum over samples of the passes each sample took part in
    samples: int
    tokens: int  # tokens per sample (L)

    @property
    def passes_per_image(self) -> float:
        return self.sample_passes / max(1, self.samples)

    @property
    def tokens_per_pass(self) -> float:
        """Tokens made final per pass of a sample (plain decoding: exactly 1)."""
        return self.tokens / max(1e-9, self.passes_per_image)


def _window_modulations(
    tables: ModulationTables,
    full: Tensor | None,
    groups,
    rows: Tensor,
    seq: Tensor,
    row_condition: Tensor,
    conditions: Sequence[int],
) -> Tensor:
    """Modulations (M, 6 * depth + 2, D) of the fed positions (cache ``rows``, sequence indices
    ``seq`` (M,)), listed window by window as the pass feeds them. ``row_condition`` maps a
    cache row to its label's index in ``conditions``; ``full``: every label's whole table stacked
    (conditions x indices 2 .. L), when they fit the budget together."""
    if full is not None:
        return full[row_condition[rows], seq - 2]
    spans = []
    for cache_rows, first, length in groups:
        for c in row_condition[cache_rows].tolist():
            spans.append((conditions[c], first, length))
    # Windows only move forward: a table no window reads now is never read again.
    tables.keep({tables.key(label, s) for label, first, n in spans for s in range(first, first + n)})
    return torch.cat([tables.span(label, first, length) for label, first, length in spans])


# The largest draft count taken: the longest token sequence any model may have. A pass feeds at
# most the L - 1 tokens after the first, so every K >= L - 1 verifies alike; one beyond every
# model's length can only be a typo (a million used to loop a million times on every pass).
MAX_SPECULATE = MAX_SIZES["num_image_tokens"]


def check_speculate(speculate: int, compiled: bool = False) -> None:
    """Refuse a ``speculate`` that is not an int in [0, ``MAX_SPECULATE``] (0 = off), naming it,
    or one asked of a compiled step. The one check of every entry point (``generate``,
    ``generate_speculative``, ``rargen sample``); its words name the arguments and the flags."""
    if not isinstance(speculate, int) or isinstance(speculate, bool) or not 0 <= speculate <= MAX_SPECULATE:
        raise ValueError(
            f"speculate must be an int >= 0 (0 = off) and at most {MAX_SPECULATE}, got {speculate!r}"
        )
    if speculate and compiled:
        raise ValueError(
            f"speculate={speculate} and compile=True (--speculate, --compile): speculative decoding "
            "runs the eager step; drop one of them"
        )


def generate_speculative(
    decoder: Decoder,
    labels: list[int],
    config,
    noise: Tensor,
    speculate: int,
) -> tuple[Tensor, SpeculationStats]:
    """Tokens (B, L) int64 for ``labels`` with ``noise`` (B, L, V) (``draw_noise``), each pass
    verifying up to ``speculate`` draft tokens per sample; see the module docstring."""
    check_speculate(speculate, decoder.compiled)
    model = decoder.model
    cfg = model.config
    L, V, device = cfg.num_image_tokens, cfg.codebook_size, model.device
    B = len(labels)
    per = 2 if config.guided else 1  # cache rows per sample: [cond, null], adjacent
    # Drafts for positions never predicted yet: the token above when the tokens form a square
    # image grid, else the token to the left (a guess; it decides speed only).
    above = math.isqrt(L) if math.isqrt(L) ** 2 == L else 1
    weights = cfg_schedule(L, config.cfg_scale, config.cfg_power, device)
    tokens = torch.zeros(B, L, dtype=torch.int64, device=device)  # final tokens, then drafts
    done = torch.ones(B, dtype=torch.int64)  # tokens final per sample (token 0 from the prefill)
    reach = torch.zeros(B, dtype=torch.int64)  # positions < reach hold a prediction
    passes, sample_passes = 1, B

    def distribution(logits: Tensor, steps: Tensor) -> Tensor:
        """Guided, filtered logits (n, V) from cond/null logits (n, per, V) at token ``steps``."""
        logits = upcast_logits(logits)
        out = guided_logits(logits[:, 0], logits[:, 1], weights[steps]) if per == 2 else logits[:, 0]
        return filtered_logits(out, config)

    with torch.inference_mode():
        cache = KVCache(cfg, B * per, model.dtype, device)
        row_labels = [x for label in labels for x in ([label, cfg.null_label] if per == 2 else [label])]
        logits = model.prefill(torch.tensor(row_labels, device=device), cache, 0)
        first = distribution(logits.view(B, per, V), torch.zeros(B, dtype=torch.int64, device=device))
        tokens[:, 0] = sample_from_logits(first, noise=noise[:, 0])
        reach[:] = 1
        conditions = sorted(set(row_labels))
        row_condition = torch.tensor([conditions.index(x) for x in row_labels], device=device)
        tables = ModulationTables(model, decoder.modulation_chunk(len(conditions)))
        full = None
        if tables.chunk > L:  # every label's whole table fits the budget: one gather per pass
            tables.prepare((label, 0) for label in conditions)  # one product for all labels
            full = torch.stack([tables.span(label, 2, L - 1) for label in conditions])
        all_rows = torch.arange(B, device=device)
        while bool((done < L).any()):
            passes += 1
            # Drafts for positions never predicted yet (a guess: it decides speed only), for
            # every window of this pass, position by position (a guess may copy the one before).
            # Offsets from L - 2 on reach only the last position, which is never fed: no draft.
            for offset in range(min(speculate, L - 2)):
                j = (reach + offset).clamp(max=L - 1).to(device)
                fresh = (j >= reach.to(device)) & (j < (done + speculate).clamp(max=L - 1).to(device))
                source = torch.where(j >= above, j - above, j - 1)
                tokens[all_rows, j] = torch.where(fresh, tokens[all_rows, source], tokens[all_rows, j])
            reach = torch.maximum(reach, (done + speculate).clamp(max=L - 1))
            active = (done < L).nonzero()[:, 0]
            t = done[active]
            t, order = t.sort(stable=True)
            members = active[order]  # samples grouped by progress: one window shape per group
            lengths = (L - t).clamp(max=speculate + 1)
            sample_passes += members.numel()
            # Flat index of every fed position: sample-major, then its cache rows, then the window.
            counts = lengths * per
            entry = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts).repeat_interleave(counts)
            length_of = lengths.repeat_interleave(counts)
            sample = members.repeat_interleave(counts)
            start = t.repeat_interleave(counts)
            w, r = entry % length_of, entry // length_of
            feed = tokens[sample.to(device), (start - 1 + w).to(device)]
            seq = (start + 1 + w).to(device)
            rows = (sample * per + r).to(device)
            groups = []
            values, sizes = torch.unique_consecutive(t, return_counts=True)
            first_member = 0
            for value, size in zip(values.tolist(), sizes.tolist(), strict=True):
                group = members[first_member : first_member + size].to(device)
                cache_rows = (group[:, None] * per + torch.arange(per, device=device)).flatten()
                groups.append((cache_rows, value + 1, min(speculate + 1, L - value)))
                first_member += size
            mod = _window_modulations(tables, full, groups, rows, seq, row_condition, conditions)
            windows = tuple(CacheWindow.causal(*group) for group in groups)
            logits = model.decode_step(feed, mod, cache, CacheAt(seq, windows=windows, slots=rows))
            # (sample, row, w) entries -> per (sample, w): cond/null logits, guided and filtered.
            cond = r == 0
            steps, owner = (start + w)[cond].to(device), sample[cond].to(device)
            if per == 1:
                paired = logits[:, None]
            else:
                paired = torch.stack([logits[cond.to(device)], logits[(r == 1).to(device)]], 1)
            race = sample_from_logits(distribution(paired, steps), noise=noise[owner, steps])
            drafts = tokens[owner, steps]  # position steps' draft, fed after it (inside the window)
            tokens[owner, steps] = race  # the final tokens, then the new drafts
            # Final: each window's prefix up to and including its first position whose draft differs
            # (the last position has no draft fed after it).
            w_cond, length_cond = w[cond], length_of[cond]
            differs = (drafts != race).cpu() | (w_cond == length_cond - 1)
            segment = torch.arange(members.numel()).repeat_interleave(lengths)
            first_differing = torch.full((members.numel(),), L).scatter_reduce(
                0, segment, torch.where(differs, w_cond, L), "amin"
            )
            done[members] += 1 + first_differing
            reach[members] = torch.maximum(reach[members], t + lengths)
    stats = SpeculationStats(passes=passes, sample_passes=sample_passes, samples=B, tokens=L)
    return tokens, stats


__all__ = ["MAX_SPECULATE", "SpeculationStats", "check_speculate", "generate_speculative"]
