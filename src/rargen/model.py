"""The RAR generator: a class-conditional GPT over VQ codes with target-aware positions.

Paper: Yu et al., "Randomized Autoregressive Visual Generation" (arXiv 2411.00776), Sec. 3.
Numerically identical to the official ``modeling/rar.py`` (see ``shared/spec/official-rar.md``
Sec. 1 and ``rargen.convert`` for the weight mapping).

Dimensions: B batch, L image tokens (16x16 = 256), V codebook size, C classes, D width,
H heads, N = L + 2 sequence positions.

Sequence layout (one position per row, ``s`` = sequence index)::

    s = 0      cls token        pos[0]                     target: none
    s = 1      class token      pos[1]                     target: pos of the 1st token in order
    s = 2 + i  i-th token in    pos[2 + orders[i]]         target: pos of the (i+1)-th token
               generation order                            (none for the last token)

Every position's adaLN conditioning is ``class_embed[label] + step_embed[s]``. The output at
``s = 1 + i`` is the distribution of the ``i``-th token in generation order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rargen.kv_cache import CacheAt, KVCache, cache_mask
from rargen.orders import check_orders

LN_EPS = 1e-6
INIT_STD = 0.02
# Upper bounds of the size fields, far above every paper model (RAR-XXL: D 1408, depth 40), so a
# mistyped or hostile config.json is refused before anything is built (depth 10**9 would build
# blocks for ever). codebook_size is bounded by the token store's uint16 codes.
MAX_SIZES = {
    "codebook_size": 2**16, "num_classes": 2**20, "num_image_tokens": 2**16, "dim": 2**15,
    "depth": 1024, "num_heads": 1024, "mlp_dim": 2**17,
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a RAR generator (no training or sampling settings)."""

    codebook_size: int = 1024  # V: VQ codes the head predicts
    num_classes: int = 1000  # C: class labels 0..C-1; label C is the null (unconditional) label
    num_image_tokens: int = 256  # L: tokens per image (16x16 for MaskGIT-VQGAN at 256x256)
    grid_width: int = 0  # w: tokens per row of the image grid (h = L / w); 0: square (or 1D tokens)
    dim: int = 768  # D
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072  # hidden width of the MLP (4 * D for all paper sizes but XXL)
    dropout: float = 0.1  # attention-output and MLP dropout (training only)
    attn_dropout: float = 0.1  # dropout on attention probabilities (training only)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "num_image_tokens", "dim", "depth", "num_heads", "mlp_dim"):
            if not 1 <= getattr(self, name) <= MAX_SIZES[name]:
                raise ValueError(
                    f"ModelConfig.{name} must be positive and at most {MAX_SIZES[name]}, "
                    f"got {getattr(self, name)}"
                )
        if not 0 <= self.num_classes <= MAX_SIZES["num_classes"]:
            raise ValueError(
                f"ModelConfig.num_classes must be in [0, {MAX_SIZES['num_classes']}], got {self.num_classes}"
            )
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.grid_width < 0 or (self.grid_width and self.num_image_tokens % self.grid_width):
            raise ValueError(
                f"ModelConfig.grid_width {self.grid_width} does not divide num_image_tokens "
                f"{self.num_image_tokens}; give the width of the token grid (0: square)"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def null_label(self) -> int:
        """The label of the unconditional (classifier-free guidance) branch."""
        return self.num_classes

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the raster-order tokens: ``grid_width`` wide, else square, else (L, 1) (1D tokens)."""
        L, side = self.num_image_tokens, math.isqrt(self.num_image_tokens)
        width = self.grid_width or (side if side * side == L else 1)
        return L // width, width

    @property
    def seq_len(self) -> int:
        """N: cls + class + L image tokens."""
        return self.num_image_tokens + 2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see ``PRESETS``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# Paper Table 1; all with 16 heads, MaskGIT-VQGAN (V = 1024, L = 256) and ImageNet (C = 1000).
PAPER_PRESETS: dict[str, ModelConfig] = {
    "rar-b": ModelConfig(dim=768, depth=24, num_heads=16, mlp_dim=3072),
    "rar-l": ModelConfig(dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "rar-xl": ModelConfig(dim=1280, depth=32, num_heads=16, mlp_dim=5120),
    "rar-xxl": ModelConfig(dim=1408, depth=40, num_heads=16, mlp_dim=6144),
}
PRESETS: dict[str, ModelConfig] = {
    **PAPER_PRESETS,
    # The same at 512x512: 32x32 = 1024 MaskGIT-VQGAN tokens (rargen.resize fine-tunes a 256 model to them).
    **{f"{n}-512": dataclasses.replace(m, num_image_tokens=1024) for n, m in PAPER_PRESETS.items()},
    # RAR-B over TiTok's 1D tokens (rargen.tokenizers.titok: 4096 codes; 32, 64 or 128 tokens per 256x256
    # image), at the RAR-B widths (the defaults). Training takes V and L from the token store, so any
    # preset also trains on TiTok tokens.
    "rar-b-titok-l32": ModelConfig(codebook_size=4096, num_image_tokens=32),
    "rar-b-titok-b64": ModelConfig(codebook_size=4096, num_image_tokens=64),
    "rar-b-titok-s128": ModelConfig(codebook_size=4096, num_image_tokens=128),
    # Small presets for CPUs and tests. Training sets V, L and C from the token store.
    "rar-mini": ModelConfig(dim=256, depth=6, num_heads=8, mlp_dim=1024),
    "rar-digits": ModelConfig(
        codebook_size=128, num_classes=10, num_image_tokens=64, dim=192, depth=6, num_heads=6, mlp_dim=768
    ),
    "rar-tiny": ModelConfig(
        codebook_size=32, num_classes=10, num_image_tokens=16, dim=64, depth=2, num_heads=4, mlp_dim=256
    ),
}


# The adaLN formulas, each written once and in two roundings. Training and the prefill round as the
# official code (``x * (1 + scale) + shift``); decoding reads ``1 + scale`` computed ahead
# (``RAR.decode_modulations``) and does each multiply-add in one ``addcmul`` kernel (fewer kernels
# per step). The two agree to rounding, not bit for bit, so neither path may switch to the other's.


def modulate(x: Tensor, shift: Tensor, scale: Tensor, *, fused: bool = False) -> Tensor:
    """``x * (1 + scale) + shift``; ``fused``: ``scale`` holds ``1 + scale``, one ``addcmul``."""
    return torch.addcmul(shift, x, scale) if fused else x * (1 + scale) + shift


def gated_residual(x: Tensor, gate: Tensor, update: Tensor, *, fused: bool = False) -> Tensor:
    """``x + gate * update``; ``fused``: one ``addcmul``."""
    return torch.addcmul(x, gate, update) if fused else x + gate * update


def attend_masked(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """One query per row, q (M, H, hd), over the cache slots ``keys``/``values`` (M, H, S, hd) where
    ``mask`` (M, 1, 1, S) holds: (M, H, hd). On a CPU it is written as sums, not SDPA, so that the
    compiled step fuses it into one loop over each row's slots: the CPU SDPA kernel's overhead on
    M x H one-query tasks made it 1.9x (fp32) to 3.4x (bf16) slower at decode shapes
    (``benchmarks/bench_compiled_step.py --attention``). Sums in float32 at least, as SDPA's."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)[:, :, 0]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q[:, :, None].to(acc) * keys.to(acc)).sum(-1) * q.shape[-1] ** -0.5  # (M, H, S)
    weights = scores.masked_fill(~mask[:, 0], float("-inf")).softmax(-1)
    return (weights[..., None] * values.to(acc)).sum(2).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        # QK-norm: one LayerNorm over the head dimension, shared by all heads.
        self.q_norm = nn.LayerNorm(config.head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(config.head_dim, eps=LN_EPS)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attn_dropout = config.attn_dropout
        self.proj_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Causal self-attention over x (B, n, D).

        Without ``kv`` the n rows are whole sequences (causal). With ``kv`` (the cache rows of these
        B sequences, (B, H, L + 1, hd) each) they are the first n positions: written at 0 .. n-1,
        attending to the cache through ``mask`` (n, L + 1) (the prefill).
        """
        B, n, D = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, n, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if kv is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            k_cache, v_cache = kv
            k_cache[:, :, :n].copy_(k)
            v_cache[:, :, :n].copy_(v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, n, D)
        return self.proj_dropout(self.proj(y))

    def decode(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, at: CacheAt) -> Tensor:
        """New positions x (M, D) -> (M, D): position ``i`` is written into the layer's cache at
        sequence index ``at.positions[i]`` and attends to its own row's prefix (see ``CacheAt``:
        one position per row, or windows of consecutive positions)."""
        M, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(M, 3, H, D // H).unbind(1)  # (M, H, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if at.runs is not None and len(at.runs) == 1:  # every row at the same position: strided copies
            _, _, position = at.runs[0]
            k_cache[:M, :, position].copy_(k)
            v_cache[:M, :, position].copy_(v)
        else:
            slots = torch.arange(M, device=x.device) if at.slots is None else at.slots
            k_cache[slots, :, at.positions] = k
            v_cache[slots, :, at.positions] = v
        if at.mask is not None:  # fixed shapes: the cache's first mask.shape[-1] slots with a mask
            keys, values = k_cache[:M, :, : at.mask.shape[-1]], v_cache[:M, :, : at.mask.shape[-1]]
            return self.proj(attend_masked(q, keys, values, at.mask).reshape(M, D))
        out, start = [], 0
        for window in at.eager_windows():
            n, length, end = window.count, window.length, window.first + window.length
            stop = start + n * length
            q_window = q[start:stop].view(n, length, H, -1).transpose(1, 2)  # (n, H, length, hd)
            keys, values = k_cache[window.rows, :, :end], v_cache[window.rows, :, :end]
            y = F.scaled_dot_product_attention(q_window, keys, values, attn_mask=window.mask)
            out.append(y.transpose(1, 2).reshape(n * length, D))
            start = stop
        return self.proj(out[0] if len(out) == 1 else torch.cat(out))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # Exact (erf) GELU, dropout after the activation and after fc2, as the official Mlp.
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation from the per-position condition."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Unlike DiT the norms keep their affine parameters *and* are modulated.
        self.norm1 = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.mlp = MLP(config)
        self.adaln = nn.Linear(config.dim, 6 * config.dim)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cond_index: Tensor | None = None,
    ) -> Tensor:
        """x (B, n, D); cond (Bc, n, D), one row per batch row unless ``cond_index`` (B,)
        maps batch rows to the (fewer, shared) condition rows; ``kv``/``mask``: see Attention."""
        modulation = self.adaln(F.silu(cond))  # (Bc, n, 6D)
        if cond_index is not None:
            modulation = modulation[cond_index]  # (B, n, 6D)
        return self.residuals(x, modulation.chunk(6, dim=-1), partial(self.attn, kv=kv, mask=mask))

    def decode(self, x: Tensor, modulation: Tensor, k_cache: Tensor, v_cache: Tensor, at: CacheAt) -> Tensor:
        """``forward`` for new positions against the cache: x (M, D), ``modulation`` (M, 6, D) rows
        (shift, 1 + scale, gate) for attention then for the MLP (``RAR.decode_modulations``);
        ``at``: where they are (one per row, or windows; see ``CacheAt``)."""
        attend = partial(self.attn.decode, k_cache=k_cache, v_cache=v_cache, at=at)
        return self.residuals(x, modulation.unbind(1), attend, fused=True)

    def residuals(
        self, x: Tensor, modulation: Sequence[Tensor], attend: Callable[[Tensor], Tensor], fused: bool = False
    ) -> Tensor:
        """The block: modulated attention (``attend``), then the modulated MLP, each added as a
        gated residual; ``modulation`` the six (shift, scale, gate) for attention, then the MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attended = attend(modulate(self.norm1(x), shift_msa, scale_msa, fused=fused))
        x = gated_residual(x, gate_msa, attended, fused=fused)
        update = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp, fused=fused))
        return gated_residual(x, gate_mlp, update, fused=fused)


