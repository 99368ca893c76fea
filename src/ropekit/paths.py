"""Where ropekit keeps caches: a per-user directory, never the working directory.

`$ROPEKIT_CACHE` if set, else `$XDG_CACHE_HOME/ropekit`, else `~/.cache/ropekit`. Holds the
tokenisation cache (`tokens/`) and GGUF conversions for `ropekit eval X.gguf` (`gguf/`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of ropekit's user cache (see the module docstring)."""
    if os.environ.get("ROPEKIT_CACHE"):
        return Path(os.environ["ROPEKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ropekit"
