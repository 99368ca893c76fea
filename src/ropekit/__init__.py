"""ropekit: plan, apply, fine-tune and evaluate RoPE context-window extensions.

>>> import ropekit
>>> spec = ropekit.RopeSpec.from_preset("llama2-7b")
>>> p = ropekit.plan(spec, 16384, "pi")
>>> p.scale
4.0
"""

from ropekit._version import __version__

# The subpackages are imported before their same-named functions are bound, so later imports
# of e.g. `ropekit.apply.export` leave `ropekit.apply` (the function) in place.
from ropekit.apply.extend import extend
from ropekit.apply.patch import apply
from ropekit.errors import RopekitError
from ropekit.plan import (
    METHODS,
    Plan,
    RopeSpec,
    Scaling,
    compare,
    get_method,
    plan,
    register_method,
    unregister_method,
)
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
    "__version__",
    "apply",
    "base_for_bound",
    "compare",
    "critical_dimension",
    "extend",
    "extrapolation_bound",
    "get_method",
    "min_base_for_length",
    "plan",
    "register_method",
    "unregister_method",
]
