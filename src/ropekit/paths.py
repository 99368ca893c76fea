"""Where ropekit keeps caches: a per-user directory, never the working directory.

`$ROPEKIT_CACHE` if set (an absolute path), else `$XDG_CACHE_HOME/ropekit`, else `~/.cache/ropekit`.
Holds the tokenisation cache (`tokens/`), GGUF conversions for `ropekit eval X.gguf` (`gguf/`),
evaluation cells (`eval/`) and model files fetched for the llama.cpp checks (`models/`,
bench/llamacpp_parity.py). The root carries a `CACHEDIR.TAG` (the cache-directory standard, which
backup tools skip) naming ropekit: `ropekit cache` shows the size of each part, and `ropekit cache
--clear` empties only a directory that carries that tag. A `$ROPEKIT_CACHE` that is a file, lies
under a file, or is a directory holding other files is refused in one line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ropekit.errors import RopekitError

TAG = "CACHEDIR.TAG"
TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# ropekit's cache (tokenisations, GGUF conversions, evaluation cells, model files).\n"
    "# `ropekit cache` shows its size; `ropekit cache --clear` empties it.\n"
)
PARTS = {
    "tokens": "tokenisations",
    "gguf": "GGUF conversions",
    "eval": "evaluation cells",
    "models": "model files (llama.cpp checks)",
}


def cache_root(*, create: bool = True) -> Path:
    """The root of ropekit's user cache (see the module docstring), checked; with `create`, made and tagged."""
    value = os.environ.get("ROPEKIT_CACHE")
    if value:
        path, source = Path(value).expanduser(), f"ROPEKIT_CACHE={value}"
        if not path.is_absolute():
            raise RopekitError(
                f"{source} must be an absolute path (a relative one would put the cache in the working directory)"
            )
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "ropekit"
        source = f"the cache directory {path}"
    _check(path, source)
    if create and not (path / TAG).is_file():
        path.mkdir(parents=True, exist_ok=True)
        (path / TAG).write_text(TAG_TEXT)
    return path


def _check(path: Path, source: str) -> None:
    fix = "set ROPEKIT_CACHE to a new or empty directory (or unset it to use ~/.cache/ropekit)"
    if path.exists() and not path.is_dir():
        raise RopekitError(f"{source} is a file, not a directory; {fix}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RopekitError(f"{source}: {parent} is a file, so it cannot hold the cache; {fix}")
            break
    if path.is_dir() and not is_ropekit_cache(path):
        others = sorted(p.name for p in path.iterdir() if p.name not in PARTS)
        if others:  # an untagged folder of only these parts is an earlier ropekit's cache
            raise RopekitError(f"{source} holds files that are not ropekit's cache (e.g. {others[0]}); {fix}")


def is_ropekit_cache(path: Path) -> bool:
    try:
        return "ropekit" in (path / TAG).read_text()
    except OSError:
        return False


def cache_usage() -> dict[str, tuple[int, int]]:
    """{part: (bytes, files)} of each part of the cache (zeros for a part not made yet)."""
    root = cache_root(create=False)
    usage = {}
    for part in PARTS:
        files = [p for p in (root / part).rglob("*") if p.is_file() and not p.is_symlink()]
        usage[part] = (sum(p.stat().st_size for p in files), len(files))
    return usage


def clear_cache() -> int:
    """Remove every part of ropekit's cache; returns the bytes freed. Refuses a directory without ropekit's tag."""
    root = cache_root(create=False)
    if not root.exists():
        return 0
    if not is_ropekit_cache(root):
        raise RopekitError(f"{root} has no {TAG} naming ropekit, so it is not ropekit's cache; nothing was removed")
    freed = sum(size for size, _ in cache_usage().values())
    for part in PARTS:
        shutil.rmtree(root / part, ignore_errors=True)
    return freed


def describe_size(size: int) -> str:
    """Bytes in words: '518 MB', '12 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"
