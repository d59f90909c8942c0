"""When exact speculation pays: measured on the model, not a fixed rule.

A speculative pass (``rargen.sampling.speculative``) feeds ``K + 1`` positions per row and makes
``a`` tokens final per sample on average (``a`` = tokens per pass, >= 1); a plain step feeds one
position and makes one token. Speculation pays at ``rows`` live cache rows when

    pass_time(rows, K + 1) < a * step_time(rows).

Both times are measured once per decoder, row bucket (a power of two) and thread count, on a
scratch batch at the middle of the sequence (the mean cache length of a generation), and kept
(``pass_cost``); then the times of the steps and passes run in use, sampling included, take
over (``record``: the other kind is probed now and then, so both stay measured). At few rows a
step streams the weights from memory, so a pass costs little more than a step and speculation
pays; at many rows a step is bound by arithmetic, which a pass
multiplies by ``K + 1``, and it does not (BENCHMARKS.md). ``a`` is learnt from the passes run
(an exponential average of the tokens made final per sample and pass), starting from
``PRIOR_TOKENS_PER_PASS``, and relaxes back towards it while plain steps run, so a few hard
passes do not turn speculation off for good.

Exactness does not depend on the choice: plain steps and speculative passes draw every token
from the same noise and distribution (``rargen.sampling.speculating``); the choice decides speed.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rargen.sampling.decoding import DecodeBatch, Decoder

# Tokens made final per sample and pass assumed before any pass ran (measured on the demo
# generator with K = 8: 3.2 at batch 1, 2.7 at batch 8; a cautious start below both).
PRIOR_TOKENS_PER_PASS = 2.0
DEFAULT_DRAFTS = 8  # K: the best measured at batch 1 on the demo generator (BENCHMARKS.md)
REPEATS = 3  # timed runs per measurement at least (the fastest is kept: load only adds time)
MEASURE_BUDGET_S = 0.5  # more runs while a measurement has taken less than this
# Steps and passes timed in use (sampling included, which the scratch measurement leaves out)
# decide once a bucket has this many of each; the other kind is probed every PROBE_EVERY choices.
TIMED_ENOUGH = 3
PROBE_EVERY = 16


@dataclass(frozen=True)
class PassCost:
    """Seconds of one plain step and of one speculative pass at ``rows`` cache rows."""

    rows: int
    step_s: float
    pass_s: float

    @property
    def ratio(self) -> float:
        """A pass in plain steps: speculation pays when fewer than the tokens per pass."""
        return self.pass_s / max(self.step_s, 1e-12)


_COSTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, int], PassCost]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def measure_pass_cost(decoder: Decoder, rows: int, drafts: int) -> PassCost:
    """Time a plain step and a pass of ``drafts + 1`` positions at ``rows`` cache rows, on a
    scratch batch with every row half way through the sequence (the fastest of ``REPEATS`` or
    more runs after a warm-up)."""
    L = decoder.config.num_image_tokens
    batch = DecodeBatch(decoder, rows, conditions=1)
    middle = max(2, L // 2 + 1)  # the cache half full: the mean prefix of a generation
    window = max(1, min(drafts + 1, L + 1 - middle))
    zeros = torch.zeros(rows, window, dtype=torch.int64, device=batch.feed.device)
    with torch.inference_mode():
        batch.add([0] * rows)
        step_s, pass_s = float("inf"), float("inf")
        repeats, spent = 0, time.perf_counter()
        # At least REPEATS timed runs after a warm-up, more while they take under a budget (a
        # small model's few ms are easily upset by other processes: the fastest run is kept).
        while repeats <= REPEATS or repeats < 50 and time.perf_counter() - spent < MEASURE_BUDGET_S:
            repeats += 1
            batch.advance([middle - p for p in batch.positions])
            start = time.perf_counter()
            batch.feed_windows([window] * rows, zeros)
            pass_s = min(pass_s, time.perf_counter() - start)
            start = time.perf_counter()
            batch.step()
            step_s = min(step_s, time.perf_counter() - start)
    return PassCost(rows, step_s, pass_s)


def pass_cost(decoder: Decoder, rows: int, drafts: int) -> PassCost:
    """``measure_pass_cost``, measured once per decoder, rows, drafts and torch thread count."""
    key = (rows, drafts, torch.get_num_threads())
    with _LOCK:
        known = _COSTS.get(decoder.model, {}).get(key)
    if known is None:
        known = measure_pass_cost(decoder, rows, drafts)
        with _LOCK:
            _COSTS.setdefault(decoder.model, {})[key] = known
    return known


def _bucket(rows: int, capacity: int) -> int:
    """The power of two (from 2) at or above ``rows``, at most ``capacity``."""
    return next((bucket for bucket in _buckets(capacity) if bucket >= rows), capacity)


def _buckets(last: int) -> Iterator[int]:
    """The buckets from 2 (one guided sample: its cond and null rows) doubling up to ``last`` (a
    bucket), the order in which a pass's costs grow."""
    bucket = 2
    while True:
        yield min(bucket, last)
        if bucket >= last:
            return
        bucket *= 2


