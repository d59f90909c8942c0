"""Training throughput and MFU of the real training step (bf16 autocast, fused AdamW, compile) on one GPU.

    python benchmarks/gpu_train.py                                    # RAR-B @256, RAR-XL @128, compiled
    python benchmarks/gpu_train.py --device cpu --presets rar-tiny --batch 4 --steps 2 --no-compile  # smoke

The step is the one ``rargen.train.generator`` runs: orders and label dropout from
``draw_step_randomness``, the model's forward without checks, ``token_loss``, backward, global-norm
clipping, fused AdamW. MFU counts 3x the model's forward matmul FLOPs (``flops_per_token``) against
the GPU's dense bf16 peak (``rargen.train.generator.PEAK_BF16_FLOPS``; H200 989 TFLOP/s).
Goal: MFU >= 45% for RAR-B and RAR-XL on an H200.
Times are CUDA-event measured after warm-up (compile time is reported apart).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rargen.model import RAR, ModelConfig
from rargen.train.generator import PEAK_BF16_FLOPS, draw_step_randomness, param_groups, peak_flops, token_loss

DEFAULT_BATCH = {"rar-b": 256, "rar-l": 192, "rar-xl": 128, "rar-xxl": 96, "rar-b-512": 64}  # 512: 4x tokens


def bench(preset: str, batch: int, steps: int, device: torch.device, compile: bool, ckpt: bool) -> dict:
    from rargen.train.generator import enable_activation_checkpointing

    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    model = RAR(cfg).to(device).train()
    if ckpt:
        enable_activation_checkpointing(model)
    forward = torch.compile(model) if compile else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, 0.03), lr=1e-4, betas=(0.9, 0.96), fused=fused)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.num_image_tokens), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    bf16 = device.type == "cuda"

    def step() -> torch.Tensor:
        orders, drop = draw_step_randomness(generator, batch, cfg.num_image_tokens, 0.5, 0.1)
        orders = orders.to(device, non_blocking=True)
        dropped = torch.where(drop.to(device), cfg.null_label, labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(tokens, dropped, orders, check=False)
        loss, _ = token_loss(logits, tokens.gather(1, orders))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(3 if compile else 1):  # compile + autotune happen here
        step()
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch * cfg.num_image_tokens / seconds
    peak = peak_flops(device)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "preset": preset, "batch": batch, "compile": compile, "activation_checkpointing": ckpt,
        "s_per_step": round(seconds, 4), "tokens_per_s": round(tokens_per_s),
        "images_per_s": round(batch / seconds, 1),
        "mfu": round(tokens_per_s * 3 * model.flops_per_token() / peak, 4) if peak else None,
        "warmup_s": round(warmup_s, 1), "loss": float(loss),
        "peak_mem_gib": round(memory, 1) if memory is not None else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["rar-b", "rar-xl"])
    parser.add_argument("--batch", type=int, default=None, help=f"per-GPU batch (default {DEFAULT_BATCH})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":  # process-wide flags belong to the entry point, not the library
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(device)}; known peaks {PEAK_BF16_FLOPS}")
    for preset in args.presets:
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        row = bench(preset, batch, args.steps, device, not args.no_compile, args.activation_checkpointing)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
