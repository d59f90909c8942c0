"""Resizing a RAR generator to another token grid (say 16x16 -> 32x32 for 256 -> 512 px, or 16x16
-> 16x32), to fine-tune it there instead of training from scratch.

Only three tables depend on the grid (``rargen.model``): the absolute positions ``pos_embed``
(rows 0 and 1 for the cls and class positions, then one row per image position), the target-aware
positions ``target_pos_embed`` (one row per image position) and the per-step conditioning
``step_embed`` (rows 0 and 1, then one row per step of the sequence). The image-position rows are a
row-major (h, w) grid, resized as a 2D image of D channels (bicubic, as ViT position tables are);
the steps are a sequence, resized along it (linear, first and last step kept). The cls and class
rows and every other weight are kept as they are. The same grid gives back the same tensors.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from rargen.model import ModelConfig

# The tables resized; every other tensor must have the same shape in both models and is kept.
GRID_TABLES = ("pos_embed", "target_pos_embed", "step_embed")
# Fields that may differ between the two models (the grid, and the training-only dropout).
RESIZABLE_FIELDS = ("num_image_tokens", "grid_width", "dropout", "attn_dropout")


def resize_grid_table(table: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Rows (h*w, D) of a row-major grid -> rows (h'*w', D), interpolated bicubically as an image of
    D channels (computed in float64, returned in the table's dtype)."""
    if tuple(old) == tuple(new):
        return table.clone()
    (h, w), D = old, table.shape[1]
    image = table.detach().double().T.reshape(1, D, h, w)
    resized = F.interpolate(image, size=tuple(new), mode="bicubic", align_corners=False)
    return resized.reshape(D, -1).T.to(table.dtype).contiguous()


def resize_sequence_table(table: Tensor, length: int) -> Tensor:
    """Rows (n, D) of a sequence -> (length, D), linearly interpolated with the ends kept."""
    if table.shape[0] == length:
        return table.clone()
    rows = table.detach().double().T[None]  # (1, D, n)
    resized = F.interpolate(rows, size=length, mode="linear", align_corners=True)
    return resized[0].T.to(table.dtype).contiguous()


def check_resizable(old: ModelConfig, new: ModelConfig) -> None:
    """A ValueError naming the fields when ``new`` differs from ``old`` in more than its grid."""
    differing = [
        f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RESIZABLE_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    ]
    for config in (old, new):
        if (
            old.grid != new.grid
            and config.grid == (config.num_image_tokens, 1)
            and config.num_image_tokens > 1
        ):
            raise ValueError(
                f"a model of {config.num_image_tokens} tokens without a grid (1D tokens such as TiTok's) "
                "cannot be resized: TiTok is fixed at 256x256 px by design; fine-tune grids of a 2D "
                "tokenizer (MaskGIT-VQGAN, rargen's VQ), or give the grid with --model grid_width=W"
            )
    if differing:
        raise ValueError(
            f"cannot resize the checkpoint to this model: {', '.join(differing)}; only the token grid "
            "may change (train with the checkpoint's architecture and the same codebook and classes)"
        )


def resize_state_dict(state: dict[str, Tensor], old: ModelConfig, new: ModelConfig) -> dict[str, Tensor]:
    """A RAR state dict of model ``old`` as one for model ``new`` (another grid; see the module
    docstring). Tensors other than the three tables are the same objects."""
    check_resizable(old, new)
    out = dict(state)
    image = slice(2, None)  # pos_embed and step_embed: rows 0, 1 are the cls and class positions
    out["pos_embed"] = torch.cat(
        [state["pos_embed"][:2], resize_grid_table(state["pos_embed"][image], old.grid, new.grid)]
    )
    out["target_pos_embed"] = resize_grid_table(state["target_pos_embed"], old.grid, new.grid)
    out["step_embed"] = torch.cat(
        [state["step_embed"][:2], resize_sequence_table(state["step_embed"][image], new.num_image_tokens)]
    )
    return out


__all__ = [
    "GRID_TABLES",
    "check_resizable",
    "resize_grid_table",
    "resize_sequence_table",
    "resize_state_dict",
]
