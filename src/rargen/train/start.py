"""What a training run starts from: the model the data implies (codebook, token count, grid and
classes from the token store over the preset) and, with ``init_from``, another checkpoint's weights,
its grid tables resized to the data's grid (``rargen.resize``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rargen.model import RAR, ModelConfig
from rargen.train.recipe import TrainConfig


def model_config_for(config: TrainConfig, store: Any, base: ModelConfig | None = None) -> ModelConfig:
    """``base`` (default: the preset) with the data's codebook size, token count, grid and class
    count, and the model overrides (the data's fields checked if overridden)."""
    data = {"codebook_size": store.codebook_size, "num_image_tokens": store.num_tokens}
    data["num_classes"], grid = store.num_classes, tuple(getattr(store, "grid", ()))
    overrides = dict(config.model_overrides)
    if len(grid) == 2:  # a square grid keeps the default 0: configs as before
        data["grid_width"] = grid[1] if grid[0] != grid[1] else 0
        if overrides.get("grid_width") == grid[1]:  # the data's width, said explicitly
            overrides["grid_width"] = data["grid_width"]
    for key, value in data.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                f"model override {key}={overrides[key]} does not match the data ({key} = {value}); "
                "drop the override or use a store made for that model"
            )
    base = base if base is not None else ModelConfig.from_name(config.preset)
    return dataclasses.replace(base, **{"grid_width": 0, **overrides, **data})


def start_model(config: TrainConfig, store: Any) -> tuple[ModelConfig, RAR | None]:
    """The run's model config and, with ``config.init_from``, that checkpoint loaded (on the CPU):
    its architecture replaces the preset's, the data gives the grid (the caller resizes)."""
    if config.init_from is None:
        return model_config_for(config, store), None
    from rargen.hub.releases import from_pretrained

    source = from_pretrained(config.init_from)  # a folder, an official file, a released name or hf://
    if not isinstance(source, RAR):
        raise ValueError(
            f"--init-from {config.init_from!r} holds a {type(source).__name__}, not a RAR generator"
        )
    if len(getattr(store, "grid", (0, 0))) != 2 and store.num_tokens != source.config.num_image_tokens:
        raise ValueError(
            f"the data holds {store.num_tokens} 1D tokens per image and {config.init_from!r} was "
            f"trained on {source.config.num_image_tokens}: 1D tokens (TiTok, fixed at 256x256 px by "
            "design) have no grid to resize; pretokenize with a 2D tokenizer (MaskGIT-VQGAN, VQ)"
        )
    return model_config_for(config, store, base=source.config), source


def initial_weights(model: RAR, source: RAR | None) -> None:
    """Load ``source``'s weights into ``model``, the grid tables resized to ``model``'s grid."""
    if source is not None:
        from rargen.resize import resize_state_dict

        model.load_state_dict(resize_state_dict(source.state_dict(), source.config, model.config))


__all__ = ["initial_weights", "model_config_for", "start_model"]
