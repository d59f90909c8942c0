"""`rargen edit` end to end on a tiny random pair: kept cells unchanged, masked cells drawn, the
grid and meta.json written, the named masks, and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.checkpoint import load
from rargen.cli.main import main
from rargen.data.preprocess import center_crop, to_tensor
from rargen.sampling.edit import MASK_NAMES, named_mask
from rargen.sampling.engine import SampleConfig, sample_seed
from rargen.sampling.images import to_uint8
from rargen.sampling.inpaint import inpaint, inpaint_codes
from serve_helpers import save_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("edit"))  # rar-tiny + vq-tiny: 4x4 codes, 16x16 px


def _picture(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _edit(pair, *flags: str) -> int:
    generator, tokenizer = pair
    return main(["edit", str(generator), "--tokenizer", str(tokenizer), *flags])


def test_edit_keeps_the_known_cells_and_draws_the_masked_ones(pair, tmp_path) -> None:
    image = _picture(tmp_path / "in.png", size=(24, 20))  # another size: centre-cropped and resized
    out = tmp_path / "out"
    flags = ["--image", str(image), "--mask", "bottom-half", "--class", "3", "--out", str(out)]
    assert _edit(pair, *flags, "--count", "2", "--seed", "5", "--cfg-scale", "2", "--order", "random") == 0

    # The PNGs are exactly the library's inpainting of the cropped picture, image i with seed (5, i).
    model, tokenizer = load(pair[0]).eval(), load(pair[1]).eval()
    picture = to_tensor([center_crop(Image.open(image).convert("RGB"), 16)]).expand(2, -1, -1, -1)
    masks = named_mask("bottom-half", 16, 16).expand(2, -1, -1)
    config, seeds = SampleConfig(cfg_scale=2.0), [sample_seed(5, i) for i in range(2)]
    edited = inpaint(model, tokenizer, picture, masks, [3, 3], config, seeds=seeds, order="random")
    expected = to_uint8(edited)
    written = [np.asarray(Image.open(out / "images" / f"{i:06d}.png")) for i in range(2)]
    assert np.array_equal(np.stack(written), expected)

    # Its codes: the top two code rows kept exactly, the bottom two drawn anew.
    codes, tokens, regenerate = inpaint_codes(
        model, tokenizer, picture, masks, [3, 3], config, seeds=seeds, order="random"
    )
    assert regenerate[0].view(4, 4).tolist() == [[False] * 4] * 2 + [[True] * 4] * 2
    assert torch.equal(tokens[~regenerate], codes[~regenerate])
    assert not torch.equal(tokens[regenerate], codes[regenerate])
    assert not np.array_equal(written[0][8:], written[1][8:])  # two seeds, two fillings

    assert Image.open(out / "grid.png").size == (16 * 4, 16)  # original, mask overlay, 2 results
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["mask"], meta["label"], meta["class_name"]) == ("bottom-half", 3, "three")
    assert meta["order"] == "random"
    assert (meta["regenerated_cells"], meta["cells"], meta["sample_config"]["cfg_scale"]) == (8, 16, 2.0)


def test_a_mask_image_white_is_regenerated(pair, tmp_path) -> None:
    image = _picture(tmp_path / "in.png")
    drawn = np.zeros((16, 16), dtype=np.uint8)
    drawn[0:4, 12:16] = 255  # the top-right cell
    Image.fromarray(drawn).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert _edit(pair, "--image", str(image), "--mask", str(tmp_path / "mask.png"), "--class", "1",
                 "--out", str(out)) == 0  # fmt: skip
    original, edited = np.asarray(Image.open(image)), np.asarray(Image.open(out / "images" / "000000.png"))
    assert json.loads((out / "meta.json").read_text())["regenerated_cells"] == 1
    assert not np.array_equal(edited[0:4, 12:16], original[0:4, 12:16])


@pytest.mark.parametrize("name", MASK_NAMES)
def test_named_masks(pair, tmp_path, name: str) -> None:
    mask = named_mask(name, 16, 16)
    cells = mask.view(4, 4, 4, 4).any(3).any(1)  # the 4x4 code grid
    expected = {
        "bottom-half": (slice(2, 4), slice(0, 4)), "top-half": (slice(0, 2), slice(0, 4)),
        "left-half": (slice(0, 4), slice(0, 2)), "right-half": (slice(0, 4), slice(2, 4)),
        "centre": (slice(1, 3), slice(1, 3)), "border": (slice(1, 3), slice(1, 3)),
    }[name]  # fmt: skip
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[expected] = True
    assert torch.equal(cells, ~box if name == "border" else box)
    out = tmp_path / name
    assert _edit(pair, "--image", str(_picture(tmp_path / "in.png")), "--mask", name, "--class", "0",
                 "--out", str(out)) == 0  # fmt: skip
    assert json.loads((out / "meta.json").read_text())["regenerated_cells"] == int(cells.sum())


def _one_line_error(capsys, code: int, *words: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]


def test_bad_edit_inputs_give_one_line(pair, tmp_path, capsys) -> None:
    image = _picture(tmp_path / "in.png", size=(20, 20))
    out = ["--class", "1", "--out", str(tmp_path / "out")]
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("not a picture")
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--mask", "centre"], ["missing.png", "check the path"]),
        (["--image", str(image), "--mask", str(tmp_path / "nomask.png")], ["nomask.png", "check the path"]),
        (["--image", str(image), "--mask", "bottom-halves"], ["'bottom-halves'", "bottom-half", "border"]),
        (["--image", str(image), "--mask", str(tmp_path / "small.png")], ["16x16", "20x20", "image's size"]),
        (["--image", str(image), "--mask", str(tmp_path / "black.png")], ["marks nothing to regenerate"]),
        (["--image", str(tmp_path / "text.png"), "--mask", "centre"], ["text.png", "not an image"]),
        (["--image", str(image), "--mask", "centre", "--class", "10"], ["labels must be classes in [0, 9]"]),
        (["--image", str(image), "--mask", "centre", "--count", "0"], ["--count", "positive"]),
    ]
    for flags, words in cases:
        try:
            code = _edit(pair, *out, *flags)
        except SystemExit as exit:  # argparse refusals
            code = exit.code
        _one_line_error(capsys, code, *words)
    assert not (tmp_path / "out").exists()
