"""TiTok: exact official layout and size, parity with the official code, snapshot conversion and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rargen
from rargen.checkpoint import save
from rargen.cli.main import main
from rargen.tokenizers.base import Tokenizer, codes_from_sequence, token_shape_of
from rargen.tokenizers.titok import TiTok, TiTokConfig
from rargen.tokenizers.titok_convert import (
    config_from_official,
    convert_official_titok,
    from_official,
    to_official,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCE = Path(__file__).parent / "data" / "official_titok_small.safetensors"


def _reference() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(official config.json tree, official state dict (float32), the other reference tensors)."""
    tensors = load_file(str(REFERENCE))
    with safe_open(str(REFERENCE), "pt") as f:
        tree = json.loads(f.metadata()["hub_config"])
    state = {k[len("state.") :]: v.float() for k, v in tensors.items() if k.startswith("state.")}
    return tree, state, {k: v for k, v in tensors.items() if not k.startswith("state.")}


def _snapshot(
    folder: Path, tree: dict, state: dict[str, torch.Tensor], weights: str = "model.safetensors"
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(tree))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


# ------------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize(
    ("preset", "params", "tensors", "tokens"),
    [  # counts measured on the official TiTok(config) of configs/infer/TiTok/titok_{l32,b64,s128}.yaml
        ("titok-l-32", 641_054_735, 692, 32),
        ("titok-b-64", 204_814_095, 404, 64),
        ("titok-s-128", 83_674_639, 308, 128),
    ],
)
def test_released_presets_have_the_official_size(preset, params, tensors, tokens):
    with torch.device("meta"):
        model = TiTok(TiTokConfig.from_name(preset))
    assert model.num_params() == params and len(model.state_dict()) == tensors
    assert sum(p.numel() for p in model.pixel_decoder.parameters()) == 30_478_339  # the MaskGIT-VQGAN decoder
    assert model.token_shape(256, 256) == (tokens,) and model.codebook_size == 4096
    # the official layout (key names and shapes) converts back to exactly this config
    tree, official = to_official(model)
    assert config_from_official(tree, official)[0] == model.config
    assert (
        "encoder.transformer.0.attn.in_proj_weight" in official and "pixel_decoder.conv_in.weight" in official
    )


def test_interface_encode_decode_shapes_and_errors():
    torch.manual_seed(0)
    model = TiTok(TiTokConfig.from_name("titok-test")).eval()
    assert isinstance(model, Tokenizer) and token_shape_of(model, 32, 32) == (8,)
    images = torch.rand(3, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (3, 8) and codes.dtype == torch.int64
    out = model.decode(codes)
    assert out.shape == (3, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(model.decode(codes[:, None]), out)  # the official (B, 1, K) layout too
    assert codes_from_sequence(model, codes) is codes  # 1D: the generator's tokens are the codes
    with pytest.raises(ValueError, match="32x32 images only.*--image-size 32"):
        model.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        model.decode(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 8), 64))
    with pytest.raises(ValueError, match="pixel decoder upsamples by 8"):
        TiTokConfig.from_name("titok-test", patch_size=4, image_size=32)


# ------------------------------------------------------------------------------------ official parity


