"""The prepared decoder is kept with its model while the weights are unchanged, and only then."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch

import rargen.sampling.decoding as decoding
from conftest import requires
from rargen.model import RAR
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, generate, token_probs
from rargen.sampling.prepared import kept_count, release_prepared

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    requires(
        None if torch.backends.mkldnn.is_available() else "oneDNN in this torch build",
        "install a torch build with oneDNN; the x86 CPU wheels have it",
    ),
]

CONFIG = SampleConfig(cfg_scale=3.0, cfg_power=1.0)
LABELS = [0, 5]


@pytest.fixture
def model(tiny_model: RAR) -> RAR:
    return tiny_model.float()


@pytest.fixture
def packings(monkeypatch) -> list[int]:
    """Counts the oneDNN packings ``prepare_for_decoding`` makes."""
    calls: list[int] = []
    pack = decoding.packed_for_cpu_decoding

    def counted(model: RAR) -> RAR:
        calls.append(1)
        return pack(model)

    monkeypatch.setattr(decoding, "packed_for_cpu_decoding", counted)
    return calls


def probs(model: RAR) -> torch.Tensor:
    cfg, generator = model.config, torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.codebook_size, (2, cfg.num_image_tokens), generator=generator)
    return token_probs(model, LABELS, tokens, CONFIG)


def test_a_second_call_does_not_prepare_again(model: RAR, packings: list[int]) -> None:
    first = generate(model, LABELS, CONFIG, seeds=[1, 2])
    assert len(packings) == 1
    second = generate(model, LABELS, CONFIG, seeds=[1, 2])
    probs(model)
    assert len(packings) == 1 and torch.equal(first, second)
    assert prepare_for_decoding(model) is prepare_for_decoding(model)


def test_an_optimizer_step_prepares_anew_with_the_new_weights(model: RAR, packings: list[int]) -> None:
    before = probs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    tokens = torch.randint(0, model.config.codebook_size, (2, model.config.num_image_tokens))
    model(tokens, torch.tensor(LABELS)).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    after = probs(model)
    assert len(packings) == 2 and kept_count(model) == 1  # the stale decoder is dropped
    fresh = probs(copy.deepcopy(model))  # a model never prepared: the new weights' exact numbers
    assert torch.equal(after, fresh) and not torch.allclose(after, before)


def test_load_state_dict_and_dtype_changes_prepare_anew(model: RAR, packings: list[int]) -> None:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    probs(model)
    model.load_state_dict(other.state_dict())
    assert torch.equal(probs(model), probs(copy.deepcopy(other)))
    assert len(packings) == 3  # model twice, the copy once
    model.to(torch.bfloat16)
    prepare_for_decoding(model, bf16=True)
    assert len(packings) == 4


def test_options_are_kept_apart_and_release_forgets(model: RAR, packings: list[int]) -> None:
    plain, int8 = prepare_for_decoding(model), prepare_for_decoding(model, quantize="int8")
    assert int8.quantize == "int8" and plain.quantize is None and kept_count(model) == 2
    assert prepare_for_decoding(model, quantize="int8") is int8
    release_prepared(model)
    assert kept_count(model) == 0 and prepare_for_decoding(model) is not plain


def test_keeping_changes_nothing_saved_and_lets_the_model_go(tiny_config) -> None:
    model = RAR(tiny_config).eval()  # not a fixture: the test holds the only reference
    keys = list(model.state_dict())
    prepare_for_decoding(model)
    assert list(model.state_dict()) == keys and not any("packed" in k for k in keys)
    clone = copy.deepcopy(model)  # a deep copy has its own weights: prepared on its own
    assert kept_count(clone) == 0
    assert prepare_for_decoding(clone).model is not prepare_for_decoding(model).model
    torch.save(model, io.BytesIO())  # the model pickles as before (nothing unpicklable was added)
    gone = weakref.ref(model)
    del model, clone
    gc.collect()
    assert gone() is None  # the kept decoder does not hold its model alive


def test_a_float64_model_is_not_kept(tiny_model: RAR) -> None:
    assert prepare_for_decoding(tiny_model).model is tiny_model and kept_count(tiny_model) == 0


def test_a_training_preview_keeps_no_packed_copy(model: RAR, tmp_path) -> None:
    """Sample grids during training: the weights change before the next one, so nothing is kept."""
    from rargen.sampling.images import run_sample_hook

    def hook(raw: RAR, step: int, path) -> None:
        generate(raw, LABELS, CONFIG, seeds=[1, 2])
        assert kept_count(raw) == 1

    model.train()
    run_sample_hook(hook, model, 1, tmp_path)
    assert kept_count(model) == 0 and model.training
