"""Conversion between the official TiTok Hub snapshots and rargen's TiTok checkpoints.

A released tokenizer (for example the Hugging Face repo ``yucornetto/tokenizer_titok_l32_imagenet``)
is a folder with ``config.json`` (the official OmegaConf tree: ``model.vq_model.*`` and
``dataset.preprocessing.crop_size``) and ``model.safetensors`` (or, from older
``huggingface_hub`` versions, ``pytorch_model.bin``). The architecture comes from the tensors:
widths, depths and MLP widths are read from their shapes and win over the config's size names
(small/base/large); heads = width / 64 as in every official size; token count, codebook, token
width and patch size come from the shapes too. From the config come only what shapes cannot
say: ``use_l2_norm`` and the switches the official code reads with a default when absent
(``quantize_mode`` "vq", ``finetune_decoder`` true, ``is_legacy`` true).

The key mapping is one table (official -> rargen); everything else keeps its official name:

=========================================================  ==========================================
official                                                   rargen
=========================================================  ==========================================
``{encoder,decoder}.transformer.{i}.ln_1`` / ``ln_2``      ``{encoder,decoder}.blocks.{i}.norm1`` / ``norm2``
``....transformer.{i}.attn.in_proj_{weight,bias}``         ``....blocks.{i}.attn.qkv.{weight,bias}``
``....transformer.{i}.attn.out_proj.*``                    ``....blocks.{i}.attn.proj.*``
``....transformer.{i}.mlp.c_fc.*`` / ``mlp.c_proj.*``      ``....blocks.{i}.mlp.fc1.*`` / ``mlp.fc2.*``
``{encoder,decoder}.ln_pre`` / ``ln_post``                 ``{encoder,decoder}.norm_pre`` / ``norm_post``
=========================================================  ==========================================
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rargen.tokenizers.titok import HEAD_DIM, TiTok, TiTokConfig
from rargen.weight_files import describe_state, read_weights_file

SNAPSHOT_CONFIG = "config.json"
SNAPSHOT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OFFICIAL_SIZES = {"small": (512, 8), "base": (768, 12), "large": (1024, 24)}  # name -> (width, depth)
# Switches the official TiTok reads with ``.get(key, default)``: older snapshots may lack them.
OFFICIAL_DEFAULTS = {"quantize_mode": "vq", "finetune_decoder": True, "is_legacy": True}

_TO_RARGEN = [
    (r"^(encoder|decoder)\.transformer\.(\d+)\.ln_1\.", r"\1.blocks.\2.norm1."),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.ln_2\.", r"\1.blocks.\2.norm2."),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.attn\.in_proj_(weight|bias)$", r"\1.blocks.\2.attn.qkv.\3"),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.attn\.out_proj\.", r"\1.blocks.\2.attn.proj."),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.mlp\.c_fc\.", r"\1.blocks.\2.mlp.fc1."),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.mlp\.c_proj\.", r"\1.blocks.\2.mlp.fc2."),
    (r"^(encoder|decoder)\.ln_(pre|post)\.", r"\1.norm_\2."),
]
_TO_OFFICIAL = [
    (r"^(encoder|decoder)\.blocks\.(\d+)\.norm1\.", r"\1.transformer.\2.ln_1."),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.norm2\.", r"\1.transformer.\2.ln_2."),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"\1.transformer.\2.attn.in_proj_\3"),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.attn\.proj\.", r"\1.transformer.\2.attn.out_proj."),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.mlp\.fc1\.", r"\1.transformer.\2.mlp.c_fc."),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.mlp\.fc2\.", r"\1.transformer.\2.mlp.c_proj."),
    (r"^(encoder|decoder)\.norm_(pre|post)\.", r"\1.ln_\2."),
]
_REQUIRED = (
    "latent_tokens",
    "encoder.patch_embed.weight",
    "encoder.positional_embedding",
    "encoder.conv_out.weight",
    "quantize.embedding.weight",
    "decoder.ffn.2.weight",
    "pixel_quantize.embedding.weight",
    "pixel_decoder.conv_in.weight",
)


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def read_snapshot(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json tree, state dict) of a Hub-style TiTok snapshot folder; clear errors otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"no TiTok snapshot at {str(folder)!r}; download a tokenizer repository such as "
            "yucornetto/tokenizer_titok_l32_imagenet (config.json + model.safetensors) and pass its folder"
        )
    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is a file; `convert official-titok` takes a snapshot folder with "
            f"{SNAPSHOT_CONFIG} and one of {list(SNAPSHOT_WEIGHTS)} (a bare tokenizer_titok_*.bin has no "
            "config: download the Hub repository yucornetto/tokenizer_titok_* instead)"
        )
    found = sorted(p.name for p in folder.iterdir())
    weights = next((folder / n for n in SNAPSHOT_WEIGHTS if (folder / n).is_file()), None)
    if not (folder / SNAPSHOT_CONFIG).is_file() or weights is None:
        raise ValueError(
            f"{str(folder)!r} is not a TiTok snapshot: it needs {SNAPSHOT_CONFIG} and one of "
            f"{list(SNAPSHOT_WEIGHTS)}, found {found or 'nothing'}"
        )
    config = json.loads((folder / SNAPSHOT_CONFIG).read_text())
    state = read_weights_file(weights)  # weights_only for a .bin: never unpickle arbitrary objects
    return config, state


def _vq_settings(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    model = tree.get("model") if isinstance(tree, dict) else None
    vq = model.get("vq_model") if isinstance(model, dict) else None
    if not isinstance(vq, dict):
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"{origin}: config.json has no model.vq_model section (found top-level keys {keys}); "
            "is it a TiTok tokenizer snapshot (not a generator's)?"
        )
    settings = {**OFFICIAL_DEFAULTS, **vq}
    if settings["quantize_mode"] != "vq":
        raise ValueError(
            f"{origin}: quantize_mode {settings['quantize_mode']!r} is a continuous (VAE) TiTok; rargen "
            "converts the VQ tokenizers (TiTok-L-32, TiTok-B-64, TiTok-S-128)"
        )
    if not settings["finetune_decoder"] or not settings["is_legacy"]:
        raise ValueError(
            f"{origin}: finetune_decoder={settings['finetune_decoder']}, is_legacy={settings['is_legacy']}: "
            "rargen converts the two-stage VQ TiToks (decoder -> MaskGIT-VQGAN pixel decoder, legacy "
            "layout: TiTok-L-32, TiTok-B-64, TiTok-S-128); single-stage and stage-1 snapshots are not "
            "supported"
        )
    if "use_l2_norm" not in settings:
        raise ValueError(
            f"{origin}: config.json lacks model.vq_model.use_l2_norm (the official code needs it)"
        )
    return settings


def _vit_shape(state: dict[str, Tensor], part: str) -> tuple[int, int, int]:
    """(width, depth, mlp width) of the encoder or decoder from its tensors."""
    width = state[f"{part}.positional_embedding"].shape[1]
    layers = {
        int(m.group(1)) for k in state if (m := re.match(rf"^{part}\.transformer\.(\d+)\.ln_1\.weight$", k))
    }
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"the {part} blocks are not numbered 0..n-1: found {sorted(layers)}")
    return width, len(layers), state[f"{part}.transformer.0.mlp.c_fc.weight"].shape[0]


def config_from_official(
    tree: dict[str, Any], state: dict[str, Tensor], origin: str = "snapshot"
) -> tuple[TiTokConfig, list[str]]:
    """The TiTokConfig of an official snapshot, and notes where its config disagrees with the tensors."""
    settings = _vq_settings(tree, origin)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"{origin}: not an official VQ TiTok state dict (missing {missing}); "
            f"found {describe_state(state)}"
        )
    notes: list[str] = []
    sizes = {}
    for part, short in (("encoder", "enc"), ("decoder", "dec")):
        width, depth, mlp = _vit_shape(state, part)
        if width % HEAD_DIM:
            raise ValueError(
                f"{origin}: {part} width {width} is not a multiple of {HEAD_DIM} (heads = width / 64)"
            )
        named = settings.get(f"vit_{short}_model_size")
        if named is not None and OFFICIAL_SIZES.get(named) != (width, depth):
            notes.append(
                f"{part}: config says {named!r}, tensors are {width} wide and {depth} deep; using the tensors"
            )
        sizes.update({f"{part}_width": width, f"{part}_depth": depth, f"{part}_heads": width // HEAD_DIM,
                      f"{part}_mlp_dim": mlp})  # fmt: skip
    patch = state["encoder.patch_embed.weight"].shape[-1]
    if settings.get("vit_dec_patch_size", patch) != patch:
        raise ValueError(
            f"{origin}: encoder patch {patch} and decoder patch {settings['vit_dec_patch_size']} differ; "
            "rargen's TiTok needs one patch size"
        )
    grid_rows = state["encoder.positional_embedding"].shape[0] - 1
    grid = round(grid_rows**0.5)
    crop = settings.get("crop_size", (tree.get("dataset") or {}).get("preprocessing", {}).get("crop_size"))
    if grid * grid != grid_rows or (crop is not None and crop != grid * patch):
        raise ValueError(
            f"{origin}: {grid_rows} patch positions at patch {patch} do not fit crop_size {crop}"
        )
    codebook_size, token_size = state["quantize.embedding.weight"].shape
    for key, value in (("codebook_size", codebook_size), ("token_size", token_size),
                       ("num_latent_tokens", state["latent_tokens"].shape[0])):  # fmt: skip
        if key in settings and settings[key] != value:
            notes.append(f"{key}: config says {settings[key]}, tensors say {value}; using the tensors")
    config = TiTokConfig(
        image_size=grid * patch, patch_size=patch, num_latent_tokens=state["latent_tokens"].shape[0],
        codebook_size=codebook_size, token_size=token_size, use_l2_norm=bool(settings["use_l2_norm"]),
        **sizes, **_pixel_shape(state),
    )  # fmt: skip
    return config, notes


def _pixel_shape(state: dict[str, Tensor]) -> dict[str, Any]:
    """The MaskGIT-VQGAN pixel decoder's sizes from its tensors (level i's width = up.i's blocks)."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("pixel_decoder.up.")})
    blocks = {int(k.split(".")[4]) for k in state if k.startswith("pixel_decoder.up.0.block.")}
    hidden = state["pixel_decoder.conv_out.weight"].shape[1]
    widths = [state[f"pixel_decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    if levels != list(range(len(levels))) or any(w % hidden for w in widths):
        raise ValueError(f"unexpected pixel decoder structure: levels {levels}, widths {widths}")
    return {
        "pixel_codebook_size": state["pixel_quantize.embedding.weight"].shape[0],
        "pixel_channel_mult": tuple(w // hidden for w in widths),
        "pixel_hidden_channels": hidden,
        "pixel_num_res_blocks": len(blocks),
        "pixel_z_channels": state["pixel_decoder.conv_in.weight"].shape[1],
    }


def from_official(
    tree: dict[str, Any], state: dict[str, Tensor], origin: str = "snapshot"
) -> tuple[TiTok, list[str]]:
    """Build a rargen TiTok (float32, eval mode) from an official config tree and state dict."""
    from rargen.checkpoint import build

    config, notes = config_from_official(tree, state, origin)
    weights = {_rename(k, _TO_RARGEN): v.to(torch.float32).contiguous() for k, v in state.items()}
    return build(TiTok.checkpoint_kind, config, weights, origin), notes


def convert_official_titok(snapshot: str | os.PathLike) -> tuple[TiTok, list[str]]:
    """A rargen TiTok from a Hub-style snapshot folder, and notes on config/tensor disagreements."""
    tree, state = read_snapshot(snapshot)
    return from_official(tree, state, str(snapshot))


def is_official_titok_snapshot(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    if not (folder / SNAPSHOT_CONFIG).is_file():
        return False
    try:
        tree = json.loads((folder / SNAPSHOT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(tree, dict) and "format_version" not in tree and "vq_model" in (tree.get("model") or {})


def to_official(model: TiTok) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json tree, state dict) in the official layout of a rargen TiTok."""
    cfg = model.config

    def size_name(width: int, depth: int) -> str:
        # The official code knows only these names; another size is written as a descriptive name
        # (rargen reads the tensors; the official constructor would not accept it).
        return next(
            (n for n, wd in OFFICIAL_SIZES.items() if wd == (width, depth)), f"width{width}-depth{depth}"
        )

    tree = {
        "model": {
            "vq_model": {
                "codebook_size": cfg.codebook_size,
                "token_size": cfg.token_size,
                "use_l2_norm": cfg.use_l2_norm,
                "commitment_cost": 0.25,
                "vit_enc_model_size": size_name(cfg.encoder_width, cfg.encoder_depth),
                "vit_dec_model_size": size_name(cfg.decoder_width, cfg.decoder_depth),
                "vit_enc_patch_size": cfg.patch_size,
                "vit_dec_patch_size": cfg.patch_size,
                "num_latent_tokens": cfg.num_latent_tokens,
                "finetune_decoder": True,
                "quantize_mode": "vq",
                "is_legacy": True,
            }
        },
        "dataset": {"preprocessing": {"crop_size": cfg.image_size}},
    }
    state = {
        _rename(k, _TO_OFFICIAL): (v.detach() if v.is_meta else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    return tree, state


def save_official_snapshot(model: TiTok, folder: str | os.PathLike) -> Path:
    """Write ``to_official(model)`` as a snapshot folder (config.json + model.safetensors), atomically."""
    from safetensors.torch import save_file

    from rargen.checkpoint import atomic_write_dir

    tree, state = to_official(model)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / SNAPSHOT_WEIGHTS[0]), metadata={"format": "pt"})
        (tmp / SNAPSHOT_CONFIG).write_text(json.dumps(tree, indent=4) + "\n")

    return atomic_write_dir(folder, write)


__all__ = [
    "config_from_official",
    "convert_official_titok",
    "from_official",
    "is_official_titok_snapshot",
    "read_snapshot",
    "save_official_snapshot",
    "to_official",
]
