"""Tokenizer throughput: encode/decode images/s of the full-size MaskGIT-VQGAN and the small VQ tokenizer.

Random weights (the speed does not depend on them), float32, channels-last on and off.

    python benchmarks/bench_tokenizer.py                  # VQGAN f16 at 256x256, batch 4; vq-digits at 32x32
    python benchmarks/bench_tokenizer.py --threads 2 --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig
from rargen.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench(
    name: str, model: torch.nn.Module, size: int, batch: int, repeats: int, device: torch.device
) -> None:
    images = torch.rand(batch, 3, size, size, device=device)
    for channels_last in (False, True):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        codes = model.encode(images)
        encode = functools.partial(model.encode, images, channels_last=channels_last)
        decode = functools.partial(model.decode, codes, channels_last=channels_last)
        t_enc, t_dec = timed(encode, repeats, device), timed(decode, repeats, device)
        print(
            f"| {name} | {size}x{size} | {batch} | {'on' if channels_last else 'off'} "
            f"| {batch / t_enc:8.2f} | {batch / t_dec:8.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="VQGAN batch")
    parser.add_argument("--small-batch", type=int, default=256, help="vq-digits batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print("| tokenizer | size | batch | channels-last | encode img/s | decode img/s |")
    print("|---|---|---|---|---|---|")
    vqgan = MaskGITVQGAN(VQGANConfig.from_name("maskgit-vqgan-f16-256")).to(device).eval()
    bench("maskgit-vqgan-f16-256", vqgan, 256, args.batch, args.repeats, device)
    small = VQTokenizer(VQTokenizerConfig.from_name("vq-digits")).to(device).eval()
    bench("vq-digits", small, 32, args.small_batch, args.repeats, device)


if __name__ == "__main__":
    main()
