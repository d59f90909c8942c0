"""The server's continuous-batching scheduler on its own: jobs compared by identity, rows reserved at
admission, and a decoding thread that cannot die silently (issue 25, items 1 and 2)."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, draw_noise, generate, sample_seed
from rargen.serve.batching import BatchScheduler, Job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = SampleConfig(cfg_scale=2.0, temperature=0.9, top_k=20)


@pytest.fixture(scope="module")
def model() -> RAR:
    return randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()


def make_job(model: RAR, label: int, count: int, seed: int, config: SampleConfig = CONFIG) -> Job:
    cfg = model.config
    seeds = [sample_seed(seed, i) for i in range(count)]
    noise = draw_noise((count, cfg.num_image_tokens, cfg.codebook_size), model.device, seeds=seeds)
    return Job(labels=[label] * count, config=config, noise=noise, width=4)


def outcome(job: Job, timeout: float = 30.0):
    """The job's last event: ("done", tokens) or ("error", message); skips progress events."""
    while True:
        kind, *payload = job.events.get(timeout=timeout)
        if kind != "rows":
            return kind, payload[0]


def alone(model: RAR, label: int, count: int, seed: int) -> torch.Tensor:
    return generate(model, [label] * count, CONFIG, seeds=[sample_seed(seed, i) for i in range(count)])


@pytest.fixture
def scheduler(model):
    scheduler = BatchScheduler(prepare_for_decoding(model), max_rows=16, max_queue=8)
    yield scheduler
    scheduler.stop()


def test_jobs_are_compared_by_identity(model) -> None:
    """Two requests with equal settings make equal jobs field by field; `job in list` and
    `list.remove(job)` compared their noise tensors and raised (the thread died)."""
    first, second = make_job(model, 3, 2, seed=7), make_job(model, 3, 2, seed=7)
    assert first != second and first == first
    assert [first, second].index(second) == 1


def test_cancelling_one_of_two_equal_jobs_leaves_the_other_to_finish(model, scheduler) -> None:
    first, second = make_job(model, 3, 2, seed=7), make_job(model, 3, 2, seed=7)
    first.cancel()  # cancelled while waiting: dropped from the queue by identity
    scheduler.submit(first)
    scheduler.submit(second)
    scheduler.start()
    kind, tokens = outcome(second)
    assert kind == "done" and torch.equal(tokens, alone(model, 3, 2, seed=7))
    # The thread lives on and serves the next job.
    third = make_job(model, 3, 2, seed=7)
    scheduler.submit(third)
    assert outcome(third)[0] == "done" and scheduler.healthy()[0]


def test_jobs_admitted_together_never_overflow_the_batch(model, scheduler) -> None:
    """4 + 8 + 8 guided images at 16 rows: each was checked against the same free rows, the third
    add raised and every job in the batch failed. Now the third waits for rows."""
    jobs = [make_job(model, 1, 4, seed=1), make_job(model, 2, 8, seed=2), make_job(model, 5, 8, seed=3)]
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    for job, (label, count, seed) in zip(jobs, [(1, 4, 1), (2, 8, 2), (5, 8, 3)], strict=True):
        kind, tokens = outcome(job)
        assert kind == "done", tokens
        assert torch.equal(tokens, alone(model, label, count, seed))


def test_an_unexpected_error_fails_its_jobs_is_logged_and_the_thread_lives_on(
    model, scheduler, monkeypatch, caplog
) -> None:
    calls = {"n": 0}
    original = scheduler._sampler.step.__func__

    def failing_once(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a broken kernel")
        return original(self)

    monkeypatch.setattr(type(scheduler._sampler), "step", failing_once)
    job = make_job(model, 4, 1, seed=9)
    scheduler.submit(job)
    scheduler.start()
    kind, message = outcome(job)
    assert kind == "error" and "a broken kernel" in message
    assert "a broken kernel" in caplog.text
    again = make_job(model, 4, 1, seed=9)
    scheduler.submit(again)
    assert outcome(again)[0] == "done"
    assert scheduler.healthy() == (True, "idle")


def test_an_error_outside_the_step_does_not_kill_the_thread(model, scheduler, monkeypatch) -> None:
    """Any error in the loop (here in dropping cancelled jobs) fails the jobs it concerns; the
    thread keeps serving."""
    original = BatchScheduler._drop_cancelled
    broken = {"once": True}

    def drop(self):
        if self._active and broken.pop("once", False):
            raise TypeError("a bug in the bookkeeping")
        return original(self)

    monkeypatch.setattr(BatchScheduler, "_drop_cancelled", drop)
    job = make_job(model, 4, 1, seed=9)
    scheduler.submit(job)
    scheduler.start()
    kind, message = outcome(job)
    assert kind == "error" and "a bug in the bookkeeping" in message
    again = make_job(model, 4, 1, seed=9)
    scheduler.submit(again)
    assert outcome(again)[0] == "done" and scheduler.running


def test_a_dead_or_stalled_scheduler_is_unhealthy(model, scheduler) -> None:
    assert scheduler.healthy() == (False, "the decoding thread is not running")
    scheduler.start()
    assert scheduler.healthy() == (True, "idle")
    # Work waiting and no step for longer than stall_after seconds: stalled.
    scheduler.stall_after = 0.0
    with scheduler._lock:  # hold the loop: it cannot take the job while the lock is held
        scheduler._waiting.append(make_job(model, 1, 1, seed=0))
        healthy, reason = scheduler.healthy()
    assert not healthy and "no decoding step for" in reason
    scheduler.stop()
    assert scheduler.healthy() == (False, "the decoding thread is not running")
