"""The RAR generator: parameter counts, order semantics, causality, KV-cache decoding, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rargen.convert import count_params_official
from rargen.kv_cache import CacheAt, KVCache, cache_mask
from rargen.model import RAR, ModelConfig, attend_masked
from rargen.orders import raster_orders, sample_orders

# Official totals (spec Sec. 1.7) minus exactly the never-used rows (MaskGIT mask-token row,
# 1024 extra position rows, 1024 extra target-aware rows, 98 extra timestep rows).
PAPER_PARAMS = {
    "rar-b": (260_923_648, 259_276_288),
    "rar-l": (461_668_352, 459_471_872),
    "rar-xl": (955_425_024, 952_679_424),
    "rar-xxl": (1_498_520_704, 1_495_500_544),
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_preset_parameter_counts(name: str) -> None:
    official, ours = PAPER_PARAMS[name]
    config = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = RAR(config)
    assert model.num_params() == ours
    assert count_params_official(config) == official


def test_raster_orders_equal_no_orders(tiny_model: RAR) -> None:
    tokens = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 10, 4])
    torch.testing.assert_close(tiny_model(tokens, labels), tiny_model(tokens, labels, raster_orders(3, 16)))


def test_causal_in_any_order(tiny_model: RAR) -> None:
    generator = torch.Generator().manual_seed(2)
    B, L, V = 4, 16, 32
    tokens = torch.randint(0, V, (B, L), generator=generator)
    labels = torch.tensor([1, 2, 10, 3])
    orders = sample_orders(B, L, 1.0, generator)
    base = tiny_model(tokens, labels, orders)
    for j in (0, 5, L - 1):
        changed = tokens.clone()
        rows = torch.arange(B)
        changed[rows, orders[:, j]] = (changed[rows, orders[:, j]] + 1) % V
        out = tiny_model(changed, labels, orders)
        # Positions <= j never see the changed token (position j predicts it); later ones do.
        assert torch.equal(out[:, : j + 1], base[:, : j + 1])
        if j < L - 1:
            assert (out[:, j + 1 :] - base[:, j + 1 :]).abs().amax() > 1e-3


def test_order_semantics(tiny_model: RAR) -> None:
    """logits[b, i] predicts tokens[b, orders[b, i]]: permuting a raster sequence's positions
    with a matching order is the same factorisation as the raster order of the permuted image."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    labels = torch.tensor([5, 6])
    orders = sample_orders(2, 16, 1.0, generator)
    out = tiny_model(tokens, labels, orders)
    # The first output sees only the label and the target position orders[:, 0]: its logits
    # are those of the raster model for the image whose first token is orders[:, 0].
    # Changing which position comes first changes the first prediction (target-aware embedding).
    swapped = orders.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert (tiny_model(tokens, labels, swapped)[:, 0] - out[:, 0]).abs().amax() > 1e-3


def test_fresh_model_blocks_are_identity(tiny_config: ModelConfig) -> None:
    model = RAR(tiny_config).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(torch.randint(0, 32, (2, 16)), torch.tensor([0, 10]))
    assert len(seen) == tiny_config.depth
    for block_input, block_output in seen:
        assert torch.equal(block_input, block_output)
    assert torch.count_nonzero(model.cls_token) == 0


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager-runs", "fixed-shape-mask"])
def test_kv_cache_decode_equals_full_forward(tiny_model: RAR, fixed_shapes: bool) -> None:
    """Rows prefilled at different steps, each then decoding at its own position, give the full
    forward's logits."""
    generator = torch.Generator().manual_seed(4)
    B, L = 3, 16
    tokens = torch.randint(0, 32, (B, L), generator=generator)
    labels = torch.tensor([0, 9, 10])
    full = tiny_model(tokens, labels)
    cache = KVCache(tiny_model.config, B, tiny_model.dtype, tiny_model.device)
    start = [0, 0, 5]  # row b is prefilled at step start[b]
    out = torch.zeros_like(full)
    with torch.no_grad():
        out[:2, 0] = tiny_model.prefill(labels[:2], cache, 0)  # two rows in one prefill
        for step in range(1, L + max(start)):
            if step == start[2]:
                out[2, 0] = tiny_model.prefill(labels[2:], cache, 2)[0]
            live = [b for b in range(B) if start[b] < step < start[b] + L]
            a, z = live[0], live[-1] + 1
            positions = torch.tensor([step - start[b] + 1 for b in live])  # feeds token step-start-1
            fed = tokens[live, positions - 2]
            modulation = tiny_model.decode_modulations(labels[a:z], positions)
            if fixed_shapes:
                at = CacheAt(positions, mask=cache_mask(positions, L + 1))
            else:
                p = positions.tolist()
                at = CacheAt(positions, runs=tuple((i, i + 1, p[i]) for i in range(len(live))))
            rows = slice(a, z)
            sub = KVCache.__new__(KVCache)  # the live rows' view of the cache
            sub.k, sub.v = [k[rows] for k in cache.k], [v[rows] for v in cache.v]
            logits = tiny_model.decode_step(fed, modulation, sub, at)
            for i, b in enumerate(live):
                out[b, step - start[b]] = logits[i]
    torch.testing.assert_close(out, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("labels", "orders", "message"),
    [
        (torch.tensor([0, 11]), None, "labels must be in"),
        (torch.tensor([-1, 0]), None, "labels must be in"),
        (torch.tensor([0, 1]), torch.zeros(2, 16, dtype=torch.int64), "permutation"),
        (torch.tensor([0, 1]), torch.arange(15).expand(2, 15), "shape"),
        (torch.tensor([0, 1]), torch.arange(16).expand(2, 16).int(), "int64"),
        (torch.tensor([0.0, 1.0]), None, "int64"),
    ],
)
def test_bad_inputs_raise(tiny_model: RAR, labels, orders, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.zeros(2, 16, dtype=torch.int64), labels, orders)


def test_bad_tokens_raise(tiny_model: RAR) -> None:
    with pytest.raises(ValueError, match="codes in"):
        tiny_model(torch.full((2, 16), 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        tiny_model(torch.zeros(2, 15, dtype=torch.int64), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"dim": 65}, "divisible"), ({"depth": 0}, "positive"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_config_raises(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("rar-tiny", **overrides)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ValueError, match="rar-b"):
        ModelConfig.from_name("rar-huge")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_masked_attention_over_the_cache_is_sdpa_with_the_mask(dtype) -> None:
    """The compiled CPU step's attention (sums Inductor fuses) against SDPA: exact in float64,
    bf16 inputs summed in float32."""
    generator = torch.Generator().manual_seed(0)
    M, H, S, hd = 3, 4, 9, 8
    shapes = ((M, H, hd), (M, H, S, hd), (M, H, S, hd))
    q, keys, values = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes)
    mask = (torch.arange(S) <= torch.tensor([0, 4, 8])[:, None])[:, None, None]  # rows' prefixes 1, 5, 9
    want = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)[:, :, 0]
    got = attend_masked(q.to(dtype), keys.to(dtype), values.to(dtype), mask)
    assert got.dtype == dtype and got.shape == (M, H, hd)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance)
    # a slot past a row's prefix changes nothing for that row
    keys[0, :, 1:] += 100.0
    torch.testing.assert_close(attend_masked(q, keys, values, mask)[0], want[0], rtol=0, atol=1e-12)
