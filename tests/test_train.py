"""The training loop: recipe pieces against their formulas, and whole runs against each other."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rargen
import rargen.train.generator as train_module
from rargen.model import RAR, ModelConfig
from rargen.orders import random_order_prob
from rargen.train.generator import draw_step_randomness, param_groups, train
from rargen.train.recipe import TrainConfig, lr_at
from train_data import data_factory, make_store

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
NO_DROPOUT = (("dropout", 0.0), ("attn_dropout", 0.0))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are fastest on one thread, and a shared 2-core machine makes OpenMP spin badly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> TrainConfig:
    base = dict(preset="rar-tiny", steps=6, batch_size=8, warmup=2, lr=1e-3, log_every=2, checkpoint_every=3)
    return TrainConfig(**{**base, **kw})


def weights(path: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(path / name))


# --------------------------------------------------------------------------------------------
# Recipe pieces


def test_lr_schedule_warmup_then_cosine_to_end_lr():
    cfg = TrainConfig(steps=1000, warmup=0.1, lr=4e-4, end_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(4e-4 / 100)  # first step already learns (official: 0)
    assert lr_at(49, cfg) == pytest.approx(4e-4 * 50 / 100)
    assert lr_at(99, cfg) == pytest.approx(4e-4)
    assert lr_at(100, cfg) == pytest.approx(4e-4)
    mid = 100 + 450
    assert lr_at(mid, cfg) == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.5)
    p = (700 - 100) / 900
    assert lr_at(700, cfg) == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_at(1000, cfg) == pytest.approx(1e-5)


def test_steps_or_fractions_and_defaults_follow_the_paper():
    cfg = TrainConfig(steps=250_000)
    assert (cfg.resolve(cfg.anneal_start), cfg.resolve(cfg.anneal_end)) == (125_000, 187_500)
    assert cfg.resolve(cfg.warmup) == 62_500
    assert (cfg.lr, cfg.end_lr, cfg.betas, cfg.weight_decay, cfg.grad_clip) == (
        4e-4,
        1e-5,
        (0.9, 0.96),
        0.03,
        1.0,
    )
    assert TrainConfig(steps=100, anneal_start=10, anneal_end=30).resolve(30) == 30
    with pytest.raises(ValueError, match="fraction"):
        TrainConfig(anneal_start=1.5)
    with pytest.raises(ValueError, match="anneal_end"):
        TrainConfig(steps=100, anneal_start=50, anneal_end=20)


def test_weight_decay_only_on_linear_weights(tiny_config):
    model = RAR(tiny_config)
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == linear and decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert "final_adaln.weight" in decayed and "blocks.0.adaln.weight" in decayed
    for name in (
        "cls_token",
        "pos_embed",
        "target_pos_embed",
        "step_embed",
        "token_embed.weight",
        "head.bias",
    ):
        assert name not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("r", [0.0, 0.3, 0.8, 1.0])
def test_fraction_of_permuted_rows_follows_r(r):
    g = torch.Generator().manual_seed(1)
    orders, drop = draw_step_randomness(g, 4000, 16, r, 0.1)
    permuted = (orders != torch.arange(16)).any(dim=1).float().mean().item()
    # A random permutation of 16 is the identity with probability 1/16!, so permuted ~ Binomial(r).
    assert abs(permuted - r) < 4 * math.sqrt(r * (1 - r) / 4000) + 1e-9
    assert abs(drop.float().mean().item() - 0.1) < 4 * math.sqrt(0.09 / 4000)


def test_run_anneals_r_per_step_and_drops_labels(tmp_path, monkeypatch):
    seen = []
    original = train_module.draw_step_randomness

    def spy(generator, batch_size, num_tokens, r, label_dropout):
        seen.append((r, label_dropout, batch_size))
        return original(generator, batch_size, num_tokens, r, label_dropout)

    monkeypatch.setattr(train_module, "draw_step_randomness", spy)
    cfg = tiny(steps=10, anneal_start=0.2, anneal_end=0.6, checkpoint_every=100, log_every=1)
    train(cfg, data_factory(make_store()), tmp_path / "run", progress=False)
    assert [s[0] for s in seen] == [random_order_prob(k, 2, 6) for k in range(10)]
    assert all(s[1:] == (0.1, 8) for s in seen)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["r"] for row in rows] == [random_order_prob(k, 2, 6) for k in range(10)]
    assert [row["lr"] for row in rows] == [lr_at(k, cfg) for k in range(10)]


def test_r_end_keeps_random_orders_after_the_window(tmp_path, monkeypatch):
    seen = []
    original = train_module.draw_step_randomness

    def spy(generator, batch_size, num_tokens, r, label_dropout):
        seen.append(r)
        return original(generator, batch_size, num_tokens, r, label_dropout)

    monkeypatch.setattr(train_module, "draw_step_randomness", spy)
    cfg = tiny(steps=8, anneal_start=0.25, anneal_end=0.5, r_end=0.25, checkpoint_every=100)
    train(cfg, data_factory(make_store()), tmp_path / "run", progress=False)
    assert seen == [random_order_prob(k, 2, 4, 0.25) for k in range(8)] and seen[-1] == 0.25
    assert "r_end" not in tiny().to_dict()  # recorded only when set: old records read as before
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"TrainConfig.r_end = 1.5"):
        tiny(r_end=1.5)


# --------------------------------------------------------------------------------------------
# Whole runs


def test_tiny_model_overfits_a_few_sequences(tmp_path):
    cfg = tiny(steps=100, warmup=10, lr=3e-3, end_lr=1e-4, log_every=10, checkpoint_every=1000,
               label_dropout=0.0, model_overrides=NO_DROPOUT, anneal_start=0, anneal_end=0.5,
               weight_decay=0.0)  # fmt: skip
    train(cfg, data_factory(make_store(num=8, num_classes=4)), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 2.0  # starts near ln(32) = 3.47
    assert rows[-1]["loss"] < 0.02 and rows[-1]["accuracy"] == 1.0


def test_accumulation_equals_the_large_batch(tmp_path):
    store = make_store()
    common = dict(steps=3, batch_size=16, label_dropout=0.3, model_overrides=NO_DROPOUT, checkpoint_every=3)
    a = train(tiny(**common), data_factory(store), tmp_path / "a", progress=False)
    b = train(tiny(**common, grad_accum=4), data_factory(store), tmp_path / "b", progress=False)
    wa, wb = weights(a), weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-6
    # and the run moved: the comparison is not between two untouched models
    assert (
        max((wa[k] - RAR(ModelConfig.from_name("rar-tiny")).state_dict()[k]).abs().max() for k in wa) > 1e-3
    )


def _ddp_worker(rank: int, world: int, port: int, out: str, sharding: str) -> None:
    sys.path.insert(0, str(TESTS))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rargen import distributed

    common = dict(steps=3, batch_size=16, label_dropout=0.3, model_overrides=NO_DROPOUT, checkpoint_every=3)
    try:
        train(
            tiny(**common, sharding=sharding, ema_decay=0.5),
            data_factory(make_store()),
            out,
            progress=False,
            device="cpu",
        )
    finally:
        distributed.teardown()


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(TESTS))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rargen import distributed

    try:
        cfg = tiny(steps=6, batch_size=16, checkpoint_every=3, model_overrides=NO_DROPOUT, label_dropout=0.3)
        train(cfg, data_factory(make_store(), log=f"{out}.rank{rank}.batches"), out, resume=True,
              progress=False, device="cpu")  # fmt: skip
    finally:
        distributed.teardown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_resume_on_another_world_size(tmp_path):
    """A run checkpointed by one process and resumed on two gloo ranks continues from its step (the
    global batches are the same images) and ends where the one-process run ends (up to the order
    of the gradient all-reduce)."""
    import shutil

    import torch.multiprocessing as mp

    cfg = tiny(steps=6, batch_size=16, checkpoint_every=3, model_overrides=NO_DROPOUT, label_dropout=0.3)
    single = train(cfg, data_factory(make_store()), tmp_path / "one", progress=False)
    cut = tmp_path / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-0000003", cut / "step-0000003")
    mp.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path / "cut")), nprocs=2, join=True)
    # 64 images, global batch 16: 4 global steps per epoch; rank r draws per-rank batch 2 * s + r.
    for rank in range(2):
        drawn = _batches(Path(f"{tmp_path / 'cut'}.rank{rank}.batches"))
        assert drawn == [(0, 3), (1, 0), (1, 1)], (rank, drawn)  # steps 3, 4, 5: not from step 0
    state = torch.load(cut / "step-0000006" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 6
    wa, wb = weights(single), weights(tmp_path / "cut" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-6


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, sharding):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), sharding), nprocs=2, join=True)
    common = dict(steps=3, batch_size=16, label_dropout=0.3, model_overrides=NO_DROPOUT, checkpoint_every=3)
    single = train(
        tiny(**common, ema_decay=0.5), data_factory(make_store()), tmp_path / "one", progress=False
    )
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(single, name), weights(tmp_path / "ddp" / "final", name)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-6
    state = torch.load(
        tmp_path / "ddp" / "checkpoints" / "step-0000003" / "train_state.pt", weights_only=True
    )
    assert state["world_size"] == 2 and len(state["rng"]) == 2


RUN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from train_data import data_factory, make_store
from rargen.train.generator import TrainConfig, train
cfg = TrainConfig(preset="rar-tiny", steps=24, batch_size=8, warmup=4, lr=1e-3, log_every=4,
                  checkpoint_every=4, keep_checkpoints=2, ema_decay=0.9, anneal_start=0.25, anneal_end=0.75)
log = sys.argv[1] + ("-resumed" if "--resume" in sys.argv else "") + ".batches"
train(cfg, data_factory(make_store(num=40), delay={delay}, log=log), sys.argv[1],
      resume="--resume" in sys.argv, progress=False)
"""


