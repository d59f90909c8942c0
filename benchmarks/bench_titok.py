"""TiTok on this machine: full-size tokenizer throughput, and RAR-B sampling over 32 vs 256 tokens.

    python benchmarks/bench_titok.py --threads 2    # both tables: ~4 min on 2 idle CPU cores
    python benchmarks/bench_titok.py --tokenizers titok-l-32 --lengths 256,32 --batches 1 --repeats 3

Table 1: encode / decode images/s of the full-size TiTok presets (random weights: the speed does
not depend on them) and the MaskGIT-VQGAN beside them, float32, and how much of a TiTok decode is
the MaskGIT-VQGAN pixel stage. Table 2: whole RAR-B generations with the paper's guidance
(``SampleConfig`` preset rar-b) over 256 MaskGIT-VQGAN tokens (V = 1024) and over 32 TiTok-L-32
tokens (V = 4096; 64 / 128 with ``--lengths``), on weights packed once for oneDNN as ``rargen
sample`` does; after one warm-up generation each, the models' decode steps are interleaved one by
one (a model starts its next generation when one ends) until the 256-token model has finished
``--repeats`` generations, so a drift of a shared host hits all alike; medians of the generations.
"with decoding" adds each tokenizer's decode time per image from table 1 (MaskGIT-VQGAN for 256
tokens, the TiTok preset of that length otherwise).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import Decoder, prepare_for_decoding
from rargen.sampling.engine import SampleConfig, Sampler, draw_noise, generate
from rargen.tokenizers.titok import TiTok, TiTokConfig
from rargen.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig

TITOK_OF_LENGTH = {32: "titok-l-32", 64: "titok-b-64", 128: "titok-s-128"}


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device) for _ in range(repeats))


def bench_tokenizers(names: list[str], batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Print table 1; return decode seconds per image by tokenizer name."""
    print("| tokenizer | parameters | tokens | encode img/s | decode img/s | pixel stage of decode |")
    print("|---|---|---|---|---|---|")
    decode_per_image = {}
    for name in names:
        torch.manual_seed(0)
        if name.startswith("titok"):
            model = TiTok(TiTokConfig.from_name(name))
        else:
            model = MaskGITVQGAN(VQGANConfig.from_name(name))
        model = model.to(device).eval().requires_grad_(False)
        size = model.config.image_size
        images = torch.rand(batch, 3, size, size, device=device)
        codes = model.encode(images)
        t_enc = median_seconds(lambda m=model, x=images: m.encode(x), repeats, device)
        decode = [lambda m=model, c=codes: m.decode(c)]
        if isinstance(model, TiTok):  # the pixel stage alone, timed alternately with the whole decode
            with torch.inference_mode():
                logits = model.decoder(model.quantize.lookup(codes))
            decode.append(lambda m=model, x=logits: m.pixels_from_logits(x))
        for fn in decode:
            fn()  # warm-up
        runs = [[timed(fn, device) for fn in decode] for _ in range(repeats)]
        t_dec = statistics.median(run[0] for run in runs)
        share = f"{statistics.median(run[1] / run[0] for run in runs):.0%}" if len(decode) > 1 else "-"
        params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {params / 1e6:.1f}M | {codes[0].numel()} | {batch / t_enc:.3f} "
            f"| {batch / t_dec:.3f} | {share} |",
            flush=True,
        )
        decode_per_image[name] = t_dec / batch
        del model, codes, images
        gc.collect()
    return decode_per_image


def generator(preset: str, length: int, device: torch.device) -> Decoder:
    """Random weights at the preset's widths; TiTok's 4096 codes at 32/64/128 tokens, else 1024."""
    codebook = 4096 if length in TITOK_OF_LENGTH else 1024
    config = ModelConfig.from_name(
        preset, num_image_tokens=length, codebook_size=codebook, num_classes=1000, dropout=0.0
    )
    torch.manual_seed(0)
    model = RAR(config).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # random weights; adaLN-zero init would make every block an identity
        for p in model.parameters():
            p.normal_(0, 0.02)
    return prepare_for_decoding(model)  # packed for oneDNN on a CPU


