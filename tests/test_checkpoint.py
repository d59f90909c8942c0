"""Checkpoint folders: round trip, strict loading with named errors, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rargen
from rargen.checkpoint import remove_stale_temporaries
from rargen.model import RAR
from rargen.weight_files import CheckpointError, read_weights_file


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
    with pytest.raises(CheckpointError, match=message):  # verify=False: past the digest check
        rargen.load(tmp_path / "ckpt", verify=False)


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


# ------------------------------------------------------------------------------ bad files on disk


def _edit_record(folder: Path, edit) -> None:
    config_file = folder / "config.json"
    record = json.loads(config_file.read_text())
    record = edit(record)
    config_file.write_text(json.dumps(record))


def _set(section: str | None, key: str, value):
    def edit(record):
        (record[section] if section else record)[key] = value
        return record

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # size fields: refused before anything is built (depth 10**9 used to build blocks for ever)
        (_set("config", "depth", 10**9), r"depth must be positive and at most 1024, got 1000000000"),
        (_set("config", "codebook_size", 2**40), r"codebook_size must be positive and at most 65536"),
        (_set("config", "num_classes", -1), r"num_classes must be in"),
        # wrong JSON types
        (_set("config", "dim", "192"), r"RAR|ModelConfig\.dim is '192'; expected an integer"),
        (_set("config", "dim", None), r"ModelConfig\.dim is None; expected an integer"),
        (_set("config", "depth", 2.5), r"ModelConfig\.depth is 2\.5; expected an integer"),
        (_set("config", "depth", True), r"ModelConfig\.depth is True; expected an integer"),
        (_set("config", "dropout", "0.1"), r"ModelConfig\.dropout is '0\.1'; expected a number"),
        (_set(None, "config", [1, 2]), r"'config' is \[1, 2\]; expected a JSON object"),
        (lambda r: {k: v for k, v in r.items() if k != "config"}, r"'config' is missing"),
        (_set(None, "kind", 5), r"'kind' is 5; expected a string"),
        (_set(None, "kind", "gan"), r"unknown checkpoint kind 'gan'"),
        (_set(None, "weights_sha256", "abc"), r"'weights_sha256' is 'abc'"),
        (lambda r: [r], r"holds a list; expected an object"),
        (lambda r: "text", r"holds a str; expected an object"),
    ],
)
def test_bad_config_json_is_one_clear_error(tmp_path: Path, tiny_model: RAR, edit, message: str) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    _edit_record(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message) as caught:
        rargen.load(tmp_path / "ckpt")
    assert "config.json" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe garbage", b"[" * 30_000])
def test_unparsable_config_json(tmp_path: Path, tiny_model: RAR, content: bytes) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        rargen.load(tmp_path / "ckpt")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("spoil", "message"),
    [(_truncate, "cannot be read"), (_garbage, "cannot be read"), (_folder, "not a regular file")],
)
def test_unreadable_weights_file(tmp_path: Path, tiny_model: RAR, spoil, message: str) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    spoil(tmp_path / "ckpt" / "model.safetensors")
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=message) as caught:
            rargen.load(tmp_path / "ckpt", verify=verify)
        assert "model.safetensors" in str(caught.value)


def test_corrupted_tensor_bytes_are_refused(tmp_path: Path, tiny_model: RAR) -> None:
    rargen.save(tiny_model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # one bit of the tensor data: still a valid file with plausible numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its SHA-256"):
        rargen.load(tmp_path / "ckpt")
    assert rargen.load(tmp_path / "ckpt", verify=False) is not None  # the bytes themselves still parse
    # A checkpoint saved before digests were recorded still loads (nothing to compare with).
    _edit_record(tmp_path / "ckpt", lambda r: {k: v for k, v in r.items() if k != "weights_sha256"})
    assert rargen.load(tmp_path / "ckpt") is not None


_SAVE_IN_A_PROCESS = """
import sys, torch, rargen
from rargen.checkpoint import checkpoint_hash, file_sha256
torch.manual_seed(0)
model = rargen.RAR(rargen.ModelConfig.from_name("rar-tiny"))
rargen.save(model, sys.argv[1])
print(file_sha256(sys.argv[1] + "/model.safetensors"), checkpoint_hash(sys.argv[1]))
"""


def test_saving_is_deterministic_across_processes(tmp_path: Path) -> None:
    """The safetensors metadata order used to change between processes (hash-map order), so the
    weights' SHA-256 in meta.json and PNG chunks did too. Four processes, one digest."""
    import subprocess
    import sys

    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVE_IN_A_PROCESS, str(tmp_path / f"ckpt{i}")], stdout=subprocess.PIPE
        )
        for i in range(4)
    ]
    digests = {tuple(run.communicate()[0].split()) for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(digests) == 1
    ((file_digest, recorded),) = digests
    assert file_digest == recorded  # the digest recorded in config.json is the file's SHA-256
    header = (tmp_path / "ckpt0" / "model.safetensors").read_bytes()[8:200]
    assert header.startswith(b'{"__metadata__":{"format":"pt","kind":"rar"}')


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_are_cleaned_up_safely(tmp_path: Path, tiny_model: RAR) -> None:
    import os

    dead = _dead_pid()
    half_written = tmp_path / f".step-0000004.tmp-{dead}-x1y2"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".step-0000006.tmp-{os.getpid()}-abcd"  # a writer that is still running
    live.mkdir()
    rargen.save(tiny_model, tmp_path / "step-0000002")
    os.rename(tmp_path / "step-0000002", tmp_path / f".step-0000002.old-{dead}")  # killed mid-swap
    rargen.save(tiny_model, tmp_path / "step-0000003")
    (tmp_path / f".step-0000003.old-{dead}").mkdir()  # the swap finished; the old copy is spare
    unrelated = tmp_path / ".keep.tmp-notapid"
    unrelated.mkdir()

    handled = remove_stale_temporaries(tmp_path)
    assert len(handled) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, unrelated.name, "step-0000002", "step-0000003"])
    assert rargen.load(tmp_path / "step-0000002").config == tiny_model.config  # restored, not lost


def test_legacy_torch_save_format_loads_with_weights_only(tmp_path: Path) -> None:
    """Official .bin files written by old torch (non-zip) cannot be memory-mapped; they are read
    into memory, still with weights_only=True."""
    import argparse

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "zip.bin")
    for name in ("legacy.bin", "zip.bin"):
        loaded = read_weights_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"a": argparse.Namespace(x=1)}, tmp_path / "objects.bin")  # not only tensors
    with pytest.raises(CheckpointError, match="objects other than tensors, refused"):
        read_weights_file(tmp_path / "objects.bin")
    _garbage(tmp_path / "garbage.bin")
    with pytest.raises(CheckpointError, match="garbage.bin cannot be read"):
        rargen.load(tmp_path / "garbage.bin")
