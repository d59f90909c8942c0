"""Decoding in any order and the known tokens first (issue 28): the cached decode in an order is the
model's forward in that order, ``generate(known=...)`` draws exactly the model's conditional of the
unknown tokens, a row's edit does not depend on its batch, and the known codes come back unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rargen.kv_cache import KVCache
from rargen.model import RAR
from rargen.sampling.any_order import known_first
from rargen.sampling.decoding import DecodeBatch, Decoder, decode_fixed_shapes, prepare_for_decoding
from rargen.sampling.engine import SampleConfig, Sampler, draw_noise, generate, run_to_end, token_probs
from rargen.sampling.inpaint import cell_mask, inpaint, inpaint_codes
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Guidance with the power-cosine schedule, temperature, top-k and top-p all at once.
FILTERED = SampleConfig(cfg_scale=2.5, cfg_power=1.5, temperature=0.9, top_k=2, top_p=0.8)
# The same kinds, milder: the enumerable model's conditional keeps 6 (one order) to 14 (the mixture
# of "random") of its 27 outcomes, none above 0.39.
CONDITIONAL = SampleConfig(cfg_scale=2.5, cfg_power=1.5, temperature=1.2, top_k=2, top_p=0.9)


def random_orders(rows: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=generator) for _ in range(rows)])


@pytest.mark.parametrize("chunk", [None, 3])
def test_cached_decode_in_any_order_equals_forward(tiny_model: RAR, monkeypatch, chunk) -> None:
    """float64: token_probs in each row's order (raster rows beside them) == forward with those orders."""
    if chunk is not None:  # modulation tables of 3 positions: steps read across table boundaries
        monkeypatch.setattr(Decoder, "modulation_chunk", lambda self, conditions: chunk)
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 9, 4])
    orders = random_orders(4, 16, seed=1)
    orders[2] = torch.arange(16)  # a raster row in the same batch
    full = (tiny_model(tokens, labels, orders) / 0.7).softmax(-1)
    probs = token_probs(tiny_model, labels, tokens, SampleConfig(temperature=0.7), orders=orders)
    torch.testing.assert_close(probs, full, rtol=0, atol=1e-12)


def test_known_tokens_fed_in_one_pass_give_the_forward_logits(tiny_model: RAR) -> None:
    """DecodeBatch.add with a prefix of given tokens per row (0, 3, 9 and 15 of 16): its logits and
    every later step's equal forward's in that order (float64)."""
    L = 16
    tokens = torch.randint(0, 32, (4, L), generator=torch.Generator().manual_seed(2))
    labels, counts = torch.tensor([3, 1, 3, 8]), [0, 3, 9, 15]
    orders = random_orders(4, L, seed=3)
    full = tiny_model(tokens, labels, orders)  # (4, L, V): step i predicts tokens[orders[i]]
    in_order = tokens.gather(1, orders)
    batch = DecodeBatch(prepare_for_decoding(tiny_model), 6)
    with torch.inference_mode():
        batch.add([5])  # a raster row already decoding beside them
        batch.step()
        slots, logits = batch.add(labels.tolist(), orders, in_order, counts)
        for i, count in enumerate(counts):
            torch.testing.assert_close(logits[i], full[i, count], rtol=0, atol=1e-12)
        assert batch.positions[1:] == [2 + c for c in counts]
        for i, count in enumerate(counts):
            batch.feed[slots[i]] = in_order[i, count]
        for step in range(1, L - max(counts)):
            logits = batch.step()[1:]
            for i, count in enumerate(counts):
                torch.testing.assert_close(logits[i], full[i, count + step], rtol=0, atol=1e-12)
                batch.feed[slots[i]] = in_order[i, count + step]


def test_raster_batches_hold_no_order_table(tiny_model: RAR) -> None:
    """Raster rows step as they always did: the order table exists only while a row needs it."""
    batch = DecodeBatch(prepare_for_decoding(tiny_model), 4)
    with torch.inference_mode():
        batch.add([1, 2])
        assert batch._orders is None
        batch.add([3], random_orders(1, 16, seed=0))
        assert batch._orders is not None
        batch.step()
        batch.remove([2])
        assert batch._orders is None


