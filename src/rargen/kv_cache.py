"""The key/value cache of decoding: static buffers of every attention layer, one row per decoding
slot, and where each decoded position writes and attends (``CacheAt``, ``CacheWindow``).
``rargen.model`` reads and writes it in ``RAR.prefill``/``RAR.decode_step``; ``rargen.sampling``'s
decoding batch and speculative decoder each own one per generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: the model imports this module
    from rargen.model import ModelConfig


class KVCache(nn.Module):
    """Static key/value buffers of every attention layer, one row per decoding slot.

    ``k[layer]`` and ``v[layer]`` are (rows, H, L + 1, hd): slot ``r`` holds the keys and values of
    its own sequence at indices 0 .. its position (cls, class, image tokens 0 .. L - 2; the last
    token is never fed). Rows are independent: each slot may be at its own position. Buffers, not
    persistent: a cache never ends up in a checkpoint.
    """

    def __init__(self, config: ModelConfig, rows: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        shape = (rows, config.num_heads, config.num_image_tokens + 1, config.head_dim)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for layer in range(config.depth):
            for name, store in (("k", self.k), ("v", self.v)):
                buffer = torch.zeros(shape, dtype=dtype, device=device)
                self.register_buffer(f"{name}{layer}", buffer, persistent=False)
                store.append(buffer)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions to slot ``target`` (batch compaction)."""
        for buffers in (self.k, self.v):
            for buffer in buffers:
                buffer[target, :, :length].copy_(buffer[source, :, :length])


class CacheWindow(NamedTuple):
    """``count`` cache slots ``rows`` (a slice, or an index tensor when they are not consecutive),
    each feeding ``length`` consecutive sequence indices from ``first`` and attending to its own
    slots ``0 .. first + length - 1``; causally within the window through ``mask``."""

    rows: slice | Tensor
    count: int
    first: int
    length: int
    mask: Tensor | None = None  # (length, first + length) bool; None: each row sees its whole prefix

    @classmethod
    def causal(cls, rows: Tensor, first: int, length: int) -> CacheWindow:
        """The window of slots ``rows`` (n,) with its causal mask, which a window of one keeps too
        (all True), so a speculative pass attends as it always has."""
        listed = rows.tolist()
        consecutive = listed == list(range(listed[0], listed[0] + len(listed)))
        where = slice(listed[0], listed[0] + len(listed)) if consecutive else rows
        key = torch.arange(first + length, device=rows.device)
        query = torch.arange(first, first + length, device=rows.device)
        return cls(where, len(listed), first, length, key[None, :] <= query[:, None])


class CacheAt(NamedTuple):
    """Where each fed position writes its key/value and what it attends to.

    ``positions`` (M,) int64: the sequence index of each fed position, written into cache slot
    ``slots[i]`` (None: slot ``i``). One of three layouts: ``runs`` (eager, one position per row):
    spans ``(start, stop, position)`` of consecutive rows at the same position, each attended with
    exactly its prefix length (no mask, so a row's numbers do not depend on the other rows);
    ``windows`` (eager, several consecutive positions per row: speculative passes): the fed
    positions listed window by window, each row's positions in order; or ``mask`` (M, 1, 1, L + 1)
    bool over the whole cache (one position per row in fixed shapes: compiled / CUDA graphs).
    """

    positions: Tensor
    runs: tuple[tuple[int, int, int], ...] | None = None
    mask: Tensor | None = None
    windows: tuple[CacheWindow, ...] | None = None
    slots: Tensor | None = None

    def eager_windows(self) -> tuple[CacheWindow, ...]:
        """``windows``, or each run as a window of one position (no mask)."""
        if self.windows is not None:
            return self.windows
        return tuple(CacheWindow(slice(a, b), b - a, position, 1) for a, b, position in self.runs)


def cache_mask(positions: Tensor, slots: int) -> Tensor:
    """(n, 1, 1, slots) bool: the row at sequence index ``positions[i]`` sees slots <= it."""
    return (torch.arange(slots, device=positions.device) <= positions[:, None])[:, None, None]
