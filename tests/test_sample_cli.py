"""`rargen sample` end to end with a tiny stand-in tokenizer: files, rounding, seeds, batch invariance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import randomize
from rargen.checkpoint import checkpoint_hash, load, register_kind, save
from rargen.cli.main import main
from rargen.model import RAR, ModelConfig
from rargen.sampling.engine import SampleConfig, generate_images, sample_seed
from rargen.sampling.images import to_uint8


@dataclass(frozen=True)
class TinyTokenizerConfig:
    codebook_size: int = 32
    grid: int = 4
    patch: int = 2


class TinyTokenizer(nn.Module):
    """Each code is a colour; a code grid (B, h, w) decodes to (B, 3, h*patch, w*patch) in [0, 1]."""

    checkpoint_kind: ClassVar[str] = "test-tiny-tokenizer"
    config_class: ClassVar[type] = TinyTokenizerConfig

    def __init__(self, config: TinyTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.colours = nn.Parameter(torch.randn(config.codebook_size, 3))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        images = torch.sigmoid(self.colours[codes]).permute(0, 3, 1, 2)
        return images.repeat_interleave(self.config.patch, 2).repeat_interleave(self.config.patch, 3)


register_kind(TinyTokenizer.checkpoint_kind, f"{__name__}:TinyTokenizer")


def test_to_uint8_rounds() -> None:
    x = torch.tensor([0.0, 0.6 / 255, 0.49 / 255, 1.6 / 255, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 1, 0, 2, 255]


def test_sample_command_end_to_end(tmp_path) -> None:
    model = randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()
    names = [f"class{i}" for i in range(10)]
    save(model, tmp_path / "gen", extra={"class_names": names})
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    common = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--per-class", "2"]
    common += ["--cfg-scale", "3", "--cfg-power", "1", "--seed", "5"]
    assert main([*common, "--out", str(tmp_path / "a"), "--batch-size", "8"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--batch-size", "3"]) == 0

    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["arr_0"].shape == (20, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    assert a["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert np.array_equal(a["arr_0"], b["arr_0"])  # batch size does not change the samples
    png = np.asarray(Image.open(tmp_path / "a" / "images" / "000007.png"))
    assert np.array_equal(png, a["arr_0"][7])
    # One row per class (10), one column per sample (2) after the class-name column.
    from rargen.sampling.images import GRID_LABEL_WIDTH

    assert Image.open(tmp_path / "a" / "grid.png").size == (GRID_LABEL_WIDTH + 2 * 8, 10 * 8)
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["class_names"] == names

    # The pixels are exactly the library's images, rounded.
    loaded, tokenizer = load(tmp_path / "gen").eval(), load(tmp_path / "tok")
    config = SampleConfig(cfg_scale=3.0, cfg_power=1.0)
    labels = a["labels"].tolist()
    images = generate_images(loaded, tokenizer, labels, config, seeds=[sample_seed(5, i) for i in range(20)])
    assert np.array_equal(to_uint8(images), a["arr_0"])

    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == checkpoint_hash(tmp_path / "gen")
    assert meta["sample_config"]["cfg_scale"] == 3.0 and meta["seed"] == 5
    assert meta["versions"]["torch"] == torch.__version__


def test_sample_command_rejects_bad_labels(tmp_path, capsys) -> None:
    save(RAR(ModelConfig.from_name("rar-tiny")), tmp_path / "gen")
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    code = main(
        [
            "sample",
            str(tmp_path / "gen"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--labels",
            "3,12",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "labels must be" in capsys.readouterr().err


def test_sample_command_checks_the_tokenizer_before_sampling(tmp_path, capsys, monkeypatch) -> None:
    """A generator (or a tokenizer with another codebook) passed as --tokenizer is refused before
    any token is sampled (it used to fail only when decoding, after all the sampling)."""
    save(RAR(ModelConfig.from_name("rar-tiny")), tmp_path / "gen")
    save(TinyTokenizer(TinyTokenizerConfig(codebook_size=16)), tmp_path / "tok16")
    sampled = []
    monkeypatch.setattr("rargen.sampling.images.generate_images", lambda *a, **k: sampled.append(1))
    for tokenizer, message in (
        (tmp_path / "gen", "not an image tokenizer"),
        (tmp_path / "tok16", "has 16 codes"),
    ):
        argv = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tokenizer), "--labels", "1"]
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "tok16"), "--tokenizer", str(tmp_path / "gen"), "--labels", "1",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "not a RAR generator" in capsys.readouterr().err
    assert not sampled


def _sample_rank(rank: int, world: int, port: int, root: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rargen.sampling.images import sample_to_folder

    try:
        config = SampleConfig(cfg_scale=2.0, cfg_power=1.0)
        labels = [c for c in range(10) for _ in range(2)][:14]
        sample_to_folder(f"{root}/gen", f"{root}/tok", labels, config, f"{root}/two", seed=3, batch_size=3,
                         progress=False)  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_same_image_set_as_one_process(tmp_path) -> None:
    """ "Any rank count gives the same image set": 14 samples in batches of 3 (5 chunks, split
    unevenly over 2 ranks) against one process; the files, labels and pixels are identical."""
    import socket

    import torch.multiprocessing as mp

    from rargen.sampling.images import sample_to_folder

    model = randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()
    save(model, tmp_path / "gen")
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sample_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    labels = [c for c in range(10) for _ in range(2)][:14]
    config = SampleConfig(cfg_scale=2.0, cfg_power=1.0)
    one_folder = tmp_path / "one"
    sample_to_folder(tmp_path / "gen", tmp_path / "tok", labels, config, one_folder, seed=3, batch_size=7,
                     progress=False)  # fmt: skip
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert one["labels"].tolist() == two["labels"].tolist() == labels
    assert np.array_equal(one["arr_0"], two["arr_0"]) and len(set(map(bytes, one["arr_0"]))) > 7
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == [
        f"{i:06d}.png" for i in range(14)
    ]
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["world_size"] == 2


def test_grey_tokenizer_gives_grey_samples(tmp_path) -> None:
    """A tokenizer that records image_channels 1 (trained on grey data) yields grey PNGs, no tint."""
    torch.manual_seed(0)
    model = randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()
    save(model, tmp_path / "gen", extra={"class_names": [f"c{i}" for i in range(10)]})
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok", extra={"image_channels": 1})
    argv = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--labels", "1,2,3"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "images" / "000000.png").mode == "L"
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (3, 8, 8, 1)  # one channel, as the PNGs and the grid
    pngs = [np.asarray(Image.open(tmp_path / "s" / "images" / f"{i:06d}.png")) for i in range(3)]
    np.testing.assert_array_equal(arr[..., 0], np.stack(pngs))
    assert Image.open(tmp_path / "s" / "grid.png").mode == "L"
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["image_channels"] == 1
