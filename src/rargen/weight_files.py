"""Weight files: reading one (``.safetensors`` or ``torch.save`` with ``weights_only``), its
SHA-256, describing a state dict in an error message, and comparing a state dict with the one a
module expects.

The lowest layer under ``checkpoint`` (rargen's folders) and ``convert`` (the official files): it
imports nothing from rargen, so both can use it without an import circle.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is (the message names the file and the fix)."""


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

    Every way a file can be unreadable (truncated, garbage, a folder in its place, the legacy
    non-zip ``torch.save`` format, a pickle with objects other than tensors) is a CheckpointError
    naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a folder?); it must be a weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only: never unpickle arbitrary objects from a downloaded file. mmap only works on
        # the zip format; the legacy format (torch < 1.6, `_use_new_zipfile_serialization=False`)
        # is read into memory, still with weights_only.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        if isinstance(error, (MemoryError, RecursionError)):
            raise
        if "Unsupported global" in str(error):  # weights_only refused a class in the pickle
            raise CheckpointError(
                f"{path} is a pickle with objects other than tensors, refused (weights_only=True): "
                "convert it to a plain state dict of tensors or to .safetensors"
            ) from None
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
        raise CheckpointError(
            f"{path} cannot be read as a weights file ({reason}); it is truncated, corrupt or not a "
            "weights file: restore or re-download it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def check_state_dict(expected: dict[str, Any], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if mis_shaped:
        problems.append("mis-shaped tensors [" + "; ".join(mis_shaped) + "]")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + ", ".join(problems))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_state(state: dict[str, Any], limit: int = 6) -> str:
    """A state dict in one line for an error message: its size and first keys with their shapes."""
    keys = list(state)
    shown = ", ".join(f"{k} {tuple(getattr(state[k], 'shape', ()))}" for k in keys[:limit])
    return f"{len(keys)} entries ({shown}{', ...' if len(keys) > limit else ''})"
