"""Choose: find the plan that works best on your own model, by measurement (`ropekit tune`).

`ropekit.tune(TuneConfig(...))` screens every method, searches per-pair factors with optuna and
reports on held-out documents; see `ropekit.choose.tune` for the stages and `ropekit.choose.space`
for the search families.
"""

from ropekit.choose.tune import TuneConfig, tune

__all__ = ["TuneConfig", "tune"]
