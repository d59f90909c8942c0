"""Token grids other than 16x16: the model's grid, sampling at a larger grid, resizing the grid tables
(``rargen.resize``), and a non-square grid trained, sampled, fine-tuned, resumed and served via the CLI."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import rargen
from conftest import randomize
from rargen.checkpoint import save
from rargen.cli.main import main
from rargen.data.token_store import TokenStore
from rargen.model import PAPER_PRESETS, PRESETS, RAR, ModelConfig
from rargen.resize import GRID_TABLES, resize_grid_table, resize_sequence_table, resize_state_dict
from rargen.sampling.engine import SampleConfig, token_probs
from rargen.tokenizers.base import codes_from_sequence
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig


def test_grid_defaults_to_square_and_takes_a_width() -> None:
    assert ModelConfig().grid == (16, 16) and ModelConfig(num_image_tokens=1024).grid == (32, 32)
    assert ModelConfig(num_image_tokens=32, grid_width=8).grid == (4, 8)
    assert ModelConfig(num_image_tokens=32).grid == (32, 1)  # no grid: 1D tokens (TiTok)
    with pytest.raises(ValueError, match="grid_width 5 does not divide num_image_tokens 32"):
        ModelConfig(num_image_tokens=32, grid_width=5)
    for name, paper in PAPER_PRESETS.items():  # the 512 presets: the paper's sizes at 32x32 tokens
        assert PRESETS[f"{name}-512"] == dataclasses.replace(paper, num_image_tokens=1024)
        assert PRESETS[f"{name}-512"].grid == (32, 32)


def test_a_config_written_before_grids_loads_as_the_square_grid() -> None:
    from rargen.checkpoint import config_from_dict, config_to_dict

    old = {k: v for k, v in config_to_dict(PRESETS["rar-b"]).items() if k != "grid_width"}
    assert config_from_dict(ModelConfig, old) == PRESETS["rar-b"] and PRESETS["rar-b"].grid_width == 0


def test_codes_from_sequence_uses_the_models_grid() -> None:
    tokenizer = VQTokenizer(VQTokenizerConfig.from_name("vq-tiny"))
    tokens = torch.arange(16).view(2, 8)
    assert torch.equal(codes_from_sequence(tokenizer, tokens, (2, 4)), tokens.view(2, 2, 4))
    with pytest.raises(ValueError, match="do not form a square grid"):
        codes_from_sequence(tokenizer, tokens, ModelConfig(num_image_tokens=8).grid)
    with pytest.raises(ValueError, match="do not form a 4x4 grid"):
        codes_from_sequence(tokenizer, tokens, (4, 4))


@pytest.mark.parametrize("grid", [(8, 8), (4, 8), (32, 32)])
def test_sampling_at_a_larger_grid_equals_the_forward(grid: tuple[int, int]) -> None:
    """The cached decoder over 64, 32 (non-square) and 1,024 (a 512 px grid) tokens gives the
    full forward's probabilities."""
    config = ModelConfig.from_name(
        "rar-tiny", num_image_tokens=grid[0] * grid[1], grid_width=grid[1], dropout=0.0, attn_dropout=0.0
    )
    model = randomize(RAR(config)).double().eval()
    tokens = torch.randint(0, 32, (3, config.num_image_tokens), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 9])
    full = (model(tokens, labels) / 0.7).softmax(-1)
    torch.testing.assert_close(token_probs(model, labels, tokens, SampleConfig(temperature=0.7)), full)


def _model(grid: tuple[int, int], seed: int = 0) -> RAR:
    torch.manual_seed(seed)
    config = ModelConfig.from_name("rar-tiny", num_image_tokens=grid[0] * grid[1], grid_width=grid[1])
    return randomize(RAR(config))


def test_resizing_to_the_same_grid_is_the_identity() -> None:
    model = _model((2, 4))
    state = model.state_dict()
    resized = resize_state_dict(state, model.config, model.config)
    assert resized.keys() == state.keys()
    assert all(torch.equal(resized[k], state[k]) for k in state)


def test_resizing_keeps_every_other_weight_and_interpolates_the_grid_tables() -> None:
    small = _model((2, 4))
    big = RAR(dataclasses.replace(small.config, num_image_tokens=32, grid_width=8))
    state = small.state_dict()
    resized = resize_state_dict(state, small.config, big.config)
    big.load_state_dict(resized)  # strict: every key, every shape
    kept = [k for k in state if k not in GRID_TABLES]
    assert len(kept) == len(state) - 3 and all(resized[k] is state[k] for k in kept)
    # cls and class rows are kept; the step table's first and last image steps too
    assert torch.equal(resized["pos_embed"][:2], state["pos_embed"][:2])
    assert torch.equal(resized["step_embed"][:3], state["step_embed"][:3])
    assert torch.equal(resized["step_embed"][-1], state["step_embed"][-1])
    # row-major layout: a table that varies only down the rows still varies only down the rows
    rows = torch.arange(2.0).repeat_interleave(4)[:, None].expand(8, 5)  # (h*w, D), value = row index
    out = resize_grid_table(rows, (2, 4), (4, 8)).view(4, 8, 5)
    assert torch.equal(out, out[:, :1].expand(4, 8, 5)) and bool((out[:, 0, 0].diff() >= 0).all())
    assert torch.allclose(resize_grid_table(torch.ones(8, 3), (2, 4), (4, 8)), torch.ones(32, 3))
    line = torch.linspace(0, 1, 5)[:, None]
    assert torch.allclose(resize_sequence_table(line, 9), torch.linspace(0, 1, 9)[:, None])


