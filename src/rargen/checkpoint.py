"""Checkpoints as self-describing folders: ``config.json`` + ``model.safetensors``.

Every savable module (the RAR generator, the tokenizers, the digit classifier) carries a frozen
config dataclass in ``module.config`` and a class attribute ``checkpoint_kind``. ``save`` writes
the config (with its kind and the format version) and the weights atomically; ``load`` rebuilds
the module from the folder alone and loads the weights strictly, on the meta device first so a
large model never allocates twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# kind -> "module:Class". Resolved lazily so that importing rargen imports no model code it
# does not need and so that modules can register themselves without import cycles.
_KINDS: dict[str, str] = {
    "rar": "rargen.model:RAR",
    "maskgit-vqgan": "rargen.vqgan:MaskGITVQGAN",
    "vq-tokenizer": "rargen.vq_tokenizer:VQTokenizer",
    "titok": "rargen.titok:TiTok",
    "digit-classifier": "rargen.digits:DigitClassifier",
}


def register_kind(kind: str, target: str) -> None:
    """Make ``load`` able to rebuild modules of ``kind`` (``target`` is ``"module:Class"``)."""
    _KINDS[kind] = target


def _module_class(kind: str) -> type[nn.Module]:
    if kind not in _KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known kinds: {sorted(_KINDS)}")
    module_name, class_name = _KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _version() -> str:
    from rargen import __version__

    return __version__


def atomic_write_dir(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an old folder).

    A crash while writing leaves at most a hidden temporary folder, never a half-written
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(config_cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields {unknown}; valid fields: {sorted(names)}")
    converted = {}
    for f in dataclasses.fields(config_cls):
        if f.name in values:
            value = values[f.name]
            # JSON has no tuples; configs use tuples to stay hashable and frozen.
            converted[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**converted)


def save(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``module`` (its config and weights) to the folder ``path``, atomically.

    ``extra`` is stored under ``"extra"`` in ``config.json`` (class names, provenance, ...).
    ``state_dict`` overrides the weights written (for example EMA weights of the same module).
    """
    kind = getattr(type(module), "checkpoint_kind", None)
    if kind is None or not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} is not a rargen checkpoint module (no checkpoint_kind)")
    weights = state_dict if state_dict is not None else module.state_dict()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    record = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config_to_dict(module.config),
        "rargen_version": _version(),
        "extra": extra or {},
    }

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "kind": kind})
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")

    return atomic_write_dir(path, write)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, with clear errors for a bad folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; a rargen checkpoint is a folder with {CONFIG_NAME}")
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}; is it a rargen checkpoint folder?")
    record = json.loads(config_file.read_text())
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{config_file}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    return record


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
        raise ValueError(f"{source} does not match the model: " + ", ".join(problems))


def build(kind: str, config: Any, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Build a module of ``kind`` on the meta device and assign ``state_dict`` strictly."""
    cls = _module_class(kind)
    with torch.device("meta"):
        module = cls(config)
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers were created on the meta device; let the module rebuild them.
    if hasattr(module, "init_buffers"):
        module.init_buffers()
    return module.eval()


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights: str = WEIGHTS_NAME,
) -> nn.Module:
    """Rebuild a module from a checkpoint folder (strictly), in eval mode.

    ``path`` may also be an official RAR generator or MaskGIT-VQGAN file (``.bin`` or
    ``.safetensors`` with the official key layout); it is converted on the fly.
    ``weights`` picks another weight file of the folder (``ema.safetensors`` in training runs).
    """
    path = Path(path)
    if path.is_file() and path.suffix in {".bin", ".pt", ".pth", ".safetensors"}:
        from rargen.convert import load_official

        module = load_official(path)
    else:
        record = read_record(path)
        config_cls = _module_class(record["kind"]).config_class
        config = config_from_dict(config_cls, record["config"])
        weight_file = path / weights
        if not weight_file.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {weights}")
        module = build(record["kind"], config, load_file(str(weight_file)), str(weight_file))
        module.checkpoint_extra = record.get("extra", {})
    return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights (the folder's ``model.safetensors`` or a single file)."""
    path = Path(path)
    return file_sha256(path / WEIGHTS_NAME if path.is_dir() else path)
