"""int8 decoding on the demo's models: class accuracy and speed beside float32, same seeds.

    PYTHONPATH=src python benchmarks/bench_quantize.py runs/demo --per-class 50

Samples ``--per-class`` digits of every class with the demo's sampling settings and seeds
(``rargen.demo.stages.sample_digits``), once in float32 and once with ``quantize="int8"``
(``rargen.sampling.int8``), and scores both with the demo's digit classifier (class accuracy and the
Fréchet distance in its features, as the demo's report does). The two runs alternate
``--repeats`` times on a shared host; the time is the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rargen.checkpoint import load
from rargen.demo.pipeline import DemoConfig, score
from rargen.demo.stages import sample_digits
from rargen.sampling.decoding import prepare_for_decoding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", help="a `rargen demo` output folder (generator/, tokenizer/, classifier/)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    generator = load(demo / "generator").eval()
    tokenizer, classifier = load(demo / "tokenizer").eval(), load(demo / "classifier").eval()
    config = DemoConfig()
    decoders = {
        name: prepare_for_decoding(generator, quantize=q) for name, q in (("fp32", None), ("int8", "int8"))
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    scores = {}
    for _ in range(args.repeats):
        for name, decoder in decoders.items():
            start = time.perf_counter()
            images, labels = sample_digits(decoder, tokenizer, args.per_class, config)
            times[name].append(time.perf_counter() - start)
            scores[name] = score(classifier, images, labels)
    print(f"# {demo}: {args.per_class} per class, {config.sample}, {torch.get_num_threads()} threads")
    print("| decoding | class accuracy | Fréchet distance | images/s | x fp32 |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["fp32"])
    n = 10 * args.per_class
    for name in decoders:
        seconds = statistics.median(times[name])
        s = scores[name]
        print(
            f"| {name} | {s['class_accuracy']:.3f} | {s['frechet_distance']:.2f} | {n / seconds:.1f} "
            f"| {base / seconds:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
