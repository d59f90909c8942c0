"""Speculation inside the continuously batched engine (the server's): the tokens of plain decoding,
chosen by measured cost."""

from __future__ import annotations

import time

import pytest
import torch

import rargen.sampling.speculation_policy as policy_module
from rargen.model import RAR
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, draw_noise, generate, sample_seed
from rargen.sampling.speculating import SpeculatingSampler
from rargen.sampling.speculation_policy import PassCost, SpeculationPolicy, pass_cost
from rargen.serve.batching import BatchScheduler, Job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GUIDED = SampleConfig(cfg_scale=3.0, cfg_power=1.0, top_k=20)
PLAIN = SampleConfig(temperature=0.9, top_p=0.8)


class Always(SpeculationPolicy):
    """Speculate at every step (the choice decides speed only; these tests check the tokens)."""

    def speculate(self, rows: int, capacity: int) -> bool:
        self.passes += 1
        return True


def noise_for(model: RAR, seeds: list[int]) -> torch.Tensor:
    cfg = model.config
    return draw_noise((len(seeds), cfg.num_image_tokens, cfg.codebook_size), model.device, seeds=seeds)


@pytest.mark.parametrize("drafts", [1, 4, 15])
def test_a_lone_sample_gets_the_plain_tokens(tiny_model: RAR, drafts: int) -> None:
    """float64: no rounding difference between a window and a one-position step."""
    decoder = prepare_for_decoding(tiny_model)
    sampler = SpeculatingSampler(decoder, 1, policy=Always(decoder, drafts))
    with torch.inference_mode():
        (sample,) = sampler.add([4], GUIDED, noise=noise_for(tiny_model, [11]))
        steps = 0
        while sampler.samples:
            sampler.step()
            steps += 1
    assert torch.equal(sample.tokens, generate(tiny_model, [4], GUIDED, seeds=[11])[0])
    assert steps < tiny_model.config.num_image_tokens - 1  # passes kept more than one token


def test_a_mixed_batch_with_joins_and_a_cancel_gets_the_plain_tokens(tiny_model: RAR) -> None:
    """Guided and unguided samples, different settings, joining at different steps, one
    cancelled, plain steps and passes interleaved: each sample's tokens are plain decoding's."""
    decoder = prepare_for_decoding(tiny_model)
    policy = Always(decoder, 4)
    sampler = SpeculatingSampler(decoder, 5, policy=policy)
    seeds = [sample_seed(7, i) for i in range(5)]
    noise = noise_for(tiny_model, seeds)
    with torch.inference_mode():
        first = sampler.add([1, 5], GUIDED, noise=noise[:2])
        sampler.step()
        second = sampler.add([7], PLAIN, noise=noise[2:3])
        sampler.step()
        cancelled = sampler.add([2], GUIDED, noise=noise[3:4])
        sampler.step()
        sampler.remove(cancelled)
        third = sampler.add([9], PLAIN, noise=noise[4:])
        policy.drafts = 0  # a plain step between passes: drafts left behind are only guesses
        super(SpeculatingSampler, sampler).step()
        policy.drafts = 4
        while sampler.samples:
            sampler.step()
    assert torch.equal(
        torch.stack([s.tokens for s in first]), generate(tiny_model, [1, 5], GUIDED, seeds=seeds[:2])
    )
    assert torch.equal(second[0].tokens, generate(tiny_model, [7], PLAIN, seeds=seeds[2:3])[0])
    assert torch.equal(third[0].tokens, generate(tiny_model, [9], PLAIN, seeds=seeds[4:])[0])


