"""Shared fixtures: tiny random-weight models whose every parameter is non-zero; ``requires``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from rargen.model import RAR, ModelConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, for tests of its parts."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Redraw every parameter (adaLN, norms, cls token included) so no layer is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
    return model


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """``rargen --threads N`` run in-process sets torch's thread count for the process, as a
    command should; the next test must not inherit it (float32 sums round by thread count)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: waking a second intra-op thread costs more than the maths (seconds on a busy
    2-core machine). Modules that opt in run torch on one thread and restore the setting after;
    the thread count changes speed only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def enumerable() -> RAR:
    """4 tokens of 3 codes (81 sequences), 2 classes: small enough to enumerate exactly (the
    speculative and any-order chi-square tests)."""
    config = ModelConfig(
        codebook_size=3, num_classes=2, num_image_tokens=4, dim=16, depth=2, num_heads=2, mlp_dim=32,
        dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip
    return randomize(RAR(config), seed=3, std=0.3).eval()


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("rar-tiny", dropout=0.0, attn_dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> RAR:
    return randomize(RAR(tiny_config)).double().eval()


# ------------------------------------------------------------------------------------------------
# Tests that need something from outside the repository. The one way to skip in this suite:
# a skip names what is missing and how to get it (`-ra` prints it in the summary), and under CI
# (the `CI` variable set, as .ci/run does) a missing requirement fails the test instead.


def requires(missing: str | None, fix: str) -> pytest.MarkDecorator:
    """Mark a test (or a module, through ``pytestmark``) that needs ``missing`` (None: present)."""
    return pytest.mark.requires(missing=missing, fix=fix)


def under_ci() -> bool:
    # RARGEN_REQUIRE_BROWSER: the older name CI set for the browser test alone.
    return any(os.environ.get(name, "") not in ("", "0") for name in ("CI", "RARGEN_REQUIRE_BROWSER"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(missing, fix): skip (fail under CI) when missing is set")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        if mark.kwargs["missing"]:
            message = f"missing {mark.kwargs['missing']} ({mark.kwargs['fix']})"
            if under_ci():
                pytest.fail(f"CI runs every test, but this one is {message}", pytrace=False)
            pytest.skip(message)
