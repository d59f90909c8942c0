"""Speculative decoding against plain decoding on a trained generator: passes, tokens per pass, speed.

    PYTHONPATH=src python benchmarks/bench_speculative.py runs/demo/generator --speculate 4,8,16

Both samplers draw the same images (same seeds, same noise: ``rargen.sampling.speculative`` makes the
tokens plain decoding makes) from one model prepared once (``prepare_for_decoding``), timed in
one process round-robin (plain, then each K, then again) so that load on a shared host hits all
alike; the table gives the median of ``--repeats`` rounds. Forward passes per image include the
prefill (plain decoding: exactly L). Random-weight models accept few drafts: measure trained ones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from rargen.checkpoint import load
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, draw_noise, generate, sample_seed
from rargen.sampling.speculative import generate_speculative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "generator", nargs="?", help="a generator checkpoint folder (e.g. runs/demo/generator)"
    )
    parser.add_argument(
        "--random", default=None, help="instead: a model preset with random weights (pass cost only)"
    )
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--speculate", default="4,8,16", help="draft lengths K to compare")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds (median reported)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="default: the demo's sampling")
    parser.add_argument("--cfg-power", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--int8", action="store_true", help="quantize='int8' (CPU; rargen.sampling.int8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if (args.generator is None) == (args.random is None):
        parser.error("pass a generator checkpoint or --random PRESET")
    if args.random:
        model = RAR(ModelConfig.from_name(args.random, dropout=0.0, attn_dropout=0.0))
        args.generator = f"{args.random} (random weights)"
    else:
        model = load(args.generator)
    model = model.to(device).eval().requires_grad_(False)
    if args.bf16:
        model = model.to(torch.bfloat16)
    decoder = prepare_for_decoding(model, bf16=args.bf16, quantize="int8" if args.int8 else None)
    cfg = model.config
    config = SampleConfig(
        cfg_scale=args.cfg_scale, cfg_power=args.cfg_power, temperature=args.temperature, top_k=args.top_k
    )
    ks = [int(k) for k in args.speculate.split(",")]
    threads = torch.get_num_threads()
    print(f"# {platform.machine()} {device}, torch {torch.__version__}, {threads} threads")
    print(
        f"# {args.generator}: L={cfg.num_image_tokens}, V={cfg.codebook_size}, D={cfg.dim}, depth={cfg.depth}"
    )
    precision = "int8" if args.int8 else "bf16" if args.bf16 else "fp32"
    print(f"# {config}, {precision}, median of {args.repeats} round-robin rounds")
    print("| batch | K | passes/image | tokens/pass | images/s | x plain | x fewer passes | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        for row in bench_batch(decoder, config, batch, ks, args.repeats):
            print("| " + " | ".join(row) + " |")
    return 0


def bench_batch(decoder, config: SampleConfig, batch: int, ks: list[int], repeats: int) -> list[list[str]]:
    cfg, device = decoder.model.config, decoder.model.device
    L = cfg.num_image_tokens
    labels = [i % cfg.num_classes for i in range(batch)]
    seeds = [sample_seed(0, i) for i in range(batch)]

    def plain():
        return generate(decoder, labels, config, seeds=seeds)

    def speculative(k):
        noise = draw_noise((batch, L, cfg.codebook_size), device, seeds=seeds)
        return generate_speculative(decoder, labels, config, noise, k)

    reference = plain()
    stats, same = {}, {}
    for k in ks:  # warm-up, statistics and agreement with plain decoding
        tokens, stats[k] = speculative(k)
        same[k] = (tokens == reference).float().mean().item()
    times = {"plain": [], **{k: [] for k in ks}}
    for _ in range(repeats):
        for key in times:
            start = time.perf_counter()
            plain() if key == "plain" else speculative(key)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    rows = [[str(batch), "plain", str(L), "1.00", f"{batch / base:.2f}", "1.00", "1.00", "-"]]
    for k in ks:
        seconds, s = statistics.median(times[k]), stats[k]
        rows.append(
            [
                str(batch),
                str(k),
                f"{s.passes_per_image:.1f}",
                f"{s.tokens_per_pass:.2f}",
                f"{batch / seconds:.2f}",
            ]
            + [f"{base / seconds:.2f}", f"{L / s.passes_per_image:.2f}", f"{same[k]:.4f}"]
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