def test_the_official_layout_refuses_a_non_square_grid() -> None:
    from rargen.convert import to_official

    assert to_official(_model((4, 4)))["pos_embed"].shape == (1, 16 + 1024, 64)
    with pytest.raises(ValueError, match="token grid is 2x4; the official code decodes square grids only"):
        to_official(_model((2, 4)))


def test_resizing_refuses_another_architecture_and_1d_tokens() -> None:
    small = _model((2, 4))
    with pytest.raises(ValueError, match="dim 64 -> 128; only the token grid may change"):
        resize_state_dict(small.state_dict(), small.config, dataclasses.replace(small.config, dim=128))
    one_d = dataclasses.replace(small.config, grid_width=0)  # 8 tokens, no grid
    with pytest.raises(ValueError, match="TiTok is fixed at 256x256 px by design"):
        resize_state_dict(small.state_dict(), one_d, dataclasses.replace(one_d, num_image_tokens=16))


def _pretokenize(tmp_path, height: int, width: int) -> str:
    """The held-out digits cropped to height x width, tokenized by ``tmp_path/tok`` (factor 4)."""
    out = str(tmp_path / f"s{height}x{width}")
    argv = ["pretokenize", "--data", "digits:heldout", "--tokenizer", str(tmp_path / "tok"), "--out", out]
    assert main([*argv, "--image-size", str(height), "--image-width", str(width), "--no-progress"]) == 0
    return out


def test_a_non_square_grid_trains_samples_fine_tunes_resumes_and_serves(tmp_path) -> None:
    from serve_helpers import request, running_server

    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQTokenizerConfig.from_name("vq-tiny")).eval()  # factor 4, 32 codes
    save(tokenizer, tmp_path / "tok")
    store24 = _pretokenize(tmp_path, 8, 16)
    assert TokenStore(store24).grid == (2, 4)
    common = ["--preset", "rar-tiny", "--batch-size", "8", "--warmup", "1", "--no-progress"]
    tok = ["--tokenizer", str(tmp_path / "tok")]
    train = ["train", "--data", store24, "--out", str(tmp_path / "run"), "--steps", "3"]
    assert main([*train, *common, *tok, "--sample-every", "3"]) == 0
    model = rargen.load(tmp_path / "run" / "final")
    assert model.config.grid == (2, 4) and model.config.num_image_tokens == 8
    # a grid width that is not the data's is refused
    assert main([*train[:-4], "--out", str(tmp_path / "bad"), *common, "--model", "grid_width=2"]) == 2
    assert Image.open(tmp_path / "run" / "samples" / "step-0000003.png").size[0] > 0
    assert (
        main(
            ["sample", str(tmp_path / "run" / "final"), *tok, "--labels", "1,2", "--out", str(tmp_path / "a")]
        )
        == 0
    )
    assert np.load(tmp_path / "a" / "samples.npz")["arr_0"].shape == (2, 8, 16, 3)  # (B, H, W, 3)

    # fine-tune to a 4x8 grid (16x32 px): the grid tables resized; a run cut after its step-2
    # checkpoint resumes to the same weights
    tune = [
        "train",
        "--data",
        _pretokenize(tmp_path, 16, 32),
        *common,
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
    ]
    tune += ["--init-from", str(tmp_path / "run" / "final"), "--keep-checkpoints", "5"]
    assert main([*tune, "--out", str(tmp_path / "tuned")]) == 0
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    step2 = "checkpoints/step-0000002"
    shutil.copytree(tmp_path / "tuned" / step2, tmp_path / "cut" / step2)
    assert main([*tune, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    tuned, resumed = rargen.load(tmp_path / "tuned" / "final"), rargen.load(tmp_path / "cut" / "final")
    assert all(torch.equal(t, resumed.state_dict()[k]) for k, t in tuned.state_dict().items())
    assert tuned.config.grid == (4, 8) and tuned.config.dim == model.config.dim
    sample = ["sample", str(tmp_path / "tuned" / "final"), *tok, "--labels", "3"]
    assert main([*sample, "--out", str(tmp_path / "b")]) == 0
    assert np.load(tmp_path / "b" / "samples.npz")["arr_0"].shape == (1, 16, 32, 3)
    Image.new("RGB", (32, 16), "white").save(tmp_path / "wide.png")  # W x H: the 4x8 grid's images
    edit = ["edit", str(tmp_path / "tuned" / "final"), *tok, "--image", str(tmp_path / "wide.png")]
    assert main([*edit, "--mask", "centre", "--class", "2", "--out", str(tmp_path / "e")]) == 0
    assert Image.open(tmp_path / "e" / "images" / "000000.png").size == (32, 16)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "square.png")
    edit[-1] = str(tmp_path / "square.png")
    assert main([*edit, "--mask", "centre", "--class", "2", "--out", str(tmp_path / "f")]) == 2
    with running_server((tmp_path / "tuned" / "final", tmp_path / "tok")) as server:
        _, info, _ = request(server, "GET", "/info")
        status, body, _ = request(server, "POST", "/generate", {"class": 3, "seed": 1})
    assert info["grid"] == [4, 8] and info["image_size"] == [16, 32] and status == 200, body


def test_imagenet512_names_adms_512_reference_batch() -> None:
    from rargen.hub.releases import RELEASES

    ref256, ref512 = RELEASES["imagenet256"], RELEASES["imagenet512"]
    assert ref512.kind == ref256.kind == "reference-batch"
    base = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
    assert ref256.source == f"{base}/256/VIRTUAL_imagenet256_labeled.npz"
    assert ref512.source == f"{base}/512/VIRTUAL_imagenet512.npz"
    # ADM publishes no digest: like imagenet256, it is recorded on first download, then checked
    assert ref512.sha256 is None and ref512.verified_by == ref256.verified_by
