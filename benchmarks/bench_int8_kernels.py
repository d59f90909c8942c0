"""Which torch int8 product is fastest here: microseconds per Linear at the RAR-B shapes.

    PYTHONPATH=src python benchmarks/bench_int8_kernels.py --threads 1

Compares the float32 oneDNN product on a prepacked weight (rargen's fp32 decoding), the
weight-only ``torch.ops.aten._weight_int8pack_mm`` with float32 and bf16 inputs, and the
dynamically quantized linear (int8 weights and per-call int8 inputs) that ``rargen.sampling.int8``
uses. All from one process, interleaved per shape.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from rargen.sampling.int8 import Int8Linear


def int8pack(x, q, scales, bias):
    return torch.ops.aten._weight_int8pack_mm(x, q, scales) + bias


def per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call")
    print("| out x in | rows | fp32 oneDNN | int8pack fp32 in | int8pack bf16 in | dynamic int8 (rargen) |")
    print("|---|---|---|---|---|---|")
    for out_features, in_features in ((2304, 768), (3072, 768), (768, 3072)):
        linear = torch.nn.Linear(in_features, out_features)
        w, b = linear.weight.detach(), linear.bias.detach()
        scales = w.abs().amax(1) / 127
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        int8 = Int8Linear(linear)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features)
            xb, sb = x.bfloat16(), scales.bfloat16()
            with torch.inference_mode():
                times = [
                    per_call(
                        partial(torch.ops.mkldnn._linear_pointwise, x, packed, b, "none", [], ""),
                        args.repeats,
                    ),
                    per_call(partial(int8pack, x, q, scales, b), max(2, args.repeats // 10)),
                    per_call(partial(int8pack, xb, q, sb, b), args.repeats),
                    per_call(partial(int8, x), args.repeats),
                ]
            print(
                f"| {out_features} x {in_features} | {rows} | " + " | ".join(f"{t:.0f}" for t in times) + " |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
