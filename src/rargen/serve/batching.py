"""Continuous batching for the web server: every request's images decode in one shared batch.

One thread owns a ``rargen.sampling.engine.Sampler``. Between two decode steps it lets queued jobs in
(whole requests, first come first served, as long as their rows fit: ``max_rows`` images, each
guided image taking two cache rows), drops cancelled jobs (their rows are free for the next
step), steps the batch once (a plain step, or an exact speculative pass while few rows decode and
the measured costs say it is faster: ``rargen.sampling.speculating``), and hands each job its
progress (every ``stream_every`` token rows) and its final tokens. A job's images depend only on
its settings and seeds: each sample keeps its own label, guidance schedule, temperature,
top-k/top-p and noise inside the batch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rargen.sampling.decoding import Decoder
from rargen.sampling.engine import Sample, SampleConfig, Sampler
from rargen.sampling.speculating import SpeculatingSampler
from rargen.sampling.speculation_policy import DEFAULT_DRAFTS, SpeculationPolicy

log = logging.getLogger(__name__)


# eq=False: jobs are compared by identity. Generated equality compared the noise tensors of two
# requests with equal settings (`job in list`, `list.remove`) and raised inside the loop.
@dataclass(eq=False)
class Job:
    """One request's samples: what the scheduler decodes and what it reports back on ``events``.

    Events: ``("rows", rows_done, tokens (B, L))`` every ``stream_every`` token rows (``width``
    tokens per row, the last row excluded), then ``("done", tokens)``, or ``("error", message)``.
    A job with ``orders`` (an edit, or a random order) counts its progress in steps of its order
    (``width`` steps a "row"), reports once as soon as it joins (its known cells show from the
    start), and adds the cells drawn so far: ``("rows", rows_done, tokens, filled (B, L) bool)``.
    Tokens are always at raster positions.
    """

    labels: Sequence[int]
    config: SampleConfig
    noise: Tensor  # (B, L, V) Exp(1) draws, one row per image (from its per-image seed)
    width: int  # tokens per token row of the image grid
    stream_every: int = 0  # token rows between progress events; 0 = none
    orders: Tensor | None = None  # (B, L) the image position of each step; None: raster
    known: Tensor | None = None  # (B, L) tokens in that order: row b's first counts[b] are given
    counts: Sequence[int] | None = None
    cancelled: bool = False
    samples: list[Sample] | None = None
    reported: int = -1  # tokens done at the last progress event

    def __post_init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        """Stop decoding this job at the next step boundary (its rows are freed then)."""
        self.cancelled = True


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` jobs already."""


