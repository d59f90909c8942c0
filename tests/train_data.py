"""An in-memory data source with the ``TokenLoader`` interface, for the training tests.

Batch ``step`` of an epoch is rows ``(step * world_size + rank) * B`` .. ``+ B`` of a seeded
permutation, so a global batch holds the same images whatever the world size or batch split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ArrayStore:
    tokens: np.ndarray  # (N, L) int64
    labels: np.ndarray  # (N,) int64
    codebook_size: int
    num_classes: int
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)


class ArrayLoader:
    def __init__(
        self, store: ArrayStore, batch_size: int, rank: int, world_size: int, seed: int, delay=0.0, log=None
    ):
        self.store, self.batch_size, self.rank, self.world_size, self.seed = (
            store,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.steps_per_epoch = len(store) // (batch_size * world_size)
        assert self.steps_per_epoch > 0
        self.epoch, self.step, self.delay, self.log = 0, 0, delay, log

    def __iter__(self):
        import time

        epoch = self.epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.store))
        for step in range(self.step, self.steps_per_epoch):
            start = (step * self.world_size + self.rank) * self.batch_size
            rows = order[start : start + self.batch_size]
            self.epoch, self.step = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            if self.log:  # which batches a run drew: a resumed run must start where it stopped
                with open(self.log, "a") as f:
                    f.write(f"{epoch} {step}\n")
            if self.delay:
                time.sleep(self.delay)
            yield torch.from_numpy(self.store.tokens[rows]), torch.from_numpy(self.store.labels[rows])

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state):
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def make_store(
    num: int = 64, num_tokens: int = 16, codebook_size: int = 32, num_classes: int = 10, seed: int = 0
):
    """Random-but-learnable sequences: each class has one fixed token sequence plus a little noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, codebook_size, size=(num_classes, num_tokens))
    labels = rng.integers(0, num_classes, size=num)
    tokens = prototypes[labels].copy()
    return ArrayStore(tokens.astype(np.int64), labels.astype(np.int64), codebook_size, num_classes)


def data_factory(store: ArrayStore, delay: float = 0.0, log: str | None = None):
    """``log``: a file each drawn batch appends its ``epoch step`` to."""

    def make(batch_size, rank, world_size, seed):
        return ArrayLoader(store, batch_size, rank, world_size, seed, delay, log)

    return make
