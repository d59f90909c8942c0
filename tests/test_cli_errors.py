"""One error policy for the whole CLI: an error the user can cause prints one line naming the value
and the fix and exits with status 2; tracebacks only for bugs, or with --debug / RARGEN_DEBUG=1."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from rargen.checkpoint import save
from rargen.cli.main import main
from rargen.model import RAR, ModelConfig
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    save(RAR(ModelConfig.from_name("rar-tiny", codebook_size=32)), root / "gen")
    save(VQTokenizer(VQTokenizerConfig.from_name("vq-tiny")), root / "tok")
    return root, root / "gen", root / "tok"


def _one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--labels", ""], ["--labels", "'' is not a comma-separated list of ints"]),
        (["--labels", "1,x"], ["--labels", "'1,x'"]),
        (["--per-class", "0"], ["--per-class", "'0' is not a positive integer"]),
        (["--labels", "1", "--batch-size", "0"], ["--batch-size", "'0' is not a positive integer"]),
        (["--labels", "1", "--batch-size", "-1"], ["--batch-size", "'-1'"]),
        (["--labels", "1", "--batch-size", "many"], ["--batch-size", "'many' is not an integer"]),
        (["--labels", "1", "--top-k", "-3"], ["--top-k", "negative"]),
        (["--labels", "1", "--temperature", "0"], ["temperature must be > 0"]),
        (["--labels", "99"], ["labels must be classes in [0, 9]"]),
    ],
)
def test_bad_sample_flags(folders, capsys, flags: list[str], words: list[str]) -> None:
    root, gen, tok = folders
    argv = ["sample", str(gen), "--tokenizer", str(tok), "--out", str(root / "out"), *flags]
    code = _exit_code(argv)
    _one_line_error(capsys, code, *words)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's errors
        return int(stop.code)


def test_bad_values_of_other_commands(folders, capsys) -> None:
    root, gen, tok = folders
    cases = [
        (["serve", str(gen), "--tokenizer", str(tok), "--port", "70000"], ["--port", "out of range"]),
        (["serve", str(gen), "--tokenizer", str(tok), "--max-rows", "0"], ["--max-rows"]),
        (
            ["sweep", str(gen), "--tokenizer", str(tok), "--out", "o", "--cfg-scales", "1,,2"],
            ["--cfg-scales"],
        ),
        (["train", "--data", "x", "--out", "o", "--batch-size", "0"], ["batch_size", "positive integer"]),
        (["pretokenize", "--data", "x", "--tokenizer", str(tok), "--out", "o", "--batch-size", "-1"], ["-1"]),
        (["train-tokenizer", "--out", "o", "--steps", "0"], ["--steps"]),
        (["demo", "--threads", "0"], ["--threads"]),
    ]
    for argv, words in cases:
        _one_line_error(capsys, _exit_code(argv), *words)


def test_missing_and_unusable_files(folders, capsys) -> None:
    root, gen, tok = folders
    sample = ["--labels", "1", "--out", str(root / "o")]
    _one_line_error(
        capsys, main(["sample", str(root / "nope"), "--tokenizer", str(tok), *sample]), "no checkpoint"
    )
    _one_line_error(capsys, main(["sample", str(gen), "--tokenizer", str(root / "nope"), *sample]), "nope")
    (root / "afile").write_text("x")
    # A part of the output path is a file (ENOTDIR): an OSError of the user's making.
    line = _one_line_error(
        capsys,
        main(
            ["sample", str(gen), "--tokenizer", str(tok), "--labels", "1", "--out", str(root / "afile" / "o")]
        ),
    )
    assert "afile" in line
    _one_line_error(capsys, main(["convert", "official-rar", str(root / "afile"), "--out", str(root / "c")]))
    config = root / "list.json"
    config.write_text("[1, 2]")
    _one_line_error(
        capsys, main(["train", "--data", "x", "--out", "o", "--config", str(config)]), "JSON object"
    )
    config.write_text('{"steps": "ten"}')
    _one_line_error(capsys, main(["train", "--data", "x", "--out", "o", "--config", str(config)]), "steps")


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (errno.EACCES, ["Permission denied", "check its permissions"]),
        (errno.ENOSPC, ["No space left on device", "the disk is full"]),
        (errno.EROFS, ["Read-only file system", "choose a writable path"]),
    ],
)
def test_os_errors_of_the_environment(folders, capsys, monkeypatch, number: int, words: list[str]) -> None:
    """Permission denied, a full disk and a read-only file system while writing a checkpoint. (The
    test runs as root here, which chmod cannot stop, so the write itself raises the error.)"""
    import os

    root, gen, tok = folders

    def fail(tensors, path, metadata=None):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr("rargen.checkpoint.save_weights", fail)
    argv = ["convert", "official-rar", str(root / "rar.safetensors"), "--out", str(root / "conv")]
    from rargen.convert import save_official

    save_official(RAR(ModelConfig.from_name("rar-tiny")), root / "rar.safetensors")
    _one_line_error(capsys, main(argv), *words, "model.safetensors")


def test_bugs_keep_their_traceback_and_debug_shows_expected_ones(folders, monkeypatch) -> None:
    root, gen, tok = folders

    import functools

    import rargen.cli.sample

    # The stand-in keeps sample_to_folder's signature: `rargen sample`'s flags are read from it.
    @functools.wraps(rargen.cli.sample.sample_to_folder)
    def bug(*args, **kwargs):
        raise TypeError("a bug in rargen")

    argv = ["sample", str(gen), "--tokenizer", str(tok), "--labels", "1", "--out", str(root / "o")]
    monkeypatch.setattr("rargen.cli.sample.sample_to_folder", bug)
    with pytest.raises(TypeError, match="a bug in rargen"):
        main(argv)
    monkeypatch.undo()
    bad = ["sample", str(root / "nope"), "--tokenizer", str(tok), "--labels", "1", "--out", str(root / "o")]
    with pytest.raises(FileNotFoundError):
        main(["--debug", *bad])
    monkeypatch.setenv("RARGEN_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(bad)


def test_the_installed_command_prints_one_line(folders) -> None:
    root, gen, tok = folders
    argv = ["sample", str(gen), "--tokenizer", str(tok), "--labels", "", "--out", str(root / "o")]
    run = subprocess.run([sys.executable, "-m", "rargen", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "--labels" in run.stderr and "Traceback" not in run.stderr
