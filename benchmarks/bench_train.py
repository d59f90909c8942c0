"""Training throughput: rargen's step vs the official RAR's forward+backward+AdamW step on the same batch.

    python benchmarks/bench_train.py --official /work/official            # RAR-B and rar-mini, batch 8
    python benchmarks/bench_train.py --presets rar-mini --batch 16 --steps 3

``--official`` points at an extracted tree of bytedance/1d-tokenizer (spec §9); it is imported at run
time with stand-ins for timm's Mlp and the heavy package ``__init__`` files, never copied here. Each
(implementation, preset) runs in its own subprocess so that peak memory (max RSS on the CPU,
``max_memory_allocated`` on CUDA) belongs to it alone. Steps: one warm-up, then ``--steps`` timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from official_shim import import_official  # noqa: E402


def import_official_rar(root: Path) -> types.ModuleType:
    return import_official(root)[0]  # the one shim for the official tree (tests/reference)


def official_model(root: Path, cfg) -> tuple[nn.Module, callable]:
    from omegaconf import OmegaConf

    rar = import_official_rar(root)
    tree = OmegaConf.create({
        "model": {
            "vq_model": {"codebook_size": cfg.codebook_size},
            "generator": {
                "hidden_size": cfg.dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
                "intermediate_size": cfg.mlp_dim, "dropout": cfg.dropout, "attn_drop": cfg.attn_dropout,
                "class_label_dropout": 0.1, "image_seq_len": cfg.num_image_tokens,
                "condition_num_classes": cfg.num_classes, "use_checkpoint": False,
            },
        }
    })  # fmt: skip
    model = rar.RAR(tree)
    model.set_random_ratio(1.0)

    def loss_fn(tokens, labels):
        condition = model.preprocess_condition(labels, cond_drop_prob=0.1)
        logits, targets = model(tokens, condition, return_labels=True)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return model, loss_fn


def ours_model(cfg) -> tuple[nn.Module, callable]:
    from rargen.model import RAR
    from rargen.orders import sample_orders

    model = RAR(cfg)
    generator = torch.Generator().manual_seed(0)

    def loss_fn(tokens, labels):
        orders = sample_orders(len(tokens), cfg.num_image_tokens, 1.0, generator, device=tokens.device)
        drop = torch.rand(len(tokens), generator=generator).to(tokens.device) < 0.1
        labels = torch.where(drop, cfg.null_label, labels)
        logits = model(tokens, labels, orders, check=False)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, orders).flatten())

    return model, loss_fn


def measure(
    impl: str, preset: str, batch: int, steps: int, device: str, official: str | None, bf16: bool
) -> dict:
    from rargen.model import ModelConfig

    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    model, loss_fn = official_model(Path(official), cfg) if impl == "official" else ours_model(cfg)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.03)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.num_image_tokens), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    times = []
    for _ in range(steps + 1):
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    seconds = sum(times[1:]) / steps
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"impl": impl, "preset": preset, "batch": batch, "s_per_step": seconds,
            "tokens_per_s": batch * cfg.num_image_tokens / seconds, "peak_gib": peak,
            "loss": float(loss)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["rar-b", "rar-mini"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    parser.add_argument("--official", default=None, help="extracted official repository (optional)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    bf16 = args.bf16 or args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(*args.one, args.batch, args.steps, args.device, args.official, bf16)))
        return
    impls = ["ours"] + (["official"] if args.official else [])
    precision = "bf16" if bf16 else "fp32"
    print(f"device {args.device}, batch {args.batch}, {precision}, {torch.get_num_threads()} threads")
    print("| preset | implementation | s/step | tokens/s | peak memory (GiB) |\n|---|---|---|---|---|")
    for preset in args.presets:
        for impl in impls:
            cmd = [sys.executable, __file__, "--one", impl, preset, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"| {preset} | {impl} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            cells = f"{row['s_per_step']:.3f} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f}"
            print(f"| {preset} | {impl} | {cells} |")


if __name__ == "__main__":
    main()
