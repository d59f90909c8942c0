"""The token store: pre-tokenized images as memory-mapped ``uint16`` shards, written by ``pretokenize``
(read by ``rargen.data.token_store.TokenStore``, also importable from here).

Layout of a store folder (format version 1)::

    meta.json                  # written last: its presence marks a complete store (see ``TokenStore``)
    report.json                # counts (per class too), throughput, every skipped (unreadable) image
                               # with its error, what the source left out before reading and why
    plan.json                  # the settings of the run; a resumed run must match it
    shard-00000/tokens.npy     # (n, V, *grid) uint16 codes, V = variants per image; grid = the tokenizer's
                               # token_shape: (h, w) row-major for 2D tokenizers, (K,) for 1D (TiTok)
    shard-00000/labels.npy     # (n,) int64 class index (0 for unconditional data)
    shard-00000/info.json      # source range, images stored, images skipped
    ...

Shard ``i`` holds source images ``[i * shard_size, (i + 1) * shard_size)`` minus the unreadable ones.
A shard is written into a hidden temporary folder and renamed, so a crash never leaves a half-written
shard visible; rerunning the same command keeps finished shards and redoes the rest. Under torchrun
shard ``i`` belongs to rank ``i % world_size`` and rank 0 writes ``meta.json`` once all shards exist.
Unlike the official single JSONL with one line per crop (spec §2.5), an epoch here is each *image*
once; the loader picks one of its V variants per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rargen import distributed
from rargen.checkpoint import state_sha256
from rargen.data.preprocess import crop_shape, image_variants, num_variants
from rargen.data.sources import DEFAULT_MAX_PIXELS, ImageSource, describe_read, open_source
from rargen.data.split import SPLIT_SEED, describe_split, split_parts
from rargen.data.token_store import (  # noqa: F401 - rargen.data.store's names too
    MAX_CODEBOOK_SIZE,
    META_NAME,
    PLAN_NAME,
    REPORT_NAME,
    STORE_FORMAT,
    STORE_VERSION,
    TOKEN_DTYPE,
    TokenStore,
    shard_name,
)
from rargen.tokenizers.base import token_shape_of


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _write_shard(out: Path, index: int, tokens: np.ndarray, labels: np.ndarray, info: dict[str, Any]) -> None:
    from rargen.checkpoint import atomic_write_dir

    def write(tmp: Path) -> None:
        np.save(tmp / "tokens.npy", np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))
        np.save(tmp / "labels.npy", np.ascontiguousarray(labels, dtype=np.int64))
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    atomic_write_dir(out / shard_name(index), write)


def _shard_done(out: Path, index: int) -> bool:
    return (out / shard_name(index) / "info.json").is_file()


def _remove_stale_temporaries(out: Path, index: int) -> None:
    # Leftovers of a killed writer of this shard (only this rank ever writes it).
    for stale in out.glob(f".{shard_name(index)}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _finalize(
    out: Path, plan: dict[str, Any], extra_meta: dict[str, Any], excluded: Sequence[dict[str, str]] = ()
) -> None:
    """Check every shard exists, then write ``report.json`` and (last) ``meta.json``; a store whose
    every image was skipped is refused (after the report, which lists why each was)."""
    missing = [shard_name(i) for i in range(plan["num_shards"]) if not _shard_done(out, i)]
    if missing:
        raise RuntimeError(
            f"{out}: shards {missing[:5]}{' ...' if len(missing) > 5 else ''} are not written yet (other "
            "ranks still running or killed?); rerun the same command to finish them and write meta.json"
        )
    infos = [json.loads((out / shard_name(i) / "info.json").read_text()) for i in range(plan["num_shards"])]
    skipped = [item for info in infos for item in info["skipped"]]
    seconds = sum(info["seconds"] for info in infos)
    stored = sum(info["num_images"] for info in infos)
    per_class = np.zeros(len(plan["class_names"]), dtype=np.int64)
    for i in range(plan["num_shards"] if plan["class_names"] else 0):
        labels = np.load(out / shard_name(i) / "labels.npy")
        labels = labels[(labels >= 0) & (labels < len(per_class))]  # write_store takes any labels
        per_class += np.bincount(labels, minlength=len(per_class))
    report = {
        "num_source_images": plan["num_source_images"],
        "num_images": stored,
        "classes": [
            {"name": n, "images": int(c)} for n, c in zip(plan["class_names"], per_class, strict=True)
        ],
        "excluded": list(excluded),  # what the source left out before reading (a folder's scan)
        "num_skipped": len(skipped),
        "skipped": skipped,
        "tokenizer_seconds_total": round(seconds, 3),
        "images_per_second": round((stored + len(skipped)) / seconds, 2) if seconds > 0 else None,
    }
    _write_json(out / REPORT_NAME, report)
    if stored == 0 and plan["num_source_images"] > 0:
        where = plan["source"].get("path") or plan["source"].get("type")
        raise ValueError(
            f"no readable image in {where!r}: all {len(skipped)} were skipped (each listed with its "
            f"reason in {out / REPORT_NAME}); fix the images and rerun"
        )
    from rargen.version import __version__

    meta = {
        **plan,
        **extra_meta,
        "rargen_version": __version__,
        "num_images": stored,
        "num_skipped": len(skipped),
        "shards": [{"name": shard_name(i), "num_images": info["num_images"]} for i, info in enumerate(infos)],
    }
    _write_json(out / META_NAME, meta)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Refuse to mix two different runs in one folder; record the plan for future resumes.

    An unchanged plan is not rewritten, so that a complete store on a read-only disk can be checked.
    """
    for name in (META_NAME, PLAN_NAME):
        if (out / name).is_file():
            found = json.loads((out / name).read_text())
            found = {key: found.get(key) for key in plan}
            differing = sorted(key for key in plan if found[key] != plan[key])
            if differing:
                raise ValueError(
                    f"{out} holds a store made with different settings ({', '.join(differing)}: "
                    f"{[found[k] for k in differing]} there, {[plan[k] for k in differing]} now); "
                    "pass another --out or delete the folder"
                )
    recorded = out / PLAN_NAME
    if (out / META_NAME).is_file() or (recorded.is_file() and json.loads(recorded.read_text()) == plan):
        return
    _write_json(recorded, plan)


