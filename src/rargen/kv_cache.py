"""The key/value cache of decoding: static buffers of every attention layer, one row per decoding
slot, and where each decoded row writes and attends (``CacheAt``). ``rargen.model`` reads and writes
it in ``RAR.prefill``/``RAR.decode_step``; ``rargen.sampling.decoding`` owns one per generation.
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


class CacheAt(NamedTuple):
    """Where each decoded row writes its key/value and what it attends to.

    ``positions`` (n,) int64: the sequence index row ``i`` feeds (slot ``i`` of the cache); the
    row attends to its own slots ``0 .. positions[i]``. Either ``runs`` (eager): spans
    ``(start, stop, position)`` of consecutive rows at the same position, each attended with
    exactly its prefix length (no mask, so a row's numbers do not depend on the other rows), or
    ``mask`` (n, 1, 1, L + 1) bool over the whole cache (fixed shapes: compiled / CUDA graphs).
    """

    positions: Tensor
    runs: tuple[tuple[int, int, int], ...] | None = None
    mask: Tensor | None = None


def cache_mask(positions: Tensor, slots: int) -> Tensor:
    """(n, 1, 1, slots) bool: the row at sequence index ``positions[i]`` sees slots <= it."""
    return (torch.arange(slots, device=positions.device) <= positions[:, None])[:, None, None]
