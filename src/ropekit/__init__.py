"""ropekit: plan, apply, fine-tune, evaluate and choose RoPE context-window extensions.

>>> import ropekit
>>> spec = ropekit.RopeSpec.from_preset("llama2-7b")
>>> p = ropekit.make_plan(spec, 16384, "pi")
>>> p.scale
4.0
"""

from ropekit._version import __version__

# `ropekit.plan`, `ropekit.apply`, `ropekit.train`, `ropekit.eval`, `ropekit.choose` are the subpackages; the entry
# points have names of their own (`make_plan`, `apply_plan`), so no name is both.
from ropekit.apply import readers as _readers  # noqa: F401  (registers RopeSpec's file readers)
from ropekit.apply.extend import extend
from ropekit.apply.patch import apply as apply_plan
from ropekit.choose import TuneConfig, tune
from ropekit.errors import RopekitError
from ropekit.plan import (
    METHODS,
    Plan,
    RopeSpec,
    Scaling,
    compare,
    get_method,
    register_method,
    unregister_method,
)
from ropekit.plan import plan as make_plan
from ropekit.plan.analysis.bounds import (
    base_for_bound,
    critical_dimension,
    extrapolation_bound,
    min_base_for_length,
)

__all__ = [
    "METHODS",
    "Plan",
    "RopeSpec",
    "RopekitError",
    "Scaling",
    "TuneConfig",
    "__version__",
    "apply_plan",
    "base_for_bound",
    "compare",
    "critical_dimension",
    "extend",
    "extrapolation_bound",
    "get_method",
    "min_base_for_length",
    "make_plan",
    "register_method",
    "tune",
    "unregister_method",
]
