"""The oneDNN-packed CPU decoding view: same numbers as the plain model, caller's model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import requires
from rargen.model import RAR
from rargen.sampling.cpu import PackedLinear, is_packed, packed_for_cpu_decoding
from rargen.sampling.engine import SampleConfig, generate, token_probs

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    requires(
        None if torch.backends.mkldnn.is_available() else "oneDNN in this torch build",
        "install a torch build with oneDNN; the x86 CPU wheels have it",
    ),
]


@pytest.mark.parametrize("rows", [1, 2, 16, 300])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_packed_linear_matches_float64(rows: int, activation: str) -> None:
    generator = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(96, 200)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=generator) * 0.1)
        linear.bias.copy_(torch.randn(200, generator=generator))
    x = torch.randn(rows, 96, generator=generator)
    expected = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    if activation == "gelu":
        expected = F.gelu(expected)
    got = PackedLinear(linear, activation)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 200)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert PackedLinear(linear, activation)(x[:, None]).shape == (rows, 1, 200)  # leading dims kept


def test_packed_linear_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation must be"):
        PackedLinear(torch.nn.Linear(4, 4), "relu")


def test_view_shares_parameters_and_leaves_the_model_alone(tiny_model: RAR) -> None:
    model = tiny_model.float()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    view = packed_for_cpu_decoding(model)
    assert is_packed(view) and not is_packed(model)
    assert packed_for_cpu_decoding(view) is view  # packing a view again is free
    assert view.token_embed.weight is model.token_embed.weight  # embeddings are shared, not copied
    assert all(isinstance(m, torch.nn.Linear) for m in (model.head, model.blocks[0].attn.qkv))
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert packed_for_cpu_decoding(model.double()) is model  # float64: nothing to pack
    assert packed_for_cpu_decoding(model.float().train()) is model  # training: never packed


def test_packed_view_samples_like_the_model(tiny_model: RAR) -> None:
    model = tiny_model.float()
    config, labels, seeds = SampleConfig(cfg_scale=3.0, cfg_power=1.0), [1, 5, 5], [7, 8, 9]
    view = packed_for_cpu_decoding(model)
    reference = generate(model, labels, config, seeds=seeds)
    assert torch.equal(generate(view, labels, config, seeds=seeds), reference)
    with pytest.raises(ValueError, match="not a packed_for_cpu_decoding view"):
        generate(view, labels, config, seeds=seeds, compile=True)


def test_packed_decoding_matches_float64(tiny_model: RAR) -> None:
    """The fp32 packed path (what generate runs on a CPU) against the float64 model: float32
    accuracy (guidance at g = 4 multiplies logit errors by up to 4)."""
    tokens = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    config = SampleConfig(cfg_scale=4.0, cfg_power=2.0, temperature=0.9)
    reference = token_probs(tiny_model, [0, 3, 9], tokens, config)
    packed = token_probs(packed_for_cpu_decoding(tiny_model.float()), [0, 3, 9], tokens, config)
    torch.testing.assert_close(packed.double(), reference, rtol=0, atol=1e-5)


def test_few_rows_are_padded_without_changing_them() -> None:
    """1-3 rows run through the 4-row kernel (zero rows added, their outputs dropped)."""
    linear = torch.nn.Linear(64, 48)
    packed = PackedLinear(linear)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    four = packed(x)
    for rows in (1, 2, 3):
        got = packed(x[:rows])
        assert got.shape == (rows, 48) and got.is_contiguous()
        torch.testing.assert_close(got, four[:rows], rtol=0, atol=1e-6)


def test_replicas_of_a_view_share_the_packed_weights(tiny_model: RAR) -> None:
    """What `rargen serve` does: deep copies with a memo share every weight, not the KV cache."""
    import copy

    view = packed_for_cpu_decoding(tiny_model.float())
    shared = {id(t): t for t in [*view.parameters(), *view.buffers()]}
    replica = copy.deepcopy(view, shared)
    assert (
        replica.head.weight is view.head.weight
        and replica.blocks[0].mlp.fc1.bias is view.blocks[0].mlp.fc1.bias
    )
    assert replica.blocks[0].attn is not view.blocks[0].attn  # each replica gets its own cache
    config = SampleConfig(cfg_scale=2.0)
    assert torch.equal(
        generate(replica, [1, 2], config, seeds=[3, 4]), generate(view, [1, 2], config, seeds=[3, 4])
    )
