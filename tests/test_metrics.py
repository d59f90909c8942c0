"""Metric definitions against direct numpy/scipy computations and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from rargen.evaluation.metrics import (
    FeatureStats,
    GaussianStats,
    frechet_distance,
    inception_score,
    iter_npz_batches,
    manifold_radii,
    open_image_batch,
    precision_recall,
)


def _random_stats(rng: np.random.Generator, dim: int) -> GaussianStats:
    a = rng.standard_normal((dim, 2 * dim))
    return GaussianStats(rng.standard_normal(dim), a @ a.T / (2 * dim))


def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(0)
    a, b = _random_stats(rng, 16), _random_stats(rng, 16)
    # The closed form, written independently: through the symmetric form S1^1/2 S2 S1^1/2.
    r1 = scipy.linalg.sqrtm(a.sigma).real
    cross = scipy.linalg.sqrtm(r1 @ b.sigma @ r1).real
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(cross)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    stats = FeatureStats(32).update(feats).gaussian()
    assert abs(frechet_distance(stats, stats)) < 1e-8


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    # Diagonal covariances: FID = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    a = GaussianStats(np.zeros(3), np.diag(s1))
    b = GaussianStats(np.array([1.0, 0.0, 2.0]), np.diag(s2))
    assert frechet_distance(a, b) == pytest.approx(5.0 + 1.0 + 1.0 + 4.0, rel=1e-12)


def test_streaming_stats_equal_numpy_in_chunks_and_merged():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((301, 20)) * 3 + 5
    one = FeatureStats(20)
    for i, chunk in enumerate(np.array_split(feats, 7)):
        one.update(torch.from_numpy(chunk) if i % 2 else chunk)  # tensors and arrays alike
    merged = FeatureStats(20).update(feats[:100]).merge(FeatureStats(20).update(feats[100:]))
    for stats in (one, merged):
        assert stats.count == 301
        gaussian = stats.gaussian()
        np.testing.assert_allclose(gaussian.mu, feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(gaussian.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-11)


def test_stats_reject_wrong_dimension():
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        FeatureStats(4).update(np.zeros((3, 5)))


def test_inception_score_matches_direct_computation():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((30, 12)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for part in np.split(probs, 3):  # split_size 10 -> 3 splits
        marginal = part.mean(0)
        kl = [np.sum(p * np.log(p / marginal)) for p in part]
        expected.append(np.exp(np.mean(kl)))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(expected), rel=1e-10)


def test_inception_score_limits():
    # Confident, uniformly spread predictions: IS = number of classes; identical ones: IS = 1.
    confident = np.eye(8)[np.arange(80) % 8] * 50.0
    assert inception_score(confident, split_size=80) == pytest.approx(8.0, rel=1e-6)
    assert inception_score(np.tile(confident[:1], (80, 1))) == pytest.approx(1.0, rel=1e-6)


def _brute_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    r_ref, r_smp = radii(ref), radii(smp)
    d = np.linalg.norm(ref[:, None] - smp[None], axis=-1)  # (R, S)
    precision = np.mean([np.any(d[:, j] <= r_ref) for j in range(len(smp))])
    recall = np.mean([np.any(d[i] <= r_smp) for i in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_precision_recall_matches_brute_force(batch_size):
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((60, 5))
    smp = rng.standard_normal((45, 5)) * 1.5 + 0.7
    expected = _brute_precision_recall(ref, smp, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    got = precision_recall(ref, smp, k=3, batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-12)


def test_manifold_radii_are_squared_kth_neighbour_distances():
    x = np.arange(6, dtype=np.float64)[:, None]  # points 0..5 on a line
    radii = manifold_radii(x, k=2, batch_size=4).numpy()
    np.testing.assert_allclose(radii, [4.0, 1.0, 1.0, 1.0, 1.0, 4.0])


def test_npz_batches_and_reference_files(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (11, 4, 6, 3), dtype=np.uint8)
    for name, save in (("stored.npz", np.savez), ("deflated.npz", np.savez_compressed)):
        path = tmp_path / name
        save(path, arr_0=images, labels=np.arange(11), mu=np.zeros(3), sigma=np.eye(3))
        np.testing.assert_array_equal(np.concatenate(list(iter_npz_batches(path, batch_size=4))), images)
        info = open_image_batch(path)
        assert (info.num_images, info.image_shape) == (11, (4, 6, 3))
        np.testing.assert_array_equal(info.labels, np.arange(11))
        np.testing.assert_array_equal(info.pool_stats.sigma, np.eye(3))
        assert info.spatial_stats is None
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_image_batch(bad)
    with pytest.raises(ValueError, match="neither images"):
        np.savez(bad, something=np.zeros(2))
        open_image_batch(bad)
