"""TiTok: a 1D VQ tokenizer, 256x256 images <-> 32, 64 or 128 codes (Yu et al. 2024, arXiv 2406.07550).

Numerically the released VQ tokenizers TiTok-L-32, TiTok-B-64 and TiTok-S-128 (official
``modeling/titok.py`` with ``modeling/modules/blocks.py``; facts in ``docs/titok.md``). Their
decoder is two-stage: the TiTok ViT decoder predicts, for every 16x16 patch, logits over the 1024
codes of the MaskGIT-VQGAN; the softmax-weighted mix of those code vectors goes through the exact
MaskGIT-VQGAN decoder of ``rargen.tokenizers.vqgan`` to pixels.

Dimensions: B batch, P = (S/p)^2 patches of an S x S image, K latent tokens (32/64/128),
D width, T token_size (codebook vector width), N = 1 + P + K transformer positions.

Encoder sequence::  [cls, patch_0 .. patch_{P-1}, latent_0 .. latent_{K-1}]  -> the K latent outputs
Decoder sequence::  [cls, mask_0 .. mask_{P-1}, code_0 .. code_{K-1}]        -> the P mask outputs

Encoding: latent outputs -> LayerNorm -> 1x1 conv to T -> nearest l2-normalised code (cosine).
Decoding: l2-normalised code vectors -> Linear(T, D) -> decoder -> per-patch logits over the
MaskGIT codes -> softmax mix of its code vectors -> MaskGIT-VQGAN decoder -> clamp to [0, 1].

Implements ``rargen.tokenizers.base.Tokenizer`` with 1D tokens: ``token_shape(S, S) == (K,)``.
Parameter names follow the official ones except the transformer blocks and the pre/post LayerNorms
(the mapping is one table in ``rargen.tokenizers.titok_convert``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.tokenizers.base import check_images, check_sequence_codes
from rargen.tokenizers.vqgan import Decoder as PixelDecoder
from rargen.tokenizers.vqgan import VectorQuantizer as PixelCodebook
from rargen.tokenizers.vqgan import VQGANConfig

HEAD_DIM = 64  # every official size (small 512/8, base 768/12, large 1024/16)
# Upper bounds checked before anything is built (a corrupt config must not allocate for ever).
MAX_SIZES = {
    "image_size": 8192, "patch_size": 512, "num_latent_tokens": 65536, "codebook_size": 2**16,
    "token_size": 4096, "width": 16384, "depth": 512, "heads": 256, "mlp_dim": 65536,
    "pixel_codebook_size": 2**16,
}  # fmt: skip


@dataclass(frozen=True)
class TiTokConfig:
    """Architecture of a VQ TiTok with its MaskGIT-VQGAN pixel decoder (no training settings)."""

    image_size: int = 256  # S: fixed, the positional tables have one row per patch
    patch_size: int = 16  # p: encoder patches = decoder output grid cells = pixel-decoder factor
    num_latent_tokens: int = 32  # K
    codebook_size: int = 4096
    token_size: int = 12  # T: width of the codebook vectors
    use_l2_norm: bool = True  # codes compared by cosine (all released VQ TiToks)
    encoder_width: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    encoder_mlp_dim: int = 4096
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    decoder_mlp_dim: int = 4096
    # The second stage: a MaskGIT-VQGAN decoder and its codebook (the released f16-256 one).
    pixel_codebook_size: int = 1024
    pixel_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    pixel_hidden_channels: int = 128
    pixel_num_res_blocks: int = 2
    pixel_z_channels: int = 256

    def __post_init__(self) -> None:
        positive = (
            "image_size", "patch_size", "num_latent_tokens", "codebook_size", "token_size",
            "encoder_width", "encoder_depth", "encoder_heads", "encoder_mlp_dim",
            "decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_dim", "pixel_codebook_size",
        )  # fmt: skip
        for name in positive:
            part, _, field = name.partition("_")
            value, bound = getattr(self, name), MAX_SIZES[field if part in ("encoder", "decoder") else name]
            if not isinstance(value, int) or not 1 <= value <= bound:
                raise ValueError(f"TiTokConfig.{name} must be an int in [1, {bound}], got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"TiTokConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"TiTokConfig.{part}_width {width} is not divisible by {part}_heads {heads}")
        factor = self.pixel_vqgan.downsample_factor  # also validates the pixel-decoder fields
        if factor != self.patch_size:
            raise ValueError(
                f"the pixel decoder upsamples by {factor} (2 ** (len(pixel_channel_mult) - 1)) but a "
                f"decoder grid cell is a {self.patch_size}x{self.patch_size} patch; make them equal"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side: S / p (16 for the released models)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def pixel_vqgan(self) -> VQGANConfig:
        """The MaskGIT-VQGAN configuration of the pixel decoder."""
        return VQGANConfig(
            channel_mult=self.pixel_channel_mult,
            hidden_channels=self.pixel_hidden_channels,
            num_res_blocks=self.pixel_num_res_blocks,
            z_channels=self.pixel_z_channels,
            codebook_size=self.pixel_codebook_size,
            codebook_dim=self.pixel_z_channels,
            image_size=self.image_size,
        )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TiTokConfig:
        if name not in TITOK_PRESETS:
            raise ValueError(f"unknown TiTok preset {name!r}; presets: {sorted(TITOK_PRESETS)}")
        return dataclasses.replace(TITOK_PRESETS[name], **overrides)


def _size(width: int, depth: int, part: str) -> dict[str, int]:
    return {
        f"{part}_width": width, f"{part}_depth": depth,
        f"{part}_heads": width // HEAD_DIM, f"{part}_mlp_dim": 4 * width,
    }  # fmt: skip


# Official ViT sizes: small 512 wide / 8 deep, base 768 / 12, large 1024 / 24 (heads = width / 64).
TITOK_PRESETS: dict[str, TiTokConfig] = {
    "titok-l-32": TiTokConfig(
        num_latent_tokens=32, **_size(1024, 24, "encoder"), **_size(1024, 24, "decoder")
    ),
    "titok-b-64": TiTokConfig(num_latent_tokens=64, **_size(768, 12, "encoder"), **_size(768, 12, "decoder")),
    "titok-s-128": TiTokConfig(num_latent_tokens=128, **_size(512, 8, "encoder"), **_size(512, 8, "decoder")),
    # Same structure, 32x32 images, 8 tokens of 64 codes, a small pixel decoder: for tests.
    "titok-test": TiTokConfig(
        image_size=32, patch_size=8, num_latent_tokens=8, codebook_size=64, token_size=8,
        encoder_width=64, encoder_depth=2, encoder_heads=2, encoder_mlp_dim=128,
        decoder_width=64, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=128,
        pixel_codebook_size=32, pixel_channel_mult=(1, 1, 1, 1), pixel_hidden_channels=32,
        pixel_num_res_blocks=1, pixel_z_channels=16,
    ),
}  # fmt: skip


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; ``qkv`` output laid out as [q | k | v], head-major."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5, as torch's default the official code uses)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """What encoder and decoder share: cls row + P positional rows + K latent positional rows."""

    def __init__(self, config: TiTokConfig, width: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        K, P = config.num_latent_tokens, config.num_patches
        # Official initial scale width ** -0.5; overwritten by any loaded checkpoint.
        self.class_embedding = nn.Parameter(torch.randn(1, width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(P + 1, width) * width**-0.5)
        self.latent_token_positional_embedding = nn.Parameter(torch.randn(K, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim) for _ in range(depth)])
        self.norm_post = nn.LayerNorm(width)

    def run(self, grid: Tensor, latents: Tensor) -> Tensor:
        """grid rows (B, P, D) and latent rows (B, K, D) with their positions -> all outputs (B, N, D)."""
        cls = self.class_embedding.expand(grid.shape[0], 1, -1)
        x = torch.cat([torch.cat([cls, grid], dim=1) + self.positional_embedding, latents], dim=1)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return x


class Encoder(Transformer):
    def __init__(self, config: TiTokConfig) -> None:
        w = config.encoder_width
        super().__init__(config, w, config.encoder_depth, config.encoder_heads, config.encoder_mlp_dim)
        p = config.patch_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=p, stride=p)
        self.conv_out = nn.Conv2d(w, config.token_size, kernel_size=1)

    def forward(self, images: Tensor, latent_tokens: Tensor) -> Tensor:
        """images (B, 3, S, S) in [0, 1], learned latent tokens (K, D) -> pre-quantisation z (B, K, T)."""
        B, K = images.shape[0], latent_tokens.shape[0]
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, D)
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)  # (B, K, D)
        x = self.norm_post(self.run(patches, latents)[:, -K:])  # (B, K, D)
        # Official quirk (the "legacy" layout all released models use): the (B, K, D) rows are
        # reinterpreted in memory as (B, D, K), not transposed, before the 1x1 conv to T channels.
        z = self.conv_out(x.reshape(B, -1, K, 1))  # (B, T, K, 1)
        return z.reshape(B, -1, K).transpose(1, 2)  # (B, K, T)


class Decoder(Transformer):
    def __init__(self, config: TiTokConfig) -> None:
        w = config.decoder_width
        super().__init__(config, w, config.decoder_depth, config.decoder_heads, config.decoder_mlp_dim)
        self.decoder_embed = nn.Linear(config.token_size, w)
        self.mask_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5)
        # Per patch: logits over the pixel decoder's codebook (1x1 convs with a tanh between).
        self.ffn = nn.Sequential(
            nn.Conv2d(w, 2 * w, 1), nn.Tanh(), nn.Conv2d(2 * w, config.pixel_codebook_size, 1)
        )
        self.grid_size = config.grid_size

    def forward(self, z_q: Tensor) -> Tensor:
        """Code vectors (B, K, T) -> logits over the pixel codebook (B, V_pixel, S/p, S/p)."""
        B, K, _ = z_q.shape
        g = self.grid_size
        latents = self.decoder_embed(z_q) + self.latent_token_positional_embedding  # (B, K, D)
        masks = self.mask_token.expand(B, g * g, -1)  # (B, P, D)
        x = self.norm_post(self.run(masks, latents)[:, 1 : 1 + g * g])  # (B, P, D)
        return self.ffn(x.transpose(1, 2).reshape(B, -1, g, g))


class Quantizer(nn.Module):
    """The TiTok codebook: nearest code by squared distance, between unit vectors when ``use_l2_norm``."""

    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.use_l2_norm = use_l2_norm

    def nearest(self, z: Tensor) -> Tensor:
        """z (B, K, T) -> codes (B, K), in float32 with the official expansion |z|^2 + |e|^2 - 2 z.e
        (so near-ties break as there); the first index wins exact ties."""
        z, book = z.float(), self.embedding.weight.float()
        if self.use_l2_norm:
            z, book = F.normalize(z, dim=-1), F.normalize(book, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        squared = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)
        distances = torch.addmm(squared, flat, book.t(), alpha=-2.0)
        return distances.argmin(1).view(z.shape[:-1])

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (...) -> code vectors (..., T), l2-normalised when ``use_l2_norm``."""
        vectors = self.embedding(codes)
        return F.normalize(vectors, dim=-1) if self.use_l2_norm else vectors


