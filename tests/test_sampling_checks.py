"""The sampling entry points check their inputs in one place each: class labels (``class_labels``)
and the speculation length (``check_speculate``), refused with a ValueError naming the bad value."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from rargen.model import MAX_SIZES, RAR, ModelConfig
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, Sampler, draw_noise, generate, token_probs
from rargen.sampling.speculative import generate_speculative

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> RAR:
    return randomize(RAR(ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0))).eval()


@pytest.mark.parametrize("speculate", [10**6, MAX_SIZES["num_image_tokens"] + 1, 10**100])
def test_a_speculation_beyond_any_sequence_is_refused_at_once(model: RAR, speculate: int) -> None:
    """``--speculate 1000000`` looped a million times on every pass (issue 25 item 3): now a
    ValueError naming the value and the valid range, from ``generate`` and from the speculative
    decoder itself, before any pass."""
    limit = MAX_SIZES["num_image_tokens"]
    message = rf"speculate must be an int >= 0 \(0 = off\) and at most {limit}, got {speculate}$"
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], SampleConfig(cfg_scale=2.0), seeds=[1, 2], speculate=speculate)
    L, V = model.config.num_image_tokens, model.config.codebook_size
    noise = draw_noise((1, L, V), "cpu", seeds=[1])
    with pytest.raises(ValueError, match=message):
        generate_speculative(prepare_for_decoding(model), [1], SampleConfig(), noise, speculate)


@pytest.mark.parametrize("speculate", [-1, True, 2.0, "4", None])
def test_a_speculation_that_is_no_count_is_refused(model: RAR, speculate) -> None:
    with pytest.raises(ValueError, match=r"speculate must be an int >= 0 \(0 = off\) and at most"):
        generate(model, [1], SampleConfig(), seeds=[1], speculate=speculate)


def test_the_largest_speculation_runs_and_gives_the_plain_tokens(model: RAR) -> None:
    """Drafts past the last token are never fed: the largest K allowed costs no more than L - 1."""
    config = SampleConfig(cfg_scale=2.0)
    plain = generate(model, [1, 2], config, seeds=[1, 2])
    largest = generate(model, [1, 2], config, seeds=[1, 2], speculate=MAX_SIZES["num_image_tokens"])
    assert torch.equal(largest, plain)


@pytest.mark.parametrize("labels", [[10], [-1], [3, 10, 11], [[1, 2]]])
def test_every_entry_point_refuses_a_label_outside_the_classes_alike(model: RAR, labels) -> None:
    config = SampleConfig()
    L, V = model.config.num_image_tokens, model.config.codebook_size
    bad = "shape" if isinstance(labels[0], list) else r"classes in \[0, 9\]"
    with pytest.raises(ValueError, match=f"labels must be .*{bad}"):
        generate(model, labels, config, seeds=list(range(len(labels))))
    with pytest.raises(ValueError, match=f"labels must be .*{bad}"):
        token_probs(model, labels, torch.zeros(len(labels), L, dtype=torch.int64), config)
    sampler = Sampler(prepare_for_decoding(model), 4, guided=False)
    with pytest.raises(ValueError, match=f"labels must be .*{bad}"):
        sampler.add(labels, config, noise=torch.ones(len(labels), L, V))
    assert len(sampler) == 0 and sampler.batch.free == 4  # refused before anything was added


def test_a_label_error_names_the_bad_labels_only(model: RAR) -> None:
    with pytest.raises(ValueError, match=r"got \[10, 12\]$"):
        generate(model, [1, 10, 2, 12], SampleConfig(), seeds=[1, 2, 3, 4])


def test_the_sample_command_refuses_a_speculation_beyond_any_sequence(tmp_path, capsys) -> None:
    """``rargen sample --speculate 1000000``: exit 2 and one line naming the value, before anything
    is loaded (the folders named do not even exist)."""
    from rargen.cli.main import main

    code = main(["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--labels", "1"]
                + ["--out", str(tmp_path / "out"), "--speculate", "1000000"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "speculate must be an int >= 0 (0 = off) and at most 65536, got 1000000" in err


def test_speculation_with_a_compiled_step_is_refused_in_the_words_of_each_caller(
    tmp_path, capsys, model
) -> None:
    """Issue 25 item 8: ``rargen sample --speculate 4 --compile`` answered in the Python API's
    words ("pass compile=False"). Refused before anything is loaded, naming the flags or the
    arguments the caller used."""
    from rargen.cli.main import main

    code = main(["sample", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"), "--labels", "1"]
                + ["--out", str(tmp_path / "out"), "--speculate", "4", "--compile"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--speculate" in err and "--compile" in err and "compile=False" not in err
    with pytest.raises(ValueError, match="speculate=4 and compile=True"):
        generate(model, [1], SampleConfig(), seeds=[1], speculate=4, compile=True)
