"""The README is a promise: its Python examples run as written."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from fake_hub import official_bin, paired_generator_bin, serving_hub

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples() -> None:
    assert python_blocks(), "README.md lost its Python example"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(index: int, tmp_path: Path, monkeypatch) -> None:
    """Each block runs as written. Released names are served by a local fake Hub (never the network)
    with small random-weight stand-ins in the official layouts under the real repositories and file
    names, so the download -> verify -> convert -> sample path the reader gets is the one tested."""
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[index]
    with serving_hub(tmp_path, monkeypatch) as hub:
        hub.add_hub_file("yucornetto/RAR", "rar_b.bin", paired_generator_bin(num_classes=1000))
        hub.add_hub_file(
            "fun-research/TiTok", "maskgit-vqgan-imagenet-f16-256.bin", official_bin("official_vqgan_small")
        )
        namespace = {"__name__": "__readme__"}
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    assert os.getcwd() == str(tmp_path)
    if "from_pretrained" in code and "images" in namespace:  # the three-line example drew an image
        images = namespace["images"]
        assert images.shape[:2] == (1, 3) and 0 <= images.min() and images.max() <= 1 and images.std() > 0


# The own-data commands run on a small folder; only the step counts are cut (appended flags win).
OWN_DATA_CUTS = {
    "train-tokenizer": ["--preset", "vq-tiny", "--steps", "20", "--batch-size", "16"],
    "train": ["--steps", "10", "--model", "dim=32", "--model", "depth=1", "--model", "num_heads=2",
              "--model", "mlp_dim=64"],
    "sample": ["--per-class", "2"],
    "train-classifier": ["--epochs", "3", "--feature-dim", "8"],
    "sweep": ["--per-class", "2", "--cfg-scales", "1,3"],
}  # fmt: skip


def own_data_commands() -> list[list[str]]:
    section = README.read_text().split("## The pipeline on your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("rargen ")]


@pytest.mark.slow
def test_readme_own_data_commands_run_on_a_folder(tmp_path, monkeypatch, capsys, one_torch_thread) -> None:
    """The README's own-data block, command by command through the CLI, on a class-folder tree of
    28x28 grey images named as in the README (my_images), with the step counts cut."""
    from rargen.cli.main import main
    from test_classifier import shapes_folder

    shapes_folder(tmp_path / "my_images", classes=3, per_class=8, size=28)
    monkeypatch.chdir(tmp_path)
    commands = own_data_commands()
    names = [argv[1] for argv in commands]
    assert names == ["train-tokenizer", "pretokenize", "train", "sample", "train-classifier", "sweep",
                     "evaluate"]  # fmt: skip
    for argv in commands:
        assert argv[0] == "rargen"
        assert main([*argv[1:], *OWN_DATA_CUTS.get(argv[1], []), "--threads", "1"]) == 0, argv
    printed = capsys.readouterr().out
    assert "shape_0/broken.png" in printed and "held-out accuracy" in printed
    assert "Fréchet distance" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0 <= metrics["class_accuracy"] <= 1 and metrics["num_samples"] == 6
    assert (tmp_path / "sweeps" / "gen" / "sweep.json").is_file()
