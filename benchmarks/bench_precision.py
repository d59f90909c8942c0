"""How far each speed option moves the sampling distribution from the float64 path.

    /work/venv/bin/python benchmarks/bench_precision.py --preset rar-mini --batch 4

Per-step distributions come from ``rargen.sampling.engine.token_probs`` (the cached decode path of
``generate``) on random tokens, with CFG (the RAR-B sampling preset). The model has random weights
drawn at realistic scales (Linear N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.25^2)), so its
distributions are peaked rather than uniform. Reported: max |p - p64| and mean KL(p64 || p).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from rargen.model import RAR, ModelConfig
from rargen.sampling.engine import SampleConfig, token_probs


def realistic_weights(model: RAR, seed: int = 0) -> RAR:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if (
                name.endswith("weight")
                and p.ndim == 2
                and not isinstance(model.get_submodule(name[:-7]), nn.Embedding)
            ):
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.25 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.5 * noise)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rar-mini")
    parser.add_argument("--sample", default="rar-b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default="fp32,bf16,compiled,int8")
    args = parser.parse_args(argv)
    config = SampleConfig.from_name(args.sample)
    model = realistic_weights(RAR(ModelConfig.from_name(args.preset, dropout=0.0, attn_dropout=0.0))).eval()
    model = model.double().requires_grad_(False)
    c = model.config
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, c.codebook_size, (args.batch, c.num_image_tokens), generator=generator)
    labels = torch.randint(0, c.num_classes, (args.batch,), generator=generator)
    ref = token_probs(model, labels, tokens, config)
    print(f"# {args.preset} random weights, batch {args.batch}, {config}")
    print(
        f"# reference: float64; mean entropy {-(ref * ref.clamp_min(1e-300).log()).sum(-1).mean():.2f} nats"
    )
    print("| variant | max abs prob error | mean KL(p64 || p) | time (s) |")
    print("|---|---|---|---|")
    for variant in args.variants.split(","):
        bf16, compile = "bf16" in variant, "compiled" in variant
        quantize = "int8" if variant == "int8" else None  # rargen.sampling.int8 (CPU only)
        m = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32)
        start = time.perf_counter()
        probs = token_probs(m, labels, tokens, config, bf16=bf16, compile=compile, quantize=quantize).double()
        seconds = time.perf_counter() - start
        kl = (ref * (ref.clamp_min(1e-300).log() - probs.clamp_min(1e-300).log())).sum(-1).mean()
        print(f"| {variant} | {(probs - ref).abs().max():.2e} | {kl:.2e} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
