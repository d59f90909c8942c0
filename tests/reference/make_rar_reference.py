"""Produce tests/data/official_rar_{a,b}.safetensors by running the official RAR code side by side.

Usage (the official tree is extracted outside this repository, see tests/data/README.md):

    /work/venv/bin/python tests/reference/make_rar_reference.py --official /work/official --out tests/data

Needs `omegaconf` (the official constructor reads an OmegaConf tree); it is not a rargen dependency.
For two small configurations we build the official `RAR`, re-draw every parameter (so that the
adaLN-zero init does not turn blocks into identities), and record the official outputs:
teacher-forced forward logits (raster and random orders) and the per-step probabilities of the
official `generate()` under three guidance settings, each in float64 and float32. See
tests/data/README.md for every tensor name and convention.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from official_shim import import_official, official_commit
from safetensors.torch import save_file

CONFIGS = {
    "a": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              image_seq_len=16, codebook_size=32, condition_num_classes=10),
    "b": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, intermediate_size=384,
              image_seq_len=36, codebook_size=40, condition_num_classes=7),
}  # fmt: skip
CONFIG_INT_ORDER = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_seq_len",
    "codebook_size",
    "condition_num_classes",
)
# name -> (guidance_scale, guidance_scale_pow, randomize_temperature); g = 0 is the official "no CFG".
GUIDANCE = {
    "cfg_a": (4.0, 2.75, 1.02),
    "cfg_b": (3.0, 0.0, 0.9),
    "cfg_c": (0.0, 0.0, 1.0),
}
BATCH = 3
PARAM_SEED = {"a": 1234, "b": 5678}
DATA_SEED = {"a": 4321, "b": 8765}


def build_official(rar_module, cfg: dict) -> torch.nn.Module:
    from omegaconf import OmegaConf

    generator = {k: v for k, v in cfg.items() if k != "codebook_size"}
    generator.update(dropout=0.0, attn_drop=0.0, use_checkpoint=False)
    tree = OmegaConf.create(
        {"model": {"vq_model": {"codebook_size": cfg["codebook_size"]}, "generator": generator}}
    )
    model = rar_module.RAR(tree)
    model.eval()
    model.requires_grad_(False)
    model.set_random_ratio(0.0)
    return model


def _draw(shape: torch.Size, std: float, mean: float, gen: torch.Generator) -> torch.Tensor:
    """Normal draw rounded to float16-representable values, never exactly 0 nor exactly `mean`.

    (`mean` is the default a LayerNorm weight would have; excluding it keeps every entry informative.)

    Rounding to float16 keeps the stored state small (see README) while float64/float32 casts of it
    are exact, so the float64 and float32 references use bit-identical weights.
    """
    out = torch.empty(shape, dtype=torch.float64)
    todo = torch.ones(shape, dtype=torch.bool)
    while todo.any():
        fresh = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).half().double()
        out = torch.where(todo, fresh, out)
        todo = (out == 0) | (out == mean)
    return out


def redraw_parameters(model: torch.nn.Module, seed: int) -> dict[str, str]:
    """Overwrite every parameter with non-zero random values; returns name -> rule (for the README)."""
    gen = torch.Generator().manual_seed(seed)
    rules = {}
    for name, param in model.named_parameters():
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            std, mean, rule = 0.25, 1.0, "LayerNorm weight: 1 + N(0, 0.25^2)"
        elif name.endswith(("norm1.bias", "norm2.bias", "q_norm.bias", "k_norm.bias")):
            std, mean, rule = 0.1, 0.0, "LayerNorm bias: N(0, 0.1^2)"
        elif name == "embeddings.weight" or name == "cls_token":
            std, mean, rule = 0.5, 0.0, "N(0, 0.5^2)"
        elif name in ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings"):
            std, mean, rule = 0.3, 0.0, "N(0, 0.3^2)"
        elif name.endswith(".weight") and param.ndim == 2:
            std, mean, rule = 1.0 / math.sqrt(param.shape[1]), 0.0, "Linear weight: N(0, 1/fan_in)"
        elif name.endswith(".bias"):
            std, mean, rule = 0.1, 0.0, "Linear bias: N(0, 0.1^2)"
        else:
            raise ValueError(f"no redraw rule for parameter {name!r}; add one to redraw_parameters")
        with torch.no_grad():
            param.copy_(_draw(param.shape, std, mean, gen).to(param.dtype))
        rules[name] = rule
    return rules


@contextmanager
def teacher_forced_multinomial(tokens: torch.Tensor, record: list[torch.Tensor]):
    """Make `torch.multinomial` return tokens[:, step] at the step-th call and record its `probs`."""
    original = torch.multinomial

    def fake(probs, num_samples, *args, **kwargs):
        step = len(record)
        record.append(probs.detach().clone())
        return tokens[:, step : step + 1].to(probs.device)

    torch.multinomial = fake
    try:
        yield
    finally:
        torch.multinomial = original


def run_generate(model, tokens, gen_labels, guidance: tuple[float, float, float], kv_cache: bool):
    g, p, temp = guidance
    record: list[torch.Tensor] = []
    with teacher_forced_multinomial(tokens, record):
        ids = model.generate(
            gen_labels.clone(),
            guidance_scale=g,
            randomize_temperature=temp,
            guidance_scale_pow=p,
            kv_cache=kv_cache,
        )
    if not torch.equal(ids, tokens):
        raise RuntimeError("teacher forcing failed: generate() returned other tokens")
    return torch.stack(record, dim=1)  # (B, L, V)


@contextmanager
def _recording_softmax(record: list[torch.Tensor]):
    original = F.softmax

    def spy(x, *args, **kwargs):
        record.append(x.detach().clone())
        return original(x, *args, **kwargs)

    torch.nn.functional.softmax = spy
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def official_guidance_weights(model, guidance_scale: float, guidance_scale_pow: float) -> torch.Tensor:
    """The per-step CFG weight w(t) exactly as the official `generate()` computes it (float32).

    `forward_fn` is replaced (on this instance only) by a probe returning conditional logits 1 and
    unconditional logits 0, and the temperature is 1, so the softmax input at step t is exactly
    0 + (1 - 0) * w(t). The temperature does not enter w(t).
    """
    num = 2

    def probe(input_ids, condition, return_labels=False, orders=None, is_sampling=False):
        n = condition.shape[0] // 2
        out = torch.zeros(2 * n, input_ids.shape[1] + 1, model.target_codebook_size, dtype=torch.float64)
        out[:n] = 1.0
        return out

    record: list[torch.Tensor] = []
    model.forward_fn = probe
    try:
        with (
            _recording_softmax(record),
            teacher_forced_multinomial(torch.zeros(num, model.image_seq_len, dtype=torch.long), []),
        ):
            model.generate(
                torch.zeros(num, dtype=torch.long),
                guidance_scale=guidance_scale,
                randomize_temperature=1.0,
                guidance_scale_pow=guidance_scale_pow,
            )
    finally:
        del model.forward_fn
    weights = torch.stack([r[0, 0] for r in record])
    if not torch.equal(weights.float().double(), weights):
        raise RuntimeError("guidance weights are not float32 values; the official code path changed?")
    return weights.float()


def formula_guidance_weights(g: float, p: float, length: int) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float64) / length
    return ((g - 1) * (1 - torch.cos(math.pi * t**p)) / 2 + 1).float()


def make_one(rar_module, name: str, out_dir: Path, commit: str, command: str) -> dict[str, float]:
    cfg = CONFIGS[name]
    length, vocab, ncls = cfg["image_seq_len"], cfg["codebook_size"], cfg["condition_num_classes"]
    torch.manual_seed(0)  # the constructor's init draws; all of them are overwritten below
    model = build_official(rar_module, cfg)
    rules = redraw_parameters(model, PARAM_SEED[name])
    model = model.double()

    gen = torch.Generator().manual_seed(DATA_SEED[name])
    tokens = torch.randint(0, vocab, (BATCH, length), generator=gen)
    labels = torch.randint(0, ncls, (BATCH,), generator=gen)
    labels[1] = ncls  # row 1 is the null / unconditional label
    conditions = labels + vocab + 1  # official offset; ncls maps to none_condition_id = V + NC + 1
    assert int(conditions[1]) == model.none_condition_id
    orders_raster = torch.arange(length).repeat(BATCH, 1)
    orders_random = torch.stack([torch.randperm(length, generator=gen) for _ in range(BATCH)])
    gen_labels = torch.randint(0, ncls, (BATCH,), generator=gen)
    gen_tokens = tokens.clone()

    tensors: dict[str, torch.Tensor] = {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in state.items():
        # float16 storage is exact: every drawn value is float16-representable (see _draw).
        assert torch.equal(value.half().double(), value), key
        tensors[f"state.{key}"] = value.half()
    tensors["config_ints"] = torch.tensor([cfg[k] for k in CONFIG_INT_ORDER], dtype=torch.int64)
    tensors.update(
        tokens=tokens,
        labels=labels,
        conditions=conditions,
        orders_raster=orders_raster,
        orders_random=orders_random,
        gen_tokens=gen_tokens,
        gen_labels=gen_labels,
    )

    checks: dict[str, float] = {}
    for bits, dtype in ((64, torch.float64), (32, torch.float32)):
        m = model.to(dtype)
        with torch.no_grad():
            for order_name, orders in (("raster", orders_raster), ("random", orders_random)):
                logits = m.forward_fn(tokens, conditions, orders=orders)
                assert logits.shape == (BATCH, length + 1, vocab) and logits.dtype == dtype
                tensors[f"logits{bits}_{order_name}"] = logits[:, :length].contiguous()
        for case, guidance in GUIDANCE.items():
            probs = run_generate(m, gen_tokens, gen_labels, guidance, kv_cache=True)
            assert probs.shape == (BATCH, length, vocab) and probs.dtype == dtype
            tensors[f"probs{bits}_{case}"] = probs
            if bits == 64:
                uncached = run_generate(m, gen_tokens, gen_labels, guidance, kv_cache=False)
                checks[f"probs64_{case} cached vs uncached"] = (probs - uncached).abs().max().item()
    model = model.double()

    # Sanity: a fresh official model loaded (strict) from the stored state reproduces the logits.
    fresh = build_official(rar_module, cfg)
    fresh.load_state_dict({k[len("state.") :]: v.double() for k, v in tensors.items() if k[:6] == "state."})
    with torch.no_grad():
        again = fresh.double().forward_fn(tokens, conditions, orders=orders_random)[:, :length]
    checks["reload from stored state vs logits64_random"] = (
        (again - tensors["logits64_random"]).abs().max().item()
    )

    # Sanity: the official no-CFG sampler equals softmax of the teacher-forced forward (raster order).
    with torch.no_grad():
        full = model.forward_fn(gen_tokens, gen_labels + vocab + 1)[:, :length]
    checks["probs64_cfg_c vs softmax(forward_fn)"] = (
        (tensors["probs64_cfg_c"] - F.softmax(full / GUIDANCE["cfg_c"][2], -1)).abs().max().item()
    )
    for key in ("logits64_raster", "logits64_random", "probs64_cfg_a", "probs64_cfg_b", "probs64_cfg_c"):
        other = key.replace("64", "32")
        checks[f"{key} vs {other}"] = (tensors[key] - tensors[other].double()).abs().max().item()
    checks["logits64_raster abs max"] = tensors["logits64_raster"].abs().max().item()
    checks["logits64_raster std"] = tensors["logits64_raster"].std().item()

    for case in ("cfg_a", "cfg_b"):
        g, p, _ = GUIDANCE[case]
        weights = official_guidance_weights(model, g, p)
        tensors[f"guidance_weights_{case}"] = weights
        checks[f"guidance_weights_{case} vs float64 formula"] = (
            (weights.double() - formula_guidance_weights(g, p, length).double()).abs().max().item()
        )

    metadata = {
        "config": json.dumps({**cfg, "dropout": 0.0, "attn_drop": 0.0}),
        "config_ints_order": json.dumps(CONFIG_INT_ORDER),
        "generate_settings": json.dumps(
            {
                case: {"guidance_scale": g, "guidance_scale_pow": p, "randomize_temperature": t}
                for case, (g, p, t) in GUIDANCE.items()
            }
        ),
        "state_dtype": "float16 storage of float16-representable draws; cast to float64/float32 exactly",
        "param_seed": str(PARAM_SEED[name]),
        "data_seed": str(DATA_SEED[name]),
        "redraw_rules": json.dumps(sorted(set(rules.values()))),
        "logits_positions": "first L of the L+1 official output positions",
        "official_repo": "bytedance/1d-tokenizer",
        "official_commit": commit,
        "command": command,
        "checks": json.dumps(checks),
    }
    path = out_dir / f"official_rar_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")
    for key, value in checks.items():
        print(f"  {key}: {value:.3e}")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="extracted official source tree")
    parser.add_argument("--out", default="tests/data", help="output folder")
    parser.add_argument("--commit", default=None, help="official snapshot commit (default: DIR/COMMIT)")
    parser.add_argument("--configs", default="ab", help="which configs to build (subset of 'ab')")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rar_module, _ = import_official(args.official)
    commit = args.commit or official_commit(args.official)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python tests/reference/make_rar_reference.py --official OFFICIAL_TREE --out tests/data"
    for name in args.configs:
        checks = make_one(rar_module, name, out_dir, commit, command)
        bad = {k: v for k, v in checks.items() if ("cached" in k or "forward_fn" in k) and v > 1e-12}
        bad.update({k: v for k, v in checks.items() if k.startswith("reload") and v != 0.0})
        bad.update({k: v for k, v in checks.items() if " vs " in k and "32" in k and v > 1e-4})
        if bad:
            print(f"sanity checks failed for config {name}: {bad}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
