"""Edit requests on the server (issue 28 part 4): an image and the token cells to regenerate, decoded
in the shared batch: the images are what ``generate(known=...)`` gives alone, also beside a plain
request; the stream shows the known cells from the start; bad edit fields get 422 naming them."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.checkpoint import load
from rargen.sampling.decoding import DecodeBatch
from rargen.sampling.engine import SampleConfig, generate, sample_seed
from rargen.serve.engine import MAX_BODY_BYTES
from rargen.serve.fields import PNG_SIGNATURE
from serve_helpers import events, open_stream, request, running_server, save_tiny_pair, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GUIDED = {"cfg_scale": 2.0, "temperature": 0.9, "top_k": 20}
BOTTOM = list(range(8, 16))  # the bottom two rows of the 4x4 token grid


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("serve-edit"))  # 4x4 tokens, 16x16 px


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PICTURE = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def pixels_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def alone(pair, server, class_id: int, seed: int, count: int, cells: list[int], order: str) -> np.ndarray:
    """What generate(known=...) gives for the edit on its own, decoded as the server decodes."""
    model, tokenizer = load(pair[0]), load(pair[1])
    image = torch.from_numpy(PICTURE).permute(2, 0, 1)[None].float() / 255
    codes = tokenizer.encode(image).flatten(1).expand(count, -1)
    regenerate = torch.zeros(count, 16, dtype=torch.bool)
    regenerate[:, cells] = True
    seeds = [sample_seed(seed, i) for i in range(count)]
    tokens = generate(model, [class_id] * count, SampleConfig(**GUIDED), seeds=seeds, known=codes,
                      known_mask=~regenerate, order=order)  # fmt: skip
    assert torch.equal(tokens[~regenerate], codes[~regenerate])  # the kept codes come back
    return server.engine.images(tokens).numpy()


def edit_body(seed: int, count: int, mask, order: str = "raster") -> dict:
    return {"class": 3, "seed": seed, "batch_size": count, "image": png_b64(PICTURE), "mask": mask,
            "order": order, **GUIDED}  # fmt: skip


@pytest.mark.parametrize("order", ["raster", "random"])
def test_an_edit_is_what_generate_known_gives_alone(pair, order):
    with running_server(pair, rate_limit=0) as server:
        grid = [[0] * 4, [0] * 4, [1] * 4, [1] * 4]  # the 2D form of BOTTOM
        status, reply, _ = request(server, "POST", "/generate", edit_body(11, 2, grid, order))
        assert status == 200, reply
        expected = alone(pair, server, 3, 11, 2, BOTTOM, order)
        for image, pixels in zip(reply["images"], expected, strict=True):
            np.testing.assert_array_equal(pixels_of(image["png"]), pixels)
            assert "_edit_" in image["filename"]
        assert reply["settings"]["mask"] == BOTTOM and reply["settings"]["order"] == order
        # The indices form is the same request.
        status, again, _ = request(server, "POST", "/generate", edit_body(11, 2, BOTTOM, order))
        assert [i["png"] for i in again["images"]] == [i["png"] for i in reply["images"]]


def test_an_edit_beside_a_plain_request_gets_its_images_alone(pair, monkeypatch):
    original, window = DecodeBatch.step, DecodeBatch.feed_windows
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.03), original(self))[1])
    monkeypatch.setattr(DecodeBatch, "feed_windows", lambda self, *a: (time.sleep(0.03), window(self, *a))[1])
    cells = [0, 5, 6, 9, 10, 15]  # scattered cells, drawn in random order
    with running_server(pair, rate_limit=0) as server:
        plain: dict = {}

        def run_plain():
            plain["reply"] = request(server, "POST", "/generate", {"class": 1, "seed": 4, "batch_size": 3})[1]

        thread = threading.Thread(target=run_plain)
        thread.start()
        assert wait_for(lambda: request(server, "GET", "/health")[1]["rows_in_flight"] == 3)
        status, reply, _ = request(server, "POST", "/generate", edit_body(7, 2, cells, "random"))
        thread.join(30)
        assert status == 200, reply
        monkeypatch.setattr(DecodeBatch, "step", original)
        monkeypatch.setattr(DecodeBatch, "feed_windows", window)
        for image, pixels in zip(reply["images"], alone(pair, server, 3, 7, 2, cells, "random"), strict=True):
            np.testing.assert_array_equal(pixels_of(image["png"]), pixels)
        _, single, _ = request(server, "POST", "/generate", {"class": 1, "seed": 4, "batch_size": 3})
        assert [i["png"] for i in plain["reply"]["images"]] == [i["png"] for i in single["images"]]


def test_the_stream_shows_the_known_cells_from_the_start(pair):
    with running_server(pair, rate_limit=0, stream_every=1) as server:
        conn, response = open_stream(server, edit_body(5, 1, BOTTOM))
        try:
            received = list(events(response))
        finally:
            conn.close()
        kinds = [kind for kind, _ in received]
        assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds
        first = pixels_of(received[1][1]["images"][0])  # cells 0..7 known, cell 8 drawn, 9..15 not yet
        assert (first[12:] == 128).all() and (first[8:12, 4:] == 128).all()
        assert not (first[:8] == 128).all()
        final = pixels_of(received[-1][1]["images"][0]["png"])
        np.testing.assert_array_equal(final, alone(pair, server, 3, 5, 1, BOTTOM, "raster")[0])


def test_bad_edit_fields_get_422_naming_the_field(pair):
    small = png_b64(PICTURE[:8, :8])
    cases = [
        ({"image": "@@not base64@@", "mask": BOTTOM}, "image", "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a...").decode(), "mask": BOTTOM}, "image", "not a PNG"),
        ({"image": base64.b64encode(PNG_SIGNATURE + b"bad").decode(), "mask": BOTTOM}, "image", "readable"),
        ({"image": small, "mask": BOTTOM}, "image", "8x8 pixels; this server edits 16x16"),
        ({"image": 5, "mask": BOTTOM}, "image", "base64 PNG string"),
        ({"image": png_b64(PICTURE), "mask": [[1, 0, 0], [0, 0, 0], [0, 0, 0]]}, "mask", "4 rows of 4"),
        ({"image": png_b64(PICTURE), "mask": [[0] * 4] * 4}, "mask", "no cells"),
        ({"image": png_b64(PICTURE), "mask": []}, "mask", "no cells"),
        ({"image": png_b64(PICTURE), "mask": [16]}, "mask", "[0, 15]"),
        ({"image": png_b64(PICTURE), "mask": [[2] * 4] * 4}, "mask", "0 (keep) or 1"),
        ({"image": png_b64(PICTURE), "mask": "bottom"}, "mask", "list of token-cell indices"),
        ({"image": png_b64(PICTURE)}, "mask", "mask is missing"),
        ({"mask": BOTTOM}, "image", "image is missing"),
        ({"order": "spiral"}, "order", "'raster' or 'random'"),
    ]
    with running_server(pair, rate_limit=0) as server:
        for fields, field, words in cases:
            for path in ("/generate", "/generate/stream"):
                status, reply, _ = request(server, "POST", path, {"class": 1, **fields})
                assert status == 422 and reply["field"] == field and words in reply["error"], (fields, reply)
        # The body limit: 64 KiB for plain requests, more only by an edit's image (at most its size
        # as an uncompressed PNG in base64).
        limits = request(server, "GET", "/info")[1]["limits"]
        assert limits["max_body_bytes"] == MAX_BODY_BYTES < limits["max_edit_body_bytes"]
        padding = {"class": 1, "class_name_padding": "x" * MAX_BODY_BYTES}
        assert request(server, "POST", "/generate", padding)[0] == 413
        huge = {"class": 1, "image": "A" * limits["max_edit_body_bytes"], "mask": BOTTOM}
        assert request(server, "POST", "/generate", huge)[0] == 413
        assert request(server, "POST", "/generate", {"class": 1, "seed": 1})[0] == 200  # still serving
