"""Produce tests/data/official_vqgan_small.safetensors by running the official MaskGIT-VQGAN code.

Usage (the official tree is extracted outside this repository, see tests/data/README.md):

    /work/venv/bin/python tests/reference/make_vqgan_reference.py --official /work/official --out tests/data

Needs `omegaconf` (the official classes read an OmegaConf config); it is not a rargen dependency.
Builds the official `Encoder`, `Decoder` and `VectorQuantizer` of `modeling/modules/maskgit_vqgan.py`
in a small configuration with channel-changing blocks, re-draws every weight, and records the
encoder output, codes and decoded images in float64 and float32. The three modules are held by a
container with the attribute names of the official tokenizer wrapper (`encoder`, `decoder`,
`quantize`), so the state-dict keys are the official checkpoint's; encode/decode follow that
wrapper's semantics (codes = argmin of the quantizer on the encoder output; decode = decoder of the
codebook entries, clamped to [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from official_shim import import_official, official_commit
from safetensors.torch import save_file
from torch import nn

CONFIG = {
    "channel_mult": [1, 1, 2],
    "num_resolutions": 3,
    "dropout": 0.0,
    "hidden_channels": 32,
    "num_channels": 3,
    "num_res_blocks": 2,
    "resolution": 32,
    "z_channels": 16,
}
NUM_EMBEDDINGS = 64
COMMITMENT_COST = 0.25
CONFIG_INT_ORDER = (
    "hidden_channels",
    "num_res_blocks",
    "z_channels",
    "num_channels",
    "resolution",
    "num_resolutions",
    "num_embeddings",
    "embedding_dim",
)
PARAM_SEED = 2468
DATA_SEED = 1357
BATCH = 2


class OfficialTokenizer(nn.Module):
    """Holds the official modules under the official wrapper's attribute names (state-dict keys)."""

    def __init__(self, vq_module, config) -> None:
        super().__init__()
        self.encoder = vq_module.Encoder(config)
        self.decoder = vq_module.Decoder(config)
        self.quantize = vq_module.VectorQuantizer(NUM_EMBEDDINGS, config.z_channels, COMMITMENT_COST)


def _draw(shape, std, mean, gen: torch.Generator) -> torch.Tensor:
    """Normal draw rounded to float16-representable values, never exactly 0 nor exactly `mean`."""
    out = torch.empty(shape, dtype=torch.float64)
    todo = torch.ones(shape, dtype=torch.bool)
    while todo.any():
        fresh = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).half().double()
        out = torch.where(todo, fresh, out)
        todo = (out == 0) | (out == mean)
    return out


