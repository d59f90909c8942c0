"""Pre-tokenization into a token store: round trip, crops, corrupt files, crash + resume, ranks, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.data.preprocess import image_variants, to_tensor
from rargen.data.sources import ArraySource, FolderSource, npz_source, open_source
from rargen.data.split import stratified_split
from rargen.data.store import pretokenize, write_store
from rargen.data.token_store import TokenStore
from tiny_tokenizer import FaultyTokenizer, PoolTokenizer


def _blocks(count: int, size: int, block: int, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 images of random colour blocks (structure the pooling sees)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (count, size // block + 1, size // block + 1, 3), dtype=np.uint8)
    return cells.repeat(block, axis=1).repeat(block, axis=2)[:, :size, :size]


def _direct(tokenizer: PoolTokenizer, source, index: int, size: int, augment: str) -> np.ndarray:
    """What the store should hold for one image: tokenize its variants directly."""
    return tokenizer.encode(to_tensor(image_variants(source.load(index), size, augment))).numpy()


def _store_arrays(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(path.glob("shard-*/*.npy"))]


def test_round_trip_equals_tokenizing_directly(tmp_path):
    source = open_source("digits:heldout", image_size=16)
    tokenizer = PoolTokenizer()
    pretokenize(
        source, tokenizer, tmp_path / "store", image_size=16, batch_size=8, shard_size=50, progress=False
    )
    store = TokenStore(tmp_path / "store")
    assert len(store) == len(source) == 359 and store.num_shards == 8
    assert store.grid == (4, 4) and store.num_variants == 1 and store.codebook_size == 64
    assert store.class_names == tuple(str(i) for i in range(10)) and store.num_classes == 10
    images = torch.from_numpy(source.images).permute(0, 3, 1, 2).float() / 255
    expected = tokenizer.encode(images).numpy()  # (N, 4, 4)
    stored = np.concatenate([store.shard_tokens(i) for i in range(store.num_shards)])
    np.testing.assert_array_equal(stored[:, 0], expected)
    np.testing.assert_array_equal(store.labels, source.labels)
    tokens, label = store[123]
    assert isinstance(tokens, np.memmap) and label == source.labels[123]  # a view, not a copy
    np.testing.assert_array_equal(store.gather(np.array([300, 5, 123]), np.zeros(3)), expected[[300, 5, 123]])
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "test-pool-tokenizer" and meta["num_images"] == 359
    assert meta["source"]["type"] == "digits" and meta["token_dtype"] == "uint16"


def test_ten_crop_stores_ten_distinct_variants_per_image(tmp_path):
    source = ArraySource(_blocks(6, 40, 3), np.arange(6) % 2)
    tokenizer = PoolTokenizer()
    store_path = pretokenize(
        source, tokenizer, tmp_path / "s", augment="ten-crop", image_size=32, batch_size=25, progress=False
    )
    store = TokenStore(store_path)
    assert store.num_variants == 10 and store.grid == (8, 8) and store.augment == "ten-crop"
    for index in range(len(source)):
        grids = store[index][0].reshape(10, -1)
        assert len({g.tobytes() for g in grids}) == 10, f"image {index} has repeated variants"
        np.testing.assert_array_equal(store[index][0], _direct(tokenizer, source, index, 32, "ten-crop"))


def test_flip_variant_is_the_mirrored_crop(tmp_path):
    source = ArraySource(_blocks(4, 24, 4, seed=1))
    tokenizer = PoolTokenizer()
    store = TokenStore(
        pretokenize(source, tokenizer, tmp_path / "s", augment="flip", image_size=24, progress=False)
    )
    assert store.num_classes == 0 and store.labels.tolist() == [0, 0, 0, 0]  # unconditional: all null (0)
    for index in range(4):
        crop = torch.from_numpy(source.images[index]).permute(2, 0, 1)[None].float() / 255
        np.testing.assert_array_equal(store[index][0][1], tokenizer.encode(crop.flip(-1))[0].numpy())


def test_corrupt_files_are_skipped_and_reported(tmp_path):
    root = tmp_path / "images"
    images = _blocks(6, 20, 5)
    for k, name in enumerate(["cat/a.png", "cat/b.jpg", "cat/c.png", "dog/d.png", "dog/e.png", "dog/f.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k]).save(root / name)
    (root / "cat" / "broken.png").write_bytes(b"this is not a png")
    good = (root / "dog" / "d.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated file
    source = FolderSource(root)
    assert len(source) == 8 and source.class_names == ("cat", "dog")
    tokenizer = PoolTokenizer()
    store = TokenStore(
        pretokenize(source, tokenizer, tmp_path / "s", image_size=16, shard_size=3, progress=False)
    )
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["num_skipped"] == 2 and report["num_images"] == 6 == len(store)
    assert sorted(item["name"] for item in report["skipped"]) == ["cat/broken.png", "dog/cut.png"]
    readable = [i for i in range(len(source)) if source.name(i) not in ("cat/broken.png", "dog/cut.png")]
    for row, index in enumerate(readable):
        np.testing.assert_array_equal(store[row][0], _direct(tokenizer, source, index, 16, "none"))
        assert store[row][1] == source.label(index)
    assert store.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_crashed_run_resumes_to_the_same_store(tmp_path):
    source = ArraySource(_blocks(37, 16, 2, seed=3), np.arange(37) % 5)
    kwargs = dict(augment="flip", image_size=16, batch_size=8, shard_size=6, progress=False)
    pretokenize(source, PoolTokenizer(), tmp_path / "clean", **kwargs)

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):  # 4 images per call: dies in shard 3
        pretokenize(source, FaultyTokenizer(fail_on=6), crashed, **kwargs)
    done = sorted(p.name for p in crashed.glob("shard-*"))
    assert done == ["shard-00000", "shard-00001"] and not (crashed / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        TokenStore(crashed)
    # A writer killed mid-shard leaves a hidden temporary folder; it must never be picked up.
    stale = crashed / ".shard-00002.tmp-killed"
    stale.mkdir()
    (stale / "tokens.npy").write_bytes(b"half written")
    first_shard_stamp = (crashed / "shard-00000" / "tokens.npy").stat().st_mtime_ns

    pretokenize(source, PoolTokenizer(), crashed, **kwargs)
    assert (
        crashed / "shard-00000" / "tokens.npy"
    ).stat().st_mtime_ns == first_shard_stamp  # kept, not redone
    assert not stale.exists()
    assert _store_arrays(crashed) == _store_arrays(tmp_path / "clean")  # byte-identical arrays
    assert len(TokenStore(crashed)) == 37


def test_ranks_split_shards_and_rank_zero_writes_meta(tmp_path):
    source = ArraySource(_blocks(20, 16, 4, seed=4), np.arange(20) % 3)
    kwargs = dict(image_size=16, shard_size=4, progress=False)
    pretokenize(source, PoolTokenizer(), tmp_path / "single", **kwargs)
    split = tmp_path / "split"
    with pytest.raises(RuntimeError, match="not written yet"):  # rank 0 alone cannot finish
        pretokenize(source, PoolTokenizer(), split, rank=0, world_size=2, **kwargs)
    assert sorted(p.name for p in split.glob("shard-*")) == ["shard-00000", "shard-00002", "shard-00004"]
    pretokenize(source, PoolTokenizer(), split, rank=1, world_size=2, **kwargs)
    assert not (split / "meta.json").exists()  # only rank 0 writes meta
    pretokenize(source, PoolTokenizer(), split, rank=0, world_size=2, **kwargs)
    assert _store_arrays(split) == _store_arrays(tmp_path / "single")
    assert len(TokenStore(split)) == 20


def test_a_different_run_into_the_same_folder_is_refused(tmp_path):
    source = ArraySource(_blocks(4, 16, 4))
    pretokenize(source, PoolTokenizer(), tmp_path / "s", image_size=16, progress=False)
    with pytest.raises(ValueError, match="augment"):
        pretokenize(source, PoolTokenizer(), tmp_path / "s", augment="flip", image_size=16, progress=False)
    other = PoolTokenizer(PoolTokenizer().config.__class__(seed=1))
    with pytest.raises(ValueError, match="tokenizer"):
        pretokenize(source, other, tmp_path / "s", image_size=16, progress=False)


def test_npz_sources_float_and_unconditional(tmp_path):
    images = _blocks(5, 8, 2)
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32) / 255, labels=np.array([2, 0, 1, 2, 0]))
    np.savez(tmp_path / "u.npz", arr_0=images[..., 0])  # grey, no labels
    conditional = npz_source(tmp_path / "f.npz")
    np.testing.assert_array_equal(conditional.images, images)
    assert conditional.class_names == ("0", "1", "2") and conditional.label(3) == 2
    unconditional = open_source(tmp_path / "u.npz")
    assert unconditional.num_classes == 0 and unconditional.label(4) == 0
    np.testing.assert_array_equal(unconditional.images[..., 2], images[..., 0])
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))  # floats beyond [0, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        npz_source(tmp_path / "bad.npz")


def test_write_store_from_arrays(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1024, (11, 2, 3, 3))
    store = TokenStore(
        write_store(
            tmp_path / "s",
            tokens,
            np.arange(11),
            codebook_size=1024,
            augment="flip",
            class_names=[str(i) for i in range(11)],
            shard_size=4,
        )
    )
    assert len(store) == 11 and store.num_shards == 3
    np.testing.assert_array_equal(store.gather(np.arange(11), np.ones(11)), tokens[:, 1])
    with pytest.raises(ValueError, match="1024"):
        write_store(tmp_path / "t", tokens + 1024, np.arange(11), codebook_size=1024, augment="flip")


def test_cli_pretokenize(tmp_path, capsys):
    from rargen.checkpoint import checkpoint_hash, register_kind, save
    from rargen.cli.main import main

    register_kind("test-pool-tokenizer", "tiny_tokenizer:PoolTokenizer")
    tokenizer = PoolTokenizer()
    save(tokenizer, tmp_path / "tok")
    argv = [
        "pretokenize",
        "--data",
        "digits:heldout",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "s"),
        "--augment",
        "flip",
        "--image-size",
        "16",
        "--shard-size",
        "100",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    # The command line holds out 20% of each class by default, into s-heldout (rargen.data.split).
    store, heldout = TokenStore(tmp_path / "s"), TokenStore(tmp_path / "s-heldout")
    assert len(store) + len(heldout) == 359 and len(heldout) == 73 and store.num_variants == 2
    assert store.num_shards == 3 and heldout.num_shards == 1
    assert store.meta["tokenizer_file"]["sha256"] == checkpoint_hash(tmp_path / "tok")
    source = open_source("digits:heldout", image_size=16)
    train_idx, heldout_idx = stratified_split(source.labels, 0.2, seed=0)
    np.testing.assert_array_equal(store[200][0], _direct(tokenizer, source, int(train_idx[200]), 16, "flip"))
    np.testing.assert_array_equal(heldout[5][0], _direct(tokenizer, source, int(heldout_idx[5]), 16, "flip"))
    assert store.meta["split"]["part"] == "train" and heldout.meta["split"]["part"] == "heldout"
    assert main(argv) == 0  # already complete: a no-op
    assert main([*argv[:-6], "--augment", "none", "--image-size", "16"]) == 2  # different settings refused
    assert "different settings" in capsys.readouterr().err


def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path):
    """PIL's convert("RGB") clips 16-bit values to 255 (a white square); they scale to 8 bits."""
    values = (np.arange(20 * 20, dtype=np.int64).reshape(20, 20) * 163).astype(np.uint16)  # 0..65037
    (tmp_path / "grey").mkdir()
    Image.fromarray(values).save(tmp_path / "grey" / "a.png")  # 16-bit greyscale PNG (mode I;16)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "grey" / "b.tif")  # big-endian 16-bit TIFF
    source = FolderSource(tmp_path / "grey")
    expected = np.round(values / 257.0).astype(np.uint8)
    for index in range(2):
        rgb = np.asarray(source.load(index))
        assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], expected)
    assert expected.min() == 0 and expected.max() == 253  # the whole range survives


