"""What the speculation policy measures: a plain step and a K+1-position pass at each row count.

    PYTHONPATH=src python benchmarks/bench_speculation_policy.py --model rar-b --rows 2,4,8,16,32 --threads 2
    PYTHONPATH=src python benchmarks/bench_speculation_policy.py --checkpoint runs/demo/generator

The times are ``rargen.sampling.speculation_policy.measure_pass_cost`` (fastest of its repeats, on
a scratch batch half way through the sequence): what the server and ``rargen sample`` decide by.
A pass pays at a row count when its cost in plain steps (``ratio``) is below the tokens a pass keeps
per sample (2.0 assumed at first; measured on the demo generator with K = 8: 3.2 at batch 1, 2.7
at batch 8). Weights do not change the times, so a random-weight preset measures as a trained one.
"""

from __future__ import annotations

import argparse
import os

import torch

from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.speculation_policy import DEFAULT_DRAFTS, PRIOR_TOKENS_PER_PASS, measure_pass_cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model preset, random weights (e.g. rar-b, rar-digits)")
    which.add_argument("--checkpoint", help="a generator checkpoint folder")
    parser.add_argument("--rows", default="2,4,8,16,32", help="cache rows (2 per guided image)")
    parser.add_argument("--drafts", default=str(DEFAULT_DRAFTS), help="K values, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        model = RAR(ModelConfig.from_name(args.model, dropout=0.0, attn_dropout=0.0)).eval()
    else:
        from rargen.checkpoint import load

        model = load(args.checkpoint).eval()
    decoder = prepare_for_decoding(model)
    load = os.getloadavg()[0]
    print(f"# {args.model or args.checkpoint}, {args.threads} threads, load average {load:.1f} at start")
    print("| cache rows | K | step ms | pass ms | pass / step | pays at the prior |")
    print("|---|---|---|---|---|---|")
    for drafts in (int(k) for k in args.drafts.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            cost = measure_pass_cost(decoder, rows, drafts)
            pays = "yes" if cost.ratio < PRIOR_TOKENS_PER_PASS else "no"
            times = f"{cost.step_s * 1e3:.2f} | {cost.pass_s * 1e3:.2f}"
            print(f"| {rows} | {drafts} | {times} | {cost.ratio:.2f} | {pays} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
