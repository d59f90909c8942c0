"""Loader throughput and disk size: rargen's token store vs the official JSONL + linecache reader.

The same synthetic data (``--num-sequences`` sequences of 256 tokens, codebook 1024, 1000 classes)
is written both as a token store and as the official ``{"class_id": int, "tokens": [...]}`` JSONL
(spec §2.5). Each reader then serves one epoch of random-access batches of ``--batch-size``:

* JSONL: a shuffled index list, each item read with ``linecache.getline(path, idx + 1)`` and
  ``json.loads``, then stacked (what ``PretoeknizedDataSetJSONL`` + a default DataLoader do per
  worker). The first epoch includes linecache reading the whole file into memory.
* store: ``TokenLoader`` (memory-mapped uint16 shards, gathered per batch), with and without prefetch.

Both files sit in the OS page cache after being written, so this measures the readers, not the disk.

    python benchmarks/bench_data.py --num-sequences 50000 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import linecache
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rargen.data.loader import TokenLoader
from rargen.data.store import write_store
from rargen.data.token_store import TokenStore


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def jsonl_epoch(path: Path, count: int, batch_size: int, seed: int) -> float:
    """Seconds for one epoch of random-access batches from the JSONL via linecache."""
    order = np.random.default_rng(seed).permutation(count)
    began = time.perf_counter()
    for start in range(0, count - batch_size + 1, batch_size):
        tokens, labels = [], []
        for index in order[start : start + batch_size]:
            record = json.loads(linecache.getline(str(path), int(index) + 1))
            tokens.append(torch.tensor(record["tokens"]))
            labels.append(torch.tensor(record["class_id"]))
        torch.stack(tokens), torch.stack(labels)
    return time.perf_counter() - began


def store_epoch(loader: TokenLoader) -> float:
    began = time.perf_counter()
    for _tokens, _labels in loader:
        pass
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-sequences", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp folder)")
    args = parser.parse_args()
    count, batch = args.num_sequences, args.batch_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1024, (count, 16, 16), dtype=np.int64)
    labels = rng.integers(0, 1000, count, dtype=np.int64)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl, store_path = work / "tokens.jsonl", work / "store"
    shutil.rmtree(store_path, ignore_errors=True)

    began = time.perf_counter()
    with open(jsonl, "w") as f:
        for row, label in zip(tokens.reshape(count, -1).tolist(), labels.tolist(), strict=True):
            f.write(json.dumps({"class_id": label, "tokens": row}) + "\n")
    jsonl_write = time.perf_counter() - began
    began = time.perf_counter()
    write_store(store_path, tokens, labels, codebook_size=1024, class_names=[str(i) for i in range(1000)])
    store_write = time.perf_counter() - began

    began = time.perf_counter()
    store = TokenStore(store_path)
    store_open = time.perf_counter() - began
    steps = count // batch
    rows = []
    cold = jsonl_epoch(jsonl, count, batch, seed=0)
    warm = jsonl_epoch(jsonl, count, batch, seed=1)
    plain = store_epoch(TokenLoader(store, batch, seed=0))
    prefetched = store_epoch(TokenLoader(store, batch, seed=0, prefetch=True))
    jsonl_size, store_size = jsonl.stat().st_size, folder_bytes(store_path)
    rows.append(("JSONL + linecache, 1st epoch", cold, jsonl_size, jsonl_write))
    rows.append(("JSONL + linecache, 2nd epoch", warm, jsonl_size, jsonl_write))
    rows.append(("token store (TokenLoader)", plain, store_size, store_write))
    rows.append(("token store, prefetch=True", prefetched, store_size, store_write))

    print(f"{count} sequences x 256 tokens, batch {batch} random access, {steps} batches per epoch")
    print(f"{'reader':<32} {'sequences/s':>12} {'epoch s':>9} {'size MB':>9} {'write s':>8} {'speed-up':>9}")
    for name, seconds, size, write in rows:
        speed = steps * batch / seconds
        ratio = warm / seconds
        print(f"{name:<32} {speed:>12,.0f} {seconds:>9.2f} {size / 1e6:>9.1f} {write:>8.2f} {ratio:>8.1f}x")
    print(f"store open: {store_open * 1e3:.1f} ms; size ratio JSONL / store: {jsonl_size / store_size:.1f}x")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
