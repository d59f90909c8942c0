"""Quickstart: draw images from a released RAR model, save a grid, score the tokens' likelihoods.

    python examples/quickstart.py                       # rar-b + MaskGIT-VQGAN (downloaded once)
    python examples/quickstart.py --model rar-xl --labels 207,360,387,974 --out grid.png

The three lines that do it:

    model = rargen.from_pretrained("rar-b")
    tokenizer = rargen.from_pretrained("maskgit-vqgan")
    images = rargen.generate_images(model, tokenizer, [207, 360], rargen.SampleConfig.from_name("rar-b"))
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rargen
from rargen.hub.releases import find_release
from rargen.sampling.images import save_grid, to_uint8
from rargen.tokenizers.base import codes_from_sequence


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rar-b", help="released name, hf://... or a local path")
    parser.add_argument("--tokenizer", default=None, help="default: the model's paired tokenizer")
    parser.add_argument("--labels", default="207,360,387,974", help="comma-separated ImageNet classes")
    parser.add_argument("--out", default="quickstart.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    release = find_release(args.model)
    model = rargen.from_pretrained(args.model)
    tokenizer = rargen.from_pretrained(args.tokenizer or (release.tokenizer if release else "maskgit-vqgan"))
    config = rargen.SampleConfig.from_name(release.sample_preset) if release else rargen.SampleConfig()
    labels = [int(x) for x in args.labels.split(",")]

    # Draw tokens, decode them to images, save a labelled grid.
    tokens = rargen.generate(model, labels, config, torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():  # (B, L) -> the tokenizer's layout: a square grid, or TiTok's 1D codes
        images = tokenizer.decode(codes_from_sequence(tokenizer, tokens)).float().clamp(0, 1)
    out = Path(args.out)
    save_grid(to_uint8(images), labels, None, out)

    # Likelihoods: the sampler's exact per-step distributions with the drawn tokens teacher-forced.
    probs = rargen.token_probs(model, labels, tokens, config)  # (B, L, V)
    log_p = probs.gather(-1, tokens[..., None]).squeeze(-1).log()
    for label, row in zip(labels, log_p, strict=True):
        print(f"class {label}: log p = {row.sum().item():.1f} nats ({-row.mean().item():.3f} nats/token)")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
