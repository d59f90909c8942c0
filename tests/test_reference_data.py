"""Integrity of the committed official reference data (tests/data), checked without the official code.

These pin the documented layout (tests/data/README.md) so parity tests can rely on it, and re-derive
the parts of the references that follow from simple facts of the official implementation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"


def _load(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = DATA / name
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def _rar_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, mlp, length = cfg["hidden_size"], cfg["intermediate_size"], cfg["image_seq_len"]
    hd = d // cfg["num_attention_heads"]
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, length + 1024, d),
        "target_aware_pos_embed": (1, length + 1024, d),
        "timesteps_embeddings": (1, length + 100, d),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.q_norm.weight": (hd,), p + "attn.q_norm.bias": (hd,),
            p + "attn.k_norm.weight": (hd,), p + "attn.k_norm.bias": (hd,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (mlp, d), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (d, mlp), p + "mlp.fc2.bias": (d,),
            p + "adaLN_modulation.1.weight": (6 * d, d), p + "adaLN_modulation.1.bias": (6 * d,),
        })  # fmt: skip
    vocab, ncls = cfg["codebook_size"], cfg["condition_num_classes"]
    shapes.update({
        "embeddings.weight": (vocab + ncls + 2, d),
        "adaln_before_head.adaLN_modulation.1.weight": (2 * d, d),
        "adaln_before_head.adaLN_modulation.1.bias": (2 * d,),
        "lm_head.weight": (vocab, d), "lm_head.bias": (vocab,),
    })  # fmt: skip
    return shapes


@pytest.mark.parametrize("name", ["a", "b"])
def test_rar_reference_layout(name: str) -> None:
    t, meta = _load(f"official_rar_{name}.safetensors")
    cfg = json.loads(meta["config"])
    order = json.loads(meta["config_ints_order"])
    assert t["config_ints"].tolist() == [cfg[k] for k in order]
    state = {k[len("state.") :]: v for k, v in t.items() if k.startswith("state.")}
    assert {k: tuple(v.shape) for k, v in state.items()} == _rar_expected_shapes(cfg)
    for key, value in state.items():
        assert value.dtype == torch.float16 and bool((value != 0).all()), key
    # adaLN-zero and LayerNorm defaults were really replaced by random values
    for key in (k for k in state if "norm" in k and k.endswith("weight")):
        assert bool((state[key] != 1).all()), key
    assert state["adaln_before_head.adaLN_modulation.1.weight"].double().std() > 0.05

    b, length, vocab, ncls = 3, cfg["image_seq_len"], cfg["codebook_size"], cfg["condition_num_classes"]
    assert t["labels"].min() >= 0 and t["labels"].max() == ncls  # at least one null row
    assert torch.equal(t["conditions"], t["labels"] + vocab + 1)
    assert torch.equal(t["orders_raster"], torch.arange(length).repeat(b, 1))
    assert torch.equal(t["orders_random"].sort(dim=1).values, torch.arange(length).repeat(b, 1))
    assert t["gen_labels"].max() < ncls
    for key in ("logits64_raster", "logits64_random", "probs64_cfg_a", "probs64_cfg_b", "probs64_cfg_c"):
        assert t[key].shape == (b, length, vocab) and t[key].dtype == torch.float64
        low = t[key.replace("64", "32")]
        assert low.dtype == torch.float32 and (low.double() - t[key]).abs().max() < 1e-5
    for case in ("cfg_a", "cfg_b", "cfg_c"):
        sums = t[f"probs64_{case}"].sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["a", "b"])
def test_guidance_weights_are_the_float32_power_cosine_schedule(name: str) -> None:
    t, meta = _load(f"official_rar_{name}.safetensors")
    length = json.loads(meta["config"])["image_seq_len"]
    settings = json.loads(meta["generate_settings"])
    for case in ("cfg_a", "cfg_b"):
        g, p = settings[case]["guidance_scale"], settings[case]["guidance_scale_pow"]
        steps = (torch.arange(length, dtype=torch.float64) / length).float()
        weights = (g - 1) * (1 - torch.cos(steps ** torch.tensor(p) * math.pi)) / 2 + 1
        assert torch.equal(weights, t[f"guidance_weights_{case}"])
    assert t["guidance_weights_cfg_a"][0] == 1.0 and t["guidance_weights_cfg_a"][-1] < 4.0


def test_vqgan_reference_is_self_consistent() -> None:
    t, meta = _load("official_vqgan_small.safetensors")
    cfg = json.loads(meta["config"])
    assert t["config_channel_mult"].tolist() == cfg["channel_mult"] == [1, 1, 2]
    state = {k[len("state.") :]: v.double() for k, v in t.items() if k.startswith("state.")}
    assert len(state) == 114
    assert state["encoder.down.2.block.0.nin_shortcut.weight"].shape == (64, 64, 1, 1)
    assert state["decoder.up.1.block.0.nin_shortcut.weight"].shape == (32, 32, 1, 1)
    book = state["quantize.embedding.weight"]
    assert book.shape == (cfg["num_embeddings"], cfg["embedding_dim"])
    images = t["images"]
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1

    # codes are the nearest codebook entries of z (row-major grid), and zq is their lookup
    z = t["z64"].permute(0, 2, 3, 1)
    nearest = torch.cdist(z.reshape(-1, z.shape[-1]), book).argmin(dim=1).reshape(2, 8, 8)
    assert torch.equal(nearest, t["codes"])
    assert torch.equal(book[t["codes"]].permute(0, 3, 1, 2), t["zq64"])
    assert torch.equal(t["decoded64"], t["decoded_raw64"].clamp(0, 1))
    assert torch.equal(t["decoded32"], t["decoded_raw32"].clamp(0, 1))
    assert (t["decoded_raw64"] - t["decoded_raw32"].double()).abs().max() < 1e-4
