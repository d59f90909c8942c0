"""Speculative decoding draws from exactly plain decoding's distribution (rargen.sampling.speculative)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from conftest import randomize
from rargen.model import RAR, ModelConfig
from rargen.sampling.decoding import Decoder, prepare_for_decoding
from rargen.sampling.engine import SampleConfig, draw_noise, generate, token_probs
from rargen.sampling.speculation_policy import SpeculationPolicy
from rargen.sampling.speculative import generate_speculative
from train_data import make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Guidance with the power-cosine schedule (its weight differs at every position), temperature,
# top-k and top-p all at once: each position's distribution is the guided, filtered one.
FILTERED = SampleConfig(cfg_scale=2.5, cfg_power=1.5, temperature=0.9, top_k=2, top_p=0.8)


def exact_joint(model: RAR, label: int, config: SampleConfig) -> tuple[list[tuple[int, ...]], np.ndarray]:
    sequences = list(itertools.product(range(3), repeat=4))
    tokens = torch.tensor(sequences)
    probs = token_probs(model.double(), [label] * len(sequences), tokens, config)
    model.float()
    joint = probs.gather(-1, tokens[..., None])[..., 0].double().prod(-1).numpy()
    assert joint.sum() == pytest.approx(1.0, abs=1e-9)
    return sequences, joint


@pytest.mark.parametrize("speculate", [0, 3])
def test_samples_follow_the_exact_joint_distribution(enumerable: RAR, speculate: int) -> None:
    """Chi-square of 40,000 samples against the enumerated joint (speculate=0 is the control).

    Top-k and top-p keep about 10 of the 81 sequences, none above probability 0.2, so moving 1%
    of the probability from one kept sequence to another gives a non-centrality of at least
    n * 2 * 0.01**2 / 0.2 = 40, which the test at level 1e-3 rejects with high probability
    (``test_chi_square_detects_a_one_percent_bias``); the exact sampler passes."""
    label, n = 1, 40_000
    sequences, joint = exact_joint(enumerable, label, FILTERED)
    assert 16 > (joint > 0).sum() > 5 and joint.max() < 0.2  # top-p removes beyond top-k's 2**4
    tokens = generate(
        enumerable, [label] * n, FILTERED, torch.Generator().manual_seed(speculate), speculate=speculate
    )
    index = {seq: i for i, seq in enumerate(sequences)}
    counts = np.bincount([index[tuple(row)] for row in tokens.tolist()], minlength=len(sequences))
    kept = joint > 0
    assert counts[~kept].sum() == 0  # nothing outside top-k / top-p
    result = chisquare(counts[kept], n * joint[kept] / joint[kept].sum())
    assert result.pvalue > 1e-3, result


def test_chi_square_detects_a_one_percent_bias(enumerable: RAR) -> None:
    """The power claimed above: the same test on samples from a joint with 1% of the mass moved."""
    label, n = 1, 40_000
    _, joint = exact_joint(enumerable, label, FILTERED)
    kept = np.flatnonzero(joint > 0)
    biased = joint.copy()
    biased[kept[np.argmax(joint[kept])]] -= 0.01
    biased[kept[np.argmin(joint[kept])]] += 0.01
    counts = np.random.default_rng(0).multinomial(n, biased)
    assert chisquare(counts[kept], n * joint[kept]).pvalue < 1e-3


def test_speculative_tokens_equal_plain_tokens_for_the_same_seeds(tiny_model: RAR) -> None:
    """Same noise, same tokens (float64: no rounding differences), for every window length."""
    labels, seeds = [1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15]
    for config in (FILTERED, SampleConfig(), SampleConfig(cfg_scale=3.0)):
        plain = generate(tiny_model, labels, config, seeds=seeds)
        for speculate in (1, 4, 15, 40):
            assert torch.equal(generate(tiny_model, labels, config, seeds=seeds, speculate=speculate), plain)


def test_windows_across_modulation_tables_give_the_same_tokens(tiny_model: RAR, monkeypatch) -> None:
    """Tables of 3 positions (the path of models whose tables do not all fit the budget at once):
    windows read across table boundaries, and the tokens are those of whole tables."""
    labels, seeds, config = [1, 2, 3], [10, 11, 12], SampleConfig(cfg_scale=3.0)
    whole = generate(tiny_model, labels, config, seeds=seeds, speculate=5)
    monkeypatch.setattr(Decoder, "modulation_chunk", lambda self, conditions: 3)
    for speculate in (0, 2, 5):
        assert torch.equal(generate(tiny_model, labels, config, seeds=seeds, speculate=speculate), whole)


def test_a_sample_does_not_depend_on_its_batch(tiny_model: RAR) -> None:
    config = SampleConfig(cfg_scale=3.0, cfg_power=2.0, top_k=8)
    labels, seeds = [0, 7, 7, 3, 9], [5, 6, 7, 8, 9]
    together = generate(tiny_model, labels, config, seeds=seeds, speculate=5)
    for i in range(len(labels)):
        alone = generate(tiny_model, [labels[i]], config, seeds=[seeds[i]], speculate=5)
        assert torch.equal(alone[0], together[i])


def test_fewer_passes_than_tokens(tiny_model: RAR) -> None:
    decoder = prepare_for_decoding(tiny_model)
    L, V = tiny_model.config.num_image_tokens, tiny_model.config.codebook_size
    noise = draw_noise((4, L, V), "cpu", seeds=[1, 2, 3, 4])
    _, stats = generate_speculative(decoder, [1, 2, 3, 4], SampleConfig(top_k=2), noise, 8)
    assert stats.passes_per_image < L and stats.tokens_per_pass > 1
    _, one = generate_speculative(decoder, [1, 2, 3, 4], SampleConfig(top_k=2), noise, 0)
    assert one.passes_per_image == L and one.tokens_per_pass == 1  # K = 0: one token per pass


@pytest.fixture(scope="module")
def trained() -> RAR:
    """rar-tiny fitted for a few seconds to class prototypes: peaked, class-dependent outputs."""
    torch.manual_seed(0)
    store = make_store(num=128, seed=1)
    model = RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, labels = torch.from_numpy(store.tokens), torch.from_numpy(store.labels)
    for _ in range(40):
        logits = model(tokens, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_trained_model_log_likelihood_agrees(trained: RAR) -> None:
    """Mean log-likelihood (``token_probs``) of speculative and plain samples, independent seeds,
    within 4 standard errors; with the same seeds the float32 tokens almost all coincide."""
    config = SampleConfig(cfg_scale=2.0, cfg_power=1.0, temperature=1.2)
    n = 300
    labels = [i % 10 for i in range(n)]
    decoder = prepare_for_decoding(trained)

    def log_likelihood(tokens: torch.Tensor) -> np.ndarray:
        probs = token_probs(decoder, labels, tokens, config)
        return probs.gather(-1, tokens[..., None]).log().sum((1, 2)).double().numpy()

    plain = generate(decoder, labels, config, seeds=list(range(n)))
    speculative = generate(decoder, labels, config, seeds=list(range(n, 2 * n)), speculate=6)
    a, b = log_likelihood(plain), log_likelihood(speculative)
    error = np.sqrt(a.var() / n + b.var() / n)
    assert abs(a.mean() - b.mean()) < 4 * error, (a.mean(), b.mean(), error)
    same_seeds = generate(decoder, labels, config, seeds=list(range(n)), speculate=6)
    assert (same_seeds == plain).float().mean() > 0.99


def test_bad_speculate_raises(tiny_model: RAR) -> None:
    with pytest.raises(ValueError, match="speculate must be an int >= 0"):
        generate(tiny_model, [1], SampleConfig(), speculate=-1)


def test_sample_command_speculate_gives_the_plain_images(tmp_path, monkeypatch) -> None:
    """``rargen sample --speculate K`` (speculating wherever the policy allows): the images of
    plain sampling (``--speculate 0``) with the same seed."""
    from rargen.checkpoint import save
    from rargen.cli.main import main
    from test_sample_cli import TinyTokenizer, TinyTokenizerConfig

    save(
        randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval(),
        tmp_path / "gen",
    )
    save(TinyTokenizer(TinyTokenizerConfig()), tmp_path / "tok")
    common = ["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--per-class", "1"]
    common += ["--cfg-scale", "3", "--cfg-power", "1", "--top-k", "8", "--seed", "2", "--batch-size", "4"]
    assert main([*common, "--out", str(tmp_path / "plain"), "--speculate", "0"]) == 0
    # Every batch speculates, whatever the costs measured on this host.
    monkeypatch.setattr(SpeculationPolicy, "speculate", lambda self, rows, capacity: self.drafts > 0)
    assert main([*common, "--out", str(tmp_path / "spec"), "--speculate", "5"]) == 0
    plain, spec = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("plain", "spec"))
    assert np.array_equal(plain, spec)
