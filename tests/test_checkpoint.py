"""Checkpoint folders: round trip, strict loading with named errors, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rargen
from rargen.model import RAR


def test_round_trip(tmp_path: Path, tiny_model: RAR) -> None:
    rargen.save(tiny_model.float(), tmp_path / "ckpt", extra={"class_names": list("abcdefghij")})
    loaded = rargen.load(tmp_path / "ckpt")
    assert loaded.config == tiny_model.config
    assert not loaded.training
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded.checkpoint_extra["class_names"][0] == "a"
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["kind"] == "rar" and record["format_version"] == 1
    tokens, labels = torch.randint(0, 32, (2, 16)), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(tokens, labels), tiny_model(tokens, labels), rtol=0, atol=0)


def _tamper(folder: Path, change) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("head.bias"), r"missing tensors \['head.bias'\]"),
        (lambda w: w.update(extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
        (lambda w: w.update({"head.bias": torch.zeros(3)}), r"head.bias: expected \(32,\), found \(3,\)"),
    ],
)
def test_strict_loading_names_the_tensor(tmp_path: Path, tiny_model: RAR, change, message: str) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", change)
    with pytest.raises(ValueError, match=message):
        rargen.load(tmp_path / "ckpt")


def test_missing_and_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        rargen.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        rargen.load(tmp_path / "empty")


def test_unknown_config_field_is_an_error(tmp_path: Path, tiny_model: RAR) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    record = json.loads(config_file.read_text())
    record["config"]["dimm"] = 3
    config_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="dimm"):
        rargen.load(tmp_path / "ckpt")


def test_save_is_atomic(tmp_path: Path, tiny_model: RAR, monkeypatch) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("rargen.checkpoint.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        rargen.save(randomize_copy(tiny_model), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def randomize_copy(model: RAR) -> RAR:
    from conftest import randomize

    return randomize(RAR(model.config), seed=9)
