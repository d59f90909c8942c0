"""A deterministic, resumable, rank-sharded batch loader over a ``TokenStore``.

Batch ``step`` of ``epoch`` is a pure function of ``(seed, epoch, step, rank, world_size)``: the
epoch's image permutation and each image's variant (which of its crops) are drawn from
``numpy.random.default_rng([seed, epoch, ...])``. Resuming therefore needs only ``(epoch, step)``
(``state_dict``), unlike the official loader whose order is not resumed (spec §2.5). An epoch is
every image once, in one of its variants; the last incomplete global batch is dropped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from rargen.data.token_store import TokenStore

# Stream ids under one (seed, epoch) so the permutation and the variant choice are independent draws.
_PERMUTATION_STREAM = 0
_VARIANT_STREAM = 1


class TokenLoader:
    """Batches ``(tokens (B, h*w) int64 in raster order, labels (B,) int64)`` for one rank.

    Each global step takes ``batch_size * world_size`` consecutive images of the epoch's
    permutation; rank ``r`` gets the ``r``-th block of ``batch_size``, so ranks never overlap.
    Iterating yields the rest of the current epoch and advances ``(epoch, step)`` as batches are
    handed out; ``prefetch=True`` builds the next batch in a background thread (same batches).
    """

    def __init__(
        self,
        store: TokenStore | str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: bool = False,
    ) -> None:
        self.store = store if isinstance(store, TokenStore) else TokenStore(store)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.prefetch = prefetch
        self.steps_per_epoch = len(self.store) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the store has {len(self.store)} images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower batch_size"
            )
        self.epoch = 0
        self.step = 0
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.steps_per_epoch

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's image permutation (N,) and the variant of every image (N,), both int64."""
        with self._lock:
            if epoch not in self._plans:
                count = len(self.store)
                order = np.random.default_rng([self.seed, epoch, _PERMUTATION_STREAM]).permutation(count)
                rng = np.random.default_rng([self.seed, epoch, _VARIANT_STREAM])
                variants = rng.integers(0, self.store.num_variants, size=count)
                self._plans = {epoch: (order.astype(np.int64), variants.astype(np.int64))}  # keep one epoch
            return self._plans[epoch]

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Image indices (B,) of this rank's batch ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        order, _ = self.epoch_plan(epoch)
        start = (step * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def batch(self, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """This rank's batch ``step`` of ``epoch``: tokens (B, L = prod(grid)) int64, labels (B,) int64."""
        indices = self.batch_indices(epoch, step)
        _, variants = self.epoch_plan(epoch)
        tokens = self.store.gather(indices, variants[indices])  # (B, *grid) uint16
        tokens = torch.from_numpy(tokens.astype(np.int64)).view(len(indices), -1)  # raster / sequence order
        labels = torch.from_numpy(self.store.labels[indices].astype(np.int64))
        return tokens, labels

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self.epoch, self.step
        pool = ThreadPoolExecutor(1) if self.prefetch else None
        try:
            upcoming = pool.submit(self.batch, epoch, start) if pool else None
            for step in range(start, self.steps_per_epoch):
                if pool is not None:
                    current = upcoming.result()
                    if step + 1 < self.steps_per_epoch:
                        upcoming = pool.submit(self.batch, epoch, step + 1)
                else:
                    current = self.batch(epoch, step)
                # The state always names the next batch to hand out, so a checkpoint taken
                # after consuming this one resumes right after it.
                self.epoch, self.step = (
                    (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
                )
                yield current
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"loader state epoch={epoch}, step={step} is out of range (steps per epoch: "
                f"{self.steps_per_epoch}); was it saved with another batch size or world size?"
            )
        self.epoch, self.step = epoch, step
