"""Sampling at the limits: a temperature or top_p far below float32's range (1e-39 ... 5e-324)
is the argmax / the top token, never NaN (logits / T used to overflow: inf - inf in the softmax)."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from rargen.model import RAR, ModelConfig
from rargen.sampling.engine import SampleConfig, generate, token_probs
from rargen.sampling.next_token import filter_logits

TINY = [1e-38, 1e-39, 1e-45, 1e-300, 5e-324]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tiny", TINY)
def test_filter_logits_limits_are_the_argmax(dtype: torch.dtype, tiny: float) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -5.0], [0.5, 0.5, -1.0, 40.0], [7.0, 7.0, 6.0, 1.0]], dtype=dtype)
    argmax_probs = torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 1.0], [0.5, 0.5, 0, 0]], dtype=dtype)
    cold = filter_logits(logits, tiny).softmax(-1)
    torch.testing.assert_close(cold, argmax_probs, rtol=0, atol=0)  # ties share the mass
    top = filter_logits(logits, 1.0, 0, tiny).softmax(-1)
    assert torch.isfinite(top).all()
    assert top.argmax(-1).tolist() == [1, 3, 0] and (top > 0).sum(-1).tolist() == [1, 1, 1]
    # Ordinary settings are unchanged by the max shift: the same distribution as logits / T.
    torch.testing.assert_close(filter_logits(logits, 0.7).softmax(-1), (logits / 0.7).softmax(-1))


def test_generate_with_a_tiny_temperature_or_top_p_is_greedy() -> None:
    config = ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)
    model = randomize(RAR(config)).eval()
    labels, seeds = [1, 2, 3], [5, 6, 7]
    greedy = generate(model, labels, SampleConfig(cfg_scale=2.0, top_k=1), seeds=seeds)
    for settings in ({"temperature": 1e-39}, {"temperature": 5e-324}, {"top_p": 1e-45}, {"top_p": 5e-324}):
        sampling = SampleConfig(cfg_scale=2.0, **settings)
        for other_seeds in (seeds, [8, 9, 10]):  # the argmax does not depend on the noise
            assert torch.equal(generate(model, labels, sampling, seeds=other_seeds), greedy), settings
        probs = token_probs(model, labels, greedy, sampling)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs.gather(-1, greedy[..., None]).squeeze(-1), torch.ones(3, 16))
