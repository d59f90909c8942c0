"""What verifying a checkpoint's SHA-256 at load costs: hashing throughput on a file in the page
cache, beside the safetensors read of the same file, extrapolated to RAR-XXL's fp32 weights.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_digest.py --gib 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rargen.model import RAR, ModelConfig
from rargen.weight_files import file_sha256


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test weights file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with torch.device("meta"):
        xxl = sum(p.numel() for p in RAR(ModelConfig.from_name("rar-xxl")).parameters()) * 4
    numel = int(args.gib * (1 << 30)) // 4
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file({"w": torch.randn(numel // 1024, 1024)}, str(path))
        size = os.path.getsize(path)
        file_sha256(path), load_file(str(path))  # into the page cache
        hashing = best_of(args.repeats, lambda: file_sha256(path))
        # load_file maps the file lazily; touching every byte (a sum) is what building a model costs.
        loading = best_of(args.repeats, lambda: [t.sum() for t in load_file(str(path)).values()])
    print("| step | GB/s | s per GB | RAR-XXL fp32 (%.2f GB), s |" % (xxl / 1e9))
    print("|---|---|---|---|")
    for name, seconds in (
        ("SHA-256 of the file (verify)", hashing),
        ("safetensors load_file + read every tensor", loading),
    ):
        rate = size / seconds / 1e9
        print(f"| {name} | {rate:.2f} | {1 / rate:.2f} | {xxl / 1e9 / rate:.1f} |")


if __name__ == "__main__":
    main()
