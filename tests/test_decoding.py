"""The decoding batch keeps its rows' positions on the device: a step copies nothing from the host."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import DecodeBatch, prepare_for_decoding
from rargen.sampling.engine import SampleConfig, Sampler, draw_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> RAR:
    return randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()


@pytest.fixture
def host_copies(monkeypatch) -> list:
    """The values of every ``torch.tensor`` call made while it is watched (a host-to-device copy
    on an accelerator; each step used to make one of its rows' positions)."""
    calls: list = []
    make = torch.tensor

    def counted(data, *args, **kwargs):
        calls.append(data)
        return make(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted)
    return calls


def test_steps_keep_positions_on_the_device(model: RAR, host_copies: list) -> None:
    batch = DecodeBatch(prepare_for_decoding(model), 6)
    with torch.inference_mode():
        batch.add([1, 2, 3])
        batch.step()  # the first step computes the modulation tables
        batch.add([4, 10])  # rows at another position: two runs per step
        batch.step()
        batch.remove([1])  # the last row moves into the hole
        host_copies.clear()
        for _ in range(5):
            batch.step()
    assert host_copies == []
    assert batch.positions == [9, 8, 9, 8]
    assert batch._positions[: len(batch)].tolist() == batch.positions


def test_sampler_steps_copy_nothing_from_the_host(model: RAR, host_copies: list) -> None:
    """A whole sampler step (guidance, filtering, the race, the next inputs) between two changes
    of the batch: its index tensors are made when the batch changes, not per step."""
    L, V = model.config.num_image_tokens, model.config.codebook_size
    sampler = Sampler(prepare_for_decoding(model), 3)
    with torch.inference_mode():
        sampler.add([1, 2], SampleConfig(cfg_scale=2.0, top_k=5), noise=draw_noise((2, L, V), "cpu"))
        sampler.add([3], SampleConfig(), noise=draw_noise((1, L, V), "cpu"))
        sampler.step()
        host_copies.clear()
        for _ in range(5):
            sampler.step()
    assert host_copies == []