KNOWN_POSITION, KNOWN_CODE, LABEL = 1, 2, 1
EXPLICIT = torch.tensor([3, 0, 1, 2])  # known position 1 first, then 3, 0, 2: not raster


def exact_conditional(model: RAR, orders: list[torch.Tensor]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """P(tokens | token 1 = 2) for every completion, averaged over ``orders`` (known first in each)."""
    sequences = [s for s in itertools.product(range(3), repeat=4) if s[KNOWN_POSITION] == KNOWN_CODE]
    tokens = torch.tensor(sequences)
    total = np.zeros(len(sequences))
    for order in orders:
        probs = token_probs(model.double(), [LABEL] * len(sequences), tokens, CONDITIONAL, orders=order)
        in_order = tokens.gather(1, order.expand_as(tokens))
        step = probs.gather(-1, in_order[..., None])[..., 0]  # (n, L): probability of each step's token
        total += step[:, 1:].prod(-1).numpy()  # step 0 is the known token: given, not drawn
    model.float()
    conditional = total / len(orders)
    assert conditional.sum() == pytest.approx(1.0, abs=1e-9)
    return sequences, conditional


def orders_of(order) -> list[torch.Tensor]:
    """The generation orders ``order`` takes with the known position first, equally likely."""
    unknown = [p for p in range(4) if p != KNOWN_POSITION]
    if isinstance(order, torch.Tensor):
        listed = [p for p in order.tolist() if p != KNOWN_POSITION]
        return [torch.tensor([KNOWN_POSITION, *listed])]
    return [torch.tensor([KNOWN_POSITION, *perm]) for perm in itertools.permutations(unknown)]


@pytest.mark.parametrize("order", [EXPLICIT, "random"], ids=["explicit", "random"])
def test_known_first_samples_follow_the_exact_conditional(enumerable: RAR, order) -> None:
    """Chi-square of 40,000 completions against the enumerated conditional of the model in that
    order (for "random": the mixture over the 6 orders of the unknown tokens). As in the
    speculative tests, moving 1% of the mass between two kept outcomes is rejected
    (``test_chi_square_detects_a_one_percent_bias``); the exact sampler passes."""
    n = 40_000
    sequences, conditional = exact_conditional(enumerable, orders_of(order))
    kept = conditional > 0
    assert kept.sum() > 5 and conditional.max() < 0.4
    known = torch.full((n, 4), KNOWN_CODE)
    mask = torch.zeros(n, 4, dtype=torch.bool)
    mask[:, KNOWN_POSITION] = True
    generator = torch.Generator().manual_seed(7)
    tokens = generate(
        enumerable, [LABEL] * n, CONDITIONAL, generator, known=known, known_mask=mask, order=order
    )
    assert (tokens[:, KNOWN_POSITION] == KNOWN_CODE).all()
    index = {seq: i for i, seq in enumerate(sequences)}
    counts = np.bincount([index[tuple(row)] for row in tokens.tolist()], minlength=len(sequences))
    assert counts[~kept].sum() == 0  # nothing outside top-k / top-p
    result = chisquare(counts[kept], n * conditional[kept] / conditional[kept].sum())
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("order", [EXPLICIT, "random"], ids=["explicit", "random"])
def test_chi_square_detects_a_one_percent_bias(enumerable: RAR, order) -> None:
    """The power claimed above: the same test on draws from a conditional with 1% of the mass moved."""
    n = 40_000
    _, conditional = exact_conditional(enumerable, orders_of(order))
    kept = np.flatnonzero(conditional > 0)
    biased = conditional.copy()
    biased[kept[np.argmax(conditional[kept])]] -= 0.01
    biased[kept[np.argmin(conditional[kept])]] += 0.01
    counts = np.random.default_rng(0).multinomial(n, biased)
    assert chisquare(counts[kept], n * conditional[kept]).pvalue < 1e-3


def edit_inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    known = torch.randint(0, 32, (rows, 16), generator=generator)
    mask = torch.rand(rows, 16, generator=generator) < 0.5
    mask[0] = False  # nothing known: the whole image in the order
    return known, mask


def test_an_edit_does_not_depend_on_the_rows_beside_it(tiny_model: RAR) -> None:
    """Edits join a batch of plain raster rows mid-way: every row's tokens equal its tokens alone."""
    config, L, V = SampleConfig(cfg_scale=3.0, cfg_power=1.0, top_k=8), 16, 32
    known, mask = edit_inputs(3, seed=4)
    edit_labels, edit_seeds, plain_labels, plain_seeds = [2, 5, 5], [20, 21, 22], [5, 9], [30, 31]
    alone = [
        generate(tiny_model, [edit_labels[i]], config, seeds=[edit_seeds[i]], known=known[i : i + 1],
                 known_mask=mask[i : i + 1], order="random")[0]
        for i in range(3)
    ]  # fmt: skip
    plain = generate(tiny_model, plain_labels, config, seeds=plain_seeds)
    together = generate(
        tiny_model, edit_labels, config, seeds=edit_seeds, known=known, known_mask=mask, order="random"
    )
    assert torch.equal(together, torch.stack(alone))
    # In one sampler with the plain rows, joining after three of their steps.
    plan = known_first(known, mask, "random", 3, tiny_model.config, "cpu", seeds=edit_seeds)
    sampler = Sampler(prepare_for_decoding(tiny_model), 5)
    with torch.inference_mode():
        rows = sampler.add(plain_labels, config, noise=draw_noise((2, L, V), "cpu", seeds=plain_seeds))
        for _ in range(3):
            sampler.step()
        edits = sampler.add(
            edit_labels, config, noise=draw_noise((3, L, V), "cpu", seeds=edit_seeds), tokens=plan.tokens,
            orders=plan.orders, given=plan.counts,
        )  # fmt: skip
        run_to_end(sampler)
    assert torch.equal(torch.stack([s.tokens for s in rows]), plain)
    in_order = torch.stack([s.tokens for s in edits])
    assert torch.equal(torch.empty_like(in_order).scatter_(1, plan.orders, in_order), together)


def test_known_codes_come_back_unchanged(tiny_model: RAR) -> None:
    known, mask = edit_inputs(4, seed=5)
    mask[3] = True  # everything known: returned as given
    labels, seeds = [1, 2, 3, 4], [1, 2, 3, 4]
    for order in ("raster", "random", random_orders(1, 16, seed=6)[0], random_orders(4, 16, seed=7)):
        out = generate(tiny_model, labels, FILTERED, seeds=seeds, known=known, known_mask=mask, order=order)
        assert torch.equal(out[mask], known[mask]) and out.min() >= 0 and out.max() < 32
    kwargs = {"seeds": seeds, "known": known, "known_mask": mask, "order": "random"}
    assert torch.equal(
        generate(tiny_model, labels, FILTERED, **kwargs), generate(tiny_model, labels, FILTERED, **kwargs)
    )


def test_nothing_known_in_raster_order_is_plain_sampling(tiny_model: RAR) -> None:
    labels, seeds, config = [1, 2, 3], [7, 8, 9], SampleConfig(cfg_scale=3.0, top_p=0.9)
    plain = generate(tiny_model, labels, config, seeds=seeds)
    nothing = torch.zeros(3, 16, dtype=torch.bool)
    assert torch.equal(
        generate(tiny_model, labels, config, seeds=seeds, known=plain, known_mask=nothing), plain
    )


def test_completing_the_bottom_from_the_top_continues_plain_sampling(tiny_model: RAR) -> None:
    """The top half given in one pass, then raster: the tokens plain sampling drew with the same noise."""
    labels, seeds, config = [1, 2, 3], [7, 8, 9], SampleConfig(cfg_scale=3.0, cfg_power=2.0)
    plain = generate(tiny_model, labels, config, seeds=seeds)
    top = torch.zeros(3, 16, dtype=torch.bool)
    top[:, :8] = True
    assert torch.equal(generate(tiny_model, labels, config, seeds=seeds, known=plain, known_mask=top), plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"known": torch.zeros(2, 15, dtype=torch.int64)}, r"known must have shape \(2, 16\)"),
        ({"known_mask": torch.zeros(2, 8, dtype=torch.bool)}, r"known_mask must have the shape of known"),
        ({"known_mask": torch.zeros(2, 16)}, "known_mask must be bool"),
        ({"known": torch.full((2, 16), 32)}, r"known\[0, 0\] is 32"),
        ({"known": torch.zeros(2, 16)}, "integer codes"),
        ({"order": torch.tensor([0, 0] + list(range(2, 16)))}, "order row 0 is not a permutation"),
        ({"order": torch.arange(15)}, r"order must have shape \(16,\) or \(2, 16\)"),
        ({"order": "spiral"}, "order must be 'raster', 'random' or a permutation"),
        ({"known_mask": None}, "pass known and known_mask together"),
        ({"speculate": 2}, "speculate=2 decodes in raster order"),
    ],
)
def test_bad_known_inputs_name_the_value(tiny_model: RAR, kwargs: dict, message: str) -> None:
    arguments = {
        "known": torch.zeros(2, 16, dtype=torch.int64),
        "known_mask": torch.ones(2, 16, dtype=torch.bool),
    }
    arguments["known_mask"][:, 8:] = False
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_model, [1, 2], SampleConfig(), seeds=[1, 2], **arguments)


