"""Importing ropekit's plotting modules must not pick a matplotlib backend or load pyplot."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import ropekit, ropekit.plan.plots, ropekit.eval.report
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""


@pytest.mark.slow
def test_plot_modules_import_without_pyplot():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
