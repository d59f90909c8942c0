"""``rargen evaluate``: FID, sFID, IS, precision and recall of a sample batch, ADM-compatible.

Runs the PyTorch port of the FID Inception (``rargen.evaluation.inception``) over the samples (and over the
reference batch's images, which precision/recall need), then applies ADM's metric definitions
(``rargen.evaluation.metrics``). Where the reference ``.npz`` stores ``mu``/``sigma``/``mu_s``/``sigma_s``
they are used for FID/sFID, as ADM's evaluator does. The result is written as ``metrics.json``
together with everything needed to trust it later: sample count, the sampler settings from the
``meta.json`` beside the samples, and the hashes of the reference batch and the feature network.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rargen.evaluation.inception import POOL_DIM, SPATIAL_DIM, FIDInception, load_inception
from rargen.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    iter_npz_batches,
    open_image_batch,
    precision_recall,
)
from rargen.progress import progress_bar


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 100  # images per Inception forward
    device: str = "cpu"
    is_split_size: int = 5000  # ADM: IS over chunks of 5000 (10 splits for 50k samples)
    nearest_k: int = 3  # ADM: the 3rd nearest neighbour sets a point's manifold radius
    pr_batch_size: int = 10000  # rows/columns per pairwise-distance block


# eq=False: arrays inside; compared by identity (see tests/test_structure.py)
@dataclass(eq=False)
class InceptionFeatures:
    pool: np.ndarray  # (N, 2048) float32, kept whole for precision/recall
    pool_stats: FeatureStats
    spatial_stats: FeatureStats
    logits: np.ndarray | None  # (N, 1008) float32


@torch.inference_mode()
def inception_features(
    net: FIDInception,
    batches: Iterable[np.ndarray],
    total: int | None = None,
    device: str | torch.device = "cpu",
    desc: str = "inception",
    progress: bool = True,
) -> InceptionFeatures:
    """Run ``net`` over uint8 (B, H, W, 3) image batches, streaming the Gaussian statistics."""
    pool_stats, spatial_stats = FeatureStats(POOL_DIM), FeatureStats(SPATIAL_DIM)
    pools, logits = [], []
    with progress_bar(total=total, desc=desc, unit="img", enabled=progress) as bar:
        for batch in batches:
            images = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
            out = net(images)
            pool_stats.update(out.pool)
            spatial_stats.update(out.spatial)
            pools.append(out.pool.float().cpu().numpy())
            if out.logits is not None:
                logits.append(out.logits.float().cpu().numpy())
            bar.update(len(batch))
    return InceptionFeatures(
        pool=np.concatenate(pools) if pools else np.zeros((0, POOL_DIM), np.float32),
        pool_stats=pool_stats,
        spatial_stats=spatial_stats,
        logits=np.concatenate(logits) if logits else None,
    )


def _read_meta(samples: Path) -> dict[str, Any] | None:
    meta = samples.parent / "meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    inception: str | os.PathLike,
    config: EvalConfig = EvalConfig(),
    out: str | os.PathLike | None = None,  # metrics.json path (default: beside the samples)
    progress: bool = True,  # a progress bar
) -> dict[str, Any]:
    """Metrics of ``samples`` (.npz, ``arr_0`` uint8 NHWC) against an ADM reference batch.

    Returns (and writes to ``out``, default ``metrics.json`` beside the samples) a dict with
    ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall`` (None where the inputs
    cannot give it: IS needs weights with a classifier, precision/recall reference images) and
    ``record``.
    """
    from rargen.version import __version__
    from rargen.weight_files import file_sha256

    samples, reference, inception = Path(samples), Path(reference), Path(inception)
    sample_file, ref_file = open_image_batch(samples), open_image_batch(reference)
    if sample_file.num_images < 2:
        raise ValueError(
            f"{str(samples)!r} must hold at least 2 images in arr_0, found {sample_file.num_images}"
        )
    net = load_inception(inception, config.device)

    def features(file, desc):
        batches = iter_npz_batches(file.path, "arr_0", config.batch_size)
        batches = (np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b for b in batches)  # grey -> RGB
        return inception_features(net, batches, file.num_images, config.device, desc, progress)

    sample_feats = features(sample_file, "samples")
    ref_feats = features(ref_file, "reference") if ref_file.num_images > 0 else None

    if ref_file.pool_stats is not None:
        ref_pool, ref_spatial, ref_source = ref_file.pool_stats, ref_file.spatial_stats, "stored"
    else:
        ref_pool, ref_spatial = ref_feats.pool_stats.gaussian(), ref_feats.spatial_stats.gaussian()
        ref_source = "computed"
    if ref_spatial is None and ref_feats is not None:
        ref_spatial = ref_feats.spatial_stats.gaussian()

    fid = frechet_distance(sample_feats.pool_stats.gaussian(), ref_pool)
    sfid = frechet_distance(sample_feats.spatial_stats.gaussian(), ref_spatial) if ref_spatial else None
    score = (
        inception_score(sample_feats.logits, config.is_split_size)
        if sample_feats.logits is not None
        else None
    )
    precision = recall = None
    if ref_feats is not None and ref_feats.pool.shape[0] > config.nearest_k:
        precision, recall = precision_recall(
            ref_feats.pool, sample_feats.pool, config.nearest_k, config.pr_batch_size, config.device
        )

    result = {
        "fid": fid,
        "sfid": sfid,
        "inception_score": score,
        "precision": precision,
        "recall": recall,
        "record": {
            "samples": str(samples),
            "num_samples": sample_file.num_images,
            "sample_shape": list(sample_file.image_shape),
            "num_labels": None if sample_file.labels is None else int(len(sample_file.labels)),
            "sampler": _read_meta(samples),
            "reference": str(reference),
            "reference_sha256": file_sha256(reference),
            "num_reference_images": ref_file.num_images,
            "reference_statistics": ref_source,
            "feature_net": str(inception),
            "feature_net_sha256": file_sha256(inception),
            "eval_config": asdict(config),
            "rargen_version": __version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
        },
    }
    out = Path(out) if out is not None else samples.parent / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """One line per metric, as printed by ``rargen evaluate``."""
    names = [("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "Precision"),
             ("recall", "Recall")]  # fmt: skip
    lines = [f"{label:<10} {'n/a' if result[key] is None else f'{result[key]:.4f}'}" for key, label in names]
    record = result["record"]  # the counts: FID and IS are biased by small ones (50,000 is the standard)
    references = f"(reference batch: {record['num_reference_images']} images)"
    lines.append(f"{'Samples':<10} {record['num_samples']} {references}")
    return "\n".join(lines)
