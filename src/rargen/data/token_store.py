"""Reading a token store: ``TokenStore``, a finished store opened read-only with its token arrays
memory-mapped, and the names of the store's files. The layout, and ``pretokenize`` that writes it,
are in ``rargen.data.store``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

STORE_FORMAT = "rargen-token-store"
STORE_VERSION = 1
META_NAME = "meta.json"
REPORT_NAME = "report.json"
PLAN_NAME = "plan.json"
TOKEN_DTYPE = np.uint16
MAX_CODEBOOK_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def store_digest(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """What identifies a finished store, cheaply: its ``meta.json`` (source, tokenizer, counts), each
    shard's files with their sizes, and the first and last ``sample_bytes`` of each (the whole file
    when smaller: a small store is hashed in full). Not every token of a large store: an ImageNet
    store is gigabytes, and two stores that agree in all of this are the same data in practice."""
    folder, digest = Path(path), hashlib.sha256()
    if not (folder / META_NAME).is_file():
        raise ValueError(
            f"{str(folder)!r} is not a finished token store (no {META_NAME}); pass a store folder"
        )
    digest.update((folder / META_NAME).read_bytes())
    for shard in json.loads((folder / META_NAME).read_text()).get("shards", ()):
        for file in sorted((folder / shard["name"]).iterdir()):
            size = file.stat().st_size
            digest.update(f"{shard['name']}/{file.name}:{size}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(sample_bytes))
                handle.seek(max(sample_bytes, size - sample_bytes))
                digest.update(handle.read())
    return digest.hexdigest()


class TokenStore:
    """A finished token store, opened read-only; token arrays are memory-mapped (zero-copy).

    ``len(store)`` counts images; each has ``num_variants`` token arrays of shape ``grid``
    ((h, w) for 2D tokenizers, (K,) for 1D ones); the generator sees them flat, ``num_tokens`` long.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / META_NAME
        if not meta_file.is_file():
            unfinished = (self.path / PLAN_NAME).is_file()
            hint = " (pretokenization unfinished? rerun it to complete)" if unfinished else ""
            raise FileNotFoundError(f"no token store at {str(self.path)!r}: {META_NAME} missing{hint}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != STORE_FORMAT or self.meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"{meta_file}: format {self.meta.get('format')!r} version {self.meta.get('version')!r} "
                f"is not a {STORE_FORMAT} version {STORE_VERSION}"
            )
        self._tokens: list[np.ndarray] = []
        labels = []
        shape = (self.num_variants, *self.grid)
        for shard in self.meta["shards"]:
            folder = self.path / shard["name"]
            # mmap of a zero-length array is not allowed; an all-skipped shard is read normally.
            tokens = np.load(folder / "tokens.npy", mmap_mode="r" if shard["num_images"] else None)
            if tokens.shape != (shard["num_images"], *shape) or tokens.dtype != TOKEN_DTYPE:
                expected = f"{np.dtype(TOKEN_DTYPE).name}{(shard['num_images'], *shape)}"
                found = f"{tokens.dtype}{tokens.shape}"
                raise ValueError(f"{folder}/tokens.npy is {found}, meta.json says {expected}")
            self._tokens.append(tokens)
            labels.append(np.load(folder / "labels.npy"))
        self.labels: np.ndarray = np.concatenate(labels) if labels else np.zeros(0, np.int64)  # (N,)
        self._offsets = np.cumsum([0] + [len(t) for t in self._tokens])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_variants(self) -> int:
        return int(self.meta["num_variants"])

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.meta["grid"])

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes; 0 for unconditional data (then every label is 0 = the null label)."""
        return len(self.class_names)

    @property
    def augment(self) -> str:
        return str(self.meta["augment"])

    @property
    def num_shards(self) -> int:
        return len(self._tokens)

    def shard_tokens(self, shard: int) -> np.ndarray:
        """The memory-mapped (n, V, *grid) uint16 array of one shard."""
        return self._tokens[shard]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """(V, *grid) uint16 view (no copy) and the label of image ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for a store of {len(self)} images")
        index %= len(self)
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._tokens[shard][index - self._offsets[shard]], int(self.labels[index])

    def gather(self, indices: np.ndarray, variants: np.ndarray) -> np.ndarray:
        """Tokens (B, *grid) uint16 of images ``indices`` (B,), each in variant ``variants`` (B,)."""
        indices = np.asarray(indices, dtype=np.int64)
        variants = np.asarray(variants, dtype=np.int64)
        out = np.empty((len(indices), *self.grid), dtype=TOKEN_DTYPE)
        shards = np.searchsorted(self._offsets, indices, side="right") - 1
        for shard in np.unique(shards):
            rows = np.nonzero(shards == shard)[0]
            local = indices[rows] - self._offsets[shard]
            order = np.argsort(local, kind="stable")  # ascending offsets read the mapped file forwards
            out[rows[order]] = self._tokens[shard][local[order], variants[rows[order]]]
        return out

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.path)!r}, images={len(self)}, variants={self.num_variants}, "
            f"grid={self.grid}, codebook_size={self.codebook_size}, num_classes={self.num_classes})"
        )
