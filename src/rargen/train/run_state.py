"""The saved state of a training run, for both trainers (the RAR generator's and the tokenizer's).

A run checkpoint is a ``rargen.load``-able checkpoint folder plus ``train_state.pt`` (optimizer,
step, random streams: what an exact resume needs) and any small files the trainer adds, written
atomically (a killed writer leaves a hidden temporary folder that the next start removes).
A generator run keeps its checkpoints as ``checkpoints/step-XXXXXXX`` (the last k kept); the
tokenizer trainer rewrites one folder. ``MetricsLogger`` appends the run's scalars to
``metrics.jsonl`` and drops rows logged after the checkpoint a run resumes from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rargen.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_dir,
    read_record,
    remove_stale_temporaries,
    save,
    verify_weights,
)
from rargen.weight_files import read_weights_file

TRAIN_STATE = "train_state.pt"


def check_settings_record(record: Path, settings: dict[str, Any], what: str, fix: str) -> None:
    """Resumable work (a demo, a study) records its settings in ``record``: a rerun with the same
    settings picks up where it stopped; other settings are refused before any work, naming the
    fields that differ (``train.seed``: nested configs are nested JSON objects) and ``fix``, and so
    are settings of another shape (a folder of an older rargen, whose configs nested otherwise)."""
    settings = json.loads(json.dumps(settings))  # tuples as lists: as read back
    if record.exists():
        saved, now = _dotted(json.loads(record.read_text())), _dotted(settings)
        if saved.keys() != now.keys():
            odd = sorted(saved.keys() ^ now.keys())
            raise ValueError(
                f"{record.parent} holds {what} whose {record.name} has other fields ({', '.join(odd[:4])}"
                f"{', ...' if len(odd) > 4 else ''}): made by another version of rargen; {fix}"
            )
        changed = [name for name in now if saved[name] != now[name]]
        if changed:
            raise ValueError(
                f"{record.parent} holds {what} with other settings ({', '.join(changed)}); {fix}"
            )
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process: a second process writing the same run folder (the same
    study shard started twice, a repeated command) would append to the same ``metrics.jsonl``,
    race on its checkpoints and take the first one's temporaries for stale; it is refused, naming
    the process that holds the folder. The lock (``flock``) ends with the process, so a killed run
    leaves nothing to clean up."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = (out / LOCK_NAME).open("a+")
    except OSError as error:
        raise ValueError(
            f"cannot write to the output folder {str(out)!r} ({error}); pass another --out"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"{out} is in use by {holder}; wait for it to finish, stop it, or pass another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def _dotted(settings: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    if not isinstance(settings, dict) or not settings:
        return {prefix.rstrip("."): settings}
    return {k: v for name, value in settings.items() for k, v in _dotted(value, f"{prefix}{name}.").items()}


def step_folder(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are hidden dot-names)."""
    folder = run / "checkpoints"
    found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)] if folder.is_dir() else []
    return sorted((p for p in found if (p / TRAIN_STATE).is_file()), key=lambda p: int(p.name[5:]))


def open_run_folder(out: Path, resume: bool) -> Path | None:
    """Check that ``out`` is writable and clean up after a killed writer; the newest checkpoint to
    resume from (None for a new run). Checkpoints without ``resume`` are an error: never overwritten."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write to the output folder {str(out)!r} ({error}); pass another --out"
        ) from None
    # Half-written checkpoint folders of a killed run (only one process writes them, and it is here).
    remove_stale_temporaries(out / "checkpoints")
    remove_stale_temporaries(out)
    found = checkpoints(out)
    if found and not resume:
        raise ValueError(
            f"{out} already holds checkpoints (newest {found[-1].name}); pass --resume or another --out"
        )
    return found[-1] if found else None


def write_final(out: Path) -> Path:
    """Copy the newest checkpoint's weights and config to ``out/final`` (atomically)."""
    newest = checkpoints(out)[-1]
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME, "ema.safetensors") if (newest / n).is_file()]
    return atomic_write_dir(out / "final", lambda tmp: [shutil.copy2(newest / n, tmp / n) for n in names])


def write_checkpoint(
    path: Path,
    module: nn.Module,
    train_state: dict[str, Any],
    *,
    extra: dict[str, Any],
    state_dict: dict[str, Tensor] | None = None,
    extra_weights: dict[str, dict[str, Tensor]] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``module`` (or ``state_dict``), ``train_state`` and text ``files`` to ``path`` atomically."""

    def write(tmp: Path) -> None:
        save(module, tmp, state_dict=state_dict, extra=extra, extra_weights=extra_weights)
        torch.save(train_state, tmp / TRAIN_STATE)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    return atomic_write_dir(path, write)


def keep_last(run: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoint folders of a run."""
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(
    path: Path, map_location: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor], Any]:
    """``(config.json record, verified model weights, train_state)`` of a run checkpoint."""
    record = read_record(path)
    weights = read_weights(path, WEIGHTS_NAME, record)
    return record, weights, torch.load(path / TRAIN_STATE, map_location=map_location, weights_only=True)


def read_weights(path: Path, name: str, record: dict[str, Any]) -> dict[str, Tensor]:
    """The weight file ``name`` of a checkpoint folder, checked against the digest in ``record``."""
    weights = read_weights_file(path / name)
    verify_weights(path / name, record)
    return weights


class MetricsLogger:
    """Scalars to ``metrics.jsonl`` (and TensorBoard when it is installed); rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        if self.path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