def new_generation(
    decoder: Decoder, labels: torch.Tensor, seeds: list[int], config: SampleConfig
) -> Iterator[int]:
    """One generation of ``generate`` (same engine, same noise) as an iterator over its steps."""
    cfg = decoder.model.config
    noise = draw_noise((len(seeds), cfg.num_image_tokens, cfg.codebook_size), labels.device, None, seeds)
    with torch.inference_mode():
        sampler = Sampler(decoder, len(seeds), guided=config.guided)
        sampler.add(labels.tolist(), config, noise=noise)  # prefill and token 0
    yield 0
    while sampler.samples:
        with torch.inference_mode():  # per step, not across the yield
            _, logits = sampler.step()
        yield int(logits.shape[0])


def interleaved_generations(
    models: dict[int, Decoder], batch: int, config: SampleConfig, repeats: int, device: torch.device
) -> dict[int, list[float]]:
    """Seconds of whole generations, the models' steps interleaved one by one (a new generation starts
    when one ends) until the longest has finished ``repeats`` times: a drift of the host hits all alike."""
    labels, seeds = torch.arange(batch, device=device) * 7 % 1000, list(range(batch))
    running: dict[int, Iterator[int] | None] = dict.fromkeys(models)
    elapsed = dict.fromkeys(models, 0.0)
    done: dict[int, list[float]] = {L: [] for L in models}
    longest = max(models)
    while len(done[longest]) < repeats:
        for L, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if running[L] is None:
                running[L] = new_generation(model, labels, seeds, config)
            finished = next(running[L], None) is None
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed[L] += time.perf_counter() - start
            if finished:
                done[L].append(elapsed[L])
                running[L], elapsed[L] = None, 0.0
    return done


def bench_sampling(
    preset: str,
    lengths: list[int],
    batches: list[int],
    repeats: int,
    decode_per_image: dict[str, float],
    device: torch.device,
) -> None:
    config = SampleConfig.from_name("rar-b")
    print(f"\nsampling: {preset}, {config}; whole generations, steps interleaved (median of >= {repeats})")
    print(
        "| tokens (tokenizer) | codebook | batch | generations timed | s/batch | images/s | vs 256 tokens "
        "| with decoding: images/s | vs 256 tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    models = {}
    for length in lengths:
        start = time.perf_counter()
        models[length] = generator(preset, length, device)
        generate(models[length], [0], config, seeds=[0])  # warm-up: a whole generation at batch 1
        print(
            f"# {preset} over {length} tokens: built, packed, warmed up: {time.perf_counter() - start:.1f} s"
        )
    for batch in batches:
        times = interleaved_generations(models, batch, config, repeats, device)
        seconds = {L: statistics.median(t) for L, t in times.items()}
        tokenizer_of = {
            L: TITOK_OF_LENGTH.get(L, "maskgit-vqgan-f16-256" if L == 256 else "-") for L in models
        }
        with_decode = {
            L: seconds[L] + batch * decode_per_image[tokenizer_of[L]]
            if tokenizer_of[L] in decode_per_image
            else None
            for L in models
        }
        base, base_dec = seconds.get(256), with_decode.get(256)
        for L in models:
            speed = f"{base / seconds[L]:.1f}x" if base else "-"
            dec = with_decode[L]
            dec_rate = f"{batch / dec:.3f}" if dec else "-"
            dec_speed = f"{base_dec / dec:.1f}x" if dec and base_dec else "-"
            codebook = models[L].model.config.codebook_size
            print(
                f"| {L} ({tokenizer_of[L]}) | {codebook} | {batch} | {len(times[L])} "
                f"| {seconds[L]:.2f} | {batch / seconds[L]:.3f} | {speed} | {dec_rate} | {dec_speed} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizers", default="titok-l-32,titok-b-64,titok-s-128,maskgit-vqgan-f16-256", help="table 1 rows"
    )
    parser.add_argument("--tokenizer-batch", type=int, default=2)
    parser.add_argument("--preset", default="rar-b", help="generator widths for table 2")
    parser.add_argument("--lengths", default="256,32", help="sequence lengths for table 2 (256, 32/64/128)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-tokenizers", action="store_true", help="table 2 only (no decoding columns)")
    parser.add_argument("--skip-sampling", action="store_true", help="table 1 only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"# {platform.machine()} {device}, torch {torch.__version__}, {threads} CPU threads, float32")
    decode = {}
    if not args.skip_tokenizers:
        decode = bench_tokenizers(args.tokenizers.split(","), args.tokenizer_batch, args.repeats, device)
    if not args.skip_sampling:
        lengths = [int(n) for n in args.lengths.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        bench_sampling(args.preset, lengths, batches, args.repeats, decode, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
