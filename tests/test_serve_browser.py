"""The serve page in real headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Playwright only drives the browser here: no ``playwright install``, no downloaded browser. The
test skips, naming it, when /usr/bin/chromium is absent (install: ``apt-get install -y chromium``);
CI installs it and fails without it. Screenshots land in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires
from rargen.checkpoint import register_kind, save
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import DecodeBatch
from serve_helpers import randomize, request, running_server, save_tiny_pair, wait_for
from tiny_tokenizer import PoolTokenizer, PoolTokenizerConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# CI installs Chromium; there (CI set) a missing browser fails the run instead of skipping.
pytestmark = [
    requires(None if Path(CHROMIUM).exists() else f"Chromium at {CHROMIUM}", "apt-get install -y chromium"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture
def slow_decode(monkeypatch):
    """20 ms per decode step, so the page sees several partial images even on a fast machine."""
    original, window = DecodeBatch.step, DecodeBatch.feed_windows

    def step(self, *args):  # a plain step, or a speculative pass
        time.sleep(0.02)
        return (window if args else original)(self, *args)

    monkeypatch.setattr(DecodeBatch, "step", step)
    monkeypatch.setattr(DecodeBatch, "feed_windows", step)


def test_page_generates_and_shows_images_forming_row_by_row(tmp_path, slow_decode):
    from playwright.sync_api import sync_playwright

    pair = save_tiny_pair(tmp_path, "rar-digits", "vq-digits")  # 8x8 tokens -> 32x32 images
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(pair, stream_every=1, rate_limit=0) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 600})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.wait_for_function("document.querySelectorAll('#class option').length === 10")
            assert "8×8 tokens · 32×32 px" in page.inner_text("#model")

            # Search narrows the class list; the match is selected.
            page.fill("#search", "sev")
            assert page.eval_on_selector_all("#class option", "o => o.map(x => x.textContent)") == [
                "7: seven"
            ]
            page.fill("#batch_size", "4")
            page.fill("#seed", "1234")
            page.fill("#cfg_scale", "3")
            page.click("#generate")

            page.wait_for_function("window.rargen.rowsSeen.length >= 4", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "serve_partial.png"))
            partial_rows = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.dataset.rows)")
            assert len(partial_rows) == 4 and all(r not in (None, "done") for r in partial_rows)

            page.wait_for_function("window.rargen.state !== 'running'", timeout=30_000)
            assert page.evaluate("window.rargen.state") == "done", page.inner_text("#status")
            assert page.evaluate("window.rargen.rowsSeen") == list(range(1, 8))  # every row, in order
            page.screenshot(path=str(ARTIFACTS / "serve_done.png"))
            images = page.eval_on_selector_all(
                "#gallery img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight, i.dataset.rows])"
            )
            assert images == [[32, 32, "done"]] * 4
            names = page.eval_on_selector_all("#gallery a[download]", "links => links.map(a => a.download)")
            assert len(names) == 4 and all(n.startswith("rargen_c7-seven_seed1234_") for n in names)
            assert "done in" in page.inner_text("#status")

            # Stop aborts the stream, which cancels the job on the server.
            page.fill("#batch_size", "1")
            page.click("#generate")
            page.wait_for_function("window.rargen.rowsSeen.length >= 1", timeout=30_000)
            page.click("#stop")
            page.wait_for_function("window.rargen.state === 'stopped'")
            assert wait_for(lambda: request(server, "GET", "/health")[1]["cancelled"] == 1, timeout=5)

            # A rejected request shows the server's reason.
            page.fill("#batch_size", "99")
            page.click("#generate")
            page.wait_for_function("window.rargen.state === 'error'")
            assert "batch_size must be in [1, 8]" in page.inner_text("#status")
            assert errors == []
        finally:
            browser.close()


class PaletteTokenizer(PoolTokenizer):
    """Each code a flat 4x4 patch of its codebook colour: a cell decodes on its own, and a decoded
    image encodes back to its codes, so an edit's kept cells come back pixel for pixel."""

    checkpoint_kind: ClassVar[str] = "test-palette-tokenizer"

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        colours = self.codebook[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
        return colours.repeat_interleave(4, 2).repeat_interleave(4, 3)


register_kind(PaletteTokenizer.checkpoint_kind, f"{__name__}:PaletteTokenizer")


def _pixels(page, selector: str) -> np.ndarray:
    data = page.eval_on_selector(selector, "img => img.src").split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_edit_mode_paints_cells_and_fills_only_them(tmp_path, slow_decode):
    from playwright.sync_api import sync_playwright

    model = randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)), 0, 0.3)
    save(model, tmp_path / "generator")  # 4x4 tokens of 32 codes -> 16x16 images
    save(PaletteTokenizer(PoolTokenizerConfig(codebook_size=32)), tmp_path / "tokenizer")
    pair = (tmp_path / "generator", tmp_path / "tokenizer")
    with running_server(pair, stream_every=1, rate_limit=0) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.wait_for_function("document.querySelectorAll('#class option').length === 10")
            page.fill("#batch_size", "1")
            page.fill("#seed", "21")
            page.click("#generate")
            page.wait_for_function("window.rargen.state === 'done'", timeout=30_000)
            original = _pixels(page, "#gallery img")

            # Edit mode: the last image, the bottom two token rows painted in two strokes.
            page.select_option("#mode", "edit")
            assert page.inner_text("#generate") == "Edit"
            page.click("#use_last")
            page.wait_for_function("window.rargenEdit.ready()")
            box = page.locator("#canvas").bounding_box()
            cell = box["width"] / 4
            for row in (2, 3):
                y = box["y"] + (row + 0.5) * cell
                page.mouse.move(box["x"] + cell / 2, y)
                page.mouse.down()
                page.mouse.move(box["x"] + 3.5 * cell, y, steps=6)
                page.mouse.up()
            assert page.evaluate("window.rargenEdit.cells()") == list(range(8, 16))
            page.screenshot(path=str(ARTIFACTS / "serve_edit_mask.png"), full_page=True)
            page.fill("#seed", "5")
            page.click("#generate")
            page.wait_for_function("window.rargen.rowsSeen.length >= 1", timeout=30_000)
            partial = _pixels(page, "#gallery img")  # the known rows show from the start
            np.testing.assert_array_equal(partial[:8], original[:8])
            page.wait_for_function("window.rargen.state !== 'running'", timeout=30_000)
            assert page.evaluate("window.rargen.state") == "done", page.inner_text("#status")
            page.screenshot(path=str(ARTIFACTS / "serve_edit_done.png"), full_page=True)
            edited = _pixels(page, "#gallery img")
            np.testing.assert_array_equal(edited[:8], original[:8])  # kept cells: pixel for pixel
            assert not (edited[8:] == 128).all(axis=-1).any()  # every painted cell filled, none grey
            assert not np.array_equal(edited[8:], original[8:])  # and drawn anew
            names = page.eval_on_selector_all("#gallery a[download]", "links => links.map(a => a.download)")
            assert len(names) == 1 and "_edit_" in names[0]

            # Without a painted cell the server's reason shows.
            page.click("#clear_mask")
            page.click("#generate")
            page.wait_for_function("window.rargen.state === 'error'")
            assert "mask has no cells to regenerate" in page.inner_text("#status")
            assert errors == []
        finally:
            browser.close()
