"""Parity with the official RAR: converted official weights reproduce the official logits.

The reference tensors were produced by running the official code (bytedance/1d-tokenizer) side
by side on random weights in which every parameter is non-zero; see tests/data/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rargen.checkpoint import build
from rargen.convert import from_official, to_official
from rargen.model import RAR

DATA = Path(__file__).parent / "data"


def load_reference(name: str, dtype: torch.dtype) -> tuple[RAR, dict[str, torch.Tensor]]:
    tensors = load_file(str(DATA / f"official_rar_{name}.safetensors"))
    official = {k[len("state.") :]: v.to(dtype) for k, v in tensors.items() if k.startswith("state.")}
    config, state = from_official(official)
    return build("rar", config, state, name), tensors


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize(
    ("dtype", "bits", "atol"), [(torch.float64, "64", 1e-9), (torch.float32, "32", 2e-5)]
)
def test_logits_match_official(name: str, order: str, dtype: torch.dtype, bits: str, atol: float) -> None:
    model, ref = load_reference(name, dtype)
    logits = model(ref["tokens"], ref["labels"], ref[f"orders_{order}"])
    expected = ref[f"logits{bits}_{order}"]
    assert logits.dtype == dtype and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["a", "b"])
def test_raster_equals_no_orders_on_official_weights(name: str) -> None:
    model, ref = load_reference(name, torch.float64)
    torch.testing.assert_close(model(ref["tokens"], ref["labels"]), ref["logits64_raster"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["a", "b"])
def test_to_official_returns_the_official_tensors_for_used_rows(name: str) -> None:
    """rargen -> official -> rargen is exact, and to_official reproduces every used row."""
    model, ref = load_reference(name, torch.float64)
    back = to_official(model)
    official = {k[len("state.") :]: v.double() for k, v in ref.items() if k.startswith("state.")}
    assert set(back) == set(official)
    L, V = model.config.num_image_tokens, model.config.codebook_size
    used_rows = {
        "pos_embed": (slice(None), slice(0, L + 2)),
        "target_aware_pos_embed": (slice(None), slice(2, L + 2)),
        "timesteps_embeddings": (slice(None), slice(0, L + 2)),
    }
    for key, value in official.items():
        index = used_rows.get(key, slice(None))
        if key == "embeddings.weight":
            keep = torch.ones(value.shape[0], dtype=torch.bool)
            keep[V] = False
            index = keep
        assert torch.equal(back[key][index], value[index]), key
