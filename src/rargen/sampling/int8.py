"""int8 decoding on CPUs: an explicit, inexact speed option (``quantize="int8"``).

Every Linear of the per-step path (attention qkv and projection, the MLP, the head) gets int8
weights with one scale per output channel (symmetric, the channel's max |w| / 127), multiplied
with torch's dynamically quantized linear (fbgemm / oneDNN, the CPU's int8 dot-product
instructions): each call quantizes its input rows to 8 bits with one scale and zero point per
call, multiplies in int32 and rescales to float32. The adaLN modulations, computed ahead of the
loop and not read per step, stay in float32, as do the norms, attention and guidance.

Measured on the 2-core AMD EPYC (``torch.ops.aten._weight_int8pack_mm``, the weight-only kernel,
with bf16 or float32 activations, ran no faster than the float32 oneDNN product at 4-64 rows,
or far slower) the dynamic int8 product is the fastest torch path here; its error against float64
is measured like bf16's (``benchmarks/bench_precision.py``, BENCHMARKS.md). It changes the
distribution: use it where speed matters more than exactness. The input scale is per call, so
a sample's numbers also depend slightly on the rows multiplied beside it (its batch, and with
``speculate`` its window): seeds stay reproducible for one batch layout only.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from rargen.model import RAR
from rargen.sampling.cpu import decoding_view

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 per-output-channel weights, on the dynamic int8 product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.int64)
        with warnings.catch_warnings():  # torch deprecates quantized tensors; its int8 kernels take them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        out = torch.ops.quantized.linear_dynamic(rows, self._packed, False)
        return out.view(*x.shape[:-1], self.out_features)


def int8_available() -> bool:
    return "quantized" in dir(torch.ops) and hasattr(torch.ops.quantized, "linear_dynamic")


def quantized_for_decoding(model: RAR, quantize: str) -> RAR:
    """A view of a float32 CPU ``model`` whose per-step Linears are int8 (``Int8Linear``); the
    other parameters are shared. ``model`` is left untouched."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantize={quantize!r}; choose from {list(QUANTIZATIONS)} (or None: off)")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"quantize='int8' runs a float32 model on a CPU, got {model.dtype} on {model.device.type}; "
            "use model.float().cpu() (or bf16 on a GPU)"
        )
    if not int8_available():
        raise ValueError("quantize='int8' needs torch's quantized CPU kernels (torch.ops.quantized)")
    per_step = {"qkv", "proj", "fc1", "fc2", "head"}  # not adaln: its modulations are computed ahead

    def int8(name: str, module: nn.Module) -> nn.Module | None:
        return Int8Linear(module) if isinstance(module, nn.Linear) and name in per_step else None

    return decoding_view(model, int8)


__all__ = ["QUANTIZATIONS", "Int8Linear", "int8_available", "quantized_for_decoding"]
