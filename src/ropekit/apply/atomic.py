"""Deprecated: the output contract moved to `ropekit.output` (a base module below every capability)."""

from __future__ import annotations

import warnings

from ropekit.output import (
    MARKER,
    MARKER_FILES,
    SIGNATURE,
    OutputTarget,
    atomic_directory,
    check_target,
    default_modes,
    is_ropekit_output,
    prepare_output,
    remove_replaced,
    set_normal_permissions,
)

warnings.warn(
    "ropekit.apply.atomic is deprecated; import from ropekit.output instead", DeprecationWarning, stacklevel=2
)

__all__ = [
    "MARKER",
    "MARKER_FILES",
    "SIGNATURE",
    "OutputTarget",
    "atomic_directory",
    "check_target",
    "default_modes",
    "is_ropekit_output",
    "prepare_output",
    "remove_replaced",
    "set_normal_permissions",
]
