"""RAR over TiTok's 1D tokens end to end: pretokenize -> (N, K) store -> train -> sample / sweep -> PNGs."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

import rargen
from conftest import randomize
from rargen.checkpoint import save
from rargen.cli.main import main
from rargen.data.store import write_store
from rargen.data.token_store import TokenStore
from rargen.model import RAR, ModelConfig
from rargen.sampling.engine import SampleConfig, generate_images
from rargen.tokenizers.titok import TiTok, TiTokConfig
from rargen.tokenizers.titok_convert import save_official_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _titok(seed: int = 0) -> TiTok:
    torch.manual_seed(seed)
    return randomize(TiTok(TiTokConfig.from_name("titok-test")), seed=seed, std=0.2).eval()


def test_store_train_sample_over_1d_tokens(tmp_path):
    tokenizer = _titok()
    save(tokenizer, tmp_path / "tok")
    pretokenize = ["pretokenize", "--data", "digits:heldout", "--tokenizer", str(tmp_path / "tok"),
                   "--out", str(tmp_path / "store"), "--image-size", "32", "--shard-size", "200",
                   "--device", "cpu"]  # fmt: skip
    assert main(pretokenize) == 0
    store = TokenStore(tmp_path / "store")
    assert store.grid == (8,) and store.num_tokens == 8 and store.codebook_size == 64 and len(store) == 286
    assert len(TokenStore(tmp_path / "store-heldout")) == 73  # the command line's held-out 20%
    from rargen.data.sources import open_source
    from rargen.data.split import heldout_split

    source = open_source("digits:heldout", image_size=32)
    image = source.load(int(heldout_split(source)[0][5]))  # the training store's 6th image
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    assert np.array_equal(store[5][0][0], tokenizer.encode(pixels)[0].numpy())  # (V, K) sequences

    train = ["train", "--data", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
             "--preset", "rar-tiny", "--steps", "3", "--batch-size", "8", "--warmup", "1",
             "--checkpoint-every", "3",
             "--tokenizer", str(tmp_path / "tok"), "--sample-every", "3", "--no-progress"]  # fmt: skip
    assert main(train) == 0
    generator = rargen.load(tmp_path / "run" / "final")
    cfg = generator.config
    assert (cfg.num_image_tokens, cfg.codebook_size, cfg.num_classes) == (8, 64, 10)
    assert (tmp_path / "run" / "samples" / "step-0000003.png").is_file()  # the training preview decoded

    sample = ["sample", str(tmp_path / "run" / "final"), "--tokenizer", str(tmp_path / "tok"),
              "--labels", "3,7,7", "--cfg-scale", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(sample) == 0
    arr = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3)
    assert Image.open(tmp_path / "out" / "images" / "000001.png").size == (32, 32)
    # rargen sweep samples and scores each guidance scale through the same path
    from rargen.demo.digit_classifier import DigitClassifier, DigitClassifierConfig

    torch.manual_seed(0)
    save(DigitClassifier(DigitClassifierConfig(image_size=32)).eval(), tmp_path / "clf")
    sweep = ["sweep", str(tmp_path / "run" / "final"), "--tokenizer", str(tmp_path / "tok"),
             "--out", str(tmp_path / "sweep"), "--cfg-scales", "1,3", "--per-class", "1",
             "--classifier", str(tmp_path / "clf")]  # fmt: skip
    assert main(sweep) == 0
    assert np.load(tmp_path / "sweep" / "cfg3-pow0-t1" / "samples.npz")["arr_0"].shape == (10, 32, 32, 3)
    # generate_images decodes the (B, 8) sequences directly with the 1D tokenizer
    images = generate_images(generator, tokenizer, [3, 7], SampleConfig(cfg_scale=2.0), seeds=[1, 2])
    assert images.shape == (2, 3, 32, 32)


def test_write_store_takes_1d_sequences(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, size=(20, 8))
    write_store(tmp_path / "s", tokens, np.zeros(20), codebook_size=64, token_ndim=1)
    store = TokenStore(tmp_path / "s")
    assert store.grid == (8,) and store.num_tokens == 8
    assert np.array_equal(store.gather(np.arange(20), np.zeros(20, dtype=np.int64)), tokens)
    with pytest.raises(ValueError, match=r"\(N, V, K\)"):
        write_store(tmp_path / "t", tokens[:, :, None, None], np.zeros(20), codebook_size=64, token_ndim=1)


def test_generate_images_refuses_a_2d_tokenizer_for_a_non_square_sequence():
    from rargen.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig

    model = randomize(RAR(ModelConfig.from_name("rar-tiny", num_image_tokens=8, codebook_size=64))).eval()
    vqgan = MaskGITVQGAN(VQGANConfig.from_name("maskgit-vqgan-test")).eval()
    with pytest.raises(ValueError, match="8 tokens do not form a square grid.*MaskGITVQGAN"):
        generate_images(model, vqgan, [1], SampleConfig(), seeds=[0])


@pytest.mark.slow
def test_sample_with_a_converted_full_size_titok_l32_writes_256px_pngs(tmp_path):
    """Random-weight TiTok-L-32 (641M parameters) -> official snapshot -> convert -> rargen sample."""
    torch.manual_seed(0)
    full = TiTok(TiTokConfig.from_name("titok-l-32"))
    save_official_snapshot(full, tmp_path / "snapshot")
    del full
    gc.collect()
    assert (
        main(["convert", "official-titok", str(tmp_path / "snapshot"), "--out", str(tmp_path / "tok")]) == 0
    )
    generator = RAR(ModelConfig.from_name("rar-tiny", codebook_size=4096, num_image_tokens=32, num_classes=2))
    save(randomize(generator).eval(), tmp_path / "gen")
    argv = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--labels", "1",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    png = Image.open(tmp_path / "out" / "images" / "000000.png")
    assert png.size == (256, 256) and png.mode == "RGB"
    assert np.asarray(png).std() > 0  # an image, not a constant


def test_serve_over_1d_tokens_streams_token_progress_then_the_images_of_generate(tmp_path):
    """rargen serve with a TiTok: no rows to paint, so progress counts tokens (no partial images) and
    the final PNGs are exactly generate()'s samples decoded by the 1D tokenizer."""
    import base64
    import io

    from rargen.sampling.engine import generate, sample_seed
    from serve_helpers import events, open_stream, request, running_server

    tokenizer = _titok()
    generator = randomize(RAR(ModelConfig.from_name("rar-tiny", num_image_tokens=8, codebook_size=64)))
    save(generator.eval(), tmp_path / "gen")
    save(tokenizer, tmp_path / "tok")
    body = {"class": 3, "seed": 4, "batch_size": 2, "cfg_scale": 2.0, "stream_every": 3}
    # Plain steps (speculate=0): progress then comes every 3 tokens exactly; a speculative pass may
    # cover several tokens at once (its streaming is tested in test_speculating.py).
    with running_server((tmp_path / "gen", tmp_path / "tok"), speculate=0) as server:
        status, info, _ = request(server, "GET", "/info")
        conn, response = open_stream(server, body)
        received = list(events(response))
        conn.close()
        status, plain, _ = request(server, "POST", "/generate", body)
    assert status == 200 and info["progressive"] is False and info["grid"] == [8, 1]
    names = [name for name, _ in received]
    assert names == ["start", "progress", "progress", "done"]
    assert received[0][1]["rows"] == 8 and received[0][1]["unit"] == "tokens"
    assert [p["rows_done"] for _, p in received[1:3]] == [3, 6]
    assert all(p["images"] == [] for _, p in received[1:3])  # a partial 1D sequence shows nothing
    final = received[-1][1]["images"]
    assert [image["png"] for image in final] == [image["png"] for image in plain["images"]]
    seeds = [sample_seed(4, i) for i in range(2)]
    tokens = generate(generator.eval(), [3, 3], SampleConfig(cfg_scale=2.0), seeds=seeds)
    expected = (tokenizer.decode(tokens).float().clamp(0, 1) * 255).round().to(torch.uint8)
    for image, pixels in zip(final, expected.permute(0, 2, 3, 1).numpy(), strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(image["png"])))), pixels)