class BatchScheduler:
    """Decodes all jobs in one batch on a background thread (``start`` / ``stop``)."""

    # Seconds without a decoding step, while jobs wait or decode, after which ``healthy`` says
    # stalled: far beyond one step of the largest model at the largest batch on a CPU.
    stall_after = 120.0

    def __init__(
        self, decoder: Decoder, max_rows: int, max_queue: int, speculate: int = DEFAULT_DRAFTS
    ) -> None:
        self.decoder, self.max_rows, self.max_queue = decoder, max_rows, max_queue
        # Draft tokens per speculative pass (0: plain steps only); kept across samplers.
        self.policy = SpeculationPolicy(decoder, speculate)
        self._sampler = self._new_sampler()
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._finished: deque[tuple[float, int]] = deque()  # (time, images) of the last minute
        self._stop = False
        self._beat = time.monotonic()  # when the loop last made progress (or went idle)
        self._thread = threading.Thread(target=self._run, name="rargen-batch", daemon=True)

    def _new_sampler(self) -> Sampler:
        return SpeculatingSampler(self.decoder, self.max_rows, guided=True, policy=self.policy)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the decoding thread is alive (started and not stopped)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(10)

    def healthy(self) -> tuple[bool, str]:
        """(ok, what the loop is doing): not ok when the thread is dead or when jobs wait or
        decode and no step came for ``stall_after`` seconds."""
        if not self.running:
            return False, "the decoding thread is not running"
        with self._lock:
            if not self._active and not self._waiting:
                return True, "idle"
            quiet = time.monotonic() - self._beat
        if quiet > self.stall_after:
            return False, f"no decoding step for {quiet:.0f} s with jobs waiting (stalled)"
        return True, "decoding"

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch at the next step its rows fit. QueueFull beyond
        ``max_queue`` waiting jobs."""
        if len(job.labels) > self.max_rows:
            raise ValueError(f"a job of {len(job.labels)} images never fits in {self.max_rows} rows")
        with self._lock:
            if len(self._waiting) >= self.max_queue and not self._fits_now(job):
                raise QueueFull(f"{len(self._waiting)} requests are queued (the limit)")
            self._waiting.append(job)
            self._lock.notify_all()

    def _fits_now(self, job: Job) -> bool:
        return not self._waiting and self._sampler.fits(len(job.labels), job.config.guided)

    def load(self) -> dict[str, float]:
        """Rows (images) decoding now, jobs queued, jobs decoding, and images/s over the last minute."""
        now = time.monotonic()
        with self._lock:
            while self._finished and now - self._finished[0][0] > 60.0:
                self._finished.popleft()
            images = sum(count for _, count in self._finished)
            span = max(1.0, now - self._finished[0][0]) if self._finished else 1.0
            return {
                "rows_in_flight": sum(len(job.labels) for job in self._active),
                "max_rows": self.max_rows,
                "queue_length": len(self._waiting),
                "jobs_in_flight": len(self._active),
                "images_per_second": round(images / span, 3) if images else 0.0,
            }

    # -- the decoding thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:  # the costs speculation is chosen by: measured once now, before any request waits on them
            with torch.inference_mode():
                self.policy.measure(2 * self.max_rows)
        except Exception as error:  # noqa: BLE001 - a failed measurement turns speculation off, no more
            log.warning("speculation off: measuring its cost failed: %r", error)
            self.policy.drafts = 0
        while True:
            with self._lock:
                while not self._stop and not self._active and not self._waiting:
                    self._beat = time.monotonic()
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self._cycle()
            except Exception as error:  # noqa: BLE001 - no error may end the loop: fail, log, go on
                self._fail_batch(error)

    def _cycle(self) -> None:
        """Let jobs in, step the batch once, report."""
        with self._lock:
            self._drop_cancelled()
            joining = self._admit()
            if not self._active and not joining:
                return
        with torch.inference_mode():
            for index, job in enumerate(joining):  # prefill + token 0, then it decodes with the others
                try:
                    given = {"tokens": job.known, "orders": job.orders, "given": job.counts}
                    job.samples = self._sampler.add(job.labels, job.config, noise=job.noise, **given)
                except ValueError as error:  # refused before the sampler changed: this job only
                    self._fail([job], error)
                    continue
                except Exception:  # a failed prefill may leave the batch half-changed: all of it fails
                    with self._lock:
                        self._active.append(job)
                        self._waiting.extendleft(reversed(joining[index + 1 :]))  # not started: they wait
                    raise
                with self._lock:
                    self._active.append(job)
            self._report()
            if self._active:
                self._sampler.step()
                self._beat = time.monotonic()
                self._report()

    def _admit(self) -> list[Job]:
        """Take waiting jobs, first come first served, while their rows fit together: each job's
        rows are reserved as it is taken (under the lock)."""
        joining: list[Job] = []
        while self._waiting:
            job = self._waiting[0]
            reserved = [(len(j.labels), j.config.guided) for j in joining]
            if not job.cancelled and not self._sampler.fits(len(job.labels), job.config.guided, reserved):
                break
            self._waiting.popleft()
            if not job.cancelled:
                joining.append(job)
        return joining

    def _fail_batch(self, error: Exception) -> None:
        """The shared batch failed: its jobs fail, the sampler starts anew, queued jobs wait on."""
        with self._lock:
            failed, self._active = self._active, []
            self._sampler = self._new_sampler()
        self._fail(failed, error)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        log.error("generation failed for %d job(s): %r", len(jobs), error, exc_info=error)
        for job in jobs:
            job.events.put(("error", f"generation failed: {error!r}"))

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._active if job.cancelled]:
            self._sampler.remove(job.samples or [])
            self._active.remove(job)
        self._waiting = deque(job for job in self._waiting if not job.cancelled)

    def _report(self) -> None:
        """Progress and completion events for the jobs whose samples got a token."""
        done_jobs = []
        for job in list(self._active):
            samples = job.samples or []
            done = samples[0].done
            if all(sample.finished for sample in samples):
                job.events.put(("done", _raster(job, torch.stack([s.tokens for s in samples]))))
                done_jobs.append(job)
                continue
            rows, L = done // job.width, len(samples[0].tokens)
            first = job.orders is not None and job.reported < 0
            every = job.width * job.stream_every  # tokens between events (a pass may cross one)
            if job.stream_every and (first or 0 < done < L and done // every > max(job.reported, 0) // every):
                job.reported = done
                tokens = _raster(job, torch.stack([s.tokens for s in samples]).clone())
                if job.orders is None:
                    job.events.put(("rows", rows, tokens))
                else:  # the cells of steps 0 .. done - 1
                    filled = torch.zeros_like(tokens, dtype=torch.bool).scatter_(
                        1, job.orders[:, :done], True
                    )
                    job.events.put(("rows", rows, tokens.where(filled, 0), filled))
        if done_jobs:
            with self._lock:
                now = time.monotonic()
                for job in done_jobs:
                    self._active.remove(job)
                    self._finished.append((now, len(job.labels)))


def _raster(job: Job, tokens: Tensor) -> Tensor:
    """A job's tokens (B, L) in its generation order, put back at their raster positions."""
    return tokens if job.orders is None else torch.empty_like(tokens).scatter_(1, job.orders, tokens)


def retry_after(load: dict[str, float]) -> int:
    """Seconds a client should wait before retrying a request refused for a full queue."""
    rate = load["images_per_second"]
    waiting = load["queue_length"] + load["rows_in_flight"]
    return max(1, min(60, math.ceil(waiting / rate))) if rate else 1


__all__ = ["BatchScheduler", "Job", "QueueFull", "retry_after"]