def test_the_server_scheduler_speculates_and_gives_the_plain_tokens(tiny_model: RAR) -> None:
    """The server's batch: a lone job, then two jobs together, token-identical to generate()."""
    decoder = prepare_for_decoding(tiny_model)
    scheduler = BatchScheduler(decoder, max_rows=4, max_queue=4)
    scheduler.policy = Always(decoder, 8)
    scheduler._sampler = scheduler._new_sampler()
    cfg = tiny_model.config

    def job(label: int, count: int, seed: int, config: SampleConfig) -> Job:
        seeds = [sample_seed(seed, i) for i in range(count)]
        return Job([label] * count, config, noise_for(tiny_model, seeds), width=4, stream_every=1)

    def run(*jobs: Job) -> None:
        for j in jobs:
            scheduler.submit(j)
        while scheduler._active or scheduler._waiting:
            scheduler._cycle()

    lone = job(3, 1, 5, GUIDED)
    run(lone)
    together = [job(2, 2, 6, GUIDED), job(8, 1, 9, PLAIN)]
    run(*together)
    for j, seed in zip([lone, *together], [5, 6, 9], strict=True):
        events = []
        while not j.events.empty():
            events.append(j.events.get())
        assert events[-1][0] == "done", events[-1]
        seeds = [sample_seed(seed, i) for i in range(len(j.labels))]
        assert torch.equal(events[-1][1], generate(tiny_model, list(j.labels), j.config, seeds=seeds))
        rows = [e[1] for e in events if e[0] == "rows"]
        assert rows == sorted(set(rows)) and rows  # progress still streamed, rows only forward
    assert scheduler.policy.passes > 0 and cfg.num_image_tokens > 8


def test_teacher_forced_and_ordered_rows_step_plainly(tiny_model: RAR) -> None:
    decoder = prepare_for_decoding(tiny_model)
    sampler = SpeculatingSampler(decoder, 2, policy=Always(decoder, 4))
    tokens = torch.zeros(1, tiny_model.config.num_image_tokens, dtype=torch.int64)
    with torch.inference_mode():
        sampler.add([1], GUIDED, tokens=tokens)
    assert not sampler.can_speculate()


def test_the_policy_speculates_at_few_rows_from_measured_costs(tiny_model: RAR, monkeypatch) -> None:
    """A pass costing 1.5 steps at 2 rows pays (2 tokens per pass assumed); 6 steps at 16 does not."""
    ratios = {2: 1.5, 4: 1.8, 8: 2.5, 16: 6.0}
    measured: list[int] = []

    def fake(decoder, rows: int, drafts: int) -> PassCost:
        measured.append(rows)
        return PassCost(rows, 1.0, ratios[rows])

    monkeypatch.setattr(policy_module, "measure_pass_cost", fake)
    decoder = prepare_for_decoding(tiny_model)
    policy = SpeculationPolicy(decoder, 4)
    assert policy.speculate(2, 16) and policy.speculate(4, 16)
    assert not policy.speculate(6, 16)  # bucket 8: 2.5 steps for about 2 tokens
    assert not policy.speculate(16, 16)  # not measured: a smaller bucket already does not pay
    assert sorted(set(measured)) == [2, 4, 8] and len(measured) == 3  # each measured once
    policy.observe(4.0)
    policy.observe(4.0)
    assert policy.speculate(6, 16)  # more tokens per pass than assumed: 8 rows pay now
    assert not SpeculationPolicy(decoder, 0).speculate(2, 16)  # 0 drafts: off


def test_a_pass_cost_is_measured_once_per_decoder(tiny_model: RAR) -> None:
    decoder = prepare_for_decoding(tiny_model)
    cost = pass_cost(decoder, 2, 3)
    assert cost.step_s > 0 and cost.pass_s > 0 and pass_cost(decoder, 2, 3) is cost


