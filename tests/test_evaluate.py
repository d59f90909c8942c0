"""``rargen evaluate`` end to end on tiny .npz files with a random-weight FID Inception."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from rargen.cli.main import main
from rargen.evaluation.inception import FIDInception
from rargen.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from rargen.weight_files import file_sha256


@pytest.mark.slow
def test_evaluate_cli_matches_direct_metric_computation(tmp_path, capsys):
    torch.manual_seed(0)
    net = FIDInception(with_logits=True).eval()
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    reference = rng.integers(0, 120, (5, 24, 24, 3), dtype=np.uint8)
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", arr_0=samples, labels=np.arange(6))
    (run / "meta.json").write_text(json.dumps({"cfg": 2.0, "seed": 42}))
    np.savez(tmp_path / "ref.npz", arr_0=reference)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few points in many dimensions: singular covariances
        args = ["evaluate", str(run / "samples.npz"), "--reference", str(tmp_path / "ref.npz")]
        code = main([*args, "--inception", str(weights), "--batch-size", "4", "--device", "cpu"])
        assert code == 0
        result = json.loads((run / "metrics.json").read_text())

        with torch.inference_mode():
            ours = net(torch.from_numpy(samples).permute(0, 3, 1, 2))
            theirs = net(torch.from_numpy(reference).permute(0, 3, 1, 2))

        def gauss(x):
            return FeatureStats(x.shape[1]).update(x).gaussian()

        assert result["fid"] == pytest.approx(
            frechet_distance(gauss(ours.pool), gauss(theirs.pool)), rel=1e-6
        )
        assert result["sfid"] == pytest.approx(
            frechet_distance(gauss(ours.spatial), gauss(theirs.spatial)), rel=1e-6
        )
    assert result["inception_score"] == pytest.approx(inception_score(ours.logits), rel=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(precision_recall(theirs.pool, ours.pool))
    record = result["record"]
    assert record["num_samples"] == 6 and record["num_reference_images"] == 5
    assert record["sampler"] == {"cfg": 2.0, "seed": 42}
    assert record["feature_net_sha256"] == file_sha256(weights)
    assert record["reference_sha256"] == file_sha256(tmp_path / "ref.npz")
    assert record["reference_statistics"] == "computed"
    printed = capsys.readouterr().out
    assert "FID" in printed and "Samples    6 (reference batch: 5 images)" in printed  # the counts

    # Grey samples (N, H, W, 1), as rargen sample writes for a grey tokenizer, are the same images
    # to the Inception network as their channels repeated to RGB.
    for name, images in (("grey", samples[..., :1]), ("repeated", np.repeat(samples[..., :1], 3, axis=-1))):
        np.savez(tmp_path / f"{name}.npz", arr_0=images, labels=np.arange(6))
        args = ["evaluate", str(tmp_path / f"{name}.npz"), "--reference", str(tmp_path / "ref.npz")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main([*args, "--inception", str(weights), "--out", str(tmp_path / f"{name}.json")]) == 0
    grey, repeated = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("grey", "repeated"))
    assert grey["fid"] == repeated["fid"] and grey["record"]["sample_shape"] == [24, 24, 1]


def test_evaluate_reports_bad_inputs(tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    args = ["evaluate", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref.npz")]
    assert main([*args, "--inception", str(tmp_path / "none.pth")]) == 2
    assert "uint8" in capsys.readouterr().err
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main([*args, "--inception", str(tmp_path / "none.pth")]) == 2
    assert "pt_inception-2015-12-05" in capsys.readouterr().err
