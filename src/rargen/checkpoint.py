"""Checkpoints as self-describing folders: ``config.json`` + ``model.safetensors``.

Every savable module (the RAR generator, the tokenizers, the digit classifier) carries a frozen
config dataclass in ``module.config`` and a class attribute ``checkpoint_kind``. ``save`` writes
the config (with its kind and the format version) and the weights atomically; ``load`` rebuilds
the module from the folder alone and loads the weights strictly, on the meta device first so a
large model never allocates twice.

Everything read from disk is checked before it is used: ``config.json`` field by field against
the config dataclass (types, then the config's own bounds, so a ``depth`` of 10**9 is refused
before a single block is built), the weights file's SHA-256 against the digest recorded at save
time (a flipped byte in the tensor data is refused, not sampled from). Every such problem is a
``CheckpointError`` naming the file, the field and the fix. Saving is deterministic: the same
weights give the same bytes, so the recorded digests are stable across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rargen.version import __version__
from rargen.weight_files import CheckpointError, check_state_dict, file_sha256, read_weights_file

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# kind -> "module:Class". Resolved lazily so that importing rargen imports no model code it
# does not need and so that modules can register themselves without import cycles.
_KINDS: dict[str, str] = {
    "rar": "rargen.model:RAR",
    "maskgit-vqgan": "rargen.tokenizers.vqgan:MaskGITVQGAN",
    "vq-tokenizer": "rargen.tokenizers.vq:VQTokenizer",
    "titok": "rargen.tokenizers.titok:TiTok",
    "digit-classifier": "rargen.demo.digit_classifier:DigitClassifier",
    "image-classifier": "rargen.evaluation.classifier:ImageClassifier",
}


def register_kind(kind: str, target: str) -> None:
    """Make ``load`` able to rebuild modules of ``kind`` (``target`` is ``"module:Class"``)."""
    _KINDS[kind] = target


def _module_class(kind: str) -> type[nn.Module]:
    if not isinstance(kind, str) or kind not in _KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known kinds: {sorted(_KINDS)}")
    module_name, class_name = _KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def atomic_write_dir(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an old folder).

    A crash while writing leaves at most a hidden temporary folder, never a half-written
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in both temporary names, so that `remove_stale_temporaries` can tell the
    # leftovers of a killed writer from the folder of a live one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
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


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(-.*)?$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Clean up after writers of ``atomic_write_dir`` that were killed, in ``folder``; return them.

    Only hidden folders of ``atomic_write_dir``'s naming whose writer process is gone (on this
    host) are touched, so a concurrent live writer is left alone. A ``.NAME.tmp-PID-*`` is a
    half-written folder and is removed. A ``.NAME.old-PID`` is the previous ``NAME`` moved aside
    just before the new one was renamed in: it is removed when ``NAME`` exists and renamed back
    when the kill came between the two renames (so no data is ever lost).
    """
    folder = Path(folder)
    handled = []
    if not folder.is_dir():
        return handled
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if _process_alive(int(match["pid"])):  # this process included: a thread may be writing it
            continue
        target = folder / match["name"]
        if match["what"] == "old" and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry)
        handled.append(entry)
    return handled


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _convert_field(value: Any, kind: Any, where: str) -> Any:
    """``value`` (parsed JSON) as the annotated type ``kind``, or a CheckpointError naming ``where``."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _convert_field(value, option, where)
            except CheckpointError:
                pass
        raise CheckpointError(f"{where} is {value!r}; expected {kind}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where} is {value!r}; expected a list")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise CheckpointError(f"{where} is {value!r}; expected a list of {len(args)}")
        # JSON has no tuples; configs use tuples to stay hashable and frozen.
        return tuple(
            _convert_field(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise CheckpointError(f"{where} is {value!r}; expected {kind.__name__}")
        return value
    if kind is int:  # bool is an int in Python, not in a config
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where} is {value!r}; expected an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{where} is {value!r}; expected a number")
        return float(value)
    if kind is type(None):
        if value is not None:
            raise CheckpointError(f"{where} is {value!r}; expected null")
        return value
    return value  # a type this reader does not know: the config's own checks apply


def config_from_dict(config_cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build ``config_cls`` from parsed JSON, checking every field's type, then the config's bounds.

    ``source`` names where the values came from in errors (a file path).
    """
    name = config_cls.__name__
    if not isinstance(values, dict):
        raise CheckpointError(
            f"{source}: the {name} is a {type(values).__name__}, expected an object of fields "
            f"({', '.join(f.name for f in dataclasses.fields(config_cls))})"
        )
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown {name} fields {unknown}; valid fields: {sorted(names)}")
    hints = typing.get_type_hints(config_cls)
    converted = {}
    for f in dataclasses.fields(config_cls):
        if f.name in values:
            converted[f.name] = _convert_field(
                values[f.name], hints.get(f.name, Any), f"{source}: {name}.{f.name}"
            )
    try:
        return config_cls(**converted)
    except (ValueError, TypeError) as error:  # the config's own checks (bounds, divisibility)
        raise CheckpointError(f"{source}: {error}") from None


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    safetensors serialises the metadata from a hash map whose order changes between processes,
    which made the bytes (and SHA-256) of two saves of the same weights differ. Sorting keeps the
    header's length, so the tensor data does not move.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        text = f.read(size)
        header = json.loads(text)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        fixed = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        fixed += b" " * (size - len(fixed))  # safetensors pads the header with spaces
        if len(fixed) != size:  # never expected: leave the file as safetensors wrote it
            return
        f.seek(8)
        f.write(fixed)


