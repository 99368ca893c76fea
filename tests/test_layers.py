"""The import-linter contracts of pyproject.toml catch what they promise: an upward import and an import cycle.

Each case runs `lint-imports` (the command scripts/lint.sh runs) on a copy of src/ropekit with one
import planted, so the real tree is never touched; the untouched copy must pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_copy(tmp_path: Path, plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """lint-imports with this repository's contracts on a copy of the package, `plant` = (module file, code) appended."""
    package = tmp_path / "src" / "ropekit"
    shutil.copytree(ROOT / "src" / "ropekit", package, ignore=shutil.ignore_patterns("__pycache__"))
    if plant is not None:
        module, code = plant
        with (package / module).open("a") as fh:
            fh.write("\n\n" + code + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}  # the copy shadows the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_the_contracts_hold_for_the_tree_and_fail_on_a_planted_upward_import_or_cycle(tmp_path):
    clean = _lint_copy(tmp_path / "clean")
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # plan reading a GGUF through apply: the import the layers forbid (function-level imports count)
    upward = _lint_copy(
        tmp_path / "upward", ("plan/geometry.py", "def _planted():\n    from ropekit.apply import gguf  # noqa: F401")
    )
    assert upward.returncode != 0
    assert "ropekit.plan.geometry -> ropekit.apply.gguf" in upward.stdout
    assert "BROKEN" in upward.stdout.split("no import cycle")[0]  # the layers contract, not only the cycle one

    # a method module importing the registry, which imports every method module: a cycle inside plan
    cycle = _lint_copy(
        tmp_path / "cycle",
        ("plan/methods/none.py", "def _planted():\n    from ropekit.plan import registry  # noqa: F401"),
    )
    assert cycle.returncode != 0
    assert "No cycles are allowed in ropekit.plan" in cycle.stdout
