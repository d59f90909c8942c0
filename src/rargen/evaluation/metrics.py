"""Sample-quality metrics with ADM's evaluator semantics: FID, sFID, IS, precision and recall.

Everything here works on features (any network's): streaming float64 Gaussian statistics that
merge across batches and ranks, the Fréchet distance between two Gaussians, the Inception Score
of classifier logits, and k-NN manifold precision/recall. It also reads the ``.npz`` files ADM
uses for reference batches and rargen writes for samples, in batches, so 50k 256x256 images never
have to sit in memory at once.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor


# eq=False: arrays inside; compared by identity (see tests/test_structure.py)
@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray


class FeatureStats:
    """Running float64 sum and sum of outer products of (N, D) feature batches.

    Sums (rather than running means) make merging exact and order-free: two ranks' stats add,
    and ``all_reduce`` is one collective. The covariance is the unbiased one of ``np.cov``.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.total = np.zeros(dim, dtype=np.float64)
        self.total_outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray | Tensor) -> FeatureStats:
        if isinstance(features, Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.total_outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add ``other``'s features to these stats (in place)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {other.dim} into dimension {self.dim}")
        self.count += other.count
        self.total += other.total
        self.total_outer += other.total_outer
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the stats of every rank of the default process group (in place; no-op without one)."""
        import torch.distributed as dist

        from rargen import distributed

        if not distributed.active():
            return self
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = torch.from_numpy(np.concatenate([[self.count], self.total, self.total_outer.ravel()])).to(
            device
        )
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        self.count = int(round(flat[0]))
        self.total = flat[1 : 1 + self.dim].copy()
        self.total_outer = flat[1 + self.dim :].reshape(self.dim, self.dim).copy()
        return self

    def gaussian(self) -> GaussianStats:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.total / self.count
        sigma = (self.total_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return GaussianStats(mu, sigma)


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as ADM's evaluator computes it.

    If the matrix square root is not finite, both covariances get ``eps`` on the diagonal; a
    complex root is accepted only if its diagonal's imaginary part is below 1e-3 (then dropped).
    """
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # ADM calls sqrtm(..., disp=False): a singular product is handled below, not reported.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product of covariances; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has imaginary component {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """ADM's Inception Score: mean over consecutive chunks of ``split_size`` of exp(E KL(p(y|x) || p(y))).

    With the standard 50,000 samples this is the usual 10 splits.
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).numpy()
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    # Same expansion as ADM (|a|^2 - 2ab + |b|^2, clamped at 0); squared distances compare the
    # same as distances.
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(
    features: np.ndarray | Tensor, k: int = 3, batch_size: int = 10000, device: str | torch.device = "cpu"
) -> Tensor:
    """Squared distance of each feature vector to its k-th nearest neighbour in the same set.

    The point itself (distance 0) is the 0-th neighbour, as in ADM's ManifoldEstimator.
    """
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32, device=device)
    for start in range(0, len(x), batch_size):
        d = torch.cat([_squared_distances(x[start : start + batch_size], x[j : j + batch_size])
                       for j in range(0, len(x), batch_size)], dim=1)  # fmt: skip
        radii[start : start + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(
    reference: np.ndarray | Tensor,
    samples: np.ndarray | Tensor,
    k: int = 3,
    batch_size: int = 10000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with ADM's ManifoldEstimator rules.

    Precision: fraction of samples within the k-NN radius of at least one reference point.
    Recall: fraction of reference points within the k-NN radius of at least one sample.
    Distances are float32 (ADM uses float16 on GPU and falls back to float32).
    """
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    smp = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref, k, batch_size, device)
    smp_radii = manifold_radii(smp, k, batch_size, device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_inside = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(smp), batch_size):
            d = _squared_distances(ref[i : i + batch_size], smp[j : j + batch_size])
            ref_inside[i : i + batch_size] |= (d <= smp_radii[None, j : j + batch_size]).any(1)
            smp_inside[j : j + batch_size] |= (d <= ref_radii[i : i + batch_size, None]).any(0)
    return smp_inside.double().mean().item(), ref_inside.double().mean().item()


# ---------------------------------------------------------------------------------------------
# .npz files: ADM reference batches and rargen samples


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise ValueError("Fortran-ordered arrays in .npz files are not supported")
    return shape, dtype


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of ``key`` in an .npz without reading it (None if absent)."""
    with zipfile.ZipFile(path) as archive:
        if f"{key}.npy" not in archive.namelist():
            return None
        with archive.open(f"{key}.npy") as f:
            return _npy_header(f)


def iter_npz_batches(
    path: str | os.PathLike, key: str = "arr_0", batch_size: int = 100
) -> Iterator[np.ndarray]:
    """Yield consecutive batches of the array ``key`` of an .npz, reading only one batch at a time."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        shape, dtype = _npy_header(f)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row)
            yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


# eq=False: arrays inside; compared by identity (see tests/test_structure.py)
@dataclass(frozen=True, eq=False)
class ImageBatchFile:
    """What an ADM-style .npz holds: images (``arr_0``, uint8 NHWC) and/or stored statistics."""

    path: Path
    num_images: int  # 0 when the file holds statistics only
    image_shape: tuple[int, ...]
    pool_stats: GaussianStats | None  # ADM's precomputed ``mu`` / ``sigma``
    spatial_stats: GaussianStats | None  # ADM's precomputed ``mu_s`` / ``sigma_s``
    labels: np.ndarray | None


def open_image_batch(path: str | os.PathLike) -> ImageBatchFile:
    """Inspect an ADM reference batch or a rargen ``samples.npz`` (reads everything but the images)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {str(path)!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is not an .npz file (expected arr_0 uint8 NHWC images and/or mu/sigma)"
        )
    info = npz_array_info(path, "arr_0")
    with np.load(path) as npz:
        keys = set(npz.files)
        pool = GaussianStats(npz["mu"], npz["sigma"]) if {"mu", "sigma"} <= keys else None
        spatial = GaussianStats(npz["mu_s"], npz["sigma_s"]) if {"mu_s", "sigma_s"} <= keys else None
        labels = npz["labels"] if "labels" in keys else None
    if info is None and pool is None:
        raise ValueError(
            f"{str(path)!r} has neither images (arr_0) nor statistics (mu, sigma); keys: {sorted(keys)}"
        )
    if info is not None:
        shape, dtype = info
        if len(shape) != 4 or shape[3] not in (1, 3) or dtype != np.uint8:
            raise ValueError(
                f"{str(path)!r}: arr_0 must be uint8 (N, H, W, 3) images (or (N, H, W, 1) grey), "
                f"got {dtype} {shape}"
            )
    num, image_shape = (info[0][0], tuple(info[0][1:])) if info is not None else (0, ())
    return ImageBatchFile(path, num, image_shape, pool, spatial, labels)
