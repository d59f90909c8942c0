"""One decode in the model: windows of several new positions per row against the static KV cache
(what a speculative pass feeds) give the full forward's logits, and no decoder outside
``rargen.model`` computes any part of a block itself."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from rargen.kv_cache import CacheAt, CacheWindow, KVCache
from rargen.model import RAR

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rargen"


def test_window_decode_equals_full_forward(tiny_model: RAR) -> None:
    """Float64: rows at different positions feeding windows of 1 to 5 positions in one pass (rows
    grouped by window, one group's slots not consecutive), then on from where each stopped, give
    the teacher-forced logits of the whole sequence."""
    generator = torch.Generator().manual_seed(5)
    B, L = 4, tiny_model.config.num_image_tokens
    tokens = torch.randint(0, tiny_model.config.codebook_size, (B, L), generator=generator)
    labels = torch.tensor([0, 9, 10, 3])
    full = tiny_model(tokens, labels)
    cache = KVCache(tiny_model.config, B, tiny_model.dtype, tiny_model.device)
    out = torch.zeros_like(full)
    done = [1, 1, 1, 1]  # tokens of each row with logits; token 0 from the prefill
    plans = [[(0, 2), (1, 4), (2, 2), (3, 1)], [(0, 5), (2, 5), (1, 3), (3, 4)], [(1, 8)]]
    with torch.no_grad():
        out[:, 0] = tiny_model.prefill(labels, cache, 0)
        for plan in plans:
            by_length: dict[int, list[int]] = {}
            for row, length in plan:
                by_length.setdefault(length, []).append(row)
            windows, positions, slots, fed, feeders = [], [], [], [], []
            for length, rows in by_length.items():
                first = done[rows[0]] + 1  # rows of one window are at the same position
                assert all(done[row] + 1 == first for row in rows)
                windows.append(CacheWindow.causal(torch.tensor(rows), first, length))
                for row in rows:
                    for w in range(length):  # feed token first - 2 + w at sequence index first + w
                        positions.append(first + w)
                        slots.append(row)
                        fed.append(tokens[row, first - 2 + w])
                        feeders.append((row, first - 1 + w))
            positions_t = torch.tensor(positions)
            modulation = tiny_model.decode_modulations(labels[slots], positions_t)
            at = CacheAt(positions_t, windows=tuple(windows), slots=torch.tensor(slots))
            logits = tiny_model.decode_step(torch.stack(fed), modulation, cache, at)
            for (row, predicted), row_logits in zip(feeders, logits, strict=True):
                out[row, predicted] = row_logits
            for row, length in plan:
                done[row] += length
    assert done == [8, 16, 8, 6]  # row 1 to the last token
    for row in range(B):
        torch.testing.assert_close(out[row, : done[row]], full[row, : done[row]], rtol=0, atol=1e-12)


def test_a_window_of_one_is_the_one_token_step(tiny_model: RAR) -> None:
    """The same new positions as windows of one (speculative) and as a step (one run per row)."""
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, tiny_model.config.codebook_size, (3,), generator=generator)
    labels, positions = torch.tensor([1, 2, 10]), torch.tensor([2, 2, 2])
    results = []
    with torch.no_grad():
        for windowed in (False, True):
            cache = KVCache(tiny_model.config, 3, tiny_model.dtype, tiny_model.device)
            tiny_model.prefill(labels, cache, 0)
            modulation = tiny_model.decode_modulations(labels, positions)
            if windowed:
                window = CacheWindow.causal(torch.tensor([0, 1, 2]), 2, 1)
                at = CacheAt(positions, windows=(window,), slots=torch.arange(3))
            else:
                at = CacheAt(positions, runs=((0, 3, 2),))
            results.append(tiny_model.decode_step(tokens, modulation, cache, at))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)


# What a block is made of: its submodules, the final layer, and the kernels that combine them.
BLOCK_INTERNALS = {
    "blocks", "attn", "qkv", "q_norm", "k_norm", "proj", "norm1", "norm2", "mlp", "adaln",
    "final_norm", "final_adaln", "residuals", "scaled_dot_product_attention", "addcmul",
}  # fmt: skip


def test_the_block_arithmetic_lives_in_the_model_only() -> None:
    """Every decoder (the decoding batch, speculative windows, the engine, the server) runs the
    model's own ``prefill``/``decode_step``: none reaches into a block (speculative windows used to
    compute attention, norms and gates themselves: a third copy of the block). ``cpu`` is left out:
    its packed view swaps Linear layers (and the MLP's, with GELU fused), it computes no block."""
    reaching = {}
    for path in sorted([*(PACKAGE / "sampling").glob("*.py"), *(PACKAGE / "serve").glob("*.py")]):
        if path.name == "cpu.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & BLOCK_INTERNALS)
        if names:
            reaching[path.name] = names
    assert reaching == {}
