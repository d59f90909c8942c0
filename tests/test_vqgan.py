"""MaskGIT-VQGAN: exact official layout and size, quantizer semantics, conversion, I/O checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rargen
from conftest import requires
from rargen.checkpoint import load_official as convert_official_vqgan
from rargen.checkpoint import save
from rargen.convert import is_official_vqgan_state_dict
from rargen.tokenizers.base import Tokenizer
from rargen.tokenizers.vqgan import (
    MaskGITVQGAN,
    VQGANConfig,
)

# The steering repo's spec sits beside the clone (../shared); CI always has it.
SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "official-state-dict-layouts.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(seed: int = 0) -> MaskGITVQGAN:
    torch.manual_seed(seed)
    model = MaskGITVQGAN(VQGANConfig.from_name("maskgit-vqgan-test")).eval()
    # Random GroupNorm affines so that no layer is a trivial identity in the checks below.
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    return model


def test_official_preset_size_and_layout():
    with torch.device("meta"):
        model = MaskGITVQGAN(VQGANConfig.from_name("maskgit-vqgan-f16-256"))
    assert sum(p.numel() for p in model.parameters()) == 54_515_587
    assert sum(p.numel() for p in model.encoder.parameters()) == 23_775_104
    assert sum(p.numel() for p in model.decoder.parameters()) == 30_478_339
    assert model.downsample_factor == 16 and model.grid_shape(256, 256) == (16, 16)


@requires(None if SPEC.exists() else str(SPEC), "check out ../shared beside the repository")
def test_official_preset_key_layout_matches_the_official_state_dict():
    with torch.device("meta"):
        model = MaskGITVQGAN(VQGANConfig.from_name("maskgit-vqgan-f16-256"))
    official = json.loads(SPEC.read_text())["maskgit_vqgan_f16_256"]["state_dict"]  # key -> shape, in order
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours.items()) == list(official.items())


def test_resnet_block_shortcut_acts_on_output():
    from rargen.tokenizers.vqgan import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(32, 64)
    x = torch.randn(2, 32, 4, 4)
    h = block.conv2(
        torch.nn.functional.silu(block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x)))))
    )
    torch.testing.assert_close(block(x), h + block.nin_shortcut(h))
    assert block.nin_shortcut.weight.shape == (64, 64, 1, 1)


@pytest.mark.parametrize("size", [(32, 32), (16, 48), (64, 32)])
def test_encode_decode_shapes_and_range(size):
    model = small_model()
    assert isinstance(model, Tokenizer)
    images = torch.rand(3, 3, *size)
    codes = model.encode(images)
    assert codes.shape == (3, size[0] // 2, size[1] // 2) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    out = model.decode(codes)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # channels-last is a layout choice only
    assert torch.equal(model.encode(images, channels_last=False), codes)
    torch.testing.assert_close(model.decode(codes, channels_last=False), out, rtol=1e-4, atol=1e-4)


def test_quantizer_is_exact_nearest_neighbour_with_first_index_ties():
    model = small_model()
    z = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    codebook = model.quantize.embedding.weight.detach().double()
    model.double()
    brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 16), codebook).argmin(1).view(2, 3, 5)
    assert torch.equal(model.quantize.nearest(z), brute)
    # duplicate a code: the first of two equal rows wins
    with torch.no_grad():
        model.quantize.embedding.weight[7] = model.quantize.embedding.weight[3]
        model.quantize.embedding.weight[3:4].copy_(z[0, :, 0, 0])
        model.quantize.embedding.weight[7:8].copy_(z[0, :, 0, 0])
    assert model.quantize.nearest(z)[0, 0, 0] == 3


def test_straight_through_gradient_reaches_encoder():
    model = small_model().train()
    images = torch.rand(2, 3, 16, 16)
    recon, codes, vq_loss = model(images)
    ((recon - images).pow(2).mean() + vq_loss).backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert codes.shape == (2, 8, 8)


def test_convert_official_state_dict_and_save_load_round_trip(tmp_path):
    model = small_model()
    state = model.state_dict()
    assert is_official_vqgan_state_dict(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vq.safetensors"))
    torch.save(state, tmp_path / "vq.bin")
    images = torch.rand(2, 3, 32, 32)
    for source in (state, tmp_path / "vq.safetensors", tmp_path / "vq.bin"):
        converted = convert_official_vqgan(source)
        assert converted.config == model.config
        assert torch.equal(converted.encode(images), model.encode(images))
    save(converted, tmp_path / "ckpt")
    loaded = rargen.load(tmp_path / "ckpt")
    assert isinstance(loaded, MaskGITVQGAN) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = model.encode(images)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_convert_refuses_other_state_dicts(tmp_path):
    rar_like = {
        "cls_token": torch.zeros(1, 1, 8),
        "blocks.0.norm1.weight": torch.ones(8),
        "lm_head.weight": torch.zeros(4, 8),
    }
    with pytest.raises(ValueError, match="not an official MaskGIT-VQGAN.*cls_token.*official-rar"):
        convert_official_vqgan(rar_like)
    prefixed = {f"module.{k}": v for k, v in small_model().state_dict().items()}
    with pytest.raises(ValueError, match="prefix"):
        convert_official_vqgan(prefixed)
    with pytest.raises(FileNotFoundError, match="fun-research/TiTok"):
        convert_official_vqgan(tmp_path / "missing.bin")


def test_bad_inputs_raise_value_error():
    model = small_model()
    good = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(images \+ 1\) / 2"):
        model.encode(good * 2 - 1)
    with pytest.raises(ValueError, match="uint8"):
        model.encode((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(good[:, :1])
    with pytest.raises(ValueError, match="width 33 .* multiple of the downsample factor 2"):
        model.encode(torch.rand(1, 3, 32, 33))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 4, 4))
    # flat (B, L) codes from the generator decode like (B, h, w)
    codes = model.encode(good)
    assert torch.equal(model.decode(codes.flatten(1)), model.decode(codes))


def test_config_validation():
    with pytest.raises(ValueError, match="codebook_dim"):
        VQGANConfig(codebook_dim=128)
    with pytest.raises(ValueError, match="divisible by 32"):
        VQGANConfig(hidden_channels=48)
    with pytest.raises(ValueError, match="unknown VQGAN preset"):
        VQGANConfig.from_name("nope")


# --------------------------------------------------------------------------- official parity

REFERENCE = Path(__file__).parent / "data" / "official_vqgan_small.safetensors"


def _reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REFERENCE))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_official_vqgan(dtype):
    """Reference produced by the official code on a small random-weight config (tests/data/README)."""
    ref = _reference()
    state = {k[len("state.") :]: v.to(dtype) for k, v in ref.items() if k.startswith("state.")}
    model = convert_official_vqgan(state).to(dtype)
    assert model.config.channel_mult == (1, 1, 2) and model.config.codebook_size == 64
    suffix = "64" if dtype == torch.float64 else "32"
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    images = ref["images"].to(dtype)
    with torch.inference_mode():
        z = model.encoder(images)
    torch.testing.assert_close(z, ref[f"z{suffix}"], rtol=0, atol=tol)
    codes = model.encode(images)
    assert torch.equal(codes, ref["codes"])
    with torch.inference_mode():
        raw = model.decoder(model.quantize.lookup(codes))
    torch.testing.assert_close(raw, ref[f"decoded_raw{suffix}"], rtol=0, atol=tol)
    torch.testing.assert_close(model.decode(codes), ref[f"decoded{suffix}"], rtol=0, atol=tol)
    if dtype == torch.float64:
        with torch.inference_mode():
            torch.testing.assert_close(model.quantize.lookup(codes), ref["zq64"], rtol=0, atol=0)
