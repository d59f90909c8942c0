"""End to end: a reduced `rargen demo` trains, samples and scores, and leaves loadable checkpoints."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rargen
from rargen.cli.main import main
from rargen.demo.pipeline import DemoConfig
from rargen.model import RAR
from rargen.sampling.engine import SampleConfig, generate_images


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Done in" in printed and str(out / "report.md") in printed

    for name in ("report.md", "samples.png", "training.png", "results.json", "demo_config.json"):
        assert (out / name).is_file(), name
    quick = DemoConfig.quick()
    grid = Image.open(out / "samples.png")
    assert grid.size == (24 + quick.grid_per_class * 96, 10 * 96)
    assert Image.open(out / "training.png").size[0] > 500

    results = json.loads((out / "results.json").read_text())
    scores = results["generated"]["RAR annealing"]
    # Ten classes: chance is 10%. The reduced budget still gives clearly recognisable digits.
    assert scores["class_accuracy"] > 0.6
    assert results["real"]["heldout_accuracy"] > 0.9
    assert scores["frechet_distance"] > results["real"]["real_vs_real_frechet"] > 0
    assert results["tokenizer"]["codebook_usage"] > 0.5

    generator, tokenizer = rargen.load(out / "generator"), rargen.load(out / "tokenizer")
    assert isinstance(generator, RAR) and generator.config.num_image_tokens == 64
    assert generator.checkpoint_extra["class_names"] == [str(i) for i in range(10)]
    images = generate_images(generator, tokenizer, [3, 7], SampleConfig(cfg_scale=3.0), seeds=[0, 1])
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    classifier = rargen.load(out / "classifier")
    assert classifier(images).shape == (2, 10)

    # `rargen sample` works on the demo's checkpoints.
    code = main(["sample", str(out / "generator"), "--tokenizer", str(out / "tokenizer"), "--labels", "0,1",
                 "--cfg-scale", "3", "--out", str(tmp_path / "samples")])  # fmt: skip
    assert code == 0
    npz = np.load(tmp_path / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (2, 32, 32, 3) and npz["labels"].tolist() == [0, 1]

    # examples/quickstart.py runs on the demo's trained checkpoints (local paths through from_pretrained):
    # a grid, and the likelihood of each sample under the sampler's own distribution, better than chance.
    quickstart = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"))
    quickstart["main"]([
        "--model", str(out / "generator"), "--tokenizer", str(out / "tokenizer"),
        "--labels", "0,5,9", "--out", str(tmp_path / "quickstart.png"),
    ])  # fmt: skip
    assert Image.open(tmp_path / "quickstart.png").size[0] > 0
    nats = [
        float(line.split("(")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if "nats/token" in line
    ]
    assert len(nats) == 3 and all(0 < n < math.log(128) for n in nats)  # 128 codes: log(128) is chance

    # A rerun with the same settings picks up the finished pieces; other settings are refused.
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--seed", "1"]) == 2
    assert "other settings (train.seed)" in capsys.readouterr().err  # the demo's seed is its recipe's
