"""The serve API against a tiny random-weight generator and tokenizer, on 127.0.0.1:ephemeral."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rargen.checkpoint import load
from rargen.sampling.decoding import DecodeBatch
from rargen.sampling.engine import SampleConfig, generate, sample_seed
from serve_helpers import CLASS_NAMES, events, open_stream, request, running_server, save_tiny_pair, wait_for

GUIDED = {"cfg_scale": 3.0, "cfg_power": 1.5, "temperature": 0.9, "top_k": 20, "top_p": 0.95}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def slow_decode(monkeypatch):
    """Make every decode step take ``delay`` seconds (while ``gate`` is clear) and count the steps."""
    state = {"delay": 0.05, "calls": 0, "peak_rows": 0}
    original, window = DecodeBatch.step, DecodeBatch.feed_windows

    def step(self, *args):  # a plain step, or a speculative pass (few rows)
        state["calls"] += 1
        state["peak_rows"] = max(state["peak_rows"], len(self))  # cache rows decoding together
        time.sleep(state["delay"])
        return (window if args else original)(self, *args)

    monkeypatch.setattr(DecodeBatch, "step", step)
    monkeypatch.setattr(DecodeBatch, "feed_windows", step)
    return state


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def reference_pixels(pair, class_id: int, seed: int, count: int, config: SampleConfig) -> np.ndarray:
    """What the server should return: generate() tokens with per-image seeds, decoded, as uint8."""
    model, tokenizer = load(pair[0]), load(pair[1])
    seeds = [sample_seed(seed, i) for i in range(count)]
    tokens = generate(model, [class_id] * count, config, seeds=seeds)
    images = tokenizer.decode(tokens.view(count, 4, 4)).float().clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Valid requests


def test_generate_returns_the_sampled_images_as_pngs_with_their_settings(pair):
    with running_server(pair) as server:
        status, body, _ = request(
            server, "POST", "/generate", {"class": 3, "seed": 42, "batch_size": 3, **GUIDED}
        )
    assert status == 200, body
    assert body["settings"] == {
        "class_id": 3, "class_name": "three", "seed": 42, "batch_size": 3, **GUIDED
    }  # fmt: skip
    expected = reference_pixels(pair, 3, 42, 3, SampleConfig(**GUIDED))
    assert len(body["images"]) == 3
    for i, image in enumerate(body["images"]):
        png = decode_png(image["png"])
        assert png.format == "PNG" and png.size == (16, 16) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), expected[i])
        settings = json.loads(png.text["rargen:settings"])
        assert settings["seed"] == 42 and settings["index"] == i and settings["class_id"] == 3
        assert settings["sample_seed"] == sample_seed(42, i)
        assert json.loads(png.text["rargen:checkpoint"])["checkpoint"] == "generator"
        assert image["filename"].startswith("rargen_c3-three_seed42_") and image["filename"].endswith(".png")
        assert "cfg3_pow1.5_t0.9_k20_p0.95" in image["filename"]
    # Image i depends on (seed, i) only, not on the batch it was drawn in.
    assert not np.array_equal(expected[0], expected[1])


def test_a_grey_tokenizer_gives_grey_pngs(pair, tmp_path):
    """A tokenizer trained on grey data (image_channels 1) is served as 1-channel PNGs: the mean of
    the decoded channels, as rargen sample writes them."""
    from rargen.checkpoint import save

    save(load(pair[1]), tmp_path / "grey", extra={"image_channels": 1})
    with running_server((pair[0], tmp_path / "grey")) as server:
        status, body, _ = request(server, "POST", "/generate", {"class": 3, "seed": 42, "batch_size": 2})
    assert status == 200, body
    rgb = reference_pixels(pair, 3, 42, 2, SampleConfig()).astype(np.float64) / 255
    for i, image in enumerate(body["images"]):
        png = decode_png(image["png"])
        assert png.mode == "L" and png.size == (16, 16)
        expected = np.round(rgb[i].mean(-1) * 255)  # mean of the rounded channels, within one level
        assert np.abs(np.asarray(png).astype(np.int64) - expected).max() <= 1


def test_a_class_can_be_named_and_images_do_not_depend_on_the_batch_size(pair):
    with running_server(pair) as server:
        _, by_name, _ = request(server, "POST", "/generate", {"class": "Seven", "seed": 9, "batch_size": 2})
        _, by_id, _ = request(server, "POST", "/generate", {"class": 7, "seed": 9})
    assert by_name["settings"]["class_id"] == 7 and by_name["settings"]["class_name"] == "seven"
    pixels = [np.asarray(decode_png(reply["images"][0]["png"])) for reply in (by_name, by_id)]
    np.testing.assert_array_equal(pixels[0], pixels[1])


def test_a_class_name_matches_exactly_then_uniquely_ignoring_case_else_422_naming_the_candidates(
    pair, tmp_path
):
    """Issue 25 item 4: names differing only in case (``Cat``, ``cat``, ``CAT``) were looked up
    lower-cased, so ``cat`` was served as class 0 ``Cat``."""
    from rargen.checkpoint import save

    names = ["Cat", "cat", "CAT", "Dog", "007", "five", "six", "seven", "eight", "nine"]
    save(load(pair[0]), tmp_path / "named", extra={"class_names": names})
    with running_server((tmp_path / "named", pair[1])) as server:

        def served(value):
            status, reply, _ = request(server, "POST", "/generate", {"class": value, "seed": 1})
            settings = reply.get("settings", {})
            return (settings["class_id"], settings["class_name"]) if status == 200 else reply

        assert served("cat") == (1, "cat") and served("CAT") == (2, "CAT") and served("Cat") == (0, "Cat")
        assert served("dog") == (3, "Dog") and served(" DOG ") == (3, "Dog")  # one name ignores case
        assert served("007") == (4, "007") and served("7") == (7, "seven")  # a name first, then an id
        for ambiguous in ("cAt", " cat "):
            reply = served(ambiguous)
            assert reply["field"] == "class", reply
            assert "'Cat' (0), 'cat' (1), 'CAT' (2)" in reply["error"] and "exact name" in reply["error"]


def test_stream_sends_grey_partial_images_then_the_same_final_images(pair):
    with running_server(pair) as server:
        conn, response = open_stream(server, {"class": 2, "seed": 5, "batch_size": 2, "stream_every": 1})
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        received = list(events(response))
        conn.close()
        _, plain, _ = request(server, "POST", "/generate", {"class": 2, "seed": 5, "batch_size": 2})
    names = [name for name, _ in received]
    assert names == ["start", "progress", "progress", "progress", "done"]
    assert received[0][1]["rows"] == 4 and received[0][1]["size"] == [16, 16]
    for rows_done, (_, progress) in zip([1, 2, 3], received[1:4], strict=True):
        assert progress["rows_done"] == rows_done and len(progress["images"]) == 2
        pixels = np.asarray(decode_png(progress["images"][0]))
        # 4 pixel rows per token row (16 px / 4 tokens); the unsampled ones are grey.
        assert (pixels[rows_done * 4 :] == 128).all()
        assert not (pixels[: rows_done * 4] == 128).all()
    final = received[-1][1]
    assert [image["png"] for image in final["images"]] == [image["png"] for image in plain["images"]]


def test_health_info_and_page(pair):
    with running_server(pair, max_batch_size=4) as server:
        status, health, _ = request(server, "GET", "/health")
        _, info, _ = request(server, "GET", "/info")
        status_page, page, headers = request(server, "GET", "/")
    assert status == 200 and health["status"] == "ok" and health["active_jobs"] == 0
    assert info["class_names"] == CLASS_NAMES and info["grid"] == [4, 4] and info["image_size"] == [16, 16]
    assert info["limits"]["max_batch_size"] == 4 and info["defaults"]["stream_every"] == 1
    assert info["model"]["checkpoint_sha256"] and info["model"]["codebook_size"] == 32
    assert (
        status_page == 200 and headers["Content-Type"].startswith("text/html") and "/generate/stream" in page
    )


# ---------------------------------------------------------------------------------------------
# Invalid requests: 422 with the reason, and the server keeps serving


INVALID = [
    ({}, "class", "class is required"),
    ({"class": 10}, "class", "class must be in [0, 9], got 10"),
    ({"class": -1}, "class", "class must be in [0, 9]"),
    ({"class": "platypus"}, "class", "not one of this checkpoint's class names"),
    ({"class": 1.5}, "class", "class must be an integer id or a name"),
    ({"class": True}, "class", "class must be an integer id or a name"),
    ({"class": 1, "cfg_scale": "big"}, "cfg_scale", "cfg_scale must be a number"),
    ({"class": 1, "cfg_scale": -1}, "cfg_scale", "cfg_scale must be in [0, 100]"),
    ({"class": 1, "cfg_power": 11}, "cfg_power", "cfg_power must be in [0, 10]"),
    ({"class": 1, "temperature": 0}, "temperature", "temperature must be in (0, 10]"),
    ({"class": 1, "temperature": None}, "temperature", "temperature must be a number"),
    ({"class": 1, "top_k": 33}, "top_k", "top_k must be in [0, 32] (0 = off)"),
    ({"class": 1, "top_k": 2.5}, "top_k", "top_k must be an integer"),
    ({"class": 1, "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"class": 1, "top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
    ({"class": 1, "seed": -3}, "seed", "seed must be in [0, 9223372036854775807]"),
    ({"class": 1, "seed": "x"}, "seed", "seed must be an integer"),
    ({"class": 1, "batch_size": 0}, "batch_size", "batch_size must be in [1, 4]"),
    (
        {"class": 1, "batch_size": 5},
        "batch_size",
        "batch_size must be in [1, 4] (the server's --max-batch-size)",
    ),
    ({"class": 1, "stream_every": 5}, "stream_every", "stream_every must be in [1, 4] token rows"),
    ({"class": 1, "guidance": 3}, "guidance", "unknown fields ['guidance']"),
]


def test_every_invalid_field_gets_422_naming_it_and_the_server_keeps_serving(pair):
    with running_server(pair, max_batch_size=4, rate_limit=0) as server:
        for body, field, message in INVALID:
            for path in ("/generate", "/generate/stream"):
                status, reply, _ = request(server, "POST", path, body)
                assert status == 422, (body, reply)
                assert reply["field"] == field and message in reply["error"], (body, reply)
        status, reply, _ = request(server, "POST", "/generate", raw=b'{"class": 1,')
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply, _ = request(server, "POST", "/generate", [1, 2])
        assert status == 422 and "JSON object" in reply["error"]
        status, reply, _ = request(server, "POST", "/generate", raw=b"x" * 70_000)
        assert status == 413
        status, reply, _ = request(server, "POST", "/generate", raw=b"", headers={"Content-Length": "-5"})
        assert status == 400 and "Content-Length must be >= 0" in reply["error"]
        status, reply, _ = request(server, "POST", "/nowhere", {"class": 1})
        assert status == 404 and "/generate" in reply["error"]
        status, reply, _ = request(server, "GET", "/nowhere")
        assert status == 404
        # A client that sends garbage instead of HTTP does not take the server down either.
        with socket.create_connection(server.server_address[:2], timeout=5) as raw:
            raw.sendall(b"\x00\xffnot http\r\n\r\n")
            raw.recv(1024)
        status, reply, _ = request(server, "POST", "/generate", {"class": 1, "seed": 3})
        assert status == 200 and len(reply["images"]) == 1
        _, health, _ = request(server, "GET", "/health")
    assert health["active_jobs"] == 0 and health["completed"] == 1 and health["failed"] == 0


# ---------------------------------------------------------------------------------------------
# Caps


def test_rate_limit_per_client(pair):
    with running_server(pair, rate_limit=2) as server:
        first = request(server, "POST", "/generate", {"class": 0, "seed": 1})
        second = request(server, "POST", "/generate/stream", {"class": 0, "seed": 1}, headers={})
        status, reply, headers = request(server, "POST", "/generate", {"class": 0, "seed": 1})
        health = request(server, "GET", "/health")  # not a generation: never limited
    assert first[0] == 200 and second[0] == 200
    assert status == 429 and "at most 2 generations per minute" in reply["error"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert health[0] == 200


def test_the_queue_is_capped_and_freed_rows_take_the_next_job(pair, slow_decode):
    with running_server(pair, max_rows=1, max_batch_size=1, max_queue=0, rate_limit=0) as server:
        conn, response = open_stream(server, {"class": 4, "seed": 1})
        stream = events(response)
        assert next(stream)[0] == "start"  # the job holds the only row now
        assert wait_for(lambda: request(server, "GET", "/health")[1]["rows_in_flight"] == 1)
        status, reply, headers = request(server, "POST", "/generate", {"class": 4, "seed": 2})
        assert status == 503 and "requests are waiting for the batch" in reply["error"]
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert [name for name, _ in stream][-1] == "done"
        conn.close()
        assert wait_for(lambda: request(server, "GET", "/health")[1]["active_jobs"] == 0)
        slow_decode["delay"] = 0.0
        status, reply, _ = request(server, "POST", "/generate", {"class": 4, "seed": 2})
        assert status == 200


MIXED = [  # (path, body, cancel after this many progress events or None)
    ("/generate", {"class": 0, "seed": 1, "batch_size": 3, **GUIDED}, None),
    ("/generate/stream", {"class": 1, "seed": 2, "batch_size": 2, "stream_every": 1}, None),
    ("/generate", {"class": 2, "seed": 3, "cfg_scale": 5.0, "cfg_power": 0.0, "temperature": 0.7}, None),
    ("/generate/stream", {"class": 3, "seed": 4, "batch_size": 4, "top_k": 3, "stream_every": 1}, 2),
    ("/generate", {"class": 4, "seed": 5, "batch_size": 2, "top_p": 0.5, "cfg_scale": 2.0}, None),
    (
        "/generate/stream",
        {"class": 5, "seed": 6, "cfg_scale": 8.0, "cfg_power": 2.75, "stream_every": 1},
        None,
    ),
    ("/generate", {"class": 6, "seed": 7, "batch_size": 3, "temperature": 1.5, "top_k": 10}, None),
    ("/generate/stream", {"class": 7, "seed": 8, "batch_size": 2, **GUIDED, "stream_every": 1}, 1),
    ("/generate", {"class": 8, "seed": 9, "cfg_scale": 1.5, "top_p": 0.9, "temperature": 0.8}, None),
    ("/generate", {"class": 9, "seed": 10, "batch_size": 4, "cfg_scale": 0.0}, None),
]


def final_pngs(server, path: str, body: dict, cancel_after: int | None = None) -> list[str] | None:
    """The final PNGs of one request, or None when it was cancelled after ``cancel_after`` progress
    events (the connection is closed mid-stream)."""
    if path == "/generate":
        status, reply, _ = request(server, "POST", path, body)
        assert status == 200, reply
        return [image["png"] for image in reply["images"]]
    conn, response = open_stream(server, body)
    try:
        seen = 0
        for name, payload in events(response):
            if name == "progress":
                seen += 1
                if cancel_after is not None and seen == cancel_after:
                    return None  # hang up half-way
            if name == "done":
                return [image["png"] for image in payload["images"]]
        raise AssertionError("the stream ended without done")
    finally:
        conn.close()


def test_concurrent_mixed_requests_share_the_batch_and_get_their_images_alone(pair, slow_decode):
    """10 requests at once (different classes, guidance, temperatures, top-k/top-p, batch sizes; two
    cancelled half-way) decode in one batch, and every completed request's images are pixel-identical
    to what the same request gets alone."""
    slow_decode["delay"] = 0.02  # every request overlaps the others
    # Plain steps: a cancel after 1-2 progress events needs 3 of them (speculation may make 1;
    # tests/test_speculating.py covers a mixed batch with speculation).
    with running_server(pair, max_rows=24, max_batch_size=4, rate_limit=0, speculate=0) as server:
        results: list = [None] * len(MIXED)

        def run(i):
            results[i] = final_pngs(server, *MIXED[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(MIXED))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert wait_for(lambda: request(server, "GET", "/health")[1]["active_jobs"] == 0)
        _, health, _ = request(server, "GET", "/health")
        assert health["cancelled"] == 2 and health["completed"] == 8 and health["rows_in_flight"] == 0
        # They really shared the batch (23 images, 40 cache rows in all; at least several at once).
        assert slow_decode["peak_rows"] >= 12, slow_decode
        slow_decode["delay"] = 0.0
        alone = [final_pngs(server, path, body) for path, body, _ in MIXED]  # one at a time
    for i, (_, body, cancel) in enumerate(MIXED):
        if cancel is not None:
            assert results[i] is None
            continue
        assert len(results[i]) == body.get("batch_size", 1)
        for together, single in zip(results[i], alone[i], strict=True):
            np.testing.assert_array_equal(
                np.asarray(decode_png(together)), np.asarray(decode_png(single)), err_msg=f"request {i}"
            )
    # And alone is what generate() gives.
    settings = {k: v for k, v in MIXED[0][1].items() if k in GUIDED}
    expected = reference_pixels(pair, 0, 1, 3, SampleConfig(**settings))
    np.testing.assert_array_equal(np.asarray(decode_png(results[0][2])), expected[2])


# ---------------------------------------------------------------------------------------------
# Cancellation


@pytest.mark.parametrize("path", ["/generate/stream", "/generate"])
def test_a_client_that_disconnects_cancels_its_job_and_frees_the_worker(pair, slow_decode, path):
    with running_server(pair, rate_limit=0) as server:
        with socket.create_connection(server.server_address[:2], timeout=5) as client:
            body = json.dumps({"class": 5, "seed": 3}).encode()
            head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_for(lambda: slow_decode["calls"] >= 2)
        # 15 decode steps at 50 ms would take 0.65 s more; the job stops within a step or two.
        assert wait_for(lambda: request(server, "GET", "/health")[1]["cancelled"] == 1, timeout=2)
        # Its rows leave the batch at the next step boundary.
        assert wait_for(lambda: request(server, "GET", "/health")[1]["rows_in_flight"] == 0, timeout=1)
        _, health, _ = request(server, "GET", "/health")
        assert health["active_jobs"] == 0 and health["completed"] == 0
        assert slow_decode["calls"] < 10
        slow_decode["delay"] = 0.0
        status, _, _ = request(server, "POST", "/generate", {"class": 5, "seed": 3})
        assert status == 200


def test_closing_the_server_stops_its_decoding_thread(pair):
    """A decoding thread left running past shutdown can be inside a torch kernel while the
    interpreter tears down, which aborts the process instead of exiting 0."""
    with running_server(pair) as server:
        scheduler = server.engine.scheduler
        assert scheduler.running
        status, _, _ = request(server, "POST", "/generate", {"class": 1, "seed": 0, **GUIDED})
        assert status == 200
    assert not scheduler.running


def test_the_cli_serves_on_loopback_and_stops_on_ctrl_c(pair):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "rargen",
        "serve",
        str(pair[0]),
        "--tokenizer",
        str(pair[1]),
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("rargen serve: http://127.0.0.1:"), line + process.stderr.read()
        url = line.split()[2]
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            assert json.load(response)["status"] == "ok"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0, process.stderr.read()[-3000:]  # generous: CI machines can be busy
