"""One held-out split for the whole pipeline (issue 27): no held-out image reaches a training set.

A folder of marked images (each a constant grey of its own value, so any copy of it names it: in
pixels, and in the tokens of a tokenizer whose code is the grey value) goes through train-tokenizer,
train-classifier and pretokenize. What each stage trains on is captured where it is handed over
(the tokenizer's training images, the classifier's ``fit_classifier`` input, the training store's
tokens) and compared with the held-out images: disjoint, the same held-out images in every stage,
and a stage given another split is refused naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import rargen.evaluation.classifier as classifier_module
import rargen.train.tokenizer as tokenizer_module
from rargen.cli.main import main
from rargen.data.sources import FolderSource
from rargen.data.split import check_same_split, heldout_split
from rargen.data.store import pretokenize
from rargen.data.token_store import TokenStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZES = {"a": 10, "b": 9, "c": 7}  # images per class (uneven: the split is per class)


def marked_folder(root: Path) -> dict[str, int]:
    """8x8 grey images, each one constant value (10, 17, 24, ...): ``{relative name: value}``;
    plus one corrupt file in class a (unreadable: skipped on whichever side it falls)."""
    values, value = {}, 10
    for name, count in SIZES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(root / name / f"{i:02d}.png")
            values[f"{name}/{i:02d}.png"], value = value, value + 7
    (root / "a" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return values


def marks(images: Tensor) -> set[int]:
    """The grey value of each (constant) image (N, C, S, S) in [0, 1]."""
    assert float((images - images.mean(dim=(1, 2, 3), keepdim=True)).abs().max()) < 1e-3  # still constant
    return {round(float(v) * 255) for v in images.mean(dim=(1, 2, 3))}


class ValueTokenizer(nn.Module):
    """Codes = the grey value of each 4x4 patch (0..255): a store's tokens name its images."""

    codebook_size = 256

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        return height // 4, width // 4

    def encode(self, images: Tensor) -> Tensor:
        return (F.avg_pool2d(images[:, :1], 4)[:, 0] * 255).round().long()


def store_marks(path: Path) -> set[int]:
    store = TokenStore(path)
    tokens = np.stack([store[i][0][0] for i in range(len(store))])  # (N, 2, 2), one variant
    assert (tokens == tokens[:, :1, :1]).all()
    return set(tokens[:, 0, 0].tolist())


