"""The decode step as one compiled program on CPUs (``prepare_for_decoding(compile=True)``).

The eager CPU step (``rargen.sampling.cpu``) runs about 100 oneDNN products plus norms, pads and
adds from Python: a fixed cost of several ms per step, and oneDNN's few-row products stream the
weights well below the machine's rate. Here the whole step (``RAR.decode_step``: embeddings,
every block, attention over the cache, the head) is one program made by Inductor: weights
frozen into constants (``freezing``: laid out once for the kernels, like the oneDNN packing),
the glue between products fused into C++ loops, and the products themselves chosen by
max-autotune among Inductor's C++ GEMM template (AVX-512 / AMX micro-kernels) and aten's
(``benchmarks/bench_compiled_step.py`` measures it beside the eager step).

Shapes and what recompiles. The adaLN modulations come from the tables computed ahead, as in
the eager step (not read per step). Attention reads each row's prefix through a mask over the
cache's first ``max(positions) + 1`` slots, a dynamic dimension: one program serves every
prefix length. The number of rows is static: a step of ``n`` live rows runs ``rows_for(n,
capacity)`` rows (the next power of two, at most the cache's rows), the extra rows feeding a
dummy token into free cache slots (never read: a slot's positions are written before a row in
it reads them). So a program is compiled (and autotuned, minutes for RAR-B on a 2-core CPU) once
per (prepared decoder, row bucket, raster or any-order batch), on its first step; a batch that
always holds its ``2 * B`` rows (``generate``) compiles once. A mask over the prefix rounds
differently from the eager step's exact prefix, so tokens agree with eager to float32 rounding
(tests/test_compiled_cpu.py), not bit for bit. Preparing raises Dynamo's recompile limit to
``RECOMPILE_LIMIT`` (all compiled CPU steps are programs of one function).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rargen.kv_cache import CacheAt
from rargen.model import RAR
from rargen.sampling.cpu import decoding_view

# Inductor settings of the compiled CPU step: frozen weights, C++ GEMM templates under max-autotune.
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
RECOMPILE_LIMIT = 64
# Row buckets from which a dtype's steps run eager (the oneDNN-packed step) instead: measured on
# the 2-vCPU host, RAR-B at prefix 130 (benchmarks/bench_compiled_step.py), float32 at 16 rows
# took 123 ms compiled against 76 ms eager, because max-autotune times each product with its
# weight hot in cache and picks MKL's, which streams slower from memory (130 ms with ATEN only,
# 87 ms with the C++ template only); at 2 rows compiled took 17 ms against 34. bf16 compiled is
# faster at both (24 vs 35 ms at 2 rows, 39 vs 73 at 16).
EAGER_FROM_ROWS = {torch.float32: 16}


class CacheLists(NamedTuple):
    """The KV cache's per-layer buffers as plain lists, what ``RAR.decode_step`` reads of a
    ``KVCache``: graph inputs, never frozen (the step writes them), and any cache fits."""

    k: list[Tensor]
    v: list[Tensor]


def _step(model: RAR, tokens, modulation, positions, cache: CacheLists, mask, image_positions=None) -> Tensor:
    return model.decode_step(tokens, modulation, cache, CacheAt(positions, mask=mask), image_positions)


def rows_for(live: int, capacity: int) -> int:
    """Rows a step of ``live`` rows runs: the next power of two, at most ``capacity``."""
    return min(capacity, 1 << (live - 1).bit_length())


class CompiledCpuStep:
    """``RAR.decode_step`` of one model compiled by Inductor with its weights frozen.

    Holds a view of the model sharing its parameters (``decoding_view``), not the model itself,
    so a prepared decoder can be kept with the model (``rargen.sampling.prepared``)."""

    def __init__(self, model: RAR) -> None:
        if model.device.type != "cpu":
            raise ValueError(f"the compiled CPU step runs on a CPU, got {model.device.type}")
        self.model = decoding_view(model, lambda name, module: None)
        # Every prepared model, row bucket and order kind is a program of the one ``_step``; past
        # Dynamo's limit (8 by default) a step would silently run uncompiled.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        self._compiled = torch.compile(_step, fullgraph=True, dynamic=False)

    def compiles(self, live: int, capacity: int) -> bool:
        """Whether a step of ``live`` rows (of a cache of ``capacity``) runs this program, or the
        eager step (``EAGER_FROM_ROWS``)."""
        return rows_for(live, capacity) < EAGER_FROM_ROWS.get(self.model.dtype, capacity + 1)

    def __call__(
        self, tokens: Tensor, modulation: Tensor, positions: Tensor, cache, longest: int, image_positions=None
    ) -> Tensor:
        """Logits (n, V) of the ``n`` rows feeding ``tokens`` at ``positions`` (``longest`` their
        largest, known on the host) in cache slots 0 .. n - 1, as ``RAR.decode_step``."""
        n = tokens.shape[0]
        rows = rows_for(n, cache.k[0].shape[0])
        if rows > n:  # dummy rows: token 0 at sequence index 2 of a free slot
            extra = rows - n
            tokens = F.pad(tokens, (0, extra))
            modulation = F.pad(modulation, (0, 0, 0, 0, 0, extra))
            positions = F.pad(positions, (0, extra), value=2)
            if image_positions is not None:
                image_positions = torch.cat(
                    [image_positions, image_positions.new_tensor([[0, 1]]).expand(extra, 2)]
                )
        slots = torch.arange(longest + 1, device=positions.device)
        mask = (slots <= positions[:, None])[:, None, None]  # (rows, 1, 1, longest + 1)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.no_grad():
            out = self._compiled(
                self.model, tokens, modulation, positions, CacheLists(cache.k, cache.v), mask, image_positions
            )
        return out[:n]


__all__ = ["EAGER_FROM_ROWS", "INDUCTOR_OPTIONS", "CacheLists", "CompiledCpuStep", "rows_for"]
