"""Image folders label honestly (issue 25, items 4 and 5): one rule for what a class is
(``rargen.data.folders``), colliding, linked and empty classes refused naming them, everything
left out said, float images scaled rather than clipped, and a folder with nothing readable an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rargen.data.sources import FolderSource, to_rgb
from rargen.data.split import split_images
from rargen.data.store import pretokenize
from tiny_tokenizer import PoolTokenizer


def _image(path: Path, value: int = 100, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L").save(path)


def _tree(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            _image(root / name / f"{i:02d}.png", 40 + 30 * c)
    return root


# ---------------------------------------------------------------------------------------------
# Item 4: names that differ only in case


def test_class_names_differing_only_in_case_are_refused_naming_them_and_the_fix(tmp_path):
    root = _tree(tmp_path / "data", {"Cat": 2, "cat": 2, "CAT": 2, "dog": 2})
    with pytest.raises(ValueError, match="differ only in case") as caught:
        FolderSource(root)
    message = str(caught.value)
    assert "'CAT' / 'Cat' / 'cat'" in message and "rename" in message and "dog" not in message
    # Surrounding spaces count too: the server strips them before it looks a name up.
    with pytest.raises(ValueError, match="differ only in case or spaces"):
        FolderSource(_tree(tmp_path / "spaced", {"dog": 1, "dog ": 1}))


# ---------------------------------------------------------------------------------------------
# Item 5: empty and unreadable classes, links, images at the root, hidden folders


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 2, "dog": 0})
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no image file .*'dog' \(.*dog\).*remove the folder"):
        FolderSource(root)


def test_a_class_folder_of_unreadable_files_is_refused_naming_it(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 2})
    for name in ("a.png", "b.jpg"):
        (root / "dog" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "dog" / name).write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    with pytest.raises(ValueError, match=r"class 'dog' \(.*dog\): none of its 2 image file\(s\) can be read"):
        FolderSource(root)
    # One unreadable file in a class with readable ones is skipped at read time, as before.
    (root / "dog" / "c.png").unlink(missing_ok=True)
    _image(root / "dog" / "c.png")
    assert FolderSource(root).class_names == ("cat", "dog")


def test_a_class_folder_linked_to_another_class_or_the_root_is_refused_naming_both(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 3, "dog": 3})
    os.symlink(root / "cat", root / "kitten")
    with pytest.raises(ValueError, match="hold the same files") as caught:
        FolderSource(root)
    assert str(root / "cat") in str(caught.value) and str(root / "kitten") in str(caught.value)
    (root / "kitten").unlink()
    os.symlink(root, root / "everything")
    with pytest.raises(ValueError, match=r"everything'? is a link to .*holds the whole image folder"):
        FolderSource(root)
    (root / "everything").unlink()
    os.symlink(root / "dog" / "00.png", root / "cat" / "dog-00.png")  # one file, two labels
    with pytest.raises(ValueError, match="the same file .* in two classes") as caught:
        FolderSource(root)
    assert "dog-00.png" in str(caught.value) and str(root / "dog" / "00.png") in str(caught.value)


def test_a_class_folder_linked_from_elsewhere_is_followed_and_a_file_linked_twice_counts_once(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 2})
    elsewhere = _tree(tmp_path / "disk2", {"dog": 3})
    os.symlink(elsewhere / "dog", root / "dog")
    os.symlink(root / "cat" / "00.png", root / "cat" / "00-again.png")
    source = FolderSource(root)
    assert source.class_names == ("cat", "dog") and len(source) == 5
    assert {"path": "cat/00-again.png", "reason": "the same file as another image of its class (a link); "
            "counted once"} in source.excluded  # fmt: skip


def test_root_images_hidden_folders_and_other_files_are_left_out_and_said(tmp_path, capsys):
    root = _tree(tmp_path / "data", {"cat": 2, "dog": 2, ".secret": 2})
    _image(root / "stray1.png")
    _image(root / "stray2.jpg")
    _image(root / "cat" / ".thumb.png")
    (root / "dog" / "labels.csv").write_text("x")
    source = FolderSource(root)
    assert source.class_names == ("cat", "dog") and len(source) == 4
    reasons = {item["path"]: item["reason"] for item in source.excluded}
    assert set(reasons) == {".secret", "stray1.png", "stray2.jpg", "cat/.thumb.png", "dog/labels.csv"}
    assert "move it into a class folder" in reasons["stray1.png"]
    assert "hidden" in reasons[".secret"] and "rename it" in reasons[".secret"]
    summary = source.summary("pretokenize: data")
    assert "2 classes, 4 image files (cat 2, dog 2)" in summary and "excluded 5:" in summary
    assert "2 an image beside the class folders belongs to no class; move it into a class folder: " \
        "stray1.png, stray2.jpg" in summary  # fmt: skip
    assert "2 hidden (its name starts with '.'); rename it to use it: .secret, cat/.thumb.png" in summary


# ---------------------------------------------------------------------------------------------
# Item 5: what pretokenize says, records and refuses


def _saved_tokenizer(path: Path) -> Path:
    from rargen.checkpoint import register_kind, save

    register_kind("test-pool-tokenizer", "tiny_tokenizer:PoolTokenizer")
    save(PoolTokenizer(), path)
    return path


def _pretokenize_cli(data: Path, tokenizer: Path, out: Path) -> int:
    from rargen.cli.main import main

    argv = ["--tokenizer", str(tokenizer), "--out", str(out), "--image-size", "8", "--device", "cpu"]
    return main(["pretokenize", "--data", str(data), *argv, "--num-workers", "1", "--threads", "1"])


def test_pretokenize_prints_the_folder_summary_and_records_classes_and_exclusions(tmp_path, capsys):
    root = _tree(tmp_path / "data", {"cat": 3, "dog": 2})
    _image(root / "stray.png")
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    assert _pretokenize_cli(root, _saved_tokenizer(tmp_path / "tok"), tmp_path / "store") == 0
    printed = capsys.readouterr().out
    assert "2 classes, 6 image files (cat 4, dog 2)" in printed and "stray.png" in printed
    assert "read 5 image(s), skipped 1" in printed and "cat/broken.png" in printed
    # The command line holds out a share of each class (one of each here) into store-heldout.
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("store", "store-heldout")]
    counts = [[c["images"] for c in report["classes"]] for report in reports]
    assert [c["name"] for c in reports[0]["classes"]] == ["cat", "dog"] and np.add(*counts).tolist() == [3, 2]
    assert counts[1] == [1, 1] or counts[1] == [0, 1]  # cat's held-out image may be the broken file
    for report in reports:
        assert [item["path"] for item in report["excluded"]] == ["stray.png"]
    assert [item["name"] for report in reports for item in report["skipped"]] == ["cat/broken.png"]


def test_pretokenize_of_a_folder_with_nothing_readable_fails_naming_it(tmp_path, capsys):
    tokenizer = _saved_tokenizer(tmp_path / "tok")
    for name in ("a.png", "b.png"):
        (tmp_path / "flat" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "flat" / name).write_bytes(b"garbage")
    assert _pretokenize_cli(tmp_path / "flat", tokenizer, tmp_path / "s1") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "flat") in err and "none of its 2 image file(s) can be read" in err
    assert not (tmp_path / "s1" / "meta.json").exists()
    (tmp_path / "empty").mkdir()
    assert _pretokenize_cli(tmp_path / "empty", tokenizer, tmp_path / "s2") == 2
    assert "no images" in capsys.readouterr().err
    # A library source that reads nothing (every file gone after the source was opened) is an
    # error too, never an empty store that exits 0.
    source = FolderSource(_tree(tmp_path / "gone", {"a": 1, "b": 1}))
    for path in (tmp_path / "gone").rglob("*.png"):
        path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image"):
        pretokenize(source, PoolTokenizer(), tmp_path / "s3", image_size=8, progress=False)


def test_the_trainers_print_the_summary_and_claim_no_report_they_do_not_write(tmp_path):
    """train-tokenizer and train-classifier read through ``split_images``: the folder's summary
    first; "(all listed in report.json)" only where the command writes the skipped files there."""
    root = _tree(tmp_path / "data", {"a": 2, "b": 2})
    _image(root / "stray.png")
    for i in range(12):
        (root / "a" / f"bad{i:02d}.png").write_bytes(b"garbage")
    logs: list[str] = []
    split = split_images(root, 8, heldout_fraction=0.5, seed=0, purpose="tokenizer", log=logs.append)
    assert logs[0].startswith(f"train-tokenizer: {root}: 2 classes, 16 image files (a 14, b 2)")
    assert "stray.png" in logs[0] and "read 4 image(s), skipped 12" in logs[1]
    assert logs[1].endswith("... and 2 more")  # train-tokenizer's report.json has no list of them
    assert [item["path"] for item in split.excluded] == ["stray.png"]
    logs.clear()
    split_images(root, 8, heldout_fraction=0.5, seed=0, purpose="classifier", log=logs.append,
                 listed_in="report.json")  # fmt: skip
    assert logs[1].endswith("... and 2 more (all listed in report.json)")


# ---------------------------------------------------------------------------------------------
# Item 5: float and 32-bit images


def test_float_and_32_bit_images_are_scaled_not_clipped_to_black():
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp, mode="F")))
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp * 255).astype(np.uint8))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    # Values outside [0, 1]: [0, 255] is kept as 8-bit values, anything else spans its own range.
    eight_bit = np.asarray(to_rgb(Image.fromarray(ramp * 200, mode="F")))[..., 0]
    np.testing.assert_array_equal(eight_bit, np.round(ramp * 200).astype(np.uint8))
    signed = np.asarray(to_rgb(Image.fromarray(ramp * 6 - 3, mode="F")))[..., 0]
    assert signed.min() == 0 and signed.max() == 255 and signed[4, 0] == round(32 / 63 * 255)
    # NaN and infinities take the ends of the finite range instead of poisoning it.
    odd = (ramp * 6 - 3).copy()
    odd[0, 0], odd[0, 1], odd[0, 2] = np.nan, np.inf, -np.inf
    out = np.asarray(to_rgb(Image.fromarray(odd, mode="F")))[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 0 and out[7, 7] == 255
    # 32-bit integers beyond 16 bits span their own range; within 16 bits they are 16-bit values.
    wide = (np.arange(64, dtype=np.int32).reshape(8, 8) * 100_000) - 1_000_000
    out = np.asarray(to_rgb(Image.fromarray(wide, mode="I")))[..., 0]
    assert out.min() == 0 and out.max() == 255
    sixteen = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000
    out = np.asarray(to_rgb(Image.fromarray(sixteen, mode="I")))[..., 0]
    np.testing.assert_array_equal(out, np.round(sixteen / 257).astype(np.uint8))


def test_a_float_tiff_in_a_folder_reads_as_its_values(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "data").mkdir()
    Image.fromarray(ramp, mode="F").save(tmp_path / "data" / "a.tif")
    assert Image.open(tmp_path / "data" / "a.tif").mode == "F"
    image = np.asarray(FolderSource(tmp_path / "data").load(0))
    np.testing.assert_array_equal(image[..., 1], np.round(ramp * 255).astype(np.uint8))
