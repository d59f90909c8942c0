"""Shared fixtures: tiny random-weight models whose every parameter is non-zero."""

from __future__ import annotations

import pytest
import torch

from rargen.model import RAR, ModelConfig


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Redraw every parameter (adaLN, norms, cls token included) so no layer is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: waking a second intra-op thread costs more than the maths (seconds on a busy
    2-core machine). Modules that opt in run torch on one thread and restore the setting after;
    the thread count changes speed only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> RAR:
    return randomize(RAR(tiny_config)).double().eval()
