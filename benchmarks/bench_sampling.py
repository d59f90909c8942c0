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
The roofline floor per step is max(weight bytes / bandwidth, FLOPs / matmul rate), both measured here.
The official tree (an
extracted checkout, never vendored) is imported as in tests/reference: namespace-package stubs
and a ``timm.layers.Mlp`` stand-in, so neither torchvision nor timm is needed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
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
# Roofline


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


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_cost(model: RAR, batch: int, guided: bool, distinct_labels: int) -> dict[str, float]:
    """Bytes and FLOPs of one decode step, averaged over a generation (attention over t+2 slots).

    ``all_weight_bytes``: every Linear read once per step (a plain decoder: the issue's floor);
    ``rargen_bytes``: what rargen's step must read: the Linear weights except adaLN (computed
    ahead once per chunk of steps), the adaLN weights / chunk, and the mean KV cache; ``flops``:
    every row through every non-adaLN Linear, attention, and adaLN on the distinct conditions.
    """
    c = model.config
    D, L, rows = c.dim, c.num_image_tokens, batch * (2 if guided else 1)
    conditions = distinct_labels + (1 if guided else 0)
    mean_slots = sum(t + 2 for t in range(1, L)) / (L - 1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    adaln = [block.adaln for block in model.blocks] + [model.final_adaln]
    size = model.dtype.itemsize
    nbytes = {id(m): sum(p.numel() * p.element_size() for p in m.parameters()) for m in linears}
    all_weight_bytes = sum(nbytes.values())
    adaln_bytes = sum(nbytes[id(m)] for m in adaln)
    kv_bytes = 2 * rows * c.depth * mean_slots * D * size
    chunk = Decoder(model).modulation_chunk(conditions)
    per_block = 2 * rows * (4 * D * D + 2 * D * c.mlp_dim) + 2 * 2 * rows * mean_slots * D
    flops = c.depth * (per_block + 2 * conditions * 6 * D * D) + 2 * rows * D * c.codebook_size
    return {
        "all_weight_bytes": all_weight_bytes,
        "rargen_bytes": all_weight_bytes - adaln_bytes + adaln_bytes / chunk + kv_bytes,
        "flops": flops + 2 * conditions * 2 * D * D,
    }


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="extracted official tree (omit to skip it)")
    parser.add_argument("--presets", default="rar-b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=32, help="tokens timed per run (256 = whole image)")
    parser.add_argument("--full-official", type=int, default=None, help="also time a 256-step official run")
    parser.add_argument(
        "--variants",
        default="fp32,bf16,compiled",
        help="rargen variants: fp32,bf16,compiled,bf16-compiled,int8",
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
    bandwidth_bytes = 1 << 30 if device.type == "cpu" else 4 << 30
    matmul_size = 2048 if device.type == "cpu" else 8192
    print(f"# {platform.machine()} {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"# sampling: {config}; timed {args.steps} steps (best of {args.repeats}), per image = L x per step"
    )
    models = {}
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        with torch.device(device):
            model = (
                RAR(ModelConfig.from_name(preset, dropout=0.0, attn_dropout=0.0)).eval().requires_grad_(False)
            )
        with torch.no_grad():  # random weights; adaLN-zero init would make blocks identities
            for p in model.parameters():
                p.normal_(0, 0.02)
        models[preset] = model
        if device.type == "cpu":
            start = time.perf_counter()
            prepare_for_decoding(model)
            seconds = time.perf_counter() - start
            print(f"# {preset}: packing the weights for oneDNN takes {seconds:.2f} s, once per model")
    print(
        "| model | batch | sampler | ms/step | s/batch (L steps) | images/s | vs official "
        "| floor: all weights | floor: rargen's reads |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rates: list[tuple[float, float]] = []  # (bytes/s, FLOP/s) per group of rows
    groups: list[str] = []
    for preset, model in models.items():
        official = official_model(args.official, model) if args.official else None
        L = model.config.num_image_tokens
        for batch in (int(b) for b in args.batches.split(",")):
            labels = torch.arange(batch, device=device) * 7 % model.config.num_classes
            # Every sampler is warmed up, then the repeats run round-robin (official, fp32, bf16, ...,
            # official, fp32, ...), so a drift of the shared host hits all of them alike. The
            # machine's rates are measured in every round too and the floors use their medians: on
            # a shared host a streaming read sometimes runs at twice its usual rate for a moment.
            timers: list[tuple[str, Callable[[int], float]]] = []
            if official is not None:
                timers.append(
                    (
                        "official fp32",
                        lambda n, official=official, labels=labels: time_official(
                            official, labels, config, n
                        ),
                    )
                )
            for variant in args.variants.split(","):
                bf16, compile = "bf16" in variant, "compiled" in variant
                quantize = "int8" if variant == "int8" else None  # rargen.sampling.int8, CPU only
                m = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
                # prepared once per model, as `rargen sample` does (packing timed above)
                decoder = prepare_for_decoding(m, bf16=bf16, compile=compile, quantize=quantize)
                timers.append(
                    (
                        f"rargen {variant}",
                        lambda n, decoder=decoder, labels=labels: time_rargen(decoder, labels, config, n),
                    )
                )
            for name, timer in timers:
                timer(8 if "compiled" in name else 2)  # warm-up (and compilation)
            best = {name: float("inf") for name, _ in timers}
            bandwidths, matmuls = [], []
            for _ in range(args.repeats):
                bandwidths.append(measure_bandwidth(device, bandwidth_bytes))
                matmuls.append(measure_matmul(device, torch.float32, matmul_size))
                for name, timer in timers:
                    best[name] = min(best[name], timer(args.steps) / args.steps)
            bandwidth, matmul = statistics.median(bandwidths), statistics.median(matmuls)
            rows = list(best.items())
            if official is not None and args.full_official == batch:
                rows.insert(1, ("official fp32 (full 256)", time_official(official, labels, config, L) / L))
            del timers
            rates.append((bandwidth, matmul))
            groups.append(f"{preset} batch {batch}")
            cost = step_cost(model, batch, config.guided, len(labels.unique()))
            floors = [
                max(cost[key] / bandwidth, cost["flops"] / matmul)
                for key in ("all_weight_bytes", "rargen_bytes")
            ]
            base = rows[0][1] if official is not None else None
            for name, per_step in rows:
                speedup = f"{base / per_step:.2f}x" if base else "-"
                print(
                    f"| {preset} | {batch} | {name} | {per_step * 1e3:.1f} | {per_step * L:.1f} | "
                    f"{batch / (per_step * L):.3f} | {speedup} | "
                    + " | ".join(f"{floor * 1e3:.1f} ({per_step / floor:.2f}x)" for floor in floors)
                    + " |",
                    flush=True,
                )
    for (bandwidth, matmul), group in zip(rates, groups, strict=True):
        print(f"# {group}: floors from {bandwidth / 1e9:.1f} GB/s and {matmul / 1e9:.0f} GFLOP/s (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