def _png_bomb(path: Path, side: int = 10_000) -> None:
    """A real decompression bomb: a valid greyscale PNG of side x side zero pixels (~100 KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


def test_unusable_files_are_skipped_and_reported_never_hanging(tmp_path):
    """A FIFO named .png (used to hang the reader), a folder named .png, a real decompression bomb,
    an image over a configured pixel limit: each is skipped and listed in report.json."""
    import os
    import threading

    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    images = _blocks(3, 20, 5)
    for k in range(3):
        Image.fromarray(images[k]).save(root / "cat" / f"ok{k}.png")
    Image.fromarray(_blocks(1, 80, 5)[0]).save(root / "cat" / "large.png")  # 6400 px > the limit below
    os.mkfifo(root / "cat" / "fifo.png")
    (root / "cat" / "folder.png").mkdir()
    _png_bomb(root / "cat" / "bomb.png")
    assert (root / "cat" / "bomb.png").stat().st_size < 200_000

    result: dict = {}

    def run() -> None:
        result["out"] = pretokenize(
            FolderSource(root, max_pixels=5000),
            PoolTokenizer(),
            tmp_path / "s",
            image_size=16,
            progress=False,
        )

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "pretokenize hung on a non-regular file"
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    reasons = {item["name"]: item["error"] for item in report["skipped"]}
    assert sorted(reasons) == ["cat/bomb.png", "cat/fifo.png", "cat/folder.png", "cat/large.png"]
    assert "a FIFO" in reasons["cat/fifo.png"] and "a folder" in reasons["cat/folder.png"]
    assert "10000x10000 = 100,000,000 pixels is over the limit of 5,000" in reasons["cat/bomb.png"]
    assert "80x80 = 6,400 pixels" in reasons["cat/large.png"] and "--max-pixels" in reasons["cat/large.png"]
    assert report["num_images"] == 3 == len(TokenStore(result["out"]))
    # The default limit (40 M pixels) also refuses the bomb, before decoding it.
    with pytest.raises(ValueError, match="over the limit of 40,000,000"):
        FolderSource(root).load(
            [str(p) for p in FolderSource(root).files].index(str(root / "cat" / "bomb.png"))
        )


def test_pretokenize_on_a_complete_read_only_store(tmp_path, monkeypatch):
    """A complete store is only read: nothing in it is rewritten (plan.json used to be), so the
    command succeeds on a read-only disk."""
    import os

    source = ArraySource(_blocks(4, 16, 4), np.array([0, 1, 0, 1]))
    out = pretokenize(source, PoolTokenizer(), tmp_path / "s", image_size=16, shard_size=2, progress=False)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)  # read-only (for a non-root user)

    def no_writes(*args, **kwargs):  # root ignores file modes: any write attempt fails the test
        raise PermissionError(13, "Permission denied", str(args[0]) if args else None)

    monkeypatch.setattr("rargen.data.store._write_json", no_writes)
    monkeypatch.setattr("rargen.checkpoint.atomic_write_dir", no_writes)
    try:
        assert pretokenize(source, PoolTokenizer(), out, image_size=16, shard_size=2, progress=False) == out
        assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")} == before
        assert len(TokenStore(out)) == 4
    finally:
        for path in [out, *out.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
