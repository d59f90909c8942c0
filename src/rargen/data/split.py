"""The held-out split: one seeded split of an image source, shared by every stage of the pipeline.

The tokenizer (``train-tokenizer``), the token stores (``pretokenize`` writes a training store and a
held-out store), the generator (trained on the training store, its NLL reported on the held-out one)
and the classifier (``train-classifier``) hold out the same images: ``heldout_split(source,
heldout_fraction, seed)``. It splits the source's entries, before any image is read (a file that
turns out unreadable is then skipped on its own side, and every stage agrees whatever it could
read), by ``stratified_split``: a seeded shuffle within each class. The digits keep their fixed
split (``rargen.data.digits``: 20%, seed 0), the one every digit tool and every user sees.

Each stage records the split (``split_record``): a digest of the source, the fraction, the seed
and the counts; ``check_same_split`` refuses two stages whose records differ, naming both.
``split_images`` reads a source into memory and splits it: what the tokenizer and the classifier
train on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rargen.data.sources import (
    DEFAULT_MAX_PIXELS,
    ArraySource,
    FolderSource,
    ImageSource,
    describe_channels,
    describe_read,
    open_source,
    read_images,
)

HELDOUT_FRACTION = 0.2  # share of each class held out, in every stage
SPLIT_SEED = 0
HELDOUT_SUFFIX = "-heldout"  # pretokenize --out STORE writes the held-out images to STORE-heldout


def stratified_split(
    labels: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded shuffle within each class, ``heldout_fraction`` of each held out.

    Every class with at least two images gives at least one to each side, so a file written in
    folder (class) order no longer holds out one whole class, as taking the last 10% did. Unlabelled
    data (all labels 0) is one class, i.e. a plain seeded shuffle. Both index arrays are sorted.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < 2:
        raise ValueError(f"a held-out split needs at least 2 images, got {len(labels)}")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        wanted = max(1, round(heldout_fraction * len(members)))
        count = 0 if len(members) < 2 else min(len(members) - 1, wanted)
        heldout.append(members[:count])
        train.append(members[count:])
    heldout_idx = np.sort(np.concatenate(heldout))
    if len(heldout_idx) == 0:  # every class has a single image: hold out one image anyway
        heldout_idx = np.sort(rng.permutation(len(labels))[:1])
    train_idx = np.setdiff1d(np.arange(len(labels)), heldout_idx)
    return train_idx, heldout_idx


def source_digest(source: ImageSource) -> str:
    """What identifies a source's images, cheaply: a folder's relative file names, labels and sizes
    (not every byte of an ImageNet), an array source's bytes and labels; with the class names."""
    digest = hashlib.sha256(repr(tuple(source.class_names)).encode())
    description = source.describe()
    if description.get("type") == "digits":  # the same digits at any size: the split, not the pixels
        digest.update(f"digits:{description.get('split')}:{len(source)}".encode())
    elif isinstance(source, FolderSource):
        for index, path in enumerate(source.files):
            digest.update(f"{source.name(index)}\0{source.label(index)}\0{path.stat().st_size}\n".encode())
    elif isinstance(source, ArraySource):
        digest.update(np.ascontiguousarray(source.images).tobytes())
        digest.update(np.ascontiguousarray(source.labels, dtype=np.int64).tobytes())
    else:  # any other source: its description, names and labels
        digest.update(repr(sorted(source.describe().items())).encode())
        for index in range(len(source)):
            digest.update(f"{source.name(index)}\0{source.label(index)}\n".encode())
    return digest.hexdigest()


def _is_all_digits(source: ImageSource) -> bool:
    description = source.describe()
    return description.get("type") == "digits" and description.get("split") == "all"