def redraw_parameters(model: nn.Module, gen: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if ".norm" in name or name.startswith(("encoder.norm_out", "decoder.norm_out")):
            std, mean = (0.25, 1.0) if name.endswith("weight") else (0.1, 0.0)  # GroupNorm affine
        elif name == "quantize.embedding.weight":
            std, mean = 1.0, 0.0  # provisional; re-drawn from the encoder-output statistics below
        elif param.ndim == 4:
            std, mean = 1.0 / math.sqrt(param[0].numel()), 0.0  # conv weight: N(0, 1/fan_in)
        elif name.endswith(".bias"):
            std, mean = 0.1, 0.0
        else:
            raise ValueError(f"no redraw rule for parameter {name!r}; add one to redraw_parameters")
        with torch.no_grad():
            param.copy_(_draw(param.shape, std, mean, gen))


def encode(model: OfficialTokenizer, images: torch.Tensor):
    z = model.encoder(images)
    z_q, indices, _ = model.quantize(z)
    h, w = z.shape[-2:]
    return z, z_q, indices.reshape(images.shape[0], h, w)


def decode_raw(model: OfficialTokenizer, codes: torch.Tensor) -> torch.Tensor:
    return model.decoder(model.quantize.get_codebook_entry(codes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="extracted official source tree")
    parser.add_argument("--out", default="tests/data", help="output folder")
    parser.add_argument("--commit", default=None, help="official snapshot commit (default: DIR/COMMIT)")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    _, vq_module = import_official(args.official)
    commit = args.commit or official_commit(args.official)
    config = OmegaConf.create(CONFIG)

    torch.manual_seed(0)  # constructor init draws; all overwritten
    model = OfficialTokenizer(vq_module, config).double().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(PARAM_SEED)
    redraw_parameters(model, gen)

    data_gen = torch.Generator().manual_seed(DATA_SEED)
    coarse = torch.rand(BATCH, 3, 8, 8, generator=data_gen, dtype=torch.float64)
    fine = torch.rand(BATCH, 3, 32, 32, generator=data_gen, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    images = (0.8 * smooth + 0.2 * fine).clamp(0, 1).float()  # stored float32; float64 cast is exact

    with torch.no_grad():
        # Codebook: random vectors with the encoder output's per-channel mean/std, so codes are diverse.
        z = model.encoder(images.double())
        mean = z.mean(dim=(0, 2, 3))
        std = z.std(dim=(0, 2, 3))
        book = _draw((NUM_EMBEDDINGS, CONFIG["z_channels"]), 1.0, 0.0, gen)
        model.quantize.embedding.weight.copy_((book * std + mean).half().double())
        # Decoder output scale: an affine rescale of conv_out so the pre-clamp output is ~0.5 +- 0.3
        # (mostly inside [0, 1], a few clamped pixels) rather than saturated by the clamp.
        _, _, codes = encode(model, images.double())
        raw = decode_raw(model, codes)
        gain = 0.3 / raw.std().item()
        conv_out = model.decoder.conv_out
        conv_out.weight.copy_((conv_out.weight * gain).half().double())
        conv_out.bias.copy_((conv_out.bias * gain + 0.5 - gain * raw.mean()).half().double())
        for name, param in model.named_parameters():
            assert torch.equal(param.half().double(), param) and bool((param != 0).all()), name

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        tensors[f"state.{key}"] = value.half()
    cfg_all = {**CONFIG, "num_embeddings": NUM_EMBEDDINGS, "embedding_dim": CONFIG["z_channels"]}
    tensors["config_ints"] = torch.tensor([cfg_all[k] for k in CONFIG_INT_ORDER], dtype=torch.int64)
    tensors["config_channel_mult"] = torch.tensor(CONFIG["channel_mult"], dtype=torch.int64)
    tensors["images"] = images

    checks: dict[str, float] = {}
    results = {}
    with torch.no_grad():
        for bits, dtype in ((64, torch.float64), (32, torch.float32)):
            m = model.to(dtype)
            z, z_q, codes = encode(m, images.to(dtype))
            raw = decode_raw(m, codes if bits == 64 else results[64][2])  # both decode the float64 codes
            results[bits] = (z, z_q, codes, raw)
            # Margin between the best and second-best codebook distance: a tie would make codes fragile.
            dist = m.quantize.compute_distances(z.permute(0, 2, 3, 1).contiguous())
            top2 = dist.topk(2, dim=1, largest=False).values
            checks[f"min code margin (float{bits})"] = (top2[:, 1] - top2[:, 0]).min().item()
        model = model.double()

    z64, zq64, codes, raw64 = results[64]
    z32, _, codes32, raw32 = results[32]
    if not torch.equal(codes, codes32):
        print("float32 and float64 codes differ; pick other seeds", file=sys.stderr)
        return 1
    tensors.update(
        z64=z64,
        z32=z32,
        zq64=zq64,
        codes=codes,
        decoded64=raw64.clamp(0.0, 1.0),
        decoded32=raw32.clamp(0.0, 1.0),
        decoded_raw64=raw64,
        decoded_raw32=raw32,
    )
    checks["z64 vs z32"] = (z64 - z32.double()).abs().max().item()
    checks["decoded_raw64 vs decoded_raw32"] = (raw64 - raw32.double()).abs().max().item()
    checks["distinct codes"] = float(codes.unique().numel())
    checks["fraction of decoded pixels clamped"] = ((raw64 < 0) | (raw64 > 1)).double().mean().item()
    checks["z64 std"] = z64.std().item()

    metadata = {
        "config": json.dumps(cfg_all),
        "config_ints_order": json.dumps(CONFIG_INT_ORDER),
        "commitment_cost": str(COMMITMENT_COST),
        "state_dtype": "float16 storage of float16-representable draws; cast to float64/float32 exactly",
        "param_seed": str(PARAM_SEED),
        "data_seed": str(DATA_SEED),
        "official_repo": "bytedance/1d-tokenizer",
        "official_file": "modeling/modules/maskgit_vqgan.py (Encoder, Decoder, VectorQuantizer)",
        "official_commit": commit,
        "command": "python tests/reference/make_vqgan_reference.py --official OFFICIAL_TREE --out tests/data",
        "checks": json.dumps(checks),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "official_vqgan_small.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")
    for key, value in checks.items():
        print(f"  {key}: {value:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
