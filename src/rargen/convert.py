"""The official file formats: the RAR generator and the MaskGIT-VQGAN tokenizer, read and written.

``read_official`` turns an official file (or its state dict) into ``(kind, config, weights)`` in
rargen's layout; ``rargen.checkpoint`` builds the module (``rargen.load`` on a ``.bin`` does both).
The official TiTok snapshots, a folder rather than one file, are in ``rargen.tokenizers.titok_convert``.

The official generator files (``rar_b.bin`` ... ``rar_xxl.bin``) are ``torch.save`` state dicts
of ``modeling/rar.py::RAR`` (spec Sec. 6). The whole layout mapping lives in this one table:

=============================================  ===========================  =====================
official key (shape)                           rargen key (shape)           rows kept
=============================================  ===========================  =====================
``cls_token`` (1, 1, D)                        ``cls_token`` (D)            all
``pos_embed`` (1, L+1024, D)                   ``pos_embed`` (L+2, D)       0 .. L+1
``target_aware_pos_embed`` (1, L+1024, D)      ``target_pos_embed`` (L, D)  2 .. L+1
``timesteps_embeddings`` (1, L+100, D)         ``step_embed`` (L+2, D)      0 .. L+1
``embeddings.weight`` (V+C+2, D)               ``token_embed.weight`` (V)   0 .. V-1
                                               ``class_embed.weight`` (C+1) V+1 .. V+C+1
``blocks.i.adaLN_modulation.1.*``              ``blocks.i.adaln.*``         all
``adaln_before_head.adaLN_modulation.1.*``     ``final_adaln.*``            all
``lm_head.*``                                  ``head.*``                   all
``blocks.i.{norm1,norm2,attn.*,mlp.fc1,fc2}``  same names                   all
=============================================  ===========================  =====================

Dropped rows are never read by any computation: the MaskGIT mask-token row ``V`` of the
embedding table, positional rows beyond ``L+1``, target-aware rows 0, 1 and beyond ``L+1``, and
timestep rows beyond ``L+1``. ``to_official`` writes them back as zeros, so weights trained with
rargen load (strictly) into the official code.

The MaskGIT-VQGAN file (``maskgit-vqgan-imagenet-f16-256.bin``) uses ``rargen.tokenizers.vqgan``'s key names
as they are; only its config is inferred from the tensor shapes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rargen.model import RAR, ModelConfig
from rargen.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig
from rargen.weight_files import check_state_dict, describe_state, read_weights_file

# The official tables carry a fixed number of spare rows (``image_seq_len + 1024`` positions,
# ``image_seq_len + 100`` timesteps).
OFFICIAL_EXTRA_POS_ROWS = 1024
OFFICIAL_EXTRA_STEP_ROWS = 100
ARCHITECTURE_FIELDS = (
    "codebook_size",
    "num_classes",
    "num_image_tokens",
    "dim",
    "depth",
    "num_heads",
    "mlp_dim",
)

_RENAMES = [
    (re.compile(r"^blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$"), r"blocks.\1.adaln.\2"),
    (re.compile(r"^adaln_before_head\.adaLN_modulation\.1\.(weight|bias)$"), r"final_adaln.\1"),
    (re.compile(r"^lm_head\.(weight|bias)$"), r"head.\1"),
]
_BLOCK_KEY = re.compile(
    r"^blocks\.(\d+)\.(norm1|norm2|attn\.(qkv|q_norm|k_norm|proj)|mlp\.(fc1|fc2))\.(weight|bias)$"
)
_TABLE_KEYS = (
    "cls_token",
    "pos_embed",
    "target_aware_pos_embed",
    "timesteps_embeddings",
    "embeddings.weight",
)


def read_official_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an official ``.bin``/``.pt``/``.pth`` (``weights_only``) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no file at {str(path)!r}; the official RAR weights (rar_b.bin ... rar_xxl.bin) are in the "
            "Hugging Face repo yucornetto/RAR, the MaskGIT-VQGAN tokenizer "
            "(maskgit-vqgan-imagenet-f16-256.bin) in fun-research/TiTok; download them and pass the "
            "local path"
        )
    return read_weights_file(path)


def describe(state: dict[str, Tensor], limit: int = 6, hints: bool = True) -> str:
    """What an unrecognised state dict holds, with a hint when it is wrapped or another official kind."""
    return describe_state(state, limit) + (_hint(state) if hints else "")


def _hint(state: dict[str, Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("blocks.") for k in keys) and "lm_head.weight" in state:
        return "; it looks like an official RAR generator: use `rargen convert official-rar`"
    if is_official_vqgan_state_dict(state):
        return "; it looks like an official MaskGIT-VQGAN: use `rargen convert official-vqgan`"
    wrapped = keys and all(k.startswith(("module.", "model.", "state.", "_orig_mod.")) for k in keys)
    if wrapped or any(k in state for k in ("model", "state_dict")):
        return (
            "; it looks wrapped: all keys share a prefix (strip 'module.', e.g. "
            "{k.removeprefix('module.'): v ...}) or take the inner 'model'/'state_dict' entry"
        )
    return ""


def is_official_rar_state_dict(state: dict[str, Tensor]) -> bool:
    return all(key in state for key in _TABLE_KEYS) and "lm_head.weight" in state


def infer_official_config(state: dict[str, Tensor]) -> ModelConfig:
    """The rargen ModelConfig of an official RAR state dict, from the tensor shapes alone."""
    if not is_official_rar_state_dict(state):
        raise ValueError(
            f"not an official RAR generator state dict: expected keys {list(_TABLE_KEYS)} and "
            f"'lm_head.weight', found {describe(state)}"
        )
    dim = state["cls_token"].shape[-1]
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.norm1\.weight$", k))})
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    codebook_size = state["lm_head.weight"].shape[0]
    num_image_tokens = state["pos_embed"].shape[1] - OFFICIAL_EXTRA_POS_ROWS
    num_classes = state["embeddings.weight"].shape[0] - codebook_size - 2
    step_rows = state["timesteps_embeddings"].shape[1]
    if dim % head_dim or num_image_tokens < 1 or num_classes < 0 or step_rows != num_image_tokens + 100:
        raise ValueError(
            f"inconsistent official RAR shapes: width {dim}, head dim {head_dim}, {num_image_tokens} image "
            f"tokens, {num_classes} classes, {step_rows} timestep rows; found {describe(state, hints=False)}"
        )
    return ModelConfig(
        codebook_size=codebook_size,
        num_classes=num_classes,
        num_image_tokens=num_image_tokens,
        dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
    )


def check_against_preset(config: ModelConfig, preset: str) -> None:
    expected = ModelConfig.from_name(preset)
    diffs = [
        f"{f}: file {getattr(config, f)} vs preset {getattr(expected, f)}"
        for f in ARCHITECTURE_FIELDS
        if getattr(config, f) != getattr(expected, f)
    ]
    if diffs:
        raise ValueError(f"the file does not match preset {preset!r}: " + "; ".join(diffs))


def from_official(state: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Map an official RAR state dict to (rargen config, rargen state dict)."""
    config = infer_official_config(state)
    V, C, L = config.codebook_size, config.num_classes, config.num_image_tokens
    ours: dict[str, Tensor] = {
        "cls_token": state["cls_token"].reshape(-1),
        "pos_embed": state["pos_embed"][0, : L + 2],
        "target_pos_embed": state["target_aware_pos_embed"][0, 2 : L + 2],
        "step_embed": state["timesteps_embeddings"][0, : L + 2],
        "token_embed.weight": state["embeddings.weight"][:V],
        "class_embed.weight": state["embeddings.weight"][V + 1 : V + C + 2],
    }
    leftover = []
    for key, value in state.items():
        if key in _TABLE_KEYS:
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(key):
                ours[pattern.sub(replacement, key)] = value
                break
        else:
            if _BLOCK_KEY.match(key):
                ours[key] = value
            else:
                leftover.append(key)
    if leftover:
        raise ValueError(f"unexpected tensors in the official RAR state dict: {leftover}")
    ours = {k: v.contiguous().clone() for k, v in ours.items()}
    with torch.device("meta"):
        expected = RAR(config).state_dict()
    check_state_dict(expected, ours, "the converted official state dict")
    return config, ours