def _run_script(tmp_path: Path, delay: float) -> Path:
    script = tmp_path / f"run_{delay}.py"
    script.write_text(RUN_SCRIPT.format(tests=str(TESTS), delay=delay))
    return script


def _env() -> dict[str, str]:
    # The default thread count of this project's machine (2 cores): resume is bit-exact there too.
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}


def _batches(log: Path) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in line.split()) for line in log.read_text().splitlines()]


def test_gradients_are_bit_identical_run_to_run_at_two_threads():
    """The backward of table[positions] (index_put_ with accumulate) summed rows in a
    thread-dependent order on CPUs, so two runs at 2 threads drifted apart (1e-9 per step, 4e-6
    after a short run); the model looks positions up with F.embedding, whose order is fixed."""
    from conftest import randomize
    from rargen.orders import sample_orders

    torch.set_num_threads(2)  # big enough for the multi-threaded paths (the fixture resets it)
    config = ModelConfig.from_name("rar-digits", dropout=0.0, attn_dropout=0.0)
    model = randomize(RAR(config), std=0.02)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.codebook_size, (32, config.num_image_tokens), generator=generator)
    labels = torch.randint(0, config.num_classes, (32,), generator=generator)
    orders = sample_orders(32, config.num_image_tokens, random_prob=1.0, generator=generator)
    grads = []
    for _ in range(3):
        model.zero_grad()
        logits = model(tokens, labels, orders)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.gather(1, orders).flatten())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for other in grads[1:]:
        assert [n for n in grads[0] if not torch.equal(grads[0][n], other[n])] == []


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    # Uninterrupted reference (dropout, label dropout, random orders and EMA all on).
    subprocess.run([sys.executable, _run_script(tmp_path, 0.0), tmp_path / "ref"], env=_env(), check=True)
    # The same run killed with SIGKILL after its step-8 checkpoint, then resumed.
    slow = _run_script(tmp_path, 0.05)
    proc = subprocess.Popen([sys.executable, slow, tmp_path / "cut"], env=_env())
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoints" / "step-0000008" / "train_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists()
    subprocess.run([sys.executable, slow, tmp_path / "cut", "--resume"], env=_env(), check=True)
    # Where the resumed run started: at the newest checkpoint it found (step 8 or later, the kill
    # came after it was written), never at step 0. 40 images / 8 = 5 batches per epoch.
    resumed = _batches(tmp_path / "cut-resumed.batches")
    start = 24 - len(resumed)
    assert start >= 8 and start % 4 == 0, start
    assert resumed[0] == divmod(start, 5) and len(_batches(tmp_path / "ref.batches")) == 24
    assert _batches(tmp_path / "ref.batches")[start:] == resumed
    for name in ("model.safetensors", "ema.safetensors"):
        ref, cut = weights(tmp_path / "ref" / "final", name), weights(tmp_path / "cut" / "final", name)
        assert all(torch.equal(ref[k], cut[k]) for k in ref), name
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    cut_rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in ref_rows] == [json.loads(r)["loss"] for r in cut_rows]