def test_cell_mask_regenerates_a_cell_when_any_of_its_pixels_is_masked() -> None:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 5, 9] = True  # one pixel: cell (1, 2) of the 4x4 grid
    masks[1, 8:] = True  # the bottom half
    cells = cell_mask(masks, (4, 4))
    assert cells[0].nonzero()[:, 0].tolist() == [1 * 4 + 2]
    assert cells[1].tolist() == [False] * 8 + [True] * 8
    assert torch.equal(
        cell_mask(masks[:, None].float(), (4, 4)), cells
    )  # white = 1.0 in a (B, 1, H, W) image
    with pytest.raises(ValueError, match="does not divide"):
        cell_mask(torch.zeros(1, 15, 16, dtype=torch.bool), (4, 4))


def test_inpaint_keeps_the_unmasked_codes(tiny_model: RAR) -> None:
    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQTokenizerConfig.from_name("vq-tiny")).eval()  # 16x16 -> 4x4, 32 codes
    model = tiny_model.float()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 8:] = True  # the bottom half
    masks[1, 4:12, 4:12] = True  # the centre
    masks[2, 0, 0] = True  # one pixel
    config = SampleConfig(cfg_scale=2.0)
    codes, tokens, regenerate = inpaint_codes(
        model, tokenizer, images, masks, [1, 2, 3], config, seeds=[4, 5, 6]
    )
    assert regenerate.sum(1).tolist() == [8, 4, 1]
    assert torch.equal(tokens[~regenerate], codes[~regenerate])
    out = inpaint(model, tokenizer, images, masks, [1, 2, 3], config, seeds=[4, 5, 6])
    with torch.inference_mode():
        expected = tokenizer.decode(tokens.view(3, 4, 4)).float().clamp(0, 1)
    assert out.shape == (3, 3, 16, 16) and torch.equal(out, expected)
    with pytest.raises(ValueError, match="got 2 masks for 3 images"):
        inpaint(model, tokenizer, images, masks[:2], [1, 2, 3], config, seeds=[4, 5, 6])


def test_compiled_decode_step_in_an_order_has_no_graph_breaks(tiny_model: RAR) -> None:
    model = tiny_model.float()
    cache = KVCache(model.config, 3, model.dtype, model.device)
    positions = torch.tensor([2, 5, 9])
    orders = random_orders(3, 16, seed=8)
    image_positions = orders.gather(1, torch.stack([positions - 2, positions - 1], 1))
    explanation = torch._dynamo.explain(decode_fixed_shapes)(
        model, torch.tensor([3, 4, 5]), torch.tensor([1, 2, 10]), positions, cache, image_positions
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_generate_with_known_tokens_equals_eager(tiny_model: RAR) -> None:
    model = tiny_model.float()
    known, mask = edit_inputs(3, seed=9)
    kwargs = {"seeds": [1, 2, 3], "known": known, "known_mask": mask, "order": "random"}
    config = SampleConfig(cfg_scale=3.0, cfg_power=1.0)
    eager = generate(model, [1, 5, 5], config, **kwargs)
    assert torch.equal(generate(model, [1, 5, 5], config, compile=True, **kwargs), eager)
