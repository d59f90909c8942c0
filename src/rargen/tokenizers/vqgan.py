"""The MaskGIT-VQGAN tokenizer used by the official RAR (spec §4).

The architecture is reproduced exactly, quirks included, so the released
``maskgit-vqgan-imagenet-f16-256.bin`` loads strictly and gives the same codes:
no attention anywhere, 2x2 average-pool downsampling, nearest x2 upsampling + conv, GroupNorm
(32 groups, eps 1e-6), bias-free convs inside residual blocks, and a ``nin_shortcut`` (out->out
1x1) that acts on the block *output* (the JAX original did so and the weights depend on it).
Images go in as [0, 1] (no [-1, 1] scaling) and come out clamped to [0, 1].
Parameter names follow the official layout so conversion (``rargen.convert``) is a pure shape check.

Shapes: B batch, C channels, h x w code grid, f = 2 ** (levels - 1) downsample factor.
Implements the ``rargen.tokenizers.base.Tokenizer`` interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.tokenizers.base import CONV_MAX_SIZES, VQImageTokenizer, check_channel_mult


@dataclass(frozen=True)
class VQGANConfig:
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width of level i = hidden_channels * channel_mult[i]
    hidden_channels: int = 128
    num_res_blocks: int = 2  # per level, and in each middle stage
    z_channels: int = 256  # encoder output width = codebook vector width
    codebook_size: int = 1024
    codebook_dim: int = 256  # must equal z_channels (no quant-conv in this architecture)
    image_size: int = 256  # training resolution; the network itself is fully convolutional

    def __post_init__(self) -> None:
        for name in (
            "hidden_channels",
            "num_res_blocks",
            "z_channels",
            "codebook_size",
            "codebook_dim",
            "image_size",
        ):
            if getattr(self, name) > CONV_MAX_SIZES[name]:
                raise ValueError(
                    f"VQGANConfig.{name} must be at most {CONV_MAX_SIZES[name]}, got {getattr(self, name)}"
                )
        check_channel_mult(self.channel_mult)
        if self.codebook_dim != self.z_channels:
            raise ValueError(
                f"codebook_dim ({self.codebook_dim}) must equal z_channels ({self.z_channels}): "
                "the MaskGIT-VQGAN quantizes encoder outputs directly"
            )
        for width in {self.hidden_channels * m for m in self.channel_mult}:
            if width % 32:
                raise ValueError(
                    f"every level width must be divisible by 32 (GroupNorm groups), got {width}; "
                    "pick hidden_channels * channel_mult[i] as multiples of 32"
                )
        if self.num_res_blocks < 1 or self.codebook_size < 1 or self.z_channels < 1:
            raise ValueError("num_res_blocks, codebook_size and z_channels must be positive")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsample factor "
                f"{self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQGANConfig:
        if name not in VQGAN_PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; presets: {sorted(VQGAN_PRESETS)}")
        return dataclasses.replace(VQGAN_PRESETS[name], **overrides)


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # The released ImageNet tokenizer: 256x256 -> 16x16 codes of 1024. 54,515,587 parameters.
    "maskgit-vqgan-f16-256": VQGANConfig(),
    # Same structure, a few hundred thousand parameters: for tests.
    "maskgit-vqgan-test": VQGANConfig(
        channel_mult=(1, 2), hidden_channels=32, num_res_blocks=1, z_channels=16, codebook_size=64,
        codebook_dim=16, image_size=32,
    ),
}  # fmt: skip


def _conv(c_in: int, c_out: int, kernel: int, bias: bool) -> nn.Conv2d:
    # TF "SAME" padding for stride 1 and an odd kernel is symmetric (k - 1) / 2; every conv here
    # has stride 1 (downsampling is average pooling), so a plain padded Conv2d is exact.
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv(c_in, c_out, 3, bias=False)
        self.norm2 = _norm(c_out)
        self.conv2 = _conv(c_out, c_out, 3, bias=False)
        # Official quirk (spec §7.5): the 1x1 shortcut maps out->out and is applied to the block
        # output, the input x is dropped when widths differ.
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)
        return x + h


class DownLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks)])
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, 2) if self.downsample else x


class UpLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks)])
        self.upsample_conv = _conv(c_out, c_out, 3, bias=True) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        levels = len(widths)
        self.conv_in = _conv(3, config.hidden_channels, 3, bias=False)
        ins = [config.hidden_channels, *widths[:-1]]
        self.down = nn.ModuleList(
            [DownLevel(ins[i], widths[i], config.num_res_blocks, i < levels - 1) for i in range(levels)]
        )
        self.mid = nn.ModuleList([ResnetBlock(widths[-1], widths[-1]) for _ in range(config.num_res_blocks)])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 1, bias=True)

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, z, H/f, W/f)
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        levels = len(widths)
        self.conv_in = _conv(config.z_channels, widths[-1], 3, bias=True)
        self.mid = nn.ModuleList([ResnetBlock(widths[-1], widths[-1]) for _ in range(config.num_res_blocks)])
        # Level i is stored at index i but run from the deepest level up; its input width is the
        # output width of the level run before it (widths[i + 1]), or the middle width at the top.
        ins = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            [UpLevel(ins[i], widths[i], config.num_res_blocks, upsample=i > 0) for i in range(levels)]
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv(widths[0], 3, 3, bias=True)

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w) -> (B, 3, h*f, w*f), unclamped
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int, commitment_cost: float = 0.25) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.commitment_cost = commitment_cost

    def nearest(self, z: Tensor) -> Tensor:
        """(B, C, h, w) -> codes (B, h, w): argmin of |z|^2 + |e|^2 - 2 z.e, first index on ties."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        squared = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
        distances = torch.addmm(squared, flat, codebook.t(), alpha=-2.0)
        return distances.argmin(1).view(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, h, w) -> codebook vectors (B, C, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Straight-through quantization: (z_q with the gradient of z, codes, VQ loss)."""
        codes = self.nearest(z)
        z_q = self.lookup(codes)
        loss = F.mse_loss(z_q, z.detach()) + self.commitment_cost * F.mse_loss(z, z_q.detach())
        return z + (z_q - z).detach(), codes, loss


class MaskGITVQGAN(VQImageTokenizer):
    """The official RAR tokenizer: images in [0, 1] <-> (B, h, w) codes, f = 16 for the preset."""

    checkpoint_kind: ClassVar[str] = "maskgit-vqgan"
    config_class: ClassVar[type] = VQGANConfig

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_dim)

    @property
    def codebook(self) -> Tensor:
        return self.quantize.embedding.weight

    def codes_of(self, latents: Tensor) -> Tensor:
        return self.quantize.nearest(latents)

    def latents_of(self, codes: Tensor) -> Tensor:
        return self.quantize.lookup(codes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable pass for fine-tuning: (unclamped reconstruction, codes, VQ loss)."""
        z_q, codes, vq_loss = self.quantize(self.encoder(images))
        return self.decoder(z_q), codes, vq_loss


# --------------------------------------------------------------------------- official weights
