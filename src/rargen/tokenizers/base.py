"""The tokenizer interface shared by the MaskGIT-VQGAN (``vqgan.py``), the trainable VQ tokenizer
(``vq_tokenizer.py``) and TiTok (``titok.py``).

A tokenizer maps images to discrete codes and back:

* ``encode(images) -> codes``: images float (B, 3, H, W) in [0, 1]; codes (B, *token_shape)
  int64 in [0, codebook_size): a row-major (h, w) grid for the 2D tokenizers, a (K,) sequence
  for TiTok.
* ``decode(codes) -> images``: codes (B, *token_shape) -> images float (B, 3, H, W) clamped to
  [0, 1]. The 2D tokenizers also take (B, h*w) for a square grid.
* ``codebook_size`` and ``token_shape(H, W) -> (h, w) | (K,)`` describe the mapping; the 2D
  tokenizers also have ``downsample_factor`` and ``grid_shape`` (= ``token_shape``).

The generator sees every layout as a flat sequence (B, L), L = prod(token_shape), in the layout's
raster order; ``codes_from_sequence`` turns that back into what ``decode`` takes. A generator and
a tokenizer go together when ``check_pair`` says so, and ``as_data_images`` shows decoded images
as the data looked (grey data in grey): the sampler, the training previews and the server use both.

All run batched under ``torch.inference_mode()``; all are checkpoint modules, saved with
``rargen.checkpoint.save`` and rebuilt with ``rargen.load``. The input checks live here so the
tokenizers reject bad inputs with the same messages.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

# Upper bounds of the convolutional tokenizers' size fields (far above any use: the released
# MaskGIT-VQGAN and the small VQ tokenizer), so that a bad config.json is refused before anything
# is built.
CONV_MAX_SIZES = {
    "image_size": 8192, "hidden_channels": 4096, "num_res_blocks": 64, "z_channels": 4096,
    "codebook_size": 2**16, "codebook_dim": 4096, "levels": 10, "channel_mult": 64,
}  # fmt: skip


def check_channel_mult(channel_mult: tuple[int, ...]) -> None:
    """Per-level width multipliers: 1 to ``levels`` positive ints of at most ``channel_mult``."""
    levels, widest = CONV_MAX_SIZES["levels"], CONV_MAX_SIZES["channel_mult"]
    if len(channel_mult) > levels or any(m > widest for m in channel_mult):
        raise ValueError(f"channel_mult {channel_mult}: at most {levels} levels of at most {widest} each")
    if not channel_mult or any(m <= 0 for m in channel_mult):
        raise ValueError(f"channel_mult must be non-empty positive ints, got {channel_mult}")


@runtime_checkable
class Tokenizer(Protocol):
    """Images in [0, 1] <-> (B, *token_shape) int64 codes. See the module docstring for the contract."""

    @property
    def codebook_size(self) -> int: ...

    def token_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, codes: Tensor) -> Tensor: ...


def grid_shape(height: int, width: int, downsample_factor: int) -> tuple[int, int]:
    """(h, w) code grid of an H x W image; ValueError when a side is not divisible by the factor."""
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % downsample_factor:
            raise ValueError(
                f"image {name} {size} is not a positive multiple of the downsample factor "
                f"{downsample_factor}; resize or crop images to a multiple of {downsample_factor}"
            )
    return height // downsample_factor, width // downsample_factor


def token_shape_of(tokenizer: Any, height: int, width: int) -> tuple[int, ...]:
    """The codes' shape per image: ``token_shape`` when the tokenizer has it, else its 2D ``grid_shape``."""
    shape = getattr(tokenizer, "token_shape", None) or tokenizer.grid_shape
    return tuple(int(n) for n in shape(height, width))


def codes_from_sequence(tokenizer: Any, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """Generator tokens (B, L) -> the codes ``tokenizer.decode`` takes: (B, L) for a 1D tokenizer
    (one with ``num_latent_tokens``), else the (B, h, w) ``grid`` (the generator's
    ``config.grid``; None: square) in raster order."""
    if hasattr(tokenizer, "num_latent_tokens"):
        return tokens
    L = tokens.shape[1]
    if grid is None or (L > 1 and tuple(grid) == (L, 1)):  # (L, 1): the model knows no grid (1D tokens)
        side = math.isqrt(L)
        grid, shape = (side, side), "square"
    else:
        shape = f"{grid[0]}x{grid[1]}"
    if grid[0] * grid[1] != L:
        raise ValueError(
            f"the generator's {L} tokens do not form a {shape} grid for the 2D tokenizer "
            f"{type(tokenizer).__name__}; give the model its grid (--model grid_width=W) "
            "or reshape the tokens to the (h, w) grid and decode yourself"
        )
    return tokens.view(-1, *grid)


def check_pair(model: Any, tokenizer: Any, generator_name: Any = None, tokenizer_name: Any = None) -> None:
    """Raise a ValueError naming the folders (or objects) when ``model`` is not a RAR generator or
    ``tokenizer`` cannot decode its tokens (no ``decode``, another codebook size)."""
    from rargen.model import RAR

    generator = repr(str(generator_name)) if generator_name is not None else "the checkpoint"
    named = f"--tokenizer {str(tokenizer_name)!r}" if tokenizer_name is not None else "the tokenizer"
    if not isinstance(model, RAR):
        raise ValueError(
            f"{generator} holds a {type(model).__name__} checkpoint, not a RAR generator; "
            "pass the generator folder first and the tokenizer with --tokenizer"
        )
    book = getattr(
        tokenizer, "codebook_size", getattr(getattr(tokenizer, "config", None), "codebook_size", None)
    )
    if not callable(getattr(tokenizer, "decode", None)) or book is None:
        raise ValueError(
            f"{named} holds a {type(tokenizer).__name__} checkpoint, not an "
            "image tokenizer (MaskGIT-VQGAN, VQ tokenizer or TiTok)"
        )
    if book != model.config.codebook_size:
        raise ValueError(
            f"{named} has {book} codes but the generator predicts "
            f"{model.config.codebook_size}; pass the tokenizer the generator was trained with"
        )


def image_channels(tokenizer: Any) -> int:
    """The channels of the images a tokenizer was trained on: 1 for grey data (recorded by
    ``rargen train-tokenizer`` as ``image_channels``), else 3."""
    return int(getattr(tokenizer, "checkpoint_extra", {}).get("image_channels", 3))


def channels_of_images(images: Tensor) -> int:
    """1 when every image (N, 3, H, W) is grey (its three channels equal), else 3: recorded with a
    tokenizer (and a classifier) so that samples come back with the channels the data had."""
    grey = bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all())
    return 1 if grey else 3


