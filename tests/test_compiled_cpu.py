"""The decode step compiled by Inductor on a CPU (issue 30 part 1): the logits of rows at their own
positions agree with the eager step's, one program serves every prefix length, rows are padded
to a power of two. Tiny model; the compile (with autotuning) is what takes the time."""

from __future__ import annotations

import pytest
import torch

from rargen.model import RAR
from rargen.sampling import compiled_cpu
from rargen.sampling.compiled_cpu import rows_for
from rargen.sampling.decoding import DecodeBatch, prepare_for_decoding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_for_pads_to_a_power_of_two_within_the_cache() -> None:
    assert [rows_for(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [rows_for(n, 6) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]


@pytest.mark.slow
def test_compiled_cpu_step_matches_eager_at_every_position_with_one_program(
    tiny_model: RAR, monkeypatch
) -> None:
    """Without autotuning (the slow part of a compile; tests/test_sampling.py's compiled
    generate runs the autotuned GEMMs): rows at their own positions, a row joining, padding."""
    options = {**compiled_cpu.INDUCTOR_OPTIONS, "max_autotune": False}
    monkeypatch.setattr(compiled_cpu, "INDUCTOR_OPTIONS", options)
    model = tiny_model.float()
    compiled = prepare_for_decoding(model, compile=True)
    assert compiled.cpu_step is not None and compiled.model is not model
    assert prepare_for_decoding(model, compile=True) is compiled  # kept with the model
    batches = {
        name: DecodeBatch(decoder, 4)
        for name, decoder in (("eager", prepare_for_decoding(model)), ("compiled", compiled))
    }
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logits = {name: batch.add([1, 2])[1] for name, batch in batches.items()}
        for step in range(12):
            if step == 4:  # a third row joins behind the others: 3 live rows run as 4
                logits = {name: batch.add([7])[1] for name, batch in batches.items()}
            tokens = torch.randint(0, 32, (len(batches["eager"]),), generator=generator)
            for batch in batches.values():
                batch.feed[: len(batch)] = tokens
            logits = {name: batch.step() for name, batch in batches.items()}
            torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-4, atol=1e-4)
    assert batches["compiled"].positions == [14, 14, 10]
    # one program per row bucket (2, then 4), whatever the prefix length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_float32_buckets_of_16_rows_run_the_eager_step(tiny_model: RAR) -> None:
    """EAGER_FROM_ROWS: where the eager oneDNN step measured faster, a compiled decoder runs it
    (the same logits as the eager decoder, bit for bit) and compiles nothing."""
    assert compiled_cpu.EAGER_FROM_ROWS == {torch.float32: 16}
    model = tiny_model.float()
    batches = {
        name: DecodeBatch(prepare_for_decoding(model, compile=name == "compiled"), 16)
        for name in ("eager", "compiled")
    }
    assert not batches["compiled"]._cpu_step.compiles(9, 16) and batches["compiled"]._cpu_step.compiles(8, 16)
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batches.values():
            batch.add(list(range(10)))  # 10 rows: the bucket of 16
        for _ in range(3):
            tokens = torch.randint(0, 32, (10,), generator=generator)
            for batch in batches.values():
                batch.feed[:10] = tokens
            logits = {name: batch.step() for name, batch in batches.items()}
            assert torch.equal(logits["compiled"], logits["eager"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