_VQGAN_KEYS = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight")


def is_official_vqgan_state_dict(state: dict[str, Tensor]) -> bool:
    """True when ``state`` has the official MaskGIT-VQGAN key layout (no prefix)."""
    return all(key in state for key in _VQGAN_KEYS) and any(key.startswith("decoder.up.") for key in state)


def _indices(state: dict[str, Tensor], prefix: str) -> list[int]:
    return sorted({int(key[len(prefix) :].split(".")[0]) for key in state if key.startswith(prefix)})


def vqgan_config_from_official(state: dict[str, Tensor]) -> VQGANConfig:
    """Infer widths, levels, blocks and codebook of an official MaskGIT-VQGAN state dict."""
    hidden = state["encoder.conv_in.weight"].shape[0]
    levels = _indices(state, "encoder.down.")
    blocks = _indices(state, "encoder.down.0.block.")
    mid = _indices(state, "encoder.mid.")
    if not levels or not blocks or levels != list(range(len(levels))) or mid != blocks:
        raise ValueError(
            f"official VQGAN state dict has an unexpected structure: encoder.down levels {levels}, "
            f"blocks per level {blocks}, middle blocks {mid}"
        )
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    if any(w % hidden for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of the stem width {hidden}")
    codebook_size, codebook_dim = state["quantize.embedding.weight"].shape
    return VQGANConfig(
        channel_mult=tuple(w // hidden for w in widths),
        hidden_channels=hidden,
        num_res_blocks=len(blocks),
        z_channels=state["encoder.conv_out.weight"].shape[0],
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        # The weights do not record a resolution; 16 codes per side is what MaskGIT trained with.
        image_size=16 * 2 ** (len(levels) - 1),
    )


def vqgan_from_official(state: dict[str, Tensor]) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Map an official MaskGIT-VQGAN state dict to (rargen config, float32 state dict)."""
    if not is_official_vqgan_state_dict(state):
        raise ValueError(
            f"not an official MaskGIT-VQGAN state dict (expected keys {list(_VQGAN_KEYS)} and "
            f"decoder.up.*): found {describe(state)}"
        )
    return vqgan_config_from_official(state), {k: v.to(torch.float32) for k, v in state.items()}


# checkpoint kind -> (recogniser, converter to (config, rargen weights)), the official files
# ``read_official`` knows.
OFFICIAL_FORMATS = {
    RAR.checkpoint_kind: (is_official_rar_state_dict, from_official),
    MaskGITVQGAN.checkpoint_kind: (is_official_vqgan_state_dict, vqgan_from_official),
}


def read_official(
    source: str | os.PathLike | dict[str, Tensor], kind: str | None = None
) -> tuple[str, Any, dict[str, Tensor]]:
    """(checkpoint kind, config, weights in rargen's layout) of an official file or state dict.

    ``kind`` (``"rar"`` or ``"maskgit-vqgan"``) demands that format; by default it is recognised
    from the keys. ``rargen.checkpoint.build`` turns the result into the module.
    """
    state = source if isinstance(source, dict) else read_official_file(source)
    if kind is None:
        kind = next((k for k, (recognise, _) in OFFICIAL_FORMATS.items() if recognise(state)), None)
        if kind is None:
            origin = "the state dict" if isinstance(source, dict) else repr(str(source))
            raise ValueError(
                f"{origin} is not an official RAR generator and not an official MaskGIT-VQGAN state dict; "
                f"found {describe(state)}"
            )
    elif kind not in OFFICIAL_FORMATS:
        raise ValueError(f"no official format of kind {kind!r}; known: {sorted(OFFICIAL_FORMATS)}")
    config, weights = OFFICIAL_FORMATS[kind][1](state)
    return kind, config, weights


def to_official(model: RAR) -> dict[str, Tensor]:
    """The official state dict of a rargen model (never-used rows written as zeros)."""
    cfg = model.config
    if cfg.grid[0] != cfg.grid[1] and cfg.grid_width:
        raise ValueError(
            f"the model's token grid is {cfg.grid[0]}x{cfg.grid[1]}; the official code decodes square "
            "grids only (sqrt(image_seq_len) per side), so its files cannot hold this model"
        )
    V, C, L, D = cfg.codebook_size, cfg.num_classes, cfg.num_image_tokens, cfg.dim
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = state["cls_token"].dtype

    def padded(rows: Tensor, total: int, offset: int = 0) -> Tensor:
        table = torch.zeros(1, total, D, dtype=dtype)
        table[0, offset : offset + rows.shape[0]] = rows
        return table

    embeddings = torch.zeros(V + C + 2, D, dtype=dtype)
    embeddings[:V] = state.pop("token_embed.weight")
    embeddings[V + 1 :] = state.pop("class_embed.weight")
    official = {
        "cls_token": state.pop("cls_token").reshape(1, 1, D),
        "pos_embed": padded(state.pop("pos_embed"), L + OFFICIAL_EXTRA_POS_ROWS),
        "target_aware_pos_embed": padded(
            state.pop("target_pos_embed"), L + OFFICIAL_EXTRA_POS_ROWS, offset=2
        ),
        "timesteps_embeddings": padded(state.pop("step_embed"), L + OFFICIAL_EXTRA_STEP_ROWS),
    }
    for key, value in state.items():
        key = re.sub(r"^blocks\.(\d+)\.adaln\.", r"blocks.\1.adaLN_modulation.1.", key)
        key = re.sub(r"^final_adaln\.", "adaln_before_head.adaLN_modulation.1.", key)
        key = re.sub(r"^head\.", "lm_head.", key)
        official[key] = value.contiguous()
    official["embeddings.weight"] = embeddings
    return official


def describe_converted(model: Any) -> str:
    """The size of a converted model, for the line ``rargen convert`` prints: a RAR generator's or
    TiTok's (``": 1,234 parameters, ..."``); empty for others."""
    cfg = model.config
    if isinstance(model, RAR):
        return (f": {model.num_params():,} parameters, dim {cfg.dim}, depth {cfg.depth}, heads "
                f"{cfg.num_heads}, {cfg.num_image_tokens} tokens, {cfg.num_classes} classes")  # fmt: skip
    if hasattr(cfg, "num_latent_tokens"):  # TiTok: 1D tokens
        return (f": {model.num_params():,} parameters, {cfg.num_latent_tokens} tokens of "
                f"{cfg.codebook_size} codes per {cfg.image_size}px image")  # fmt: skip
    return ""


def save_official(model: RAR, path: str | os.PathLike) -> Path:
    """Write ``to_official(model)`` as a ``.safetensors`` file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(to_official(model), str(tmp))
    os.replace(tmp, path)
    return path


def count_params_official(config: ModelConfig) -> int:
    """Parameter count of the official model of the same size (it keeps never-used rows: the mask
    embedding row and the spare rows of the three tables)."""
    D = config.dim
    unused = D * (
        1 + (OFFICIAL_EXTRA_POS_ROWS - 2) + OFFICIAL_EXTRA_POS_ROWS + (OFFICIAL_EXTRA_STEP_ROWS - 2)
    )
    with torch.device("meta"):
        ours = RAR(config).num_params()
    return ours + unused