def as_data_images(images: Tensor, channels: int) -> Tensor:
    """Decoded images (B, 3, H, W) as the data looked: for grey data (``channels`` 1) the RGB
    output averaged to one grey in all three channels, so grey samples carry no tint."""
    return images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1) if channels == 1 else images


def check_images(images: Tensor, downsample_factor: int, dtype: torch.dtype) -> Tensor:
    """Validate (B, 3, H, W) float images in [0, 1] and cast them to ``dtype``."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor in [0, 1], got dtype {images.dtype}; "
            "for uint8 images use images.float() / 255"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W), got {tuple(images.shape)}; "
            "for (B, H, W, 3) images use images.permute(0, 3, 1, 2), for grey images repeat the channel"
        )
    grid_shape(images.shape[2], images.shape[3], downsample_factor)
    if images.numel():
        low, high = torch.aminmax(images)
        low, high = float(low), float(high)
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                "for images in [-1, 1] use (images + 1) / 2, for 0..255 use images / 255"
            )
    return images.to(dtype)


def check_codes(codes: Tensor, codebook_size: int) -> Tensor:
    """Validate integer codes (B, h, w), or (B, L) with L a perfect square; return (B, h, w) int64."""
    if not isinstance(codes, Tensor):
        raise ValueError(f"codes must be a torch.Tensor of shape (B, h, w), got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}; use codes.long()")
    if codes.ndim == 2:
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(
                f"flat codes (B, L) need a square grid, got L={codes.shape[1]}; pass codes as (B, h, w)"
            )
        codes = codes.reshape(codes.shape[0], side, side)
    if codes.ndim != 3:
        raise ValueError(f"codes must have shape (B, h, w) or (B, h*w), got {tuple(codes.shape)}")
    _check_code_range(codes, codebook_size)
    return codes.long()


def check_sequence_codes(codes: Tensor, codebook_size: int, length: int) -> Tensor:
    """Validate integer codes (B, length) of a 1D tokenizer (also (B, 1, length)); return int64."""
    if not isinstance(codes, Tensor):
        raise ValueError(f"codes must be a torch.Tensor of shape (B, {length}), got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}; use codes.long()")
    if codes.ndim == 3 and codes.shape[1] == 1:  # the official (B, 1, K) layout
        codes = codes[:, 0]
    if codes.ndim != 2 or codes.shape[1] != length:
        raise ValueError(
            f"codes must have shape (B, {length}) for this 1D tokenizer ({length} tokens per image), "
            f"got {tuple(codes.shape)}; were they made by another tokenizer?"
        )
    _check_code_range(codes, codebook_size)
    return codes.long()


def _check_code_range(codes: Tensor, codebook_size: int) -> None:
    if codes.numel():
        low, high = torch.aminmax(codes)
        if int(low) < 0 or int(high) >= codebook_size:
            raise ValueError(
                f"codes must lie in [0, {codebook_size}) for this codebook, got values in "
                f"[{int(low)}, {int(high)}]; were they made by a tokenizer with another codebook?"
            )


class VQImageTokenizer(nn.Module):
    """What both VQ tokenizers share: the interface around ``encoder`` -> quantizer -> ``decoder``.

    Subclasses set ``config`` (with ``codebook_size`` and ``downsample_factor``), ``encoder`` and
    ``decoder`` modules, and implement ``codebook`` (the code table, for device and dtype),
    ``codes_of(latents) -> codes`` and ``latents_of(codes) -> decoder input``.
    """

    config: Any

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        return grid_shape(height, width, self.downsample_factor)

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): a row-major 2D grid of codes."""
        return self.grid_shape(height, width)

    @property
    def codebook(self) -> Tensor:
        raise NotImplementedError

    def codes_of(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def latents_of(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: Tensor, *, channels_last: bool = True) -> Tensor:
        """Images (B, 3, H, W) float in [0, 1] -> codes (B, H/f, W/f) int64."""
        x = check_images(images, self.downsample_factor, self.codebook.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.codes_of(self.encoder(x))

    @torch.inference_mode()
    def decode(self, codes: Tensor, *, channels_last: bool = True) -> Tensor:
        """Codes (B, h, w) (or (B, h*w) for a square grid) -> images (B, 3, h*f, w*f) in [0, 1]."""
        codes = check_codes(codes, self.codebook_size).to(self.codebook.device)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        z = self.latents_of(codes).contiguous(memory_format=layout)
        return self.decoder(z).clamp(0.0, 1.0).contiguous()
