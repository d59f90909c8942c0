"""The trainable VQ tokenizer and its training loop: shapes, gradients, codebook health, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rargen
from rargen.checkpoint import save
from rargen.data.digits import load_digit_images
from rargen.tokenizers.base import Tokenizer
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig
from rargen.train.tokenizer import (
    TokenizerTrainConfig,
    batch_indices,
    evaluate_tokenizer,
    train_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0, **overrides) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQTokenizerConfig.from_name("vq-tiny", **overrides)).eval()


@pytest.mark.parametrize("size", [(16, 16), (8, 24), (32, 16)])
def test_encode_decode_shapes_and_range(size):
    model = tiny()
    assert isinstance(model, Tokenizer) and model.downsample_factor == 4
    images = torch.rand(2, 3, *size)
    codes = model.encode(images)
    assert codes.shape == (2, size[0] // 4, size[1] // 4) and codes.dtype == torch.int64
    assert model.grid_shape(*size) == codes.shape[1:]
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    out = model.decode(codes)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_encode_matches_training_forward_codes():
    model = tiny()
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(model(images).codes, model.encode(images))


def test_straight_through_gradient_reaches_encoder():
    model = tiny().train()
    out = model(torch.rand(2, 3, 16, 16))
    out.reconstruction.pow(2).mean().backward()  # reconstruction only: no VQ-loss path to the encoder
    grad = model.encoder.layers[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_dead_codes_restart_onto_batch_latents():
    model = tiny()
    quantizer = model.quantizer
    quantizer.usage.fill_(1.0 / 32)
    quantizer.usage[[3, 5]] = 0.0
    latents = torch.nn.functional.normalize(torch.randn(10, 4), dim=-1)
    assert quantizer.restart_dead_codes(latents, torch.Generator().manual_seed(0)) == 2
    for code in (3, 5):
        assert any(torch.equal(quantizer.embedding.weight[code], row) for row in latents)
    assert float(quantizer.usage.min()) > 0


def test_save_load_round_trip(tmp_path):
    model = tiny()
    model.quantizer.usage.uniform_()  # a buffer: must survive too
    save(model, tmp_path / "tok")
    loaded = rargen.load(tmp_path / "tok")
    assert isinstance(loaded, VQTokenizer) and loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 16, 16)
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_bad_inputs_raise_value_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got \(1, 16, 16, 3\)"):
        model.encode(torch.rand(1, 16, 16, 3))
    with pytest.raises(ValueError, match="height 18 .* factor 4"):
        model.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="square"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 8"):
        VQTokenizerConfig(hidden_channels=12)
    with pytest.raises(ValueError, match="unknown VQ tokenizer preset"):
        VQTokenizerConfig.from_name("vq-huge")


def test_batch_order_is_a_function_of_seed_and_step():
    seen = torch.cat([batch_indices(10, 4, step, seed=3) for step in range(5)])  # two full epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 2, seed=3), batch_indices(10, 4, 2, seed=3))


def _train_tiny(tmp_path, images, steps=100):
    config = TokenizerTrainConfig(steps=steps, batch_size=16, lr=5e-3, warmup_steps=10, sample_every=0)
    model_config = VQTokenizerConfig.from_name("vq-tiny")
    torch.manual_seed(0)
    before = evaluate_tokenizer(VQTokenizer(model_config).eval(), images)
    report = train_tokenizer(
        tmp_path, (images, images), model_config=model_config, train_config=config, progress=False
    )
    return before, report


def test_overfits_a_few_images(tmp_path):
    images, _ = load_digit_images("train", image_size=16)
    before, report = _train_tiny(tmp_path, images[:16])
    after = report["heldout"]
    # An untrained net reconstructs at about 10 dB; 100 steps on 16 images reach about 19.4 dB.
    assert before["psnr"] < 13.0
    assert after["psnr"] > 18.0, after
    assert (tmp_path / "samples" / "recon_000100.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["heldout"] == after
    loaded = rargen.load(tmp_path / "tokenizer")
    assert evaluate_tokenizer(loaded, images[:16]) == after


def test_short_training_keeps_most_of_the_codebook_in_use(tmp_path):
    images, _ = load_digit_images("train", image_size=16)
    _, report = _train_tiny(tmp_path, images[:256])
    # Measured: 78% of the 32 codes used, perplexity 21, PSNR 17.3 dB after 100 steps.
    assert report["heldout"]["codebook_usage"] > 0.5, report["heldout"]
    assert report["heldout"]["perplexity"] > 10.0, report["heldout"]
    assert report["heldout"]["psnr"] > 15.5, report["heldout"]


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    import rargen.train.tokenizer as tokenizer_train

    saved = []
    original = tokenizer_train._save_checkpoint
    monkeypatch.setattr(
        tokenizer_train,
        "_save_checkpoint",
        lambda path, model, opt, step, *rest: saved.append(step) or original(path, model, opt, step, *rest),
    )
    images, _ = load_digit_images("train", image_size=16)
    data = (images[:64], images[64:80])
    common = dict(batch_size=8, warmup_steps=2, restart_every=2, sample_every=0, checkpoint_every=3)
    config6 = TokenizerTrainConfig(steps=6, **common)
    model_config = VQTokenizerConfig.from_name("vq-tiny", usage_decay=0.5, dead_code_fraction=0.9)
    train_tokenizer(tmp_path / "full", data, model_config=model_config, train_config=config6, progress=False)
    # Interrupted run: stop after 3 steps of the same 6-step schedule, then resume.
    train_tokenizer(
        tmp_path / "split",
        data,
        model_config=model_config,
        train_config=config6,
        progress=False,
        stop_after=3,
    )
    mid = load_file(str(tmp_path / "split" / "tokenizer" / "model.safetensors"))
    saved.clear()
    train_tokenizer(tmp_path / "split", data, train_config=config6, resume=True, progress=False)
    assert saved == [6]  # the resumed run started at step 3 (a restart at 0 would save step 3 again)
    full = load_file(str(tmp_path / "full" / "tokenizer" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "tokenizer" / "model.safetensors"))
    assert full.keys() == split.keys()
    assert any(not torch.equal(mid[k], full[k]) for k in full)  # the resumed half did train
    for key in full:
        assert torch.equal(full[key], split[key]), key
    with pytest.raises(ValueError, match="--resume"):
        train_tokenizer(tmp_path / "full", data, train_config=config6, progress=False)


def test_cli_trains_on_an_npz_and_resumes(tmp_path, capsys):
    import numpy as np

    from rargen.cli.main import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", rng.integers(0, 256, size=(20, 12, 12, 3), dtype=np.uint8))
    args = ["train-tokenizer", "--data", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "run")]
    args += ["--preset", "vq-tiny", "--image-size", "16", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "2"]) == 2  # refuses to overwrite a run without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--steps", "4", "--resume"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 4 and report["heldout"]["num_images"] == 4  # 20% held out, as in every stage
    assert report["split"]["num_heldout"] == 4 and report["split"]["heldout_fraction"] == 0.2
    assert rargen.load(tmp_path / "run" / "tokenizer").config.image_size == 16
    assert main(["train-tokenizer", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")]) == 2


def _gated_run(tmp_path, monkeypatch, name, **kwargs):
    """A run whose learning rate turns huge at step 30, so the held-out PSNR falls from there on."""
    import rargen.train.tokenizer as tokenizer_train

    monkeypatch.setattr(tokenizer_train, "learning_rate", lambda step, config: 5e-3 if step < 30 else 0.5)
    images, _ = load_digit_images("train", image_size=16)
    config = TokenizerTrainConfig(
        steps=200, batch_size=8, warmup_steps=1, restart_every=1000, sample_every=0, checkpoint_every=10,
        eval_every=10, patience=2,
    )  # fmt: skip
    model_config = VQTokenizerConfig.from_name("vq-tiny")
    return train_tokenizer(
        tmp_path / name, (images[:64], images[64:80]), model_config=model_config, train_config=config,
        progress=False, **kwargs,
    )  # fmt: skip


def test_a_tokenizer_that_stops_improving_stops_early_and_keeps_its_best(tmp_path, monkeypatch):
    report = _gated_run(tmp_path, monkeypatch, "run")
    gate, history = report["gate"], dict(report["gate"]["history"])
    assert gate["stopped_early"] and report["steps"] == gate["ran"] < 200  # well before the cap
    assert gate["ran"] == gate["best_at"] + 2 * 10  # two evaluations without a gain, then stop
    assert gate["best_at"] <= 30 and history[gate["ran"]] < history[gate["best_at"]]
    # The checkpoint (and the report) are the best step's weights, not the last step's.
    assert report["heldout"]["psnr"] == history[gate["best_at"]] == max(history.values())
    images, _ = load_digit_images("train", image_size=16)
    assert evaluate_tokenizer(rargen.load(tmp_path / "run" / "tokenizer"), images[64:80]) == report["heldout"]
    assert "stopped early: no gain in 2 evaluations (cap 200)" in report["verdict"]
    assert "verdict: LOW" in report["verdict"] and "it levelled off: a larger codebook" in report["verdict"]


def test_a_gated_run_resumes_exactly(tmp_path, monkeypatch):
    full = _gated_run(tmp_path, monkeypatch, "full")
    stop = full["gate"]["best_at"] + 10  # after the best, between evaluations that count towards the stop
    _gated_run(tmp_path, monkeypatch, "split", stop_after=stop)
    resumed = _gated_run(tmp_path, monkeypatch, "split", resume=True)
    first, second = (tmp_path / "full" / "tokenizer", tmp_path / "split" / "tokenizer")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    states = [torch.load(run / "train_state.pt", weights_only=True) for run in (first, second)]
    assert states[0]["plateau"] == states[1]["plateau"] and states[0]["step"] == states[1]["step"]
    for key, value in states[0]["weights"].items():  # the current weights, to go on from
        assert torch.equal(value, states[1]["weights"][key]), key
    as_json = lambda report: json.loads(json.dumps(report["gate"]))  # noqa: E731
    assert as_json(resumed) == as_json(full) and resumed["heldout"] == full["heldout"]