def _load_variants(source: ImageSource, index: int, image_size: Any, augment: str) -> np.ndarray | str:
    """(V, S, S, 3) uint8 crops of one image, or the error text if it cannot be read."""
    try:
        crops = image_variants(source.load(index), image_size, augment)
        return np.stack([np.asarray(crop, dtype=np.uint8) for crop in crops])
    except Exception as error:  # noqa: BLE001 - any decode failure skips the image, never the run
        return f"{type(error).__name__}: {error}"


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[int], Any], items: Sequence[int], depth: int
) -> Iterator:
    """``pool.map`` in order, with at most ``depth`` items decoded ahead (bounded memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encode(tokenizer: nn.Module, crops: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """(b, S, S, 3) uint8 crops -> (b, *grid) codes as uint16, checked against the tokenizer's promises."""
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)  # (b, 3, S, S) in [0, 1]
    with torch.inference_mode():
        codes = tokenizer.encode(images.to(_module_device(tokenizer))).to("cpu", torch.int64)
    if tuple(codes.shape) != (len(crops), *grid):
        expected = (len(crops), *grid)
        raise ValueError(f"tokenizer returned codes of shape {tuple(codes.shape)}, expected {expected}")
    codebook_size = int(tokenizer.codebook_size)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(f"tokenizer returned codes outside [0, {codebook_size})")
    return codes.numpy().astype(TOKEN_DTYPE)


