"""Produce tests/data/official_titok_small.safetensors by running the official TiTok code.

Usage (the official tree is extracted outside this repository, see tests/data/README.md; the
official TiTok imports einops, omegaconf, huggingface_hub and accelerate, none of them rargen
dependencies, so run it from a throwaway venv):

    python3 -m venv /tmp/offvenv && /tmp/offvenv/bin/pip install torch==2.13.0 einops omegaconf \\
        huggingface_hub accelerate safetensors
    /tmp/offvenv/bin/python tests/reference/make_titok_reference.py --official /work/official --out tests/data

The official ``TiTok`` (``modeling/titok.py``) is built from a VQ config of the released kind
(``finetune_decoder`` on, legacy layout, l2-normalised codebook) at 32x32 with 8x8 patches and
8 latent tokens. Its ViT widths come from fixed size names (the smallest is 512 wide), so after
construction the encoder and decoder are re-sized in place: their width, depth and head fields are
set to 128 / 2 / 2 (MLP ratio 2) and their parameters and blocks re-created with the official block
class at that width; the per-patch head predicts 32 pixel codes and the pixel stage is the official
MaskGIT-VQGAN ``Decoder`` / ``VectorQuantizer`` in a 4-level, 32-channel configuration. Every forward pass run
here is the official code's. All weights are then re-drawn (every one non-zero, float16-exact).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from make_vqgan_reference import _draw
from official_shim import _namespace, import_official, official_commit
from safetensors.torch import save_file
from torch import nn

WIDTH, DEPTH, HEADS, MLP_RATIO = 128, 2, 2, 2.0  # heads = width / 64, as in every official size
PIXEL = {
    "channel_mult": [1, 1, 1, 1],
    "num_resolutions": 4,
    "dropout": 0.0,
    "hidden_channels": 32,
    "num_channels": 3,
    "num_res_blocks": 1,
    "resolution": 32,
    "z_channels": 16,
}
PIXEL_CODES = 32
HUB_CONFIG = {  # what the released snapshots' config.json holds (the OmegaConf tree), at this size
    "experiment": {"tokenizer_checkpoint": "tokenizer_titok_small_test.bin"},
    "model": {
        "vq_model": {
            "codebook_size": 64,
            "token_size": 8,
            "use_l2_norm": True,
            "commitment_cost": 0.25,
            "vit_enc_model_size": "small",
            "vit_dec_model_size": "small",
            "vit_enc_patch_size": 8,
            "vit_dec_patch_size": 8,
            "num_latent_tokens": 8,
            "finetune_decoder": True,
        }
    },
    "dataset": {"preprocessing": {"crop_size": 32}},
}
PARAM_SEED = 8642
DATA_SEED = 9753
BATCH = 4


def import_official_titok(root: str) -> object:
    import_official(root)  # modeling, modeling.modules (+ base_model) as bare namespaces
    _namespace("modeling.quantizer", Path(root).resolve() / "modeling" / "quantizer")
    return importlib.import_module("modeling.titok")


def shrink(part: nn.Module, blocks_module: object, grid: int, latent: int) -> None:
    """Re-size an official TiTokEncoder/Decoder to WIDTH/DEPTH/HEADS, keeping its forward code."""
    part.width, part.num_layers, part.num_heads = WIDTH, DEPTH, HEADS
    part.class_embedding = nn.Parameter(torch.zeros(1, WIDTH))
    part.positional_embedding = nn.Parameter(torch.zeros(grid**2 + 1, WIDTH))
    part.latent_token_positional_embedding = nn.Parameter(torch.zeros(latent, WIDTH))
    part.ln_pre, part.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
    part.transformer = nn.ModuleList(
        [blocks_module.ResidualAttentionBlock(WIDTH, HEADS, mlp_ratio=MLP_RATIO) for _ in range(DEPTH)]
    )


def build(titok_module: object, blocks_module: object, vq_module: object) -> nn.Module:
    from omegaconf import OmegaConf

    config = OmegaConf.create(HUB_CONFIG)
    model = titok_module.TiTok(config)
    vq = config.model.vq_model
    grid = config.dataset.preprocessing.crop_size // vq.vit_enc_patch_size
    enc, dec = model.encoder, model.decoder
    shrink(enc, blocks_module, grid, vq.num_latent_tokens)
    enc.patch_embed = nn.Conv2d(3, WIDTH, vq.vit_enc_patch_size, stride=vq.vit_enc_patch_size, bias=True)
    enc.conv_out = nn.Conv2d(WIDTH, vq.token_size, kernel_size=1, bias=True)
    shrink(dec, blocks_module, grid, vq.num_latent_tokens)
    dec.decoder_embed = nn.Linear(vq.token_size, WIDTH, bias=True)
    dec.mask_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
    dec.ffn = nn.Sequential(nn.Conv2d(WIDTH, 2 * WIDTH, 1), nn.Tanh(), nn.Conv2d(2 * WIDTH, PIXEL_CODES, 1))
    model.latent_tokens = nn.Parameter(torch.zeros(vq.num_latent_tokens, WIDTH))
    model.pixel_quantize = vq_module.VectorQuantizer(PIXEL_CODES, PIXEL["z_channels"], 0.25)
    model.pixel_decoder = vq_module.Decoder(OmegaConf.create(PIXEL))
    return model


def redraw(model: nn.Module, gen: torch.Generator) -> None:
    for name, param in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if "ln_" in name or ".norm" in name or "norm_out" in name:  # LayerNorm / GroupNorm affines
            std, mean = (0.25, 1.0) if last == "weight" else (0.1, 0.0)
        elif "embedding" in name and param.ndim == 2 and "quantize" not in name or name == "latent_tokens":
            std, mean = 0.2, 0.0  # positional / class / latent tables
        elif "mask_token" in name:
            std, mean = 0.2, 0.0
        elif name == "encoder.patch_embed.weight":
            std, mean = 4.0 / math.sqrt(param[0].numel()), 0.0  # images in [0, 1] are small inputs
        elif name == "encoder.conv_out.bias":
            std, mean = 0.01, 0.0  # keep the image-dependent part of z visible
        elif "quantize.embedding" in name:
            std, mean = 1.0, 0.0  # the TiTok codebook is re-drawn from encoder statistics in main()
        elif last in ("weight", "in_proj_weight") and param.ndim >= 2:
            std, mean = 1.0 / math.sqrt(param[0].numel()), 0.0  # N(0, 1/fan_in)
        elif last in ("bias", "in_proj_bias"):
            std, mean = 0.1, 0.0
        else:
            raise ValueError(f"no redraw rule for parameter {name!r}")
        with torch.no_grad():
            param.copy_(_draw(param.shape, std, mean, gen))


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The official README's tokenization: ``encode(x)[1]["min_encoding_indices"]`` -> (B, 1, K)."""
    return model.encode(images)[1]["min_encoding_indices"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="extracted official source tree")
    parser.add_argument("--out", default="tests/data", help="output folder")
    args = parser.parse_args(argv)
    titok_module = import_official_titok(args.official)
    blocks_module = importlib.import_module("modeling.modules.blocks")
    vq_module = importlib.import_module("modeling.modules.maskgit_vqgan")
    commit = official_commit(args.official)

    torch.manual_seed(0)  # constructor draws; all overwritten
    model = build(titok_module, blocks_module, vq_module).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(PARAM_SEED)
    redraw(model, gen)

    data_gen = torch.Generator().manual_seed(DATA_SEED)
    coarse = torch.rand(BATCH, 3, 8, 8, generator=data_gen, dtype=torch.float64)
    fine = torch.rand(BATCH, 3, 32, 32, generator=data_gen, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    images = (0.8 * smooth + 0.2 * fine).clamp(0, 1).float()

    with torch.no_grad():
        # Codebook: random vectors with the per-channel mean/std of the encoder output on the
        # images, so the codes are diverse (a codebook drawn around 0 would give a few codes only).
        vq = HUB_CONFIG["model"]["vq_model"]
        K, T = vq["num_latent_tokens"], vq["token_size"]
        z = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens).reshape(BATCH, T, K)
        z = z.permute(0, 2, 1).reshape(-1, T)
        book = _draw((vq["codebook_size"], T), 1.0, 0.0, gen).float() * z.std(0) + z.mean(0)
        # Every other code is one of the images' latents plus noise, so codes depend on the image.
        book[: 2 * len(z) : 2] = z + 0.3 * z.std(0) * _draw(z.shape, 1.0, 0.0, gen).float()
        model.quantize.embedding.weight.copy_(book.half().float())
        # Pixel stage output scale: an affine rescale of its conv_out so the pre-clamp output is
        # ~0.5 +- 0.3 (a few clamped pixels), not saturated.
        raw = model.decode_tokens(encode(model, images))
        gain = 0.3 / raw.std().item()
        conv_out = model.pixel_decoder.conv_out
        conv_out.weight.copy_((conv_out.weight * gain).half().float())
        conv_out.bias.copy_((conv_out.bias * gain + 0.5 - gain * raw.mean()).half().float())
        for name, param in model.named_parameters():
            assert torch.equal(param.half().float(), param) and bool((param != 0).all()), name

        checks: dict[str, float] = {}
        codes = encode(model, images)  # (B, 1, K), float32 (the official quantizer casts to float32)
        z32 = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens)  # (B, T, 1, K)
        decoded_raw32 = model.decode_tokens(codes)
        vectors = model.quantize.get_codebook_entry(codes.reshape(-1)).reshape(BATCH, 1, K, T)
        logits32 = model.decoder(vectors.permute(0, 3, 1, 2).contiguous())  # official (B, T, 1, K) input
        m64 = model.double()
        z64 = m64.encoder(pixel_values=images.double(), latent_tokens=m64.latent_tokens)
        decoded_raw64 = m64.decode_tokens(codes)  # the decode path has no float32 cast
        model = m64.float()
        z = F.normalize(z32.reshape(BATCH, T, K).permute(0, 2, 1).reshape(-1, T), dim=-1)
        book = F.normalize(model.quantize.embedding.weight, dim=-1)
        top2 = torch.cdist(z.double(), book.double()).pow(2).topk(2, dim=1, largest=False).values
        checks["min code margin (squared distance)"] = (top2[:, 1] - top2[:, 0]).min().item()
        checks["distinct codes"] = float(codes.unique().numel())
        checks["positions where the images' codes differ"] = float((codes != codes[:1]).any(0).sum())
        checks["z64 vs z32"] = (z64 - z32.double()).abs().max().item()
        checks["decoded_raw64 vs decoded_raw32"] = (decoded_raw64 - decoded_raw32.double()).abs().max().item()
        checks["fraction of decoded pixels clamped"] = (
            ((decoded_raw64 < 0) | (decoded_raw64 > 1)).double().mean().item()
        )

    tensors = {f"state.{k}": v.half() for k, v in model.state_dict().items()}
    tensors.update(
        images=images,
        codes=codes[:, 0].long(),  # (B, K)
        z32=z32.reshape(BATCH, T, K).transpose(1, 2).contiguous(),  # (B, K, T)
        z64=z64.reshape(BATCH, T, K).transpose(1, 2).contiguous(),
        pixel_logits32=logits32,
        decoded_raw32=decoded_raw32,
        decoded_raw64=decoded_raw64,
        decoded32=decoded_raw32.clamp(0, 1),
    )
    metadata = {
        "hub_config": json.dumps(HUB_CONFIG),
        "vit": json.dumps({"width": WIDTH, "depth": DEPTH, "heads": HEADS, "mlp_ratio": MLP_RATIO}),
        "pixel_config": json.dumps({**PIXEL, "num_embeddings": PIXEL_CODES}),
        "param_seed": str(PARAM_SEED),
        "data_seed": str(DATA_SEED),
        "official_repo": "bytedance/1d-tokenizer",
        "official_file": "modeling/titok.py, modeling/modules/blocks.py, modeling/quantizer/quantizer.py",
        "official_commit": commit,
        "command": "python tests/reference/make_titok_reference.py --official OFFICIAL_TREE --out tests/data",
        "checks": json.dumps(checks),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "official_titok_small.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")
    for key, value in checks.items():
        print(f"  {key}: {value:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
