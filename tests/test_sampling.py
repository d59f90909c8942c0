"""The sampler: exact official distributions, cache == full forward, CFG sharing, seeds, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rargen.convert import from_official
from rargen.kv_cache import KVCache
from rargen.model import RAR
from rargen.sampling.decoding import DecodeBatch, Decoder, decode_fixed_shapes
from rargen.sampling.engine import SampleConfig, generate, sample_seed, token_probs
from rargen.sampling.next_token import cfg_schedule, filter_logits

DATA = Path(__file__).parent / "data"


def official_case(name: str) -> tuple[RAR, dict[str, torch.Tensor], dict[str, dict]]:
    path = DATA / f"official_rar_{name}.safetensors"
    tensors = load_file(str(path))
    settings = json.loads(safe_open(str(path), "pt").metadata()["generate_settings"])
    config, state = from_official({k[6:]: v.double() for k, v in tensors.items() if k.startswith("state.")})
    model = RAR(config)
    model.load_state_dict(state)
    return model.double().eval(), tensors, settings


def to_config(setting: dict) -> SampleConfig:
    g = setting["guidance_scale"]
    # The official "no guidance" is g = 0; ours is g = 1.
    return SampleConfig(
        cfg_scale=g if g != 0 else 1.0,
        cfg_power=setting["guidance_scale_pow"],
        temperature=setting["randomize_temperature"],
    )


@pytest.fixture(params=["default-chunk", "chunk-3"])
def modulation_chunk(request, monkeypatch) -> str:
    """The adaLN-ahead tables at their default size (one table covers the tiny models' whole
    sequence) and forced to 3 positions, so decoding crosses many table boundaries."""
    if request.param == "chunk-3":
        monkeypatch.setattr(Decoder, "modulation_chunk", lambda self, conditions: 3)
    return request.param


# float32: both implementations carry ~1e-6 of rounding (the official float32 itself is 7e-7 off
# its float64 run), and the summation order follows torch's thread count (config a: under 1e-6 at two
# threads, 1.1e-6 at one); config b (96 wide, 3 layers) is a little noisier than a.
@pytest.mark.parametrize(("name", "atol32"), [("a", 1.5e-6), ("b", 2e-6)])
@pytest.mark.parametrize("case", ["cfg_a", "cfg_b", "cfg_c"])
def test_token_probs_equal_official_generate(name: str, atol32: float, case: str, modulation_chunk) -> None:
    model, tensors, settings = official_case(name)
    config = to_config(settings[case])
    labels, tokens = tensors["gen_labels"], tensors["gen_tokens"]
    probs64 = token_probs(model, labels, tokens, config)
    # The official w(t) is float32 (spec Sec. 7 item 13), ours float64: <= 1.2e-7 apart in w.
    atol64 = 2e-7 if config.cfg_power > 0 else 1e-12
    torch.testing.assert_close(probs64, tensors[f"probs64_{case}"], rtol=0, atol=atol64)
    probs32 = token_probs(model.float(), labels, tokens, config)
    assert probs32.dtype == torch.float32
    torch.testing.assert_close(probs32, tensors[f"probs32_{case}"], rtol=0, atol=atol32)


def test_schedule_matches_official_weights() -> None:
    _, tensors, settings = official_case("a")
    for case in ("cfg_a", "cfg_b"):
        s = settings[case]
        w = cfg_schedule(16, s["guidance_scale"], s["guidance_scale_pow"])
        assert w.dtype == torch.float64
        torch.testing.assert_close(w, tensors[f"guidance_weights_{case}"].double(), rtol=0, atol=2e-7)
    assert torch.equal(cfg_schedule(8, 4.0, 0.0), torch.full((8,), 4.0, dtype=torch.float64))
    w = cfg_schedule(256, 16.0, 2.75)
    assert w[0] == 1.0 and 15.9 < w[-1] < 16.0 and bool((w.diff() >= 0).all())


def test_cached_sampling_probs_equal_full_forward(tiny_model: RAR, modulation_chunk) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (3, 16), generator=generator)
    labels = torch.tensor([0, 4, 9])
    full = (tiny_model(tokens, labels) / 0.7).softmax(-1)
    torch.testing.assert_close(token_probs(tiny_model, labels, tokens, SampleConfig(temperature=0.7)), full)


def test_scale_one_is_unguided_and_not_doubled(tiny_model: RAR, monkeypatch) -> None:
    labels, seeds = torch.tensor([1, 2, 2, 7]), [11, 12, 13, 14]
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    batch_rows = []
    original = DecodeBatch.__init__

    def counting(self, decoder, rows, conditions=None):
        batch_rows.append(rows)
        original(self, decoder, rows, conditions)

    monkeypatch.setattr(DecodeBatch, "__init__", counting)
    config = SampleConfig(cfg_scale=1.0, cfg_power=2.0)
    plain_probs = token_probs(tiny_model, labels, tokens, config)
    plain = generate(tiny_model, labels, config, seeds=seeds)
    assert batch_rows == [4, 4]
    # Force the doubled [cond; null] path: with w == 1 it must give the same distributions.
    monkeypatch.setattr(SampleConfig, "guided", property(lambda self: True))
    torch.testing.assert_close(
        token_probs(tiny_model, labels, tokens, config), plain_probs, rtol=0, atol=1e-12
    )
    assert torch.equal(generate(tiny_model, labels, config, seeds=seeds), plain)
    assert batch_rows[2:] == [8, 8]


def test_seeds_give_same_tokens_across_runs_and_batch_splits(tiny_model: RAR) -> None:
    config = SampleConfig(cfg_scale=3.0, cfg_power=1.0, temperature=1.1)
    labels = torch.tensor([3, 3, 0, 8, 5])
    seeds = [sample_seed(42, i) for i in range(5)]
    whole = generate(tiny_model, labels, config, seeds=seeds)
    assert torch.equal(whole, generate(tiny_model, labels, config, seeds=seeds))
    parts = [generate(tiny_model, labels[a:b], config, seeds=seeds[a:b]) for a, b in ((0, 2), (2, 3), (3, 5))]
    assert torch.equal(whole, torch.cat(parts))
    other = generate(tiny_model, labels, config, seeds=[sample_seed(43, i) for i in range(5)])
    assert not torch.equal(whole, other)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(generate(tiny_model, labels, config, g1), generate(tiny_model, labels, config, g2))


@pytest.mark.parametrize(
    "config",
    [SampleConfig(top_k=3, temperature=0.8), SampleConfig(top_p=0.6, cfg_scale=2.0, cfg_power=1.0)],
    ids=["top-k", "top-p"],
)
def test_truncation_keeps_exactly_the_right_tokens(tiny_model: RAR, config: SampleConfig) -> None:
    """Every step's surviving set is the top-k tokens, or the smallest most-probable set with mass
    >= p, of the untruncated distribution at the same temperature and guidance; the sampled token
    is always in it."""
    labels = torch.arange(10).repeat(3)
    tokens = generate(tiny_model, labels, config, torch.Generator().manual_seed(3))
    probs = token_probs(tiny_model, labels, tokens, config)
    untruncated = SampleConfig(config.cfg_scale, config.cfg_power, config.temperature)
    full = token_probs(tiny_model, labels, tokens, untruncated)
    assert bool((probs.gather(-1, tokens[..., None]) > 0).all())
    order = full.argsort(-1, descending=True)
    if config.top_k:
        count = torch.full(full.shape[:-1], config.top_k)
    else:  # the first k in descending order whose mass reaches p
        mass = full.gather(-1, order).cumsum(-1)
        count = (mass < config.top_p).sum(-1) + 1
    expected = torch.zeros_like(full, dtype=torch.bool)
    ranks = torch.arange(full.shape[-1]).expand_as(full)
    expected.scatter_(-1, order, ranks < count[..., None])
    assert torch.equal(probs > 0, expected)
    assert int(count.min()) >= 1 and (config.top_k or int(count.max()) > 1)
    # Survivors keep their relative probabilities: renormalised untruncated ones.
    kept = full * expected
    torch.testing.assert_close(probs, kept / kept.sum(-1, keepdim=True), rtol=0, atol=1e-12)


def test_filter_logits_does_not_modify_input() -> None:
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    copy = logits.clone()
    out = filter_logits(logits, 0.5, top_k=4, top_p=0.8)
    assert torch.equal(logits, copy) and out.isinf().any()


def test_sampled_frequencies_match_token_probs(tiny_model: RAR) -> None:
    """Martingale check: sum_n (1[x_nt = v] - p_nt(v)) has mean 0, variance sum_n p(1 - p)."""
    config = SampleConfig(cfg_scale=2.5, cfg_power=1.0, temperature=1.3, top_k=20)
    labels = torch.arange(10).repeat(50)
    tokens = generate(tiny_model, labels, config, seeds=[sample_seed(7, i) for i in range(len(labels))])
    probs = token_probs(tiny_model, labels, tokens, config)
    onehot = torch.nn.functional.one_hot(tokens, 32).double()
    excess = (onehot - probs).sum(0)  # (L, V)
    variance = (probs * (1 - probs)).sum(0)
    z = excess[variance > 5] / variance[variance > 5].sqrt()
    assert z.numel() > 100
    assert z.abs().max() < 5.0
    assert 0.7 < z.pow(2).mean() < 1.3


def test_compiled_decode_step_has_no_graph_breaks(tiny_model: RAR) -> None:
    model = tiny_model.float()
    labels = torch.tensor([1, 2, 10, 10])
    cache = KVCache(model.config, 4, model.dtype, model.device)
    positions = torch.tensor([0, 3, 3, 7])  # rows at their own positions
    explanation = torch._dynamo.explain(decode_fixed_shapes)(
        model, torch.tensor([3, 4, 3, 4]), labels, positions, cache
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_generate_equals_eager(tiny_model: RAR) -> None:
    model = tiny_model.float()
    config, labels, seeds = SampleConfig(cfg_scale=3.0, cfg_power=1.0), torch.tensor([1, 5]), [1, 2]
    eager = generate(model, labels, config, seeds=seeds)
    assert torch.equal(generate(model, labels, config, seeds=seeds, compile=True), eager)


def test_bf16_generate_runs_close(tiny_model: RAR) -> None:
    """bf16 weights and activations (8-bit mantissa) against float32: per-step total variation
    0.011 on average and 0.032 at most here (measured), bounded at 0.02 / 0.06. For scale: moving
    the guidance scale from 2.0 to 2.2 moves these distributions by 0.07 on average."""
    model = tiny_model.float()
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    config = SampleConfig(cfg_scale=2.0)
    ref = token_probs(model, [1, 2], tokens, config)
    with pytest.raises(ValueError, match="bf16 weights"):
        token_probs(model, [1, 2], tokens, config, bf16=True)
    approx = token_probs(model.to(torch.bfloat16), [1, 2], tokens, config, bf16=True)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx.sum(-1), torch.ones(2, 16), rtol=0, atol=1e-5)
    variation = (approx - ref).abs().sum(-1) / 2  # (B, L)
    assert variation.mean() < 0.02 and variation.max() < 0.06, variation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"cfg_power": -1.0}, "cfg_power"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
    ],
)
def test_bad_sample_config_raises(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SampleConfig(**overrides)


def test_presets_and_errors(tiny_model: RAR) -> None:
    assert SampleConfig.from_name("rar-xl") == SampleConfig(cfg_scale=6.9, cfg_power=1.5, temperature=1.02)
    assert SampleConfig.from_name("rar-b", top_k=5).top_k == 5
    with pytest.raises(ValueError, match="rar-b"):
        SampleConfig.from_name("rar-s")
    with pytest.raises(ValueError, match="labels must be"):
        generate(tiny_model, [10], SampleConfig())
    with pytest.raises(ValueError, match="one seed per sample"):
        generate(tiny_model, [1, 2], SampleConfig(), seeds=[1])
    with pytest.raises(ValueError, match="eval"):
        generate(tiny_model.train(), [1], SampleConfig())
