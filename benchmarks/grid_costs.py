"""What a token grid costs per model size, computed from the configs (no timing, no weights): the grid
tables (absolute and target-aware positions, per-step conditioning), the KV cache and the adaLN
modulation tables of one guided image, and the FLOPs per image of sampling and of training.

    PYTHONPATH=src python benchmarks/grid_costs.py [--presets rar-b,rar-l,rar-xl,rar-xxl] [--tokens 256,1024]

Sizes are those rargen allocates: ``KVCache`` (K and V of every layer, L + 1 positions), built on the
meta device and measured; the modulation rows of ``RAR.decode_modulations`` (6 per block + 2 per
position) of one condition (a class; the null condition's table is shared by the whole batch), which
the decoder computes in chunks of at most ``rargen.sampling.decoding.MODULATION_CHUNK_BYTES`` for all
conditions together (resident memory is capped, the work is not). Guided sampling runs two rows
(class and null) per image; activations are bf16.
FLOPs: ``RAR.flops_per_token`` (matmuls, 2 per multiply-add, attention over the full sequence) x L;
sampling with guidance x2 (two rows per image); training x3 (forward + backward).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from rargen.kv_cache import KVCache
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import MODULATION_CHUNK_BYTES

BF16 = 2  # bytes
MIB = 2**20


def costs(config: ModelConfig) -> dict[str, float]:
    with torch.device("meta"):
        model = RAR(config)
        cache = KVCache(config, rows=2, dtype=torch.bfloat16, device="meta")  # class + null rows
    tables = sum(getattr(model, name).numel() for name in ("pos_embed", "target_pos_embed", "step_embed"))
    kv = sum(b.numel() * b.element_size() for b in (*cache.k, *cache.v))
    modulation = (config.num_image_tokens + 1) * (6 * config.depth + 2) * config.dim * BF16
    forward = model.flops_per_token() * config.num_image_tokens
    return {
        "params_m": model.num_params() / 1e6,
        "tables_m": tables / 1e6,
        "kv_mib": kv / MIB,
        "mod_mib": modulation / MIB,
        "sample_gflop": 2 * forward / 1e9,
        "train_gflop": 3 * forward / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="rar-b,rar-l,rar-xl,rar-xxl")
    parser.add_argument("--tokens", default="256,1024", help="image tokens (square grids: 16x16, 32x32)")
    args = parser.parse_args()
    print(f"(modulation tables are computed in chunks of at most {MODULATION_CHUNK_BYTES // MIB} MiB)\n")
    print(
        "| model | tokens (grid) | params | grid tables | KV cache / guided image | modulation / class "
        "| sampling GFLOP / guided image | training GFLOP / image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            config = dataclasses.replace(ModelConfig.from_name(preset), num_image_tokens=tokens)
            c, (h, w) = costs(config), config.grid
            print(
                f"| {preset} | {tokens} ({h}x{w}) | {c['params_m']:.1f}M | {c['tables_m']:.2f}M "
                f"| {c['kv_mib']:.0f} MiB | {c['mod_mib']:.0f} MiB "
                f"| {c['sample_gflop']:.0f} | {c['train_gflop']:.0f} |"
            )


if __name__ == "__main__":
    main()
