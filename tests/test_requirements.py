"""The suite's one skip mechanism (tests/conftest.py `requires`): a skip names what is missing and
how to get it; under CI (the CI variable set) it fails instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

PROBE = """
from conftest import requires

@requires("the thing", "apt-get install thing")
def test_needs_a_missing_thing():
    pass

@requires(None, "present")
def test_needs_a_present_thing():
    pass
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "RARGEN_REQUIRE_BROWSER")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "conftest", "-p", "no:cacheprovider",
         str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**clean, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "src")]), **env},
    )  # fmt: skip


def test_a_missing_requirement_skips_naming_it(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 1 skipped" in run.stdout
    assert "missing the thing (apt-get install thing)" in run.stdout


def test_under_ci_a_missing_requirement_fails(tmp_path: Path) -> None:
    run = _run(tmp_path, CI="1")
    assert run.returncode == 1, run.stdout
    assert "1 passed, 1 error" in run.stdout
    assert "CI runs every test, but this one is missing the thing" in run.stdout
