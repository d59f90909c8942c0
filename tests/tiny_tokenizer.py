"""A tiny deterministic stand-in tokenizer for the data tests: 4x4 average pooling, then the
nearest colour of a fixed random codebook. Elementwise maths only, so codes do not depend on
the batch size (which the byte-identical resume test relies on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PoolTokenizerConfig:
    codebook_size: int = 64
    downsample_factor: int = 4
    seed: int = 0


class PoolTokenizer(nn.Module):
    checkpoint_kind: ClassVar[str] = "test-pool-tokenizer"
    config_class: ClassVar[type] = PoolTokenizerConfig

    def __init__(self, config: PoolTokenizerConfig = PoolTokenizerConfig()) -> None:
        super().__init__()
        self.config = config
        codebook = torch.rand(config.codebook_size, 3, generator=torch.Generator().manual_seed(config.seed))
        self.register_buffer("codebook", codebook)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        return height // self.downsample_factor, width // self.downsample_factor

    def encode(self, images: Tensor) -> Tensor:
        pooled = F.avg_pool2d(images, self.downsample_factor).permute(0, 2, 3, 1)  # (B, h, w, 3)
        distances = ((pooled[..., None, :] - self.codebook) ** 2).sum(-1)  # (B, h, w, K)
        return distances.argmin(-1)


class FaultyTokenizer(PoolTokenizer):
    """Same weights and codes, but raises on the ``fail_on``-th encode call (a simulated crash)."""

    def __init__(self, config: PoolTokenizerConfig = PoolTokenizerConfig(), fail_on: int = 3) -> None:
        super().__init__(config)
        self.fail_on, self.calls = fail_on, 0

    def encode(self, images: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected crash")
        return super().encode(images)