def _tokenize_range(
    source: ImageSource,
    tokenizer: nn.Module,
    indices: range,
    pool: ThreadPoolExecutor,
    image_size: int | tuple[int, int],
    augment: str,
    batch_size: int,
    grid: tuple[int, ...],
    bar: Any,
    read_ahead: int,
) -> tuple[np.ndarray, list[int], list[dict[str, Any]]]:
    """Tokens (n, V, *grid) of the readable images in ``indices``, their indices, and the skipped ones.

    Batches hold whole images and depend only on ``batch_size``, so a resumed shard is computed
    exactly as it would have been in one run.
    """
    variants = num_variants(augment)
    images_per_call = max(1, batch_size // variants)
    batches: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    load = partial(_load_variants, source, image_size=image_size, augment=augment)
    for index, result in zip(indices, _bounded_map(pool, load, indices, read_ahead), strict=True):
        if isinstance(result, str):
            skipped.append({"index": index, "name": source.name(index), "error": result})
        else:
            kept.append(index)
            pending.append(result)
            if len(pending) == images_per_call:
                batches.append(_encode(tokenizer, np.concatenate(pending), grid))
                pending = []
        bar.update(1)
    if pending:
        batches.append(_encode(tokenizer, np.concatenate(pending), grid))
    batches = [codes.reshape(-1, variants, *grid) for codes in batches]
    tokens = np.concatenate(batches) if batches else np.zeros((0, variants, *grid), TOKEN_DTYPE)
    return tokens, kept, skipped


def resolve_image_size(tokenizer: nn.Module, image_size: int | None) -> int:
    """The crop size to tokenize at: the tokenizer's training size (``config.image_size``) when None.

    The old fixed default of 256 silently upscaled a 28 px data set for a 28 px tokenizer to 256 px
    (a 64x64-token store no generator could train on). An explicit other size is kept (the
    convolutional tokenizers accept it; a fixed-size one refuses in ``token_shape_of``) with a note.
    """
    trained = getattr(getattr(tokenizer, "config", None), "image_size", None)
    if image_size is None:
        if trained is None:
            name = type(tokenizer).__name__
            raise ValueError(f"{name} records no image size; pass image_size (--image-size)")
        return int(trained)
    if trained is not None and int(trained) != image_size:
        print(f"note: tokenizing at {image_size} px; the tokenizer was trained at {trained} px")
    return image_size


def store_plan(
    *,
    source: dict[str, Any],
    num_images: int,
    class_names: Sequence[str],
    augment: str,
    image_size: int | tuple[int, int] | None,
    grid: Sequence[int],
    codebook_size: int,
    shard_size: int,
    tokenizer: dict[str, Any] | None,
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A store's plan (plan.json): what it holds and how it is sharded, the one schema that
    ``pretokenize`` and ``write_store`` write and ``TokenStore`` reads."""
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "source": source,
        "num_source_images": num_images,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "augment": augment,
        "num_variants": num_variants(augment),
        "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,  # [h, w]: not square
        "grid": list(grid),
        "codebook_size": codebook_size,
        "token_dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": tokenizer,
        "shard_size": shard_size,
        "num_shards": -(-num_images // shard_size),
        "split": split,  # which side of which held-out split this store holds (rargen.data.split)
    }


def pretokenize(
    source: ImageSource | str | os.PathLike,  # 'digits' (all; or digits:train|heldout), a folder or an .npz
    tokenizer: nn.Module | str | os.PathLike,  # tokenizer checkpoint folder (rargen.load)
    out: str | os.PathLike,  # token store folder to write (or resume)
    *,
    augment: str = "none",
    image_size: int | None = None,  # square crop size fed to the tokenizer (default: its training size)
    image_width: int | None = None,  # a non-square crop: image_size high, this wide (a 2D tokenizer's grid)
    batch_size: int = 64,  # crops per tokenizer call
    shard_size: int = 10_000,  # images per shard (resume unit)
    num_workers: int = 4,  # image decoding threads
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,  # progress bars
    max_pixels: int = DEFAULT_MAX_PIXELS,  # skip (and report) images with more pixels (decompression bombs)
    log: Callable[[str], None] | None = None,  # where the folder's summary goes (None: nowhere)
    heldout_fraction: float | None = None,  # share of each class in OUT-heldout (0: none; CLI default 0.2)
    split_seed: int = SPLIT_SEED,  # seed of the held-out split (the same in every stage)
) -> Path:
    """Tokenize every image of ``source`` (all ``augment`` variants) into a token store at ``out``.

    ``source``: an ``ImageSource`` or a spec for ``open_source`` ("digits[:split]", folder, .npz).
    ``tokenizer``: a module with ``encode(images (B, 3, H, W) in [0, 1]) -> codes (B, *token_shape)``,
    ``codebook_size`` and ``token_shape(H, W)`` (or a 2D ``grid_shape``), or a checkpoint folder for
    ``rargen.load``; it is
    put in eval mode (and moved to ``device`` if given). ``batch_size`` counts crops per ``encode``
    call (rounded down to whole images). ``rank``/``world_size`` default to the torchrun env vars.
    Resumable: rerunning with the same arguments keeps finished shards. Returns ``out``.
    Images that cannot be used (corrupt, not a regular file, over ``max_pixels`` pixels) are skipped
    and listed in ``report.json``, with per-class counts and what the source left out (a folder's
    hidden or stray files). ``log`` (rank 0) gets the source's summary (``ImageSource.summary``)
    once it is opened. A complete store is only read (it may be read-only).
    """
    tokenizer_path = None
    if not isinstance(tokenizer, nn.Module):
        from rargen.checkpoint import load

        tokenizer_path = Path(tokenizer)
        tokenizer = load(tokenizer_path, device=device or "cpu")
    elif device is not None:
        tokenizer = tokenizer.to(device)
    image_size = resolve_image_size(tokenizer, image_size)
    if image_size <= 0 or batch_size <= 0 or shard_size <= 0 or num_workers <= 0:
        raise ValueError(
            f"image_size, batch_size, shard_size and num_workers must be positive, got {image_size}, "
            f"{batch_size}, {shard_size}, {num_workers}"
        )
    num_variants(augment)  # an unknown augment is refused before the source is opened
    rank, world_size = distributed.rank_and_world(rank, world_size)
    out = Path(out)
    if not isinstance(source, ImageSource):
        spec, source = source, open_source(source, image_size=image_size, max_pixels=max_pixels)
    else:
        spec = source.describe().get("path") or source.describe()["type"]
    if log is not None and rank == 0:
        log(source.summary(f"pretokenize: {spec}"))
    tokenizer.eval()
    codebook_size = int(tokenizer.codebook_size)
    if not 0 < codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size {codebook_size} does not fit the store's uint16 codes (max 65536)")
    if image_width is not None and image_width != image_size:
        if image_width <= 0:
            raise ValueError(f"image_width must be positive, got {image_width}")
        crop: int | tuple[int, int] = (image_size, image_width)  # recorded as [height, width]
    else:
        crop = image_size
    grid = token_shape_of(tokenizer, *crop_shape(crop))  # (h, w), or (K,) for a 1D tokenizer
    tokenizer_meta = {"path": None, "sha256": None}
    if tokenizer_path is not None:
        from rargen.checkpoint import checkpoint_hash

        tokenizer_meta = {"path": str(tokenizer_path.resolve()), "sha256": checkpoint_hash(tokenizer_path)}
    parts = split_parts(source, out, heldout_fraction, split_seed, getattr(tokenizer, "checkpoint_extra", {}))
    for source, out, split in parts:
        _pretokenize_part(source, tokenizer, out, split, tokenizer_meta, rank, world_size, crop,
                          augment, batch_size, shard_size, num_workers, grid, progress)  # fmt: skip
    if log is not None and rank == 0:  # one summary of what was read, whichever store holds an image
        reports = [json.loads((part_out / REPORT_NAME).read_text()) for _, part_out, _ in parts]
        skipped = [item for report in reports for item in report["skipped"]]
        listed_in = " and ".join(str(part_out / REPORT_NAME) for _, part_out, _ in parts)
        num_read = sum(report["num_images"] for report in reports)
        log(describe_read(f"pretokenize: {spec}", num_read, skipped, listed_in=listed_in))
        log(f"token store written to {parts[0][1]} ({reports[0]['num_images']} images)")
        if len(parts) == 2:
            log(f"held-out store written to {parts[1][1]} ({reports[1]['num_images']} images: "
                f"{describe_split(parts[1][2])}; rargen train reports the NLL on them)")  # fmt: skip
    return parts[0][1]


def _pretokenize_part(source, tokenizer, out, split, tokenizer_meta, rank, world_size, crop, augment,
                      batch_size, shard_size, num_workers, grid, progress) -> None:  # fmt: skip
    """``pretokenize``'s work for one store: ``source`` (one side of the split) into ``out``."""
    num_source, codebook_size = len(source), int(tokenizer.codebook_size)
    plan = store_plan(
        source=source.describe(), num_images=num_source, class_names=source.class_names, augment=augment,
        image_size=crop, grid=grid, codebook_size=codebook_size, shard_size=shard_size, split=split,
        tokenizer={
            "kind": getattr(type(tokenizer), "checkpoint_kind", type(tokenizer).__name__),
            "state_sha256": state_sha256(tokenizer),
        },
    )  # fmt: skip
    if not out.is_dir():
        out.mkdir(parents=True)
    _check_plan(out, plan)
    if (out / META_NAME).is_file():
        return  # already complete

    todo = [i for i in range(rank, plan["num_shards"], world_size) if not _shard_done(out, i)]
    total = sum(min(shard_size, num_source - i * shard_size) for i in todo)
    from rargen.progress import progress_bar

    # A bar on a terminal, plain periodic lines in a log file (no carriage returns).
    desc = f"pretokenize rank {rank}"
    bar = progress_bar(total=total, unit="img", desc=desc, enabled=progress, smoothing=0.1)
    with ThreadPoolExecutor(num_workers) as pool:
        for shard in todo:
            _remove_stale_temporaries(out, shard)
            began = time.perf_counter()
            start, stop = shard * shard_size, min((shard + 1) * shard_size, num_source)
            indices = range(start, stop)
            tokens, kept, skipped = _tokenize_range(
                source, tokenizer, indices, pool, crop, augment, batch_size, grid, bar, 4 * num_workers
            )
            labels = np.asarray([source.label(i) for i in kept], dtype=np.int64)
            info = {
                "index": shard,
                "source_start": start,
                "source_stop": stop,
                "num_images": len(kept),
                "skipped": skipped,
                "seconds": time.perf_counter() - began,
            }
            _write_shard(out, shard, tokens, labels, info)
    bar.close()
    distributed.barrier()
    if rank == 0:
        _finalize(out, plan, {"tokenizer_file": tokenizer_meta}, source.excluded)
    distributed.barrier()


def write_store(
    out: str | os.PathLike,
    tokens: np.ndarray,
    labels: np.ndarray,
    *,
    codebook_size: int,
    class_names: Sequence[str] = (),
    augment: str = "none",
    image_size: int | None = None,
    shard_size: int = 10_000,
    source: dict[str, Any] | None = None,
    token_ndim: int = 2,
) -> Path:
    """Write a store from tokens already in memory: ``tokens`` (N, V, *grid) or (N, *grid), ``labels`` (N,).

    ``token_ndim`` is the number of grid axes: 2 for (h, w) grids, 1 for 1D sequences (K,).
    For tokens made elsewhere (an existing dump, synthetic benchmark data); the result opens
    with ``TokenStore`` exactly like the output of ``pretokenize``.
    """
    if token_ndim not in (1, 2):
        raise ValueError(f"token_ndim must be 1 (sequences) or 2 (grids), got {token_ndim}")
    tokens = np.asarray(tokens)
    if tokens.ndim == token_ndim + 1:
        tokens = tokens[:, None]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if tokens.ndim != token_ndim + 2 or len(labels) != len(tokens):
        layout = "(N, V, h, w)" if token_ndim == 2 else "(N, V, K)"
        raise ValueError(f"need tokens {layout} and labels (N,), got {tokens.shape} and {labels.shape}")
    if not 0 < codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size {codebook_size} does not fit the store's uint16 codes (max 65536)")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise ValueError(f"tokens must lie in [0, {codebook_size}), found [{tokens.min()}, {tokens.max()}]")
    num, variants, *grid = tokens.shape
    if variants != num_variants(augment):
        raise ValueError(f"augment {augment!r} has {num_variants(augment)} variants, tokens have {variants}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; write_store needs a new folder")
    out.mkdir(parents=True, exist_ok=True)
    plan = store_plan(
        source=source or {"type": "arrays"}, num_images=num, class_names=class_names, augment=augment,
        image_size=image_size, grid=grid, codebook_size=codebook_size, shard_size=shard_size, tokenizer=None,
    )  # fmt: skip
    _write_json(out / PLAN_NAME, plan)
    for shard in range(plan["num_shards"]):
        start, stop = shard * shard_size, min((shard + 1) * shard_size, num)
        info = {"index": shard, "source_start": start, "source_stop": stop, "num_images": stop - start}
        info.update(skipped=[], seconds=0.0)
        _write_shard(out, shard, tokens[start:stop], labels[start:stop], info)
    _finalize(out, plan, {"tokenizer_file": {"path": None, "sha256": None}})
    return out