class RAR(nn.Module):
    """The RAR generator. ``forward(tokens, labels, orders) -> logits``; see the module docstring."""

    checkpoint_kind: ClassVar[str] = "rar"
    config_class: ClassVar[type] = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D, L = config.dim, config.num_image_tokens
        self.cls_token = nn.Parameter(torch.empty(D))
        self.token_embed = nn.Embedding(config.codebook_size, D)
        self.class_embed = nn.Embedding(config.num_classes + 1, D)  # + the null label
        self.pos_embed = nn.Parameter(torch.empty(L + 2, D))  # rows: cls, class, image positions
        self.target_pos_embed = nn.Parameter(torch.empty(L, D))  # by image position of the target
        # Per sequence-index conditioning, added to the class embedding (the official code calls
        # it "timesteps_embeddings").
        self.step_embed = nn.Parameter(torch.empty(L + 2, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(D, eps=LN_EPS, elementwise_affine=False)
        self.final_adaln = nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, config.codebook_size)
        self.init_weights()

    # ----------------------------------------------------------------------------------------
    # Initialisation

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The official initialisation: N(0, 0.02) (truncated at +-2, i.e. practically not),
        zero biases, unit LayerNorms, zero cls token, and adaLN-zero (every block starts as
        the identity, the head sees ``LN(x)``)."""
        if self.cls_token.is_meta:
            return

        def normal_(t: Tensor) -> None:
            t.copy_(torch.randn(t.shape, generator=generator).mul_(INIT_STD).clamp_(-2.0, 2.0))

        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal_(module.weight)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for table in (self.pos_embed, self.target_pos_embed, self.step_embed):
            normal_(table)
        nn.init.zeros_(self.cls_token)
        for linear in [block.adaln for block in self.blocks] + [self.final_adaln]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ----------------------------------------------------------------------------------------
    # Training / scoring: the whole sequence at once

    def check_inputs(self, tokens: Tensor, labels: Tensor, orders: Tensor | None) -> None:
        """Raise ValueError for malformed tokens, labels or orders (this syncs with the host)."""
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[1] != cfg.num_image_tokens:
            raise ValueError(f"tokens must have shape (B, {cfg.num_image_tokens}), got {tuple(tokens.shape)}")
        if tokens.dtype != torch.int64 or labels.dtype != torch.int64:
            raise ValueError(f"tokens and labels must be int64, got {tokens.dtype} and {labels.dtype}")
        if labels.shape != (tokens.shape[0],):
            raise ValueError(f"labels must have shape ({tokens.shape[0]},), got {tuple(labels.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.codebook_size):
            raise ValueError(f"tokens must be codes in [0, {cfg.codebook_size - 1}]")
        if labels.numel() and (labels.min() < 0 or labels.max() > cfg.num_classes):
            bad = labels[(labels < 0) | (labels > cfg.num_classes)].tolist()
            raise ValueError(
                f"labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = the null label), got {bad}"
            )
        if orders is not None:
            check_orders(orders, tokens.shape[0], cfg.num_image_tokens)

    def forward(
        self, tokens: Tensor, labels: Tensor, orders: Tensor | None = None, *, check: bool = True
    ) -> Tensor:
        """Teacher-forced logits of every token in its generation order.

        tokens (B, L) int64 codes in raster positions; labels (B,) int64 in [0, C] (C = null);
        orders (B, L) int64 permutations (None = raster). Returns logits (B, L, V) where
        ``logits[b, i]`` is the distribution of ``tokens[b, orders[b, i]]`` given the label and
        ``tokens[b, orders[b, :i]]``. ``check=False`` skips input validation (no host sync).
        """
        if check:
            self.check_inputs(tokens, labels, orders)
        B, L = tokens.shape
        if orders is not None:
            tokens = tokens.gather(1, orders)
            positions = orders  # (B, L) image position of the i-th token in order
        else:
            positions = torch.arange(L, device=tokens.device).expand(B, L)
        class_emb = self.class_embed(labels)  # (B, D)
        # Row lookups through F.embedding, not table[positions]: the backward of advanced indexing
        # (index_put_ with accumulate) adds rows in a thread-dependent order on CPUs, so two runs at
        # 2 threads differed by ~1e-9 per step; the embedding backward's order is fixed.
        target = F.embedding(positions, self.target_pos_embed)  # (B, L, D): what position i predicts
        x_tokens = self.token_embed(tokens) + F.embedding(2 + positions, self.pos_embed)  # (B, L, D)
        # Token i carries the target of token i+1; the last token has none.
        x_tokens = x_tokens + F.pad(target[:, 1:], (0, 0, 0, 1))
        x_cls = (self.cls_token + self.pos_embed[0]).expand(B, 1, -1)  # (B, 1, D)
        x_class = (class_emb + self.pos_embed[1] + target[:, 0])[:, None]  # (B, 1, D)
        x = torch.cat([x_cls, x_class, x_tokens], dim=1)  # (B, N, D)
        cond = class_emb[:, None] + self.step_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x, cond)
        # Drop the cls position and the last token (it has no target): outputs s = 1 .. L.
        return self.head_logits(x[:, 1 : L + 1], cond[:, 1 : L + 1])  # (B, L, V)

    def head_logits(self, x: Tensor, cond: Tensor, cond_index: Tensor | None = None) -> Tensor:
        """Final adaLN layer (split as scale, then shift: the reverse of DiT) and the head."""
        modulation = self.final_adaln(F.silu(cond))
        if cond_index is not None:
            modulation = modulation[cond_index]
        scale, shift = modulation.chunk(2, dim=-1)
        return self.head(modulate(self.final_norm(x), shift, scale))

    # ----------------------------------------------------------------------------------------
    # Sampling: a static KV cache, each row at its own position and in its own order (rargen.sampling)

    @property
    def device(self) -> torch.device:
        return self.token_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights and activations (float32, bfloat16 or float64)."""
        return self.token_embed.weight.dtype

    def prefill(self, labels: Tensor, cache: KVCache, first: int, targets: Tensor | None = None) -> Tensor:
        """Run the cls and class positions (s = 0, 1) of new rows into cache slots ``first ..
        first + B - 1``; logits (B, V) of the first token in order: image position ``targets``
        (B,) (None: raster, position 0). Rows with the same label share one adaLN."""
        B = labels.shape[0]
        cond_labels, cond_index = labels.unique(return_inverse=True)
        x_cls = (self.cls_token + self.pos_embed[0]).expand(B, 1, -1)
        target = self.target_pos_embed[0] if targets is None else self.target_pos_embed[targets]
        x_class = (self.class_embed(labels) + self.pos_embed[1] + target)[:, None]
        x = torch.cat([x_cls, x_class], dim=1)  # (B, 2, D)
        cond = self.class_embed(cond_labels)[:, None] + self.step_embed[:2]  # (Bc, 2, D)
        mask = cache_mask(torch.arange(2, device=labels.device), cache.k[0].shape[2])[:, 0, 0]
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i][first : first + B], cache.v[i][first : first + B])
            x = block(x, cond, kv, mask, cond_index)
        return self.head_logits(x[:, 1:], cond[:, 1:], cond_index)[:, 0]  # (B, V)

    def decode_inputs(self, tokens: Tensor, positions: Tensor, runs=None, image_positions=None) -> Tensor:
        """Embeddings (n, D) of raster token ``positions[i] - 2`` (``tokens[i]``) fed at sequence
        index ``positions[i] >= 2``, with its target ``positions[i] - 1``. ``runs`` (see
        ``CacheAt``) lets the eager path index by a Python int when every row is at one position.
        In another order, ``image_positions`` (n, 2) holds the image positions of the fed token and
        of its target (``forward``'s ``orders[s - 2]`` and ``orders[s - 1]``)."""
        if image_positions is not None:
            fed, target = image_positions.unbind(1)
            return self.token_embed(tokens) + self.pos_embed[2 + fed] + self.target_pos_embed[target]
        if runs is not None and len(runs) == 1:
            s = runs[0][2]
            return self.token_embed(tokens) + self.pos_embed[s] + self.target_pos_embed[s - 1]
        return self.token_embed(tokens) + self.pos_embed[positions] + self.target_pos_embed[positions - 1]

    def decode_step(
        self, tokens: Tensor, modulation: Tensor, cache: KVCache, at: CacheAt, image_positions=None
    ) -> Tensor:
        """Feed image tokens at new positions (``decode_inputs``); logits (M, V) of the next tokens.

        Position ``i`` feeds ``tokens[i]`` at sequence index ``at.positions[i]`` in [2, L], in
        cache slot ``i`` (or ``at.slots[i]``); its output is the distribution of raster token
        ``at.positions[i] - 1``. One position per row (a decoding step) or windows of several
        consecutive ones per row (a speculative pass), as ``at`` says. ``modulation``
        (M, 6 * depth + 2, D): the positions' ``decode_modulations``. Rows decoding in another
        order pass ``image_positions`` (see ``decode_inputs``); the rest is order-blind.
        """
        x = self.decode_inputs(tokens, at.positions, at.runs, image_positions)
        for i, block in enumerate(self.blocks):  # x (M, D)
            x = block.decode(x, modulation[:, 6 * i : 6 * i + 6], cache.k[i], cache.v[i], at)
        scale, shift = modulation[:, -2], modulation[:, -1]  # scale holds 1 + scale
        return self.head(modulate(self.final_norm(x), shift, scale, fused=True))

    def decode_modulations(self, labels: Tensor, positions: Tensor) -> Tensor:
        """adaLN modulations (m, 6 * depth + 2, D) of (class, sequence index) pairs.

        Per block (shift, 1 + scale, gate) for attention, then for the MLP; last the final
        layer's (1 + scale, shift). The condition of every future position is known in advance
        (class + sequence index), so a decoder computes many positions in one batched product
        per weight instead of a few rows per step: the same values, with a third of the per-step
        weight reads gone.
        """
        cfg = self.config
        cond = F.silu(self.class_embed(labels) + self.step_embed[positions])  # (m, D)
        out = cond.new_empty(cond.shape[0], 6 * cfg.depth + 2, cfg.dim)
        for i, block in enumerate(self.blocks):
            out[:, 6 * i : 6 * i + 6] = block.adaln(cond).unflatten(-1, (6, cfg.dim))
            out[:, 6 * i + 1] += 1  # scale_msa
            out[:, 6 * i + 4] += 1  # scale_mlp
        out[:, -2:] = self.final_adaln(cond).unflatten(-1, (2, cfg.dim))
        out[:, -2] += 1  # the final layer's scale
        return out

    # ----------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add), attention scores included."""
        cfg = self.config
        D, N = cfg.dim, cfg.seq_len
        per_block = 2 * (3 * D * D + D * D + 2 * D * cfg.mlp_dim + 6 * D * D) + 2 * 2 * N * D
        return cfg.depth * per_block + 2 * (2 * D * D + D * cfg.codebook_size)


__all__ = ["RAR", "ModelConfig", "PRESETS"]
