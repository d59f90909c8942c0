"""The next token's distribution has one home (``rargen.sampling.next_token``): every decoder
mixes guidance with ``guided_logits`` and filters with ``filtered_logits``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from rargen.sampling.engine import SampleConfig
from rargen.sampling.next_token import filter_logits, filtered_logits, guided_logits

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rargen"


def code_without_docstrings(path: Path) -> str:
    """The module's code as ``ast.unparse`` writes it (one spelling), without docstrings or comments."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


# ``u + (c - u) * w`` whatever the names: the guidance mix.
GUIDANCE_MIX = re.compile(r"(\w+) \+ \((\w+) - \1\) \*")


def test_guidance_and_filtering_are_written_once() -> None:
    """The mix ``u + (c - u) * w`` was computed by the engine and again by speculative decoding,
    and top-k / top-p were read off the config in four places: now each lives in next_token only."""
    mixes, filters, settings = [], [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        code = code_without_docstrings(path)
        if GUIDANCE_MIX.search(code):
            mixes.append(name)
        if re.search(r"\bfilter_logits\(", code):
            filters.append(name)
        readers = {
            ast.unparse(node.value)
            for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Attribute) and node.attr in ("top_k", "top_p")
        }
        if readers:
            settings[name] = readers
    assert mixes == ["sampling/next_token.py"]
    assert filters == ["sampling/next_token.py"]
    # Beside next_token: SampleConfig's own checks, and names: the server's file names of a request,
    # the sweep's folder names of a setting.
    assert settings == {
        "sampling/next_token.py": {"config"},
        "sampling/engine.py": {"self"},
        "serve/engine.py": {"sample"},
        "evaluation/sweep.py": {"config"},
    }


def test_guided_logits_mixes_each_row_with_its_weight() -> None:
    cond = torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=torch.bfloat16).float()
    null = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([1.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([[1.0, 2.0], [-2.0, 10.0]])
    assert torch.equal(guided_logits(cond, null, weight), expected)
    assert guided_logits(cond.double(), null.double(), weight).dtype == torch.float64


def test_filtered_logits_reads_the_config() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    config = SampleConfig(temperature=0.7, top_k=9, top_p=0.8)
    assert torch.equal(filtered_logits(logits, config), filter_logits(logits, 0.7, 9, 0.8))