class TiTok(nn.Module):
    """A VQ TiTok tokenizer: images (B, 3, S, S) in [0, 1] <-> codes (B, K) int64 (1D tokens)."""

    checkpoint_kind: ClassVar[str] = "titok"
    config_class: ClassVar[type] = TiTokConfig

    def __init__(self, config: TiTokConfig) -> None:
        super().__init__()
        self.config = config
        width = config.encoder_width
        self.latent_tokens = nn.Parameter(torch.randn(config.num_latent_tokens, width) * width**-0.5)
        self.encoder = Encoder(config)
        self.quantize = Quantizer(config.codebook_size, config.token_size, config.use_l2_norm)
        self.decoder = Decoder(config)
        self.pixel_quantize = PixelCodebook(config.pixel_codebook_size, config.pixel_z_channels)
        self.pixel_decoder = PixelDecoder(config.pixel_vqgan)

    # -- the tokenizer interface ---------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def num_latent_tokens(self) -> int:
        return self.config.num_latent_tokens

    def token_shape(self, height: int, width: int) -> tuple[int]:
        """(K,): the tokens of an image are a 1D sequence, whatever its (fixed) size."""
        size = self.config.image_size
        if (height, width) != (size, size):
            raise ValueError(
                f"TiTok tokenizes {size}x{size} images only (by design: its positional tables are fixed), "
                f"got {height}x{width}; resize or crop to {size}x{size} (rargen pretokenize --image-size "
                f"{size}), or for other sizes use a 2D tokenizer (MaskGIT-VQGAN at 512: presets rar-*-512)"
            )
        return (self.config.num_latent_tokens,)

    def pixels_from_logits(self, logits: Tensor) -> Tensor:
        """Per-patch logits (B, V_pixel, g, g) -> unclamped images (B, 3, S, S) via the MaskGIT decoder."""
        mixed = torch.einsum("bvhw,vc->bchw", logits.softmax(1), self.pixel_quantize.embedding.weight)
        # Channels-last: the faster layout for the conv stack on CPUs (as in the VQGAN's own decode).
        return self.pixel_decoder(mixed.contiguous(memory_format=torch.channels_last)).contiguous()

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, S, S) float in [0, 1] -> codes (B, K) int64."""
        x = check_images(images, self.config.patch_size, self.latent_tokens.dtype)
        self.token_shape(x.shape[2], x.shape[3])
        return self.quantize.nearest(self.encoder(x, self.latent_tokens))

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, K) -> images (B, 3, S, S) float clamped to [0, 1]."""
        codes = check_sequence_codes(codes, self.codebook_size, self.config.num_latent_tokens)
        z_q = self.quantize.lookup(codes.to(self.latent_tokens.device))  # (B, K, T)
        return self.pixels_from_logits(self.decoder(z_q)).clamp(0.0, 1.0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["TITOK_PRESETS", "TiTok", "TiTokConfig"]