def test_served_images_are_pixel_identical_to_plain_decoding(tmp_path, monkeypatch) -> None:
    """Over HTTP, speculating at every step: a lone request, then requests decoding together, get
    the PNGs of a server that never speculates."""
    import threading

    from serve_helpers import request, running_server, save_tiny_pair

    pair = save_tiny_pair(tmp_path)
    bodies = [
        {"class": 1, "seed": 3, "cfg_scale": 3.0, "cfg_power": 1.0},
        {"class": 4, "seed": 5, "batch_size": 2},
    ]

    def pngs(server, body) -> list[str]:
        status, reply, _ = request(server, "POST", "/generate", {**body, "top_k": 8})
        assert status == 200, reply
        return [image["png"] for image in reply["images"]]

    with running_server(pair, rate_limit=0, speculate=0) as server:
        plain = [pngs(server, body) for body in bodies]
    monkeypatch.setattr(SpeculationPolicy, "speculate", lambda self, rows, capacity: self.drafts > 0)
    with running_server(pair, rate_limit=0) as server:
        assert pngs(server, bodies[0]) == plain[0]  # alone
        together: list = [None, None]
        threads = [
            threading.Thread(target=lambda i=i: together.__setitem__(i, pngs(server, bodies[i])))
            for i in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert together == plain


def test_inexact_decoders_never_speculate(tiny_model: RAR) -> None:
    """bf16 and int8 round a window differently from a step enough to change tokens; a compiled
    decoder has no window step: the policy never measures them, and says no."""
    from rargen.sampling.speculation_policy import speculation_is_exact

    model = tiny_model.float()
    assert speculation_is_exact(prepare_for_decoding(model))
    int8 = prepare_for_decoding(model, quantize="int8")
    compiled = prepare_for_decoding(model, compile=True)
    bf16 = prepare_for_decoding(model.to(torch.bfloat16), bf16=True)
    for decoder in (int8, compiled, bf16):
        assert not speculation_is_exact(decoder) and not SpeculationPolicy(decoder).speculate(2, 2)


def test_times_recorded_in_use_take_over_and_the_other_kind_is_probed(tiny_model: RAR, monkeypatch) -> None:
    """The scratch measurement leaves sampling out; once steps and passes are timed in use, their
    times decide, and a pass still runs every PROBE_EVERY steps so both stay measured."""
    from rargen.sampling.speculation_policy import PROBE_EVERY, TIMED_ENOUGH

    monkeypatch.setattr(
        policy_module, "measure_pass_cost", lambda decoder, rows, drafts: PassCost(rows, 1.0, 1.5)
    )
    policy = SpeculationPolicy(prepare_for_decoding(tiny_model), 4)
    assert policy.speculate(2, 16)  # measured on the scratch batch: 1.5 steps for ~2 tokens
    for _ in range(TIMED_ENOUGH):
        policy.record(2, 16, True, 3.0)  # in use a pass costs 3 steps: no longer pays
        policy.record(2, 16, False, 1.0)
    choices = [policy.speculate(2, 16) for _ in range(2 * PROBE_EVERY)]
    assert choices.count(True) == 2 and not choices[0]  # one probe per PROBE_EVERY choices


def test_the_server_measures_every_bucket_speculation_could_pay_at_before_requests(
    tiny_model: RAR, monkeypatch
) -> None:
    """Measured lazily, the first concurrent requests of a fresh server waited on one measurement
    per bucket (bench_serve.py --compare-speculation: eight requests took 2.25 s against 0.79 s
    with plain steps). The loop measures them when it starts, up to the first bucket where a pass
    costs more steps than the K + 1 tokens it can make."""
    ratios = {2: 1.5, 4: 3.0, 8: 5.0, 16: 9.5, 32: 20.0}
    measured: list[int] = []

    def fake(decoder, rows: int, drafts: int) -> PassCost:
        measured.append(rows)
        return PassCost(rows, 1.0, ratios[rows])

    monkeypatch.setattr(policy_module, "measure_pass_cost", fake)
    scheduler = BatchScheduler(prepare_for_decoding(tiny_model), max_rows=16, max_queue=4, speculate=8)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while len(measured) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # nothing more comes
    finally:
        scheduler.stop()
    assert measured == [2, 4, 8, 16]  # 16 rows: 9.5 steps for at most 9 tokens; 32 never pays
