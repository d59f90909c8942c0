"""The floor arithmetic of benchmarks/bench_sampling.py (issue 30 part 5), against bytes and FLOPs
counted by hand for a config small enough to count. No timing."""

from __future__ import annotations

import pytest

from conftest import load_benchmark
from rargen.model import ModelConfig

# D 4, one block, MLP 8, V 5, L 3, one head.
CONFIG = ModelConfig(
    codebook_size=5, num_classes=2, num_image_tokens=3, dim=4, depth=1, num_heads=1, mlp_dim=8,
    dropout=0.0, attn_dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sampling")


# Per-step Linears (out, in): qkv (12, 4), proj (4, 4), fc1 (8, 4), fc2 (4, 8), head (5, 4):
# 148 weights, 33 biases. adaLN: 6D x D + 6D, final 2D x D + 2D: 160 parameters, read once per
# chunk of 4 positions (L + 1: the budget holds them all). Batch 1 with guidance: 2 rows, 2
# conditions; each row reads its modulation rows (6 + 2) x D; feeding s = 2, 3 reads 3, 4 slots
# (mean 3.5) of keys and values of D.
@pytest.mark.parametrize(
    ("precision", "weight_bytes", "cache_bytes"),
    [
        ("fp32", (148 + 33) * 4 + 160 * 4 / 4 + 2 * 8 * 4 * 4, 2 * 2 * 3.5 * 4 * 4),
        ("bf16", (148 + 33) * 2 + 160 * 2 / 4 + 2 * 8 * 4 * 2, 2 * 2 * 3.5 * 4 * 2),
        # int8 weights, float32 bias and scale per output channel; adaLN and the cache float32
        ("int8", 148 + 33 * 4 + 33 * 4 + 160 * 4 / 4 + 2 * 8 * 4 * 4, 2 * 2 * 3.5 * 4 * 4),
    ],
)
def test_step_cost_counts_each_precisions_bytes_and_flops(
    bench, precision, weight_bytes, cache_bytes
) -> None:
    cost = bench.step_cost(CONFIG, batch=1, guided=True, distinct_labels=1, precision=precision)
    assert cost["chunk"] == 4
    assert cost["weight_bytes"] == pytest.approx(weight_bytes)
    assert cost["cache_bytes"] == pytest.approx(cache_bytes)
    assert cost["bytes"] == pytest.approx(weight_bytes + cache_bytes)
    # rows x (2 x 148 + attention 2 x 2 x 3.5 x D) + conditions x adaLN 2 x (6D x D + 2D x D)
    assert cost["flops"] == pytest.approx(2 * (2 * 148 + 2 * 2 * 3.5 * 4) + 2 * 2 * (96 + 32))


def test_floor_is_the_slower_of_reading_and_computing(bench) -> None:
    cost = bench.step_cost(CONFIG, batch=1, guided=True, distinct_labels=1, precision="fp32")
    assert cost["bytes"] == pytest.approx(1364) and cost["flops"] == pytest.approx(1216)
    assert bench.floor_seconds(cost, bandwidth=1000.0, matmul=1000.0) == (pytest.approx(1.364), "bytes")
    assert bench.floor_seconds(cost, bandwidth=1e6, matmul=1000.0) == (pytest.approx(1.216), "FLOPs")
    # unguided batch 4 with 2 labels: 4 rows, 2 conditions
    unguided = bench.step_cost(CONFIG, batch=4, guided=False, distinct_labels=2, precision="fp32")
    assert unguided["flops"] == pytest.approx(4 * (2 * 148 + 56) + 2 * 256)
    with pytest.raises(ValueError, match="int4"):
        bench.step_cost(CONFIG, batch=1, guided=True, distinct_labels=1, precision="int4")