def test_parity_with_official_titok_float32():
    """Reference produced by the official TiTok on random weights (tests/data/README.md)."""
    tree, state, ref = _reference()
    model, notes = from_official(tree, state)
    assert model.config.encoder_width == 128 and model.config.encoder_heads == 2  # from the shapes
    assert any("config says 'small'" in note for note in notes)
    codes = model.encode(ref["images"])
    assert torch.equal(codes, ref["codes"])
    with torch.inference_mode():
        z = model.encoder(ref["images"], model.latent_tokens)
        logits = model.decoder(model.quantize.lookup(ref["codes"]))
    torch.testing.assert_close(z, ref["z32"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref["pixel_logits32"], rtol=0, atol=1e-4)
    torch.testing.assert_close(model.decode(ref["codes"]), ref["decoded32"], rtol=0, atol=1e-4)


def test_parity_with_official_titok_float64():
    tree, state, ref = _reference()
    model = from_official(tree, state)[0].double()
    with torch.inference_mode():
        z = model.encoder(ref["images"].double(), model.latent_tokens)
        raw = model.pixels_from_logits(model.decoder(model.quantize.lookup(ref["codes"])))
    torch.testing.assert_close(z, ref["z64"], rtol=0, atol=1e-10)
    torch.testing.assert_close(raw, ref["decoded_raw64"], rtol=0, atol=1e-10)
    assert torch.equal(model.encode(ref["images"]), ref["codes"])  # the quantizer runs in float32


# ------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_convert_snapshot_folder_and_round_trip(tmp_path, weights):
    tree, state, ref = _reference()
    snapshot = _snapshot(tmp_path / "snap", tree, state, weights)
    (snapshot / "README.md").write_text("a model card\n")  # Hub snapshots carry one; ignored
    assert main(["convert", "official-titok", str(snapshot), "--out", str(tmp_path / "tok")]) == 0
    tokenizer = rargen.load(tmp_path / "tok")
    assert isinstance(tokenizer, TiTok) and tokenizer.num_latent_tokens == 8
    assert torch.equal(tokenizer.encode(ref["images"]), ref["codes"])
    # export back to the official layout: the same keys, shapes and values as the snapshot
    assert main(["convert", "to-official", str(tmp_path / "tok"), "--out", str(tmp_path / "back")]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert list(back) == list(state) or sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())["model"]["vq_model"]
    assert exported["num_latent_tokens"] == 8 and exported["is_legacy"] and exported["use_l2_norm"]
    again, _ = convert_official_titok(tmp_path / "back")
    assert again.config == tokenizer.config


def test_missing_switches_take_the_official_defaults_and_sizes_come_from_tensors():
    tree, state, ref = _reference()
    drop = ("finetune_decoder", "quantize_mode", "is_legacy", "vit_enc_model_size", "vit_dec_model_size")
    for key in (*drop, "codebook_size", "token_size", "num_latent_tokens"):
        tree["model"]["vq_model"].pop(key, None)
    model, notes = from_official(tree, state)
    assert notes == [] and model.config.codebook_size == 64
    assert torch.equal(model.encode(ref["images"]), ref["codes"])


def test_convert_refuses_what_it_cannot_convert(tmp_path):
    tree, state, _ = _reference()
    with pytest.raises(FileNotFoundError, match="yucornetto/tokenizer_titok_l32_imagenet"):
        convert_official_titok(tmp_path / "missing")
    torch.save(state, tmp_path / "tokenizer_titok_l32.bin")
    with pytest.raises(ValueError, match="is a file.*snapshot folder"):
        convert_official_titok(tmp_path / "tokenizer_titok_l32.bin")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps(tree))
    (tmp_path / "partial" / "weights.ckpt").write_text("?")
    with pytest.raises(ValueError, match=r"found \['config.json', 'weights.ckpt'\]"):
        convert_official_titok(tmp_path / "partial")
    for switch, value, message in [
        ("quantize_mode", "vae", "continuous"),
        ("is_legacy", False, "is_legacy=False"),
        ("finetune_decoder", False, "finetune_decoder=False"),
    ]:
        bad = json.loads(json.dumps(tree))
        bad["model"]["vq_model"][switch] = value
        with pytest.raises(ValueError, match=message):
            from_official(bad, state)
    with pytest.raises(ValueError, match="no model.vq_model"):
        from_official({"model": {"generator": {}}}, state)
    with pytest.raises(ValueError, match=r"missing \['latent_tokens'"):
        from_official(tree, {k: v for k, v in state.items() if k != "latent_tokens"})


def test_full_size_titok_l32_snapshot_converts_from_tensor_shapes():
    """A full-size TiTok-L-32 layout (meta tensors: shapes only) with the released config."""
    with torch.device("meta"):
        model = TiTok(TiTokConfig.from_name("titok-l-32"))
    _, official = to_official(model)
    tree = {
        "model": {"vq_model": {
            "codebook_size": 4096, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25,
            "vit_enc_model_size": "large", "vit_dec_model_size": "large", "vit_enc_patch_size": 16,
            "vit_dec_patch_size": 16, "num_latent_tokens": 32, "finetune_decoder": True,
        }},
        "dataset": {"preprocessing": {"crop_size": 256}},
    }  # fmt: skip
    config, notes = config_from_official(tree, official)
    assert config == TiTokConfig.from_name("titok-l-32") and notes == []
    assert (config.encoder_heads, config.decoder_heads, config.grid_size) == (16, 16, 16)


def test_checkpoint_folder_round_trip(tmp_path):
    torch.manual_seed(1)
    model = TiTok(TiTokConfig.from_name("titok-test")).eval()
    save(model, tmp_path / "tok")
    loaded = rargen.load(tmp_path / "tok")
    assert loaded.config == model.config
    images = torch.rand(2, 3, 32, 32)
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes) and torch.equal(
        loaded.decode(codes), model.decode(codes)
    )
    tree, official = to_official(model)
    again = from_official(tree, official)[0]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
