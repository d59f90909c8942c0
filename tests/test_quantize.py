"""int8 decoding (rargen.sampling.int8): close to float, explicitly not exact, refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, generate, token_probs
from rargen.sampling.int8 import Int8Linear, int8_available

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not int8_available(), reason="torch without quantized CPU kernels"),
]


def test_int8_linear_is_the_per_channel_quantized_product() -> None:
    """Against the product with the weights rounded to 127 levels per output row: only the
    8-bit input rounding (one scale per call) is left."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    w = linear.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    rounded = (w / scale).round().clamp(-127, 127) * scale
    expected = x @ rounded.T + linear.bias.detach()
    out = Int8Linear(linear)(x)
    step = (x.max() - x.min()) / 255  # the input quantisation step
    assert (out - expected).abs().max() < step * w.abs().sum(1).max()
    assert not torch.equal(out, linear(x))


def test_int8_sampling_is_close_to_float_and_runs_with_speculation() -> None:
    model = randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)), std=0.1).eval()
    config = SampleConfig(cfg_scale=2.0, cfg_power=1.0)
    tokens = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    exact = token_probs(model, [1, 2, 3], tokens, config)
    int8 = token_probs(model, [1, 2, 3], tokens, config, quantize="int8")
    error = (int8 - exact).abs().max()
    assert 0 < error < 0.05
    out = generate(model, [1, 2], config, seeds=[1, 2], quantize="int8", speculate=4)
    assert out.shape == (2, 16) and out.dtype == torch.int64


def test_int8_refusals() -> None:
    model = RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)).eval()
    with pytest.raises(ValueError, match="unknown quantize='int4'"):
        prepare_for_decoding(model, quantize="int4")
    with pytest.raises(ValueError, match="runs a float32 model on a CPU"):
        prepare_for_decoding(model.double(), quantize="int8")
    with pytest.raises(ValueError, match="drop compile and bf16"):
        prepare_for_decoding(model.float(), quantize="int8", compile=True)
    decoder = prepare_for_decoding(model)
    with pytest.raises(ValueError, match="differs from the prepared decoder"):
        generate(decoder, [1], SampleConfig(), quantize="int8")


def test_sample_command_int8(tmp_path) -> None:
    import json

    from rargen.checkpoint import save
    from rargen.cli.main import main
    from test_sample_cli import TinyTokenizer, TinyTokenizerConfig

    save(
        randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval(),
        tmp_path / "gen",
    )
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    args = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--labels", "1,2"]
    assert main([*args, "--out", str(tmp_path / "out"), "--int8", "--speculate", "3"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["quantize"] == "int8" and meta["speculate"] == 3
