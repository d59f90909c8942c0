"""TokenLoader: batches are a pure function of (seed, epoch, step), resumable, disjoint across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rargen.data.loader import TokenLoader
from rargen.data.store import write_store
from rargen.data.token_store import TokenStore

NUM_IMAGES, NUM_VARIANTS = 103, 10


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenStore:
    # Every token of image i in variant v equals i * V + v, so a batch reveals what was read.
    codes = np.arange(NUM_IMAGES * NUM_VARIANTS).reshape(NUM_IMAGES, NUM_VARIANTS, 1, 1)
    tokens = np.broadcast_to(codes, (NUM_IMAGES, NUM_VARIANTS, 2, 3))
    path = tmp_path_factory.mktemp("loader") / "store"
    labels = np.arange(NUM_IMAGES) % 7
    write_store(
        path,
        tokens,
        labels,
        codebook_size=2048,
        class_names=list("abcdefg"),
        augment="ten-crop",
        shard_size=40,
    )
    return TokenStore(path)


def _images_and_variants(tokens: torch.Tensor, num_variants: int) -> tuple[np.ndarray, np.ndarray]:
    first = tokens[:, 0].numpy()
    assert (tokens == tokens[:, :1]).all()  # the whole grid of one image/variant was read
    return first // num_variants, first % num_variants


def test_batches_are_raster_tokens_with_matching_labels(store):
    loader = TokenLoader(store, batch_size=8, seed=1)
    tokens, labels = next(iter(loader))
    assert tokens.shape == (8, 6) and tokens.dtype == labels.dtype == torch.int64
    images, variants = _images_and_variants(tokens, store.num_variants)
    np.testing.assert_array_equal(images, loader.batch_indices(0, 0))
    np.testing.assert_array_equal(labels.numpy(), images % 7)
    np.testing.assert_array_equal(variants, loader.epoch_plan(0)[1][images])


def test_order_is_deterministic_and_depends_on_seed_and_epoch(store):
    def first_epoch(seed):
        return [t for t, _ in TokenLoader(store, batch_size=8, seed=seed)]

    a, b, c = first_epoch(3), first_epoch(3), first_epoch(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    loader = TokenLoader(store, batch_size=8, seed=3)
    assert not np.array_equal(loader.epoch_plan(0)[0], loader.epoch_plan(1)[0])


def test_resuming_mid_epoch_gives_the_same_remaining_batches(store):
    reference = TokenLoader(store, batch_size=8, seed=5)
    full = [b for _ in range(3) for b in reference]  # three epochs in a row
    assert reference.state_dict() == {"epoch": 3, "step": 0}
    for consumed in (0, 5, len(reference) - 1, len(reference) + 2):
        first = TokenLoader(store, batch_size=8, seed=5)
        seen = []
        while len(seen) < consumed:
            for batch in first:
                seen.append(batch)
                if len(seen) == consumed:
                    break
        state = first.state_dict()
        resumed = TokenLoader(store, batch_size=8, seed=5)
        resumed.load_state_dict(state)
        rest = [b for _ in range(3 - state["epoch"]) for b in resumed]
        assert len(seen) + len(rest) == len(full)
        for (t, y), (t_ref, y_ref) in zip(seen + rest, full, strict=True):
            assert torch.equal(t, t_ref) and torch.equal(y, y_ref)


def test_ranks_are_disjoint_and_cover_the_epoch(store):
    world, batch = 3, 5
    loaders = [TokenLoader(store, batch_size=batch, seed=2, rank=r, world_size=world) for r in range(world)]
    steps = NUM_IMAGES // (batch * world)
    assert all(len(loader) == steps for loader in loaders)  # 6: the last 13 images are dropped
    seen = np.concatenate([_images_and_variants(t, store.num_variants)[0] for lo in loaders for t, _ in lo])
    assert len(seen) == len(set(seen.tolist())) == steps * batch * world
    np.testing.assert_array_equal(
        np.sort(seen), np.sort(loaders[0].epoch_plan(0)[0][: steps * batch * world])
    )


def test_variants_are_drawn_per_image_per_epoch(store):
    loader = TokenLoader(store, batch_size=8, seed=0)
    counts = np.zeros(store.num_variants, dtype=np.int64)
    changed = 0
    for epoch in range(20):
        counts += np.bincount(loader.epoch_plan(epoch)[1], minlength=store.num_variants)
        changed += int((loader.epoch_plan(epoch)[1] != loader.epoch_plan(epoch + 1)[1]).sum())
    assert counts.min() > 0.8 * counts.mean()  # roughly uniform over the variants
    assert changed > 0.5 * 20 * NUM_IMAGES  # re-drawn every epoch, not fixed per image


def test_prefetch_yields_the_same_batches(store):
    plain = [t for t, _ in TokenLoader(store, batch_size=8, seed=9)]
    prefetched = [t for t, _ in TokenLoader(store, batch_size=8, seed=9, prefetch=True)]
    assert all(torch.equal(x, y) for x, y in zip(plain, prefetched, strict=True))


def test_bad_arguments_name_the_fix(store):
    with pytest.raises(ValueError, match="lower batch_size"):
        TokenLoader(store, batch_size=64, world_size=2)
    with pytest.raises(ValueError, match="world size"):
        TokenLoader(store, batch_size=8).load_state_dict({"epoch": 0, "step": 99})
