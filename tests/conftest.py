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


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> RAR:
    return randomize(RAR(tiny_config)).double().eval()
