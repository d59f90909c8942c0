"""Your own images: one source notion, a stratified held-out split, sizes from the tokenizer, skip reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.data.sources import FolderSource, read_images
from rargen.data.split import stratified_split
from rargen.data.store import pretokenize
from rargen.data.token_store import TokenStore
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig
from rargen.train.tokenizer import load_training_images


def _grey_folder(root, classes=3, per_class=6, size=12, corrupt=True):
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            value = np.full((size, size), 40 + 80 * c, dtype=np.uint8)
            value = np.clip(value + rng.integers(-20, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(value, mode="L").save(folder / f"{i:03d}.png")
    if corrupt:
        (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def test_stratified_split_holds_out_every_class_and_is_seeded():
    labels = np.repeat(np.arange(10), 20)  # written in class order, as a folder tree is
    train, heldout = stratified_split(labels, 0.1, seed=3)
    assert sorted(set(labels[heldout].tolist())) == list(range(10))
    assert np.bincount(labels[heldout]).tolist() == [2] * 10
    assert len(np.intersect1d(train, heldout)) == 0 and len(train) + len(heldout) == 200
    again = stratified_split(labels, 0.1, seed=3)
    other = stratified_split(labels, 0.1, seed=4)
    assert np.array_equal(heldout, again[1]) and not np.array_equal(heldout, other[1])
    assert heldout.tolist() != list(range(180, 200))  # not the last 10%


def test_training_images_from_a_folder_skip_and_report_the_corrupt_file(tmp_path, capsys):
    root = _grey_folder(tmp_path / "data")
    train, _, heldout, *_, split = load_training_images(root, 8, heldout_fraction=0.1, seed=0)
    out = capsys.readouterr().out
    assert "read 18 image(s), skipped 1" in out and "broken.png" in out
    # The split is of the folder's 19 entries (one per class held out); the broken one is not held out.
    assert split["num_source_images"] == 19 and split["num_heldout"] == 3 and split["heldout_fraction"] == 0.1
    assert train.shape == (15, 3, 8, 8) and heldout.shape == (3, 3, 8, 8)
    # One held-out image per class: the class means (40, 120, 200 grey) all appear among them.
    means = sorted(round(float(x.mean()) * 255 / 40) for x in heldout)
    assert means == [1, 3, 5]


def test_read_images_matches_the_source_and_lists_skips(tmp_path):
    source = FolderSource(_grey_folder(tmp_path / "data", classes=2, per_class=2))
    images, labels, kept, skipped = read_images(source, 12)
    assert images.shape == (4, 12, 12, 3) and labels.tolist() == [0, 0, 1, 1]
    assert [item["name"] for item in skipped] == ["class_0/broken.png"]
    np.testing.assert_array_equal(images[0], np.asarray(source.load(int(kept[0]))))


def test_pretokenize_takes_the_image_size_from_the_tokenizer(tmp_path):
    root = _grey_folder(tmp_path / "data", classes=2, per_class=2, size=20)
    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQTokenizerConfig.from_name("vq-tiny"))  # trained size 16 -> 4x4 tokens
    store = TokenStore(pretokenize(root, tokenizer, tmp_path / "s", progress=False))
    assert store.grid == (4, 4) and len(store) == 4 and store.meta["image_size"] == 16
    assert store.meta["num_skipped"] == 1


def test_pretokenize_records_no_size_needs_one(tmp_path):
    class Bare(torch.nn.Module):
        codebook_size = 4

    with pytest.raises(ValueError, match="records no image size"):
        pretokenize(_grey_folder(tmp_path / "d", 1, 2), Bare(), tmp_path / "s", progress=False)


def test_train_without_a_preset_on_a_small_store_uses_the_small_recipe(tmp_path, capsys):
    from rargen.cli.main import main
    from rargen.data.store import write_store

    rng = np.random.default_rng(0)
    store = write_store(
        tmp_path / "store", rng.integers(0, 8, size=(6, 1, 2, 2)), np.arange(6) % 2, codebook_size=8,
        class_names=("a", "b"),
    )  # fmt: skip
    argv = ["train", "--data", str(store), "--out", str(tmp_path / "run"), "--steps", "2", "--threads", "1"]
    argv += ["--model", "dim=32", "--model", "depth=1", "--model", "num_heads=2", "--model", "mlp_dim=64"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 1  # --threads
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "small-data recipe" in out and "rar-digits" in out
    # The summary: parameters, images and epochs (2 steps of batch 6 over 6 images = 2 epochs).
    assert "6 images, 2.0 epochs; 2 steps of batch 6" in out


def test_grid_has_a_row_for_every_class(tmp_path):
    from rargen.sampling.images import GRID_LABEL_WIDTH, save_grid

    labels = [c for c in range(10) for _ in range(50)]  # 500 images: the old grid showed classes 0 and 1
    images = np.zeros((500, 4, 4, 3), dtype=np.uint8)
    images[:, :, :, 0] = np.asarray(labels, dtype=np.uint8)[:, None, None] * 20
    note = save_grid(images, labels, [f"c{i}" for i in range(10)], tmp_path / "g.png", max_per_class=6)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (10 * 4, GRID_LABEL_WIDTH + 6 * 4, 3)
    last_column = [int(grid[row * 4, GRID_LABEL_WIDTH + 5 * 4, 0]) for row in range(10)]
    assert last_column == [20 * c for c in range(10)]
    assert note == "at most 6 samples per class shown"
    assert "2 of 10 classes not shown" in save_grid(images, labels, None, tmp_path / "h.png", max_classes=8)


def test_tokenizer_trained_on_grey_images_records_one_channel(tmp_path):
    from rargen.checkpoint import read_record
    from rargen.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    root = _grey_folder(tmp_path / "data", classes=2, per_class=4, size=16, corrupt=False)
    config = TokenizerTrainConfig(steps=2, batch_size=4, warmup_steps=1, sample_every=0, checkpoint_every=0)
    report = train_tokenizer(
        tmp_path / "tok", root, model_config=VQTokenizerConfig.from_name("vq-tiny"), train_config=config,
        progress=False,
    )  # fmt: skip
    assert report["image_channels"] == 1
    assert read_record(tmp_path / "tok" / "tokenizer")["extra"]["image_channels"] == 1
