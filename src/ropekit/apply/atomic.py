"""Write a directory all at once: build it beside the target, then rename it into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ropekit.errors import RopekitError


def check_target(target: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty output directory unless `overwrite`."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise RopekitError(f"{target} already exists and is not empty; choose another output directory, "
                           "remove it, or overwrite it (--overwrite / overwrite=True)")
    return target


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `target`, on error it is removed."""
    target = check_target(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
