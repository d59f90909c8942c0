"""Sampling speed: rargen (fp32, bf16, compiled) beside the official ``RAR.generate`` on the same weights.

    python benchmarks/bench_sampling.py --official /path/to/official --steps 256 --batches 1,8

Both samplers get the same random RAR weights (rargen's, converted with ``rargen.convert.to_official``)
and the same CFG setting, and are timed in one process, alternately. ``--steps S`` times the first S
tokens of a generation and reports time / S; both samplers' steps grow with t (attention reads the
prefix), so quote whole generations (``--steps 256``). ``--full-official B`` also times one full
256-step official generation at batch B. rargen's eager variants run on a model packed once for
oneDNN by ``rargen.sampling.decoding.prepare_for_decoding`` once per model, as ``rargen sample`` does (the
packing time is printed above the table; ``generate`` on a plain model prepares on every call),
and drive the same ``rargen.sampling.engine.Sampler`` step that ``generate`` and the web server drive.
Each row's floor is its precision's own (``step_cost``, ``floor_seconds``): max((the weight bytes
read per step at that precision + the mean KV cache of a generation at the cache dtype) / the
streaming-read rate, FLOPs / the matmul rate at that precision), every rate measured in each
round of the same run (medians printed above the table); the last column is the bytes read per
step over the step time, as a fraction of the streaming rate. ``--fixed-cost`` adds a depth-24
dim-64 model at batch 1 (nearly no bytes or FLOPs: its step time is the fixed cost per step).
The official tree (an extracted checkout, never vendored) is imported as in tests/reference:
namespace-package stubs and a ``timm.layers.Mlp`` stand-in, so neither torchvision nor timm is needed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from official_shim import import_official  # noqa: E402

from rargen.convert import to_official
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import Decoder, prepare_for_decoding
from rargen.sampling.engine import SampleConfig, Sampler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# The official model, imported from an extracted tree


class _Tree(dict):
    """Attribute access + .get, all the official constructor needs from an OmegaConf tree."""

    def __getattr__(self, name):
        value = self[name]
        return _Tree(value) if isinstance(value, dict) else value


def official_model(root: str, model: RAR) -> nn.Module:
    rar, _ = import_official(root)  # the one shim for the official tree (tests/reference)
    c = model.config
    generator = dict(
        hidden_size=c.dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim, image_seq_len=c.num_image_tokens, condition_num_classes=c.num_classes,
        dropout=0.0, attn_drop=0.0, use_checkpoint=False,
    )  # fmt: skip
    official = rar.RAR(_Tree(model=dict(vq_model=dict(codebook_size=c.codebook_size), generator=generator)))
    official.load_state_dict(to_official(model), strict=True)
    official.set_random_ratio(0.0)
    return official.eval().requires_grad_(False).to(model.device)


class _Stop(Exception):
    pass


def time_official(official: nn.Module, labels: torch.Tensor, config: SampleConfig, steps: int) -> float:
    """Seconds for the first ``steps`` tokens of the official generate() (stopped at its sampler)."""
    original, calls = torch.multinomial, [0]

    def counting(probs, *args, **kwargs):
        calls[0] += 1
        if calls[0] > steps:
            raise _Stop
        return original(probs, *args, **kwargs)

    torch.multinomial = counting
    start = time.perf_counter()
    try:
        official.generate(labels, config.cfg_scale, config.temperature, config.cfg_power)
    except _Stop:
        official.disable_kv_cache()
    finally:
        torch.multinomial = original
    sync(labels.device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# rargen


def time_rargen(decoder: Decoder, labels, config: SampleConfig, steps: int) -> float:
    """Seconds for the first ``steps`` tokens of the engine ``generate`` drives (prefill included)."""
    c = decoder.model.config
    labels = labels.tolist()
    noise = torch.empty(len(labels), c.num_image_tokens, c.codebook_size, device=decoder.model.device)
    noise.exponential_()
    sync(decoder.model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        sampler = Sampler(decoder, len(labels), guided=config.guided, conditions=len(set(labels)) + 1)
        sampler.add(labels, config, noise=noise)  # token 0
        for _ in range(steps - 1):
            sampler.step()
    sync(decoder.model.device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# Roofline: each precision's own floor, from rates measured in the same run

# The precision each variant decodes in (its weights, activations and cache).
PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "int8": "int8", "compiled": "fp32", "bf16-compiled": "bf16"}
FIXED_COST = ModelConfig(dim=64, depth=24, num_heads=1, mlp_dim=256, dropout=0.0, attn_dropout=0.0)


def variant_precision(variant: str) -> str:
    if variant not in PRECISIONS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(PRECISIONS)}")
    return PRECISIONS[variant]


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a streaming read (sum of a large float32 buffer)."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def measure_matmul(device: torch.device, precision: str, n: int) -> float:
    """FLOP/s of an (n, n) x (n, n) product at ``precision``: fp32, bf16, or int8 (the dynamic
    int8 product ``quantize="int8"`` runs, ``rargen.sampling.int8.Int8Linear``)."""
    if precision == "int8":
        from rargen.sampling.int8 import Int8Linear

        product, a = Int8Linear(nn.Linear(n, n, device=device)), torch.randn(n, n, device=device)
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        product = b.__rmatmul__  # a @ b
    best = float("inf")
    with torch.no_grad():
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            product(a)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_cost(config: ModelConfig, batch: int, guided: bool, distinct_labels: int, precision: str) -> dict:
    """Bytes and FLOPs one decode step at ``precision`` must move, averaged over a generation.

    ``weight_bytes``: the per-step Linears (qkv, proj, fc1, fc2, head; weights and biases) at the
    precision (int8: 1 byte per weight, float32 bias and per-channel scale), the adaLN Linears /
    the modulation chunk (their modulations are computed ahead once per chunk of positions, in
    the model's dtype: float32 for int8) and the rows' modulations read from those tables;
    ``cache_bytes``: the mean KV cache over a whole generation (feeding sequence index s reads
    slots 0 .. s, s = 2 .. L) at the cache dtype (bf16 for bf16, else float32); ``flops``: every
    row through every per-step Linear and attention over the mean prefix, plus adaLN once per
    (condition, position). Norms and embedding rows (a few KB) are left out.
    """
    from types import SimpleNamespace

    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or int8")
    D, L, F, V, depth = (
        config.dim,
        config.num_image_tokens,
        config.mlp_dim,
        config.codebook_size,
        config.depth,
    )
    rows = batch * (2 if guided else 1)
    conditions = distinct_labels + (1 if guided else 0)
    size = 2 if precision == "bf16" else 4  # activations, cache and modulations
    shapes = [(3 * D, D), (D, D), (F, D), (D, F)] * depth + [(V, D)]  # (out, in) of the per-step Linears
    if precision == "int8":
        linear_bytes = sum(out * inp + out * 4 + out * 4 for out, inp in shapes)  # weight, bias, scale
    else:
        linear_bytes = sum((out * inp + out) * size for out, inp in shapes)
    adaln_bytes = (depth * (6 * D * D + 6 * D) + 2 * D * D + 2 * D) * size
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunk = Decoder(SimpleNamespace(config=config, dtype=dtype)).modulation_chunk(conditions)
    modulation_rows = rows * (6 * depth + 2) * D * size
    mean_slots = sum(s + 1 for s in range(2, L + 1)) / (L - 1)
    cache_bytes = 2 * rows * depth * mean_slots * D * size
    linear_flops = 2 * sum(out * inp for out, inp in shapes)
    attention_flops = depth * 2 * 2 * mean_slots * D
    adaln_flops = 2 * (depth * 6 * D * D + 2 * D * D)
    weight_bytes = linear_bytes + adaln_bytes / chunk + modulation_rows
    return {
        "weight_bytes": weight_bytes,
        "cache_bytes": cache_bytes,
        "bytes": weight_bytes + cache_bytes,
        "flops": rows * (linear_flops + attention_flops) + conditions * adaln_flops,
        "chunk": chunk,
    }


def floor_seconds(cost: dict, bandwidth: float, matmul: float) -> tuple[float, str]:
    """The step's floor and what sets it: max(bytes / streaming rate, FLOPs / matmul rate)."""
    read, compute = cost["bytes"] / bandwidth, cost["flops"] / matmul
    return (read, "bytes") if read >= compute else (compute, "FLOPs")


# ------------------------------------------------------------------------------------------


def random_model(config: ModelConfig, device: torch.device) -> RAR:
    torch.manual_seed(0)
    with torch.device(device):
        model = RAR(config).eval().requires_grad_(False)
    with torch.no_grad():  # random weights; adaLN-zero init would make blocks identities
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="extracted official tree (omit to skip it)")
    parser.add_argument("--presets", default="rar-b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=32, help="tokens timed per run (256 = whole image)")
    parser.add_argument("--full-official", type=int, default=None, help="also time a 256-step official run")
    parser.add_argument(
        "--variants", default="fp32,bf16,compiled", help=f"rargen variants: {','.join(PRECISIONS)}"
    )
    parser.add_argument(
        "--fixed-cost",
        action="store_true",
        help="also time every variant's step on a depth-24 dim-64 model at batch 1 (issue 30: <= 2 ms)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample", default="rar-b", help="SampleConfig preset (CFG)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="report the fastest of this many runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = SampleConfig.from_name(args.sample)
    variants = args.variants.split(",")
    precisions = sorted({variant_precision(v) for v in variants})
    bandwidth_bytes = 1 << 30 if device.type == "cpu" else 4 << 30
    matmul_size = 2048 if device.type == "cpu" else 8192
    print(f"# {platform.machine()} {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"# sampling: {config}; timed {args.steps} steps (best of {args.repeats}), per image = L x per step"
    )
    batches = [int(b) for b in args.batches.split(",")]
    groups = [
        (preset, ModelConfig.from_name(preset, dropout=0.0, attn_dropout=0.0), batch)
        for preset in args.presets.split(",")
        for batch in batches
    ]
    if args.fixed_cost:
        groups.append(("d24-dim64", FIXED_COST, 1))
    models: dict[ModelConfig, RAR] = {}
    table, rates = [], []
    for preset, model_config, batch in groups:
        if model_config not in models:
            models[model_config] = random_model(model_config, device)
            if device.type == "cpu":
                start = time.perf_counter()
                prepare_for_decoding(models[model_config])
                seconds = time.perf_counter() - start
                print(f"# {preset}: packing the weights for oneDNN takes {seconds:.2f} s, once per model")
        model = models[model_config]
        official = official_model(args.official, model) if args.official and preset != "d24-dim64" else None
        L = model.config.num_image_tokens
        steps = min(args.steps, L)
        labels = torch.arange(batch, device=device) * 7 % model.config.num_classes
        # Every sampler is warmed up, then the repeats run round-robin (official, fp32, bf16, ...,
        # official, fp32, ...), so a drift of the shared host hits all of them alike. The
        # machine's rates are measured in every round too and the floors use their medians: on
        # a shared host a streaming read sometimes runs at twice its usual rate for a moment.
        timers: list[tuple[str, str, Callable[[int], float]]] = []
        if official is not None:
            timers.append(
                ("official fp32", "fp32", lambda n, o=official, y=labels: time_official(o, y, config, n))
            )
        for variant in variants:
            bf16, compile = "bf16" in variant, "compiled" in variant
            quantize = "int8" if variant == "int8" else None  # rargen.sampling.int8, CPU only
            m = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
            start = time.perf_counter()
            decoder = prepare_for_decoding(m, bf16=bf16, compile=compile, quantize=quantize)
            timer = partial(time_rargen, decoder, labels, config)
            timer(L if compile else 2)  # warm-up (and compilation: every shape a generation meets)
            if compile:
                seconds = time.perf_counter() - start
                print(f"# {preset} batch {batch} {variant}: compile + first generation {seconds:.1f} s")
            timers.append((f"rargen {variant}", variant_precision(variant), timer))
        if official is not None:
            timers[0][2](2)
        best = {name: float("inf") for name, _, _ in timers}
        bandwidths, matmuls = [], {p: [] for p in precisions}
        for _ in range(args.repeats):
            bandwidths.append(measure_bandwidth(device, bandwidth_bytes))
            for precision in precisions:
                matmuls[precision].append(measure_matmul(device, precision, matmul_size))
            for name, _, timer in timers:
                best[name] = min(best[name], timer(steps) / steps)
        bandwidth = statistics.median(bandwidths)
        matmul = {p: statistics.median(v) for p, v in matmuls.items()}
        matmul.setdefault("fp32", measure_matmul(device, "fp32", matmul_size))  # the official's
        rates.append((f"{preset} batch {batch}", bandwidth, matmul))
        rows = [(name, precision, best[name]) for name, precision, _ in timers]
        if official is not None and args.full_official == batch:
            rows.insert(
                1, ("official fp32 (full 256)", "fp32", time_official(official, labels, config, L) / L)
            )
        del timers
        base = rows[0][2] if official is not None else None
        for name, precision, per_step in rows:
            cost = step_cost(model.config, batch, config.guided, len(labels.unique()), precision)
            floor, bound = floor_seconds(cost, bandwidth, matmul[precision])
            speedup = f"{base / per_step:.2f}x" if base else "-"
            reached = cost["bytes"] / per_step
            table.append(
                f"| {preset} | {batch} | {name} | {per_step * 1e3:.1f} | {per_step * L:.1f} | "
                f"{batch / (per_step * L):.3f} | {speedup} | {precision} {cost['bytes'] / 1e6:.0f} MB, "
                f"{cost['flops'] / 1e9:.1f} GFLOP | {floor * 1e3:.1f} ({bound}) | "
                f"**{per_step / floor:.2f}x** | "
                f"{reached / 1e9:.1f} GB/s ({reached / bandwidth:.0%}) |"
            )
        print(f"# done: {preset} batch {batch}", file=sys.stderr, flush=True)
    for group, bandwidth, matmul in rates:
        measured = ", ".join(f"{p} {r / 1e9:.0f}" for p, r in sorted(matmul.items()))
        print(f"# {group}: streaming read {bandwidth / 1e9:.1f} GB/s; matmul GFLOP/s {measured} (medians)")
    print(
        "| model | batch | sampler | ms/step | s/batch (L steps) | images/s | vs official "
        "| reads and FLOPs per step | floor ms (set by) | step / floor "
        "| bytes read / step time (of streaming) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