def heldout_split(
    source: ImageSource, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train indices, held-out indices, record) of ``source``'s entries; the record is what every
    stage writes down (``split_record``). All the digits take their fixed split (20%, seed 0)."""
    if _is_all_digits(source):
        from rargen.data.digits import HELDOUT_FRACTION as DIGITS_FRACTION
        from rargen.data.digits import SPLIT_SEED as DIGITS_SEED
        from rargen.data.digits import split_indices

        if (heldout_fraction, seed) != (DIGITS_FRACTION, DIGITS_SEED):
            raise ValueError(
                f"the digits have one fixed held-out split ({DIGITS_FRACTION:.0%}, seed {DIGITS_SEED}); "
                f"got heldout_fraction {heldout_fraction} and split_seed {seed}: drop those settings"
            )
        train, heldout = (split_indices(len(source), part).numpy() for part in ("train", "heldout"))
    else:
        train, heldout = stratified_split(np.asarray([source.label(i) for i in range(len(source))]),
                                          heldout_fraction, seed)  # fmt: skip
    return train, heldout, split_record(source, heldout_fraction, seed, heldout)


def split_record(
    source: ImageSource, heldout_fraction: float, seed: int, heldout: np.ndarray
) -> dict[str, Any]:
    """The split as stages record it: the source (what, digest, size), the fraction, the seed, the
    held-out count and a digest of the held-out indices."""
    where = source.describe()
    return {
        "source": where.get("path") or ":".join(str(where[k]) for k in ("type", "split") if k in where),
        "source_digest": source_digest(source),
        "num_source_images": len(source),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "num_heldout": len(heldout),
        "heldout_digest": hashlib.sha256(np.asarray(heldout, dtype=np.int64).tobytes()).hexdigest(),
    }


_SAME = ("source_digest", "heldout_fraction", "seed", "heldout_digest")


def describe_split(record: dict[str, Any]) -> str:
    """``20% of 800 images of 'photos' (digest 1a2b3c4d5e6f), seed 0``."""
    return (
        f"{record['heldout_fraction']:.0%} of {record['num_source_images']} images of "
        f"{record['source']!r} (digest {record['source_digest'][:12]}), seed {record['seed']}"
    )


def check_same_split(first: dict[str, Any] | None, first_what: str, second: dict[str, Any] | None,
                     second_what: str) -> None:  # fmt: skip
    """Refuse (ValueError naming both) two stages that hold out different images; a stage that
    recorded no split (trained on images given in memory, or before splits were recorded) passes."""
    if not first or not second or all(first.get(k) == second.get(k) for k in _SAME):
        return
    raise ValueError(
        f"{first_what} holds out {describe_split(first)}, but {second_what} holds out "
        f"{describe_split(second)}: the held-out images of one would be training images of the other; "
        "use the same data, --heldout-fraction and --split-seed in every stage"
    )


class SubsetSource(ImageSource):
    """The entries ``indices`` of ``source``, in that order: one side of a split."""

    def __init__(self, source: ImageSource, indices: np.ndarray, part: str, record: dict[str, Any]) -> None:
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.part, self.record = part, record
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))

    def label(self, index: int) -> int:
        return self.source.label(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "part": self.part, "num_images": len(self)}

    @property
    def excluded(self) -> tuple[dict[str, str], ...]:
        return self.source.excluded

    def summary(self, what: str) -> str:
        return self.source.summary(what)


def heldout_store_path(store: str | os.PathLike) -> Path:
    """Where ``pretokenize --out STORE`` writes the held-out images: ``STORE-heldout`` beside it."""
    store = Path(store)
    return store.with_name(store.name + HELDOUT_SUFFIX)


def split_parts(
    source: ImageSource,
    out: str | os.PathLike,
    heldout_fraction: float | None,
    seed: int,
    tokenizer_extra: dict[str, Any],
) -> list[tuple[ImageSource, Path, dict[str, Any] | None]]:
    """``pretokenize``'s stores as (images, folder, split record): every image into ``out`` when
    ``heldout_fraction`` is None or 0, else the training side into ``out`` and the held-out side into
    ``heldout_store_path(out)``, after checking the tokenizer held out the same images (the split in
    its checkpoint's ``extra``, when it recorded one)."""
    out = Path(out)
    if not heldout_fraction:  # None or 0: no split (ImageNet's held-out images are its val set)
        return [(source, out, None)]
    train, heldout, record = heldout_split(source, heldout_fraction, seed)
    check_same_split(tokenizer_extra.get("split"), "the tokenizer", record, f"the store {str(out)!r}")
    held = heldout_store_path(out)
    train_record = {**record, "part": "train", "heldout_store": held.name}
    return [
        (SubsetSource(source, train, "train", record), out, train_record),
        (SubsetSource(source, heldout, "heldout", record), held, {**record, "part": "heldout"}),
    ]


class SplitImages(NamedTuple):
    """A source read into memory and split: images (N, 3, S, S) float32 in [0, 1], labels (N,) int64."""

    train_images: Tensor
    train_labels: Tensor
    heldout_images: Tensor
    heldout_labels: Tensor
    class_names: tuple[str, ...]
    skipped: list[dict[str, Any]]  # read_images' list of the unreadable files
    excluded: tuple[dict[str, str], ...]  # what the source left out (a folder's stray or hidden files)
    split: dict[str, Any]  # the split's record (``split_record``)


def split_images(
    data: str | os.PathLike,
    image_size: int,
    *,
    heldout_fraction: float,
    seed: int,
    purpose: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] | None = print,
    source: ImageSource | None = None,
    listed_in: str | None = None,
) -> SplitImages:
    """``data`` (any ``open_source`` spec) read at ``image_size`` and split by ``heldout_split``.

    The readable images of each side are read once by ``read_images`` (what was skipped reported
    through ``log``). ``purpose`` names what the images train, for the messages: ``"tokenizer"`` logs
    as ``train-tokenizer`` and refuses fewer than 2 images with "a tokenizer needs at least 2".
    ``source`` is ``data`` already opened, by a caller that looked at it first (the classifier: its
    classes and image size), so it is not opened twice. ``listed_in`` names the report that lists
    every skipped file, for a caller that writes one.
    """
    if source is None:
        source = open_source(data, image_size=image_size, max_pixels=max_pixels)
    if log is not None and not _is_all_digits(source):
        log(source.summary(f"train-{purpose}: {data}"))
    if len(source) < 2:
        raise ValueError(f"{str(data)!r}: {len(source)} image(s); a {purpose} needs at least 2")
    train_idx, heldout_idx, record = heldout_split(source, heldout_fraction, seed)
    if _is_all_digits(source):  # as every digit tool reads them: float, upscaled straight to the size
        from rargen.data.digits import load_digit_images

        train_images, train_labels = load_digit_images("train", image_size)
        heldout_images, heldout_labels = load_digit_images("heldout", image_size)
        names = tuple(source.class_names)
        return SplitImages(train_images, train_labels, heldout_images, heldout_labels, names, [], (), record)
    images, labels, kept, skipped = read_images(source, image_size)
    if log is not None and not _is_all_digits(source):
        log(describe_read(f"train-{purpose}: {data}", len(images), skipped, listed_in=listed_in))
        if mixed := describe_channels(f"train-{purpose}: {data}", images, [source.name(i) for i in kept]):
            log(mixed)
    train_rows, heldout_rows = np.isin(kept, train_idx), np.isin(kept, heldout_idx)
    if train_rows.sum() < 1 or heldout_rows.sum() < 1:
        raise ValueError(
            f"{str(data)!r}: {len(images)} readable image(s), {int(train_rows.sum())} to train on and "
            f"{int(heldout_rows.sum())} held out; a {purpose} needs at least 1 of each"
        )
    # Indexed as is, so channels-last in memory (the classifier trains on that layout; the tokenizer
    # copies to contiguous): a conv's float sums depend on the layout, so it is the caller's choice.
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    targets = torch.from_numpy(labels)
    train_rows, heldout_rows = torch.from_numpy(train_rows), torch.from_numpy(heldout_rows)
    return SplitImages(
        tensor[train_rows], targets[train_rows], tensor[heldout_rows], targets[heldout_rows],
        tuple(source.class_names), skipped, source.excluded, record,
    )  # fmt: skip
