"""The decode step compiled by Inductor on a CPU beside the eager oneDNN step (issue 30 parts 1-2).

    python benchmarks/bench_compiled_step.py --threads 2 --repeats 5

One decode step of RAR-B (random weights) at a fixed prefix (the batch-8 mean, 130), timed
directly (no sampling around it), for each (precision, rows): the eager step on the
oneDNN-packed view (``prepare_for_decoding``) and the compiled one
(``prepare_for_decoding(compile=True)``: ``rargen.sampling.compiled_cpu``), round-robin, best of
``--repeats``, with the time to compile (and autotune) the program. ``--fixed-cost`` adds the
depth-24 dim-64 model (issue 30: the fixed cost per step, at most 2 ms). ``--attention`` times
attention over the cache alone (all layers, the rows' exact prefix) as the eager step runs it
(PyTorch's SDPA per layer), compiled as masked SDPA (one program over all layers), and compiled
as the compiled step runs it (``rargen.model.attend_masked``: scores and weighted sums that
Inductor fuses into loops over k and v), in GB/s of cache read against the streaming rate
measured in the same rounds.
``--torchao`` times torchao's weight-only int8 compiled (optional: ``pip install torchao``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rargen.kv_cache import KVCache
from rargen.model import RAR, ModelConfig, attend_masked
from rargen.sampling.compiled_cpu import INDUCTOR_OPTIONS
from rargen.sampling.decoding import DecodeBatch, prepare_for_decoding

FIXED_COST = ModelConfig(dim=64, depth=24, num_heads=1, mlp_dim=256, dropout=0.0, attn_dropout=0.0)


def random_model(config: ModelConfig, dtype: torch.dtype) -> RAR:
    torch.manual_seed(0)
    model = RAR(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype)


def streaming_rate(nbytes: int = 1 << 30) -> float:
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def batch_at(decoder, rows: int, prefix: int) -> DecodeBatch:
    """A decoding batch of ``rows`` rows (labels as a guided batch: classes, then null) at ``prefix``."""
    batch = DecodeBatch(decoder, rows)
    null = decoder.config.num_classes
    batch.add([i * 7 % null for i in range(rows // 2)] + [null] * (rows - rows // 2))
    n = len(batch)
    batch.positions = [prefix] * n
    batch._positions[:n] = prefix
    return batch


def time_steps(batch: DecodeBatch, prefix: int, count: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(count):
        batch.step()
        batch.positions = [prefix] * len(batch)  # stay at one prefix (the cache rows are rewritten)
        batch._positions[: len(batch)] = prefix
    return (time.perf_counter() - start) / count


def steps(args) -> None:
    configs = [("rar-b", ModelConfig.from_name("rar-b", dropout=0.0, attn_dropout=0.0))]
    if args.fixed_cost:
        configs.append(("d24-dim64", FIXED_COST))
    print("| model | precision | rows | eager ms | compiled ms | compiled / eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, config in configs:
        for precision in args.precisions.split(","):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            model = random_model(config, dtype)
            eager = prepare_for_decoding(model, bf16=precision == "bf16")
            compiled = prepare_for_decoding(model, bf16=precision == "bf16", compile=True)
            for rows in (int(r) for r in args.rows.split(",")):
                with torch.inference_mode():
                    batches = {"eager": batch_at(eager, rows, args.prefix)}
                    start = time.perf_counter()
                    batches["compiled"] = batch_at(compiled, rows, args.prefix)
                    time_steps(batches["compiled"], args.prefix, 1)  # compiles (and autotunes)
                    compile_seconds = time.perf_counter() - start
                    best = {key: float("inf") for key in batches}
                    for _ in range(args.repeats):
                        for key, batch in batches.items():
                            best[key] = min(best[key], time_steps(batch, args.prefix))
                e, c = best["eager"] * 1e3, best["compiled"] * 1e3
                print(
                    f"| {name} | {precision} | {rows} | {e:.2f} | {c:.2f} | {c / e:.2f} "
                    f"| {compile_seconds:.0f} |",
                    flush=True,
                )


def attention(args) -> None:
    config = ModelConfig.from_name("rar-b")
    rows, prefix, H, hd = 16, args.prefix, config.num_heads, config.head_dim
    length = prefix + 1
    print(f"attention over the cache: {rows} rows, {config.depth} layers, {H} heads of {hd}, prefix {length}")
    print("| precision | path | ms | cache GB/s | of streaming |")
    print("|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        cache = KVCache(config, rows, dtype, "cpu")
        for buffer in cache.k + cache.v:
            buffer.normal_()
        q = torch.randn(rows, H, 1, hd, dtype=dtype)
        nbytes = 2 * config.depth * rows * H * length * hd * dtype.itemsize

        def eager(q=q, cache=cache):
            for k, v in zip(cache.k, cache.v, strict=True):
                F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length])

        def masked(q, ks, vs, mask):
            return [
                F.scaled_dot_product_attention(
                    q, k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]], attn_mask=mask
                )
                for k, v in zip(ks, vs, strict=True)
            ]

        program = torch.compile(masked, fullgraph=True, dynamic=False)
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
        torch._dynamo.maybe_mark_dynamic(mask, 3)

        def compiled(q=q, cache=cache, mask=mask, program=program):
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.no_grad():
                program(q, cache.k, cache.v, mask)

        def reduction(q, ks, vs, mask):  # the compiled step's attention (rargen.model.attend_masked)
            return [
                attend_masked(q[:, :, 0], k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]], mask)
                for k, v in zip(ks, vs, strict=True)
            ]

        fused = torch.compile(reduction, fullgraph=True, dynamic=False)

        def compiled_reduction(q=q, cache=cache, mask=mask, fused=fused):
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.no_grad():
                fused(q, cache.k, cache.v, mask)

        with torch.no_grad():
            compiled()
            compiled_reduction()
            reference = masked(q, cache.k, cache.v, mask)[0][:, :, 0].float()
            got = fused(q, cache.k, cache.v, mask)[0].float()
            assert (got - reference).abs().max() < 0.05, (got - reference).abs().max()
            paths = ("eager SDPA", "compiled (masked SDPA)", "compiled attend_masked")
            best, rates = dict.fromkeys(paths, float("inf")), []
            for _ in range(args.repeats):
                rates.append(streaming_rate())
                for key, run in zip(best, (eager, compiled, compiled_reduction), strict=True):
                    start = time.perf_counter()
                    run()
                    best[key] = min(best[key], time.perf_counter() - start)
        rate = statistics.median(rates)
        for key, seconds in best.items():
            print(
                f"| {precision} | {key} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} "
                f"| {nbytes / seconds / rate:.0%} |"
            )
        print(f"# streaming read {rate / 1e9:.1f} GB/s (median)")


def torchao_int8(args) -> None:
    """torchao's weight-only int8 (an optional package: ``pip install torchao``) on the per-step
    Linears, compiled as ``compile=True`` compiles, beside the eager dynamic int8 step
    (``quantize="int8"``) and the compiled float32 step."""
    import copy

    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise SystemExit(f"--torchao needs torchao: pip install torchao ({error})") from error
    from rargen.sampling.compiled_cpu import CompiledCpuStep
    from rargen.sampling.decoding import Decoder

    model = random_model(ModelConfig.from_name("rar-b", dropout=0.0, attn_dropout=0.0), torch.float32)
    quantized = copy.deepcopy(model)
    per_step = ("qkv", "proj", "fc1", "fc2", "head")

    def chosen(module, name):
        return isinstance(module, torch.nn.Linear) and name.split(".")[-1] in per_step

    quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=chosen)
    step = CompiledCpuStep(quantized)
    decoders = {
        "eager int8 (dynamic)": prepare_for_decoding(model, quantize="int8"),
        "compiled fp32": prepare_for_decoding(model, compile=True),
        "compiled torchao int8 weight-only": Decoder(step.model, compiled=True, cpu_step=step),
    }
    print("| rows | path | ms | first step s (compile) |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        with torch.inference_mode():
            batches, first = {}, {}
            for name, decoder in decoders.items():
                start = time.perf_counter()
                batches[name] = batch_at(decoder, rows, args.prefix)
                time_steps(batches[name], args.prefix, 1)
                first[name] = time.perf_counter() - start
            best = dict.fromkeys(batches, float("inf"))
            for _ in range(args.repeats):
                for name, batch in batches.items():
                    best[name] = min(best[name], time_steps(batch, args.prefix))
        for name, seconds in best.items():
            print(f"| {rows} | {name} | {seconds * 1e3:.1f} | {first[name]:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rows", default="2,16", help="decoding rows (batch 1 and 8 with guidance)")
    parser.add_argument("--prefix", type=int, default=130, help="sequence index fed (the batch-8 mean)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fixed-cost", action="store_true", help="also the depth-24 dim-64 model")
    parser.add_argument("--attention", action="store_true", help="attention over the cache only")
    parser.add_argument("--torchao", action="store_true", help="torchao weight-only int8, compiled (RAR-B)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    (attention if args.attention else torchao_int8 if args.torchao else steps)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
