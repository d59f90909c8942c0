"""Inpainting, outpainting and completion: regenerate the masked cells of images, keep the rest.

``inpaint(model, tokenizer, images, masks, labels, config, seeds=...)`` encodes the images, maps
each pixel mask (True / white = regenerate) to the tokenizer's code grid (a cell is regenerated
when any of its pixels is masked), samples the regenerated cells given the kept ones
(``generate(..., known=, known_mask=)``: the kept codes first, then the rest in ``order``) and
decodes. The kept codes come back unchanged; the decoder may still blur a cell border a little.

Completing the bottom of an image from its top works with every RAR model (it is the raster
order); other masks need a model that kept some of its any-order skill (trained with
``r_end > 0``; see ``rargen.sampling.any_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rargen.model import RAR
from rargen.sampling.decoding import Decoder
from rargen.sampling.engine import SampleConfig, generate
from rargen.tokenizers.base import check_pair, codes_from_sequence


def cell_mask(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixel masks (B, H, W) or (B, 1, H, W), bool or float (>= 0.5: white), True = regenerate ->
    (B, h * w) bool over the (h, w) code grid in raster order: a cell is regenerated when any of
    its pixels is masked."""
    masks = torch.as_tensor(masks)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if not masks.dtype.is_floating_point:
            raise ValueError(f"masks must be bool or float in [0, 1] (white = regenerate), got {masks.dtype}")
        masks = masks >= 0.5
    (B, H, W), (h, w) = masks.shape, grid
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} mask does not divide into the {h}x{w} code grid; pass the images' size")
    return masks.view(B, h, H // h, w, W // w).any(dim=4).any(dim=2).flatten(1)


def inpaint_codes(
    model: RAR | Decoder,
    tokenizer: Any,
    images: Tensor,
    masks: Tensor,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``inpaint`` samples: the images' codes (B, L), the new codes (B, L) (equal to them
    outside the mask) and the regenerated cells (B, L) bool, all in raster order."""
    generator_model = model.model if isinstance(model, Decoder) else model
    check_pair(generator_model, tokenizer)
    if hasattr(tokenizer, "num_latent_tokens"):
        raise ValueError(
            f"{type(tokenizer).__name__} makes 1D tokens with no image positions; inpaint needs a 2D "
            "tokenizer (MaskGIT-VQGAN or the VQ tokenizer)"
        )
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) floats in [0, 1], got shape {tuple(images.shape)}")
    with torch.inference_mode():
        codes = tokenizer.encode(images.to(generator_model.device)).flatten(1)  # (B, h * w) raster
    h, w = tokenizer.grid_shape(images.shape[2], images.shape[3])
    L = generator_model.config.num_image_tokens
    if h * w != L:
        raise ValueError(
            f"the tokenizer gives {h}x{w} codes for {images.shape[2]}x{images.shape[3]} images but the "
            f"generator takes {L}; pass images of the size the pair was trained on"
        )
    if torch.as_tensor(masks).shape[0] != images.shape[0]:
        raise ValueError(f"got {torch.as_tensor(masks).shape[0]} masks for {images.shape[0]} images")
    regenerate = cell_mask(masks, (h, w)).to(codes.device)
    tokens = generate(model, labels, config, generator, known=codes, known_mask=~regenerate, **kwargs)
    return codes, tokens, regenerate


def inpaint(
    model: RAR | Decoder,
    tokenizer: Any,
    images: Tensor,
    masks: Tensor,
    labels: Tensor | Sequence[int],
    config: SampleConfig,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Tensor:
    """Regenerate the masked cells of ``images`` (B, 3, H, W) float in [0, 1]: ``masks`` (B, H, W)
    True / white = regenerate; ``labels`` (B,) the class to draw them as. Returns the decoded
    images (B, 3, H, W) in [0, 1]. ``kwargs`` go to ``generate`` (``seeds``, ``order``: "raster"
    among the regenerated cells, "random", or a permutation; ``bf16``, ``compile``...)."""
    _, tokens, _ = inpaint_codes(model, tokenizer, images, masks, labels, config, generator, **kwargs)
    with torch.inference_mode():
        out = tokenizer.decode(codes_from_sequence(tokenizer, tokens, model.config.grid))
    return out.float().clamp(0, 1)


__all__ = ["cell_mask", "inpaint", "inpaint_codes"]
