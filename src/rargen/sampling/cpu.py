"""Fast decoding on CPUs: the model's Linear layers with weights prepacked for oneDNN.

Decoding multiplies a few rows (2 per image with guidance) by every weight matrix, so a decode
step is a chain of skinny matrix products whose speed is set by how fast the weights stream
from memory. PyTorch's default path (MKL ``sgemm`` on the plain row-major weight) reaches about
a third of this machine's memory bandwidth on such products; oneDNN with a weight laid out
ahead of time for its kernels reaches most of it (``benchmarks/bench_sampling.py``,
BENCHMARKS.md). The arithmetic keeps the model's dtype (float32, or bfloat16 for a bf16
model): only the summation order differs (~1e-6 relative in float32), and the fc1 GELU (exact,
erf) runs inside the same oneDNN call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.kv_cache import KVCache
from rargen.model import MLP, RAR

# oneDNN streams the weights slower with its 1-3 row kernels than with its 4-row kernel (measured
# on an AVX-512 CPU with oneDNN 3.12: 2 rows ~20% slower in float32, ~8% in bfloat16), so a
# decode step with guidance at batch 1 (2 rows) multiplies 4 rows, two of them zeros.
MIN_ROWS = 4


def _linear_pointwise_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` (optionally followed by exact GELU) on a prepacked oneDNN weight.

    Takes and returns ordinary dense tensors (..., in) -> (..., out) of the weight's dtype.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none") -> None:
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        self.out_features = linear.out_features
        self.activation = activation
        # Reordered once into oneDNN's blocked layout: at 16 rows this is 1.4x faster than the
        # plain layout, which oneDNN would otherwise re-block inside every call.
        # Buffers (never saved), so copy.deepcopy(view, memo) can share them between replicas.
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", linear.bias.detach(), persistent=False)
        # oneDNN post-op: "gelu" with algorithm "none" is the erf GELU of F.gelu's default.
        self.algorithm = "none" if activation == "gelu" else ""

    def forward(self, x: Tensor) -> Tensor:
        linear = torch.ops.mkldnn._linear_pointwise
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] < MIN_ROWS:  # zero rows in, their outputs dropped: the real rows unchanged
            padded = F.pad(rows, (0, 0, 0, MIN_ROWS - rows.shape[0]))
            out = linear(padded, self.weight, self.bias, self.activation, [], self.algorithm)
            return out[: rows.shape[0]].view(*x.shape[:-1], -1)
        return linear(x, self.weight, self.bias, self.activation, [], self.algorithm)


class PackedMLP(nn.Module):
    """``MLP`` for inference: fc1 + GELU in one oneDNN call, then fc2 (dropout is off in eval)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.fc1 = PackedLinear(mlp.fc1, activation="gelu")
        self.fc2 = PackedLinear(mlp.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))


def packed_for_cpu_decoding(model: RAR) -> RAR:
    """A view of ``model`` for fast CPU decoding.

    The view shares every parameter except the Linear weights, which are prepacked copies (so
    take a new view after the weights change), and has no KV cache of its own yet (~0.65 s for
    RAR-B; ``prepare_for_decoding`` keeps the view with the model while its weights are
    unchanged, so ``generate`` pays it once). Returns ``model`` itself
    where packing does not apply (not CPU, not float32 or bfloat16, no oneDNN, training) or
    when it is already such a view.
    """
    weight = model.head.weight
    if is_packed(model) or weight.device.type != "cpu" or model.training:
        return model
    if not _linear_pointwise_available():
        return model
    if weight.dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return model
    elif weight.dtype != torch.float32:
        return model

    def packed(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, MLP):
            return PackedMLP(module)
        return PackedLinear(module) if isinstance(module, nn.Linear) else None

    return decoding_view(model, packed)


def decoding_view(model: RAR, replace: Callable[[str, nn.Module], nn.Module | None]) -> RAR:
    """A shallow copy of ``model``'s module tree sharing every parameter, in which each submodule
    for which ``replace(its name, it)`` returns a module is swapped for that module, and without
    the KV cache (a view gets its own). The one way decoding views are made (oneDNN-packed here,
    int8 in ``rargen.sampling.int8``); ``model`` is left untouched."""

    def view(module: nn.Module | None, name: str) -> nn.Module | None:
        if module is None or isinstance(module, KVCache):
            return None
        replaced = replace(name, module)
        if replaced is not None:
            return replaced
        clone = copy.copy(module)
        clone._modules = {child: view(sub, child) for child, sub in module._modules.items()}
        return clone

    return view(model, "")


def is_packed(model: RAR) -> bool:
    """Whether ``model`` is a ``packed_for_cpu_decoding`` view."""
    return isinstance(model.head, PackedLinear)


__all__ = ["PackedLinear", "PackedMLP", "decoding_view", "is_packed", "packed_for_cpu_decoding"]