def test_a_second_process_on_a_busy_run_folder_is_refused(tmp_path):
    """Issue 25 item 7: the same study shard started twice in one folder doubled the rows of
    ``metrics.jsonl`` (no lock on a run folder). A second writer is refused, naming the first; the
    lock ends with the process, so a killed run resumes without any cleanup."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, _run_script(tmp_path, 0.05), run], env=_env())
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "step-0000004").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before the check"
            time.sleep(0.01)
        with pytest.raises(ValueError, match=f"in use by process {proc.pid} on"):
            train(tiny(steps=24), data_factory(make_store(num=40)), run, resume=True, progress=False)
        from rargen.train.tokenizer import train_tokenizer

        with pytest.raises(ValueError, match=f"in use by process {proc.pid} on"):
            train_tokenizer(run, resume=True, progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rows = len((run / "metrics.jsonl").read_text().splitlines())
    subprocess.run([sys.executable, _run_script(tmp_path, 0.0), run, "--resume"], env=_env(), check=True)
    assert rows <= 6 and len((run / "metrics.jsonl").read_text().splitlines()) == 6  # 24 steps, one row per 4


def test_checkpoint_layout_and_loading(tmp_path):
    cfg = tiny(steps=7, checkpoint_every=2, keep_checkpoints=2, ema_decay=0.5)
    final = train(cfg, data_factory(make_store()), tmp_path / "run", progress=False)
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["step-0000006", "step-0000007"]  # the last two; 7 = the end of the run
    newest = tmp_path / "run" / "checkpoints" / "step-0000007"
    files = {"config.json", "model.safetensors", "ema.safetensors", "train_state.pt", "train_config.json"}
    assert {p.name for p in newest.iterdir()} == files
    model = rargen.load(newest)
    assert set(weights(newest)) == set(RAR(model.config).state_dict())  # no module./_orig_mod. prefixes
    assert all(torch.equal(weights(final)[k], weights(newest)[k]) for k in weights(newest))
    state = torch.load(newest / "train_state.pt", weights_only=True)
    assert state["step"] == 7 and TrainConfig.from_dict(state["config"]) == cfg
    assert TrainConfig.from_dict(json.loads((newest / "train_config.json").read_text())) == cfg
    ema = rargen.load(final, weights="ema.safetensors")
    assert isinstance(ema, RAR) and model.config.codebook_size == 32


def test_ema_follows_its_formula(tmp_path):
    cfg = tiny(steps=1, checkpoint_every=1, ema_decay=0.75, model_overrides=NO_DROPOUT)
    final = train(cfg, data_factory(make_store()), tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)
    init = RAR(ModelConfig.from_name("rar-tiny", **dict(NO_DROPOUT))).state_dict()
    w, ema = weights(final), weights(final, "ema.safetensors")
    for k in w:
        torch.testing.assert_close(ema[k], 0.75 * init[k] + 0.25 * w[k], rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = train_module.token_loss
    calls = []

    def poisoned(logits, targets):
        loss, correct = original(logits, targets)
        calls.append(1)
        return (loss + float("nan") if len(calls) > 7 else loss), correct

    monkeypatch.setattr(train_module, "token_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step-0000005"):
        train(
            tiny(steps=20, checkpoint_every=5), data_factory(make_store()), tmp_path / "run", progress=False
        )
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000005"]
    good = rargen.load(tmp_path / "run" / "checkpoints" / "step-0000005")
    assert all(torch.isfinite(p).all() for p in good.parameters())


# --------------------------------------------------------------------------------------------
# Bad input fails before training


def test_bad_inputs_fail_before_training(tmp_path):
    data = data_factory(make_store())
    with pytest.raises(ValueError, match="codebook_size=64 does not match the data"):
        train(tiny(model_overrides=(("codebook_size", 64),)), data, tmp_path / "a", progress=False)
    wrong = make_store()
    wrong.labels[3] = 12  # a class the store does not have
    with pytest.raises(ValueError, match="labels up to 12 but 10 classes"):
        train(tiny(), data_factory(wrong), tmp_path / "b", progress=False)
    bad_tokens = make_store()
    bad_tokens.tokens[:] = 40  # codes beyond the codebook: caught by the first-batch check
    with pytest.raises(ValueError, match="tokens must be codes"):
        train(tiny(), data_factory(bad_tokens), tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "checkpoints").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        train(tiny(), data, tmp_path / "file" / "run", progress=False)
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['stpes'\\]"):
        TrainConfig.from_dict({"stpes": 10})
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig(preset="rar-bb")
    with pytest.raises(ValueError, match="not divisible"):
        train(tiny(batch_size=8, grad_accum=3), data, tmp_path / "d", progress=False)


def test_existing_run_needs_resume_and_the_same_recipe(tmp_path):
    data = data_factory(make_store())
    train(tiny(steps=3), data, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="pass --resume"):
        train(tiny(steps=3), data, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="lr: 0.001 saved, 0.002 now"):
        train(tiny(steps=3, lr=2e-3), data, tmp_path / "run", resume=True, progress=False)
    # longer runs may not change steps either (the schedule depends on them) ...
    with pytest.raises(ValueError, match="steps"):
        train(tiny(steps=6), data, tmp_path / "run", resume=True, progress=False)
    # ... but logistics may change
    train(tiny(steps=3, log_every=1), data, tmp_path / "run", resume=True, progress=False)


def test_cli_rejects_typos():
    from rargen.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "x", "--out", "y", "--stpes", "3"])
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "x",
            "--out",
            "y",
            "--anneal-start",
            "0.5",
            "--warmup",
            "100",
            "--betas",
            "0.9",
            "0.95",
        ]
    )
    assert args.anneal_start == 0.5 and isinstance(args.warmup, int) and args.betas == [0.9, 0.95]


# --------------------------------------------------------------------------------------------
# With a real token store and the command line


def _write_store(path: Path, codebook_size: int = 64, tokenizer_sha: str | None = None) -> Path:
    import numpy as np

    from rargen.data.store import write_store

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook_size, size=(24, 4, 4))
    write_store(
        path, tokens, rng.integers(0, 3, size=24), codebook_size=codebook_size, class_names=["a", "b", "c"]
    )
    if tokenizer_sha is not None:  # as if pretokenize had made it with that tokenizer
        meta = json.loads((path / "meta.json").read_text())
        meta["tokenizer"] = {"kind": "test-pool-tokenizer", "state_sha256": tokenizer_sha}
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_cli_trains_on_a_token_store(tmp_path):
    from rargen.cli.main import main

    store = _write_store(tmp_path / "store")
    argv = ["train", "--data", str(store), "--out", str(tmp_path / "run"), "--preset", "rar-tiny",
            "--steps", "4", "--batch-size", "8", "--grad-accum", "2", "--warmup", "1",
            "--checkpoint-every", "2",
            "--model", "depth=1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    model = rargen.load(tmp_path / "run" / "final")
    cfg = model.config
    assert (cfg.codebook_size, cfg.num_image_tokens, cfg.num_classes, cfg.depth) == (64, 16, 3, 1)
    state_file = tmp_path / "run" / "checkpoints" / "step-0000004" / "train_state.pt"
    # 4 steps x 2 micro-batches of 4 images = 8 batches; 24 images = 6 batches per epoch
    assert torch.load(state_file, weights_only=True)["loader"] == {"epoch": 1, "step": 2}
    assert main([*argv[:-1], "--model", "codebook_size=32"]) == 2  # mismatch: a clear error, exit code 2


def test_cli_resume_on_a_token_store(tmp_path, monkeypatch):
    """`rargen train --resume` through TokenLoader on a real store: the resumed run starts at the
    newest checkpoint (it writes only the later ones) and ends bit-identical to an uninterrupted run."""
    import shutil

    from rargen.cli.main import main

    store = _write_store(tmp_path / "store")

    def argv(out: Path) -> list[str]:
        return ["train", "--data", str(store), "--out", str(out), "--preset", "rar-tiny", "--steps", "6",
                "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2", "--keep-checkpoints", "5",
                "--model", "depth=1", "--no-progress"]  # fmt: skip

    assert main(argv(tmp_path / "full")) == 0
    # The same run, killed after its step-2 checkpoint: later checkpoints and final/ never written,
    # plus a half-written checkpoint folder of the killed writer (pid 2**22 + 1: never a live pid).
    cut = tmp_path / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000002", cut / "step-0000002")
    (cut / f".step-0000004.tmp-{2**22 + 1}-ab12").mkdir()
    saved = []
    original = train_module.save_checkpoint
    monkeypatch.setattr(
        train_module, "save_checkpoint", lambda out, step, *a: saved.append(step) or original(out, step, *a)
    )
    assert main([*argv(tmp_path / "cut"), "--resume"]) == 0
    assert saved == [4, 6]  # a silent restart at step 0 would save 2 again
    assert sorted(p.name for p in cut.iterdir()) == ["step-0000002", "step-0000004", "step-0000006"]
    for name in ("model.safetensors",):
        full, resumed = weights(tmp_path / "full" / "final", name), weights(tmp_path / "cut" / "final", name)
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    loader = torch.load(cut / "step-0000006" / "train_state.pt", weights_only=True)["loader"]
    assert loader == {"epoch": 2, "step": 0}  # 24 images / 8 = 3 batches per epoch; 6 steps


def test_sample_grid_hook_checks_the_tokenizer_and_never_stops_training(tmp_path):
    from rargen.checkpoint import register_kind, save
    from rargen.checkpoint import state_sha256 as _state_sha256
    from tiny_tokenizer import PoolTokenizer, PoolTokenizerConfig

    register_kind("test-pool-tokenizer", "tiny_tokenizer:PoolTokenizer")
    right, wrong = PoolTokenizer(PoolTokenizerConfig(seed=0)), PoolTokenizer(PoolTokenizerConfig(seed=1))
    save(right, tmp_path / "right")
    save(wrong, tmp_path / "wrong")
    store = _write_store(tmp_path / "store", tokenizer_sha=_state_sha256(right))
    cfg = tiny(steps=2, batch_size=4, sample_every=1)
    with pytest.raises(ValueError, match="not the one the token store was made with"):
        train(cfg, store, tmp_path / "a", tokenizer=tmp_path / "wrong", progress=False)
    assert not (tmp_path / "a" / "checkpoints").exists()

    drawn = []
    train(cfg, store, tmp_path / "b", sample_hook=lambda m, step, path: drawn.append((step, m.training)),
          progress=False)  # fmt: skip
    assert drawn == [(1, False), (2, False)]  # in eval mode, at every sample_every step

    def broken(model, step, path):
        raise RuntimeError("no sampler here")

    with pytest.warns(UserWarning, match="sample grid at step 1 failed"):
        final = train(cfg, store, tmp_path / "c", sample_hook=broken, progress=False)
    assert (final / "model.safetensors").is_file()