@pytest.mark.slow
def test_no_heldout_image_reaches_a_training_set(tmp_path, monkeypatch, capsys):
    data = tmp_path / "marked"
    values = marked_folder(data)
    readable = set(values.values())
    seen: dict[str, tuple[set[int], set[int]]] = {}

    load_training_images = tokenizer_module.load_training_images

    def spy_tokenizer_images(*args, **kwargs):
        split = load_training_images(*args, **kwargs)
        seen["tokenizer"] = marks(split.train_images), marks(split.heldout_images)
        return split

    fit_classifier = classifier_module.fit_classifier

    def spy_classifier(build, images, *args, **kwargs):
        seen["classifier"] = marks(images), set()
        return fit_classifier(build, images, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "load_training_images", spy_tokenizer_images)
    monkeypatch.setattr(classifier_module, "fit_classifier", spy_classifier)
    tok, clf = tmp_path / "tok", tmp_path / "clf"
    assert main(["train-tokenizer", "--data", str(data), "--out", str(tok), "--preset", "vq-tiny",
                 "--steps", "2", "--batch-size", "8", "--threads", "1"]) == 0  # fmt: skip
    assert main(["train-classifier", "--data", str(data), "--out", str(clf), "--epochs", "1",
                 "--feature-dim", "8", "--threads", "1"]) == 0  # fmt: skip
    clf_report = json.loads((clf / "report.json").read_text())

    # The held-out images: the split of the folder's entries, as recorded by both trainers.
    _, heldout_idx, split = heldout_split(FolderSource(data), 0.2, 0)
    source = FolderSource(data)
    heldout = {values[source.name(int(i))] for i in heldout_idx if source.name(int(i)) in values}
    assert 5 <= len(heldout) <= 6 and heldout < readable  # 2 + 2 + 1 held out, one may be the broken file
    tok_split = json.loads((tok / "tokenizer" / "config.json").read_text())["extra"]["split"]
    assert tok_split == split == clf_report["split"]

    tok_train, tok_heldout = seen["tokenizer"]
    assert tok_heldout == heldout and tok_train == readable - heldout  # disjoint, every image used
    # The classifier fits on the training side less its validation share (its stopping rule's).
    assert (
        seen["classifier"][0] <= readable - heldout
        and len(seen["classifier"][0]) >= len(readable - heldout) - 3
    )
    assert clf_report["num_heldout"] == len(heldout)

    # pretokenize: the training store holds no held-out image, the held-out store all of them.
    pretokenize(
        data, ValueTokenizer(), tmp_path / "store", image_size=8, heldout_fraction=0.2, progress=False
    )
    assert store_marks(tmp_path / "store") == readable - heldout
    assert store_marks(tmp_path / "store-heldout") == heldout
    assert TokenStore(tmp_path / "store").meta["split"]["heldout_store"] == "store-heldout"

    # The trained tokenizer's split is the store's; another seed is refused, naming both.
    args = ["pretokenize", "--data", str(data), "--tokenizer", str(tok / "tokenizer"), "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "vq")]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "vq2"), "--split-seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "the tokenizer holds out" in error and "seed 0" in error and "seed 1" in error
    assert not (tmp_path / "vq2" / "meta.json").exists()

    # rargen train refuses the held-out store and reports the held-out NLL of the training store's.
    tiny = ["--model", "dim=32", "--model", "depth=1", "--model", "num_heads=2", "--model", "mlp_dim=64"]
    train = ["train", "--steps", "3", *tiny, "--threads", "1", "--device", "cpu"]
    assert main([*train, "--data", str(tmp_path / "store-heldout"), "--out", str(tmp_path / "g0")]) == 2
    assert "held-out images" in capsys.readouterr().err
    assert main([*train, "--data", str(tmp_path / "store"), "--out", str(tmp_path / "gen")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "gen" / "heldout_nll.json").read_text())
    from rargen.checkpoint import load
    from rargen.evaluation.likelihood import raster_nll_bits, store_tokens

    model = load(tmp_path / "gen" / "final").eval()
    direct = raster_nll_bits(model, *store_tokens(tmp_path / "store-heldout"))
    assert result["heldout_nll"] == pytest.approx(direct, rel=1e-6)
    assert result["num_heldout_images"] == len(TokenStore(tmp_path / "store-heldout"))
    assert f"held-out NLL {direct:.3f} bits/token" in printed


def test_a_split_of_other_data_or_settings_is_refused_naming_both(tmp_path):
    marked_folder(tmp_path / "d")
    source = FolderSource(tmp_path / "d")
    base = heldout_split(source, 0.2, 0)[2]
    check_same_split(base, "the tokenizer", heldout_split(source, 0.2, 0)[2], "the store")  # the same: passes
    for other in (heldout_split(source, 0.3, 0)[2], heldout_split(source, 0.2, 5)[2]):
        with pytest.raises(ValueError, match="the tokenizer holds out .* but the store holds out"):
            check_same_split(base, "the tokenizer", other, "the store")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / "c" / "new.png")  # the data changed
    changed = heldout_split(FolderSource(tmp_path / "d"), 0.2, 0)[2]
    assert changed["source_digest"] != base["source_digest"]
    with pytest.raises(ValueError, match="digest"):
        check_same_split(base, "the classifier", changed, "the samples' data")


def test_the_digits_keep_their_fixed_split():
    from rargen.data.digits import split_indices
    from rargen.data.sources import open_source

    source = open_source("digits", image_size=8)
    train, heldout, record = heldout_split(source)
    assert len(source) == 1797 and np.array_equal(heldout, split_indices(1797, "heldout").numpy())
    assert record["source"] == "digits:all" and len(train) + len(heldout) == 1797
    with pytest.raises(ValueError, match="fixed held-out split"):
        heldout_split(source, 0.1, 0)
    assert torch.equal(torch.as_tensor(train), split_indices(1797, "train"))


def test_pretokenize_without_a_split_writes_one_store(tmp_path):
    """``--heldout-fraction 0`` (ImageNet: its held-out images are the val split) and the library's
    default keep every image in OUT, with no held-out store and no split recorded."""
    values = marked_folder(tmp_path / "d")
    for fraction in (None, 0.0):
        out = tmp_path / f"s{fraction}"
        pretokenize(tmp_path / "d", ValueTokenizer(), out, image_size=8, heldout_fraction=fraction)
        assert store_marks(out) == set(values.values()) and TokenStore(out).meta["split"] is None
        assert not (tmp_path / f"s{fraction}-heldout").exists()


def test_the_nll_line_calls_memorisation_only_when_the_training_nll_is_far_lower() -> None:
    from rargen.evaluation.likelihood import describe_nll

    counts = {"num_heldout_images": 359, "num_train_images": 1438}
    even = describe_nll({"heldout_nll": 6.936, "train_nll": 6.936} | counts)
    assert "no sign of memorisation" in even and "6.936" in even
    learnt = describe_nll({"heldout_nll": 5.632, "train_nll": 0.865} | counts)
    assert "4.767 lower on the training images: memorisation" in learnt