def speculation_is_exact(decoder: Decoder) -> bool:
    """Whether a pass gives plain decoding's tokens up to float32 rounding: an eager float32 or
    float64 decoder. Not compiled (no window step), not int8 (its input scale depends on the rows
    multiplied together), not bf16 (a window rounds differently enough to change tokens often)."""
    exact_dtype = decoder.model.dtype in (torch.float32, torch.float64)
    return not decoder.compiled and decoder.quantize is None and exact_dtype


class SpeculationPolicy:
    """Decides, before each step of a batch, whether a speculative pass of ``drafts`` draft
    tokens per sample or a plain step makes tokens faster, from measured costs (see the module
    docstring). ``drafts=0``: never."""

    def __init__(self, decoder: Decoder, drafts: int = DEFAULT_DRAFTS) -> None:
        if not isinstance(drafts, int) or drafts < 0:
            raise ValueError(f"speculation drafts must be an int >= 0 (0 = off), got {drafts!r}")
        self.decoder, self.drafts = decoder, drafts
        self.tokens_per_pass = PRIOR_TOKENS_PER_PASS
        self.passes = self.steps = 0  # what it chose so far
        self._timed: dict[tuple[int, bool], tuple[int, float]] = {}  # (bucket, pass?): (count, mean s)
        self._streak: dict[int, int] = {}  # choices of one kind in a row at a bucket

    def speculate(self, rows: int, capacity: int) -> bool:
        """Whether a batch of ``rows`` live cache rows (of ``capacity``) should run a pass now.
        Rows are bucketed to powers of two; a bucket's costs are measured (once) only while every
        smaller one pays, since a pass costs relatively more with every row added. Where both are
        timed in use (``record``), those times decide, and every ``PROBE_EVERY`` choices of one
        kind at a bucket one of the other runs, so both times stay measured."""
        if not self.drafts or not speculation_is_exact(self.decoder):
            return False
        target = _bucket(rows, capacity)
        for bucket in _buckets(target):
            pays = self.ratio(bucket) < self.tokens_per_pass
            if not pays:
                break
        if not pays:  # tokens per pass relax towards the prior while no pass runs
            self.tokens_per_pass += 0.02 * (PRIOR_TOKENS_PER_PASS - self.tokens_per_pass)
        if bucket == target:
            same = self._streak.get(bucket, 0) + 1
            self._streak[bucket] = 0 if same >= PROBE_EVERY else same
            pays = pays != (same >= PROBE_EVERY)  # a probe of the other kind
        if pays:
            self.passes += 1
        else:
            self.steps += 1
        return pays

    def measure(self, capacity: int) -> None:
        """Measure now the cost of every bucket up to ``capacity`` rows that speculation could
        ever pay at: up to the first where a pass costs more plain steps than the ``drafts + 1``
        tokens a pass makes at most (``speculate`` never walks past it). Measured lazily instead,
        the first requests of a fresh server to reach a bucket waited on it (up to
        ``MEASURE_BUDGET_S`` each: eight concurrent requests on the demo generator took 2.25 s
        against 0.79 s with plain steps)."""
        if not self.drafts or not speculation_is_exact(self.decoder):
            return
        for bucket in _buckets(capacity):
            if pass_cost(self.decoder, bucket, self.drafts).ratio >= self.drafts + 1:
                return

    def ratio(self, bucket: int) -> float:
        """A pass in plain steps at ``bucket`` rows: from the times recorded in use when both
        kinds have some, else from the scratch measurement (``pass_cost``)."""
        passes, steps = self._timed.get((bucket, True)), self._timed.get((bucket, False))
        if passes and steps and min(passes[0], steps[0]) >= TIMED_ENOUGH:
            return passes[1] / max(steps[1], 1e-12)
        return pass_cost(self.decoder, bucket, self.drafts).ratio

    def record(self, rows: int, capacity: int, speculated: bool, seconds: float) -> None:
        """Time of a whole step of the sampler (a pass or a plain one, sampling included) at
        ``rows`` cache rows: a mean over the last ~16 of its bucket and kind."""
        key = (_bucket(rows, capacity), speculated)
        count, mean = self._timed.get(key, (0, 0.0))
        count += 1
        self._timed[key] = (count, mean + (seconds - mean) / min(count, 16))

    def observe(self, tokens_per_pass: float) -> None:
        """Record a pass that made ``tokens_per_pass`` tokens final per sample on average."""
        self.tokens_per_pass += 0.2 * (tokens_per_pass - self.tokens_per_pass)


__all__ = [
    "DEFAULT_DRAFTS",
    "PRIOR_TOKENS_PER_PASS",
    "PassCost",
    "SpeculationPolicy",
    "measure_pass_cost",
    "pass_cost",
    "speculation_is_exact",
]