def save_weights(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> str:
    """Write ``tensors`` to a safetensors file, deterministically; return its SHA-256."""
    path = Path(path)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata
    )
    _canonical_header(path)
    return file_sha256(path)


def save(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save ``module`` (its config and weights) to the folder ``path``, atomically.

    ``extra`` is stored under ``"extra"`` in ``config.json`` (class names, provenance, ...).
    ``state_dict`` overrides the weights written (for example EMA weights of the same module).
    ``extra_weights`` maps more file names (``ema.safetensors``) to tensors written beside them.
    The SHA-256 of every weights file goes in ``config.json`` (``weights_sha256``); ``load``
    checks it.
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
        "rargen_version": __version__,
        "extra": extra or {},
    }

    def write(tmp: Path) -> None:
        digests = {WEIGHTS_NAME: save_weights(weights, tmp / WEIGHTS_NAME, {"format": "pt", "kind": kind})}
        for name, tensors in (extra_weights or {}).items():
            digests[name] = save_weights(tensors, tmp / name)
        full = record | {"weights_sha256": digests}
        (tmp / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")

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
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is not a file; it must be the checkpoint's JSON config")
    try:
        record = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(
            f"{config_file} is not valid JSON ({str(error)[:120]}); restore it or re-save the checkpoint"
        ) from None
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{config_file} holds a {type(record).__name__}; expected an object with "
            "format_version, kind and config"
        )
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key, kind in (("kind", str), ("config", dict), ("extra", dict), ("weights_sha256", dict)):
        if key not in record and key in ("extra", "weights_sha256"):
            continue  # optional (checkpoints saved before digests were recorded have none)
        if not isinstance(record.get(key), kind):
            raise CheckpointError(
                f"{config_file}: {key!r} is {'missing' if key not in record else repr(record[key])[:60]}; "
                f"expected a {'string' if kind is str else 'JSON object'} (re-save the checkpoint)"
            )
    if record["kind"] not in _KINDS:
        raise CheckpointError(
            f"{config_file}: unknown checkpoint kind {record['kind']!r}; known kinds: {sorted(_KINDS)}"
        )
    return record


def verify_weights(weight_file: Path, record: dict[str, Any]) -> None:
    """Compare ``weight_file``'s SHA-256 with the digest recorded in ``record`` (if any)."""
    expected = record.get("weights_sha256", {}).get(weight_file.name)
    if expected is None:
        return  # saved before digests were recorded
    found = file_sha256(weight_file)
    if found != expected:
        raise CheckpointError(
            f"{weight_file} is corrupt: its SHA-256 is {found[:16]}..., config.json records "
            f"{str(expected)[:16]}...; restore the file from a copy or re-save the checkpoint"
        )


def build(kind: str, config: Any, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Build a module of ``kind`` on the meta device and assign ``state_dict`` strictly."""
    cls = _module_class(kind)
    with torch.device("meta"):
        module = cls(config)
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval()


def load_official(source: str | os.PathLike | dict[str, torch.Tensor], kind: str | None = None) -> nn.Module:
    """Build a module (eval mode) from an official RAR generator or MaskGIT-VQGAN file or state dict.

    ``rargen.convert`` reads the official layout (``kind`` demands one of its kinds); this builds.
    """
    from rargen.convert import read_official

    kind, config, weights = read_official(source, kind)
    return build(kind, config, weights, "state dict" if isinstance(source, dict) else str(source))


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights: str = WEIGHTS_NAME,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a module from a checkpoint folder (strictly), in eval mode.

    ``path`` may also be an official RAR generator or MaskGIT-VQGAN file (``.bin`` or
    ``.safetensors`` with the official key layout); it is converted on the fly.
    ``weights`` picks another weight file of the folder (``ema.safetensors`` in training runs).
    ``verify`` checks the weights against the SHA-256 recorded at save time (about 1 s per GB
    on one CPU core; see BENCHMARKS.md).
    """
    path = Path(path)
    if path.is_file() and path.suffix in {".bin", ".pt", ".pth", ".safetensors"}:
        module = load_official(path)
    else:
        record = read_record(path)
        config_cls = _module_class(record["kind"]).config_class
        config = config_from_dict(config_cls, record["config"], str(path / CONFIG_NAME))
        weight_file = path / weights
        if not weight_file.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {weights}")
        state_dict = read_weights_file(weight_file)
        if verify:
            verify_weights(weight_file, record)
        module = build(record["kind"], config, state_dict, str(weight_file))
        module.checkpoint_extra = record.get("extra", {})
    return placed(module, device, dtype)


def placed(module: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``module`` moved to ``device`` (and cast to ``dtype`` when given), as ``load`` returns it."""
    return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights (the folder's ``model.safetensors`` or a single file).

    A folder's digest is the one recorded at save time when there is one (``load`` verifies it),
    so provenance costs no second read of the weights.
    """
    path = Path(path)
    if path.is_dir():
        recorded = read_record(path).get("weights_sha256", {}).get(WEIGHTS_NAME)
        return recorded if isinstance(recorded, str) else file_sha256(path / WEIGHTS_NAME)
    return file_sha256(path)


def state_sha256(module: nn.Module) -> str:
    """A hash of a module's weights and buffers (names, dtypes, shapes, bytes), independent of files.

    A token store records its tokenizer's, so a training run can check it has the same tokenizer.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
