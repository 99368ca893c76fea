"""The manifest of an output directory: what ropekit wrote there, so `--overwrite` can prove it.

Every output directory ropekit writes holds `ropekit-manifest.json`, written when the output is
created (and kept current by commands that write in place, such as a fine-tune run):

    {"written_by": "ropekit", "format": 1, "kind": "plan", "command": "ropekit plan …",
     "ropekit_version": "…", "created": "2026-…Z",
     "directories": ["logs", …], "files": {"plan.json": {"size": 1234, "sha256": "…"}, …}}

`verify` is the rule `--overwrite` follows: a directory may be replaced only if its manifest is
valid, of the same kind, and every entry on disk (file, directory) is in it, unchanged (size and
sha256). Anything else (an added file, a changed file, a symbolic link, a missing or damaged
manifest, another kind of output) is refused with one line naming the first offending entry (in
sorted path order). Files listed but missing are not a reason to refuse: they hold nothing of the
user's. A copied manifest proves nothing: the files on disk must match it.

`verify` returns a `Snapshot` (size, mtime and inode of every entry); `changed_since` compares the
directory to it again just before the replacement, without hashing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError

MANIFEST = "ropekit-manifest.json"
FORMAT = 1
# The kinds of output, one per command that writes a directory; `--overwrite` replaces only the same kind.
KINDS = (
    "plan",
    "analysis",
    "extended model",
    "converted model",
    "eval report",
    "fine-tune run",
    "tune study",
)
_COMMAND: list[str] | None = None  # the CLI invocation being run (set by ropekit.cli.main)


def set_command(argv: list[str] | None) -> None:
    """Record the command line a manifest names (the CLI sets it; the Python API records `python …`)."""
    global _COMMAND
    _COMMAND = None if argv is None else list(argv)


def current_command() -> str:
    if _COMMAND is not None:
        return shlex.join(["ropekit", *_COMMAND])
    return shlex.join(["python", *sys.argv]) + " (Python API)"


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- writing ---------------------------------------------------------------------------------------


def write_manifest(
    root: Path, kind: str, *, command: str | None = None, paths: Iterable[str] = ("",)
) -> dict[str, Any]:
    """Hash every file under `root` (ropekit's own output, complete) and write the manifest; returns it.
    `paths` limits it to those entries (relative; "" is all of `root`): what a command wrote in place."""
    check_kind(kind)
    directories, files = _scan(root, [p.strip("/") for p in paths])
    directories |= _parents(files)
    record = {
        "written_by": "ropekit",
        "format": FORMAT,
        "kind": kind,
        "command": command or current_command(),
        "ropekit_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "directories": sorted(directories),
        "files": dict(sorted(files.items())),
    }
    _write_json(root / MANIFEST, record)
    return record


def update_manifest(root: Path, paths: Iterable[str]) -> None:
    """Bring the entries under `paths` (relative: files or directories this command wrote or removed)
    up to date; every other entry stays as recorded. For outputs written in place over time (a fine-tune
    run's checkpoints and logs): a file the user put elsewhere in the directory is never absorbed."""
    record = read_manifest(root)
    if record is None:
        raise RopekitError(f"{root}: no valid {MANIFEST} to update (was it removed while the run wrote?)")
    scopes = [p.strip("/") for p in paths]
    directories = {d for d in record["directories"] if not any(_under(d, s) for s in scopes)}
    files = {f: e for f, e in record["files"].items() if not any(_under(f, s) for s in scopes)}
    found_dirs, found_files = _scan(root, scopes)
    record["directories"] = sorted(directories | found_dirs | _parents(found_files))
    record["files"] = dict(sorted({**files, **found_files}.items()))
    _write_json(root / MANIFEST, record)


def _under(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + "/")


def _parents(files: Iterable[str]) -> set[str]:
    return {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}


def _scan(root: Path, scopes: list[str]) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """(directories, {file: {size, sha256}}) under each scope ("" = all of `root`), without the manifest."""
    directories: set[str] = set()
    files: dict[str, dict[str, Any]] = {}
    for scope in scopes:
        start = root / scope if scope else root
        if start.is_file() and not start.is_symlink():
            files[scope] = {"size": start.stat().st_size, "sha256": sha256_file(start)}
            continue
        if not start.is_dir() or start.is_symlink():
            continue
        if scope:
            directories.add(scope)
        for rel, entry in _walk(start, scope):
            if entry.is_dir(follow_symlinks=False):
                directories.add(rel)
            elif entry.is_file(follow_symlinks=False) and rel != MANIFEST:
                files[rel] = {
                    "size": entry.stat(follow_symlinks=False).st_size,
                    "sha256": sha256_file(Path(entry.path)),
                }
    return directories, files


def _walk(directory: Path, prefix: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(relative path, entry) for everything under `directory`, sorted, depth first, links not followed."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = f"{prefix}/{entry.name}" if prefix else entry.name
        yield rel, entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), rel)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _version() -> str:
    from ropekit._version import __version__

    return __version__


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")


# ---- reading and verifying -------------------------------------------------------------------------


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of `root` if it is present and well formed, else None."""
    try:
        record = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if _well_formed(record) else None


def _well_formed(record: Any) -> bool:
    if not isinstance(record, dict) or record.get("written_by") != "ropekit" or record.get("format") != FORMAT:
        return False
    files, directories = record.get("files"), record.get("directories")
    if not isinstance(record.get("kind"), str) or not isinstance(files, dict) or not isinstance(directories, list):
        return False
    names = [*files, *directories]
    if not all(isinstance(n, str) and _relative(n) for n in names):
        return False
    return all(
        isinstance(e, dict)
        and isinstance(e.get("size"), int)
        and isinstance(e.get("sha256"), str)
        and len(e["sha256"]) == 64
        for e in files.values()
    )


def _relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


Stat = tuple[int, int, int, int]  # (mode type, size, mtime_ns, inode)


@dataclass(frozen=True)
class Snapshot:
    """What `verify` saw: every entry under the directory with its type, size, mtime and inode."""

    entries: dict[str, Stat]


def verify(root: Path, kind: str, *, shown: str | Path | None = None, legacy_signed: bool = False) -> Snapshot:
    """Check that `root` is an unchanged ropekit output of `kind` (see the module docstring); returns what
    it saw, or raises one `RopekitError` line naming the first offending entry and what to do.
    `legacy_signed`: the directory carries an earlier ropekit's signed marker (no manifest)."""
    shown = str(shown or root)
    advice = f"move your files out of {shown} or delete it yourself, or choose another --out"
    record = read_manifest(root)
    if record is None:
        if (root / MANIFEST).exists():
            raise RopekitError(
                f"--overwrite refused: {shown}/{MANIFEST} is damaged, so nothing proves what ropekit wrote there; {advice}"
            )
        if legacy_signed:
            raise RopekitError(
                f"--overwrite refused: {shown} was written by an earlier ropekit version that kept no manifest, so "
                f"ropekit cannot tell whether files of yours were added; delete it yourself if it holds nothing "
                "you need, or choose another --out"
            )
        raise RopekitError(
            f"--overwrite refused: {shown} is not a directory ropekit wrote (no {MANIFEST}); --overwrite replaces "
            "only ropekit's own unchanged outputs, so choose another --out"
        )
    if record["kind"] != kind:
        raise RopekitError(
            f"--overwrite refused: {shown} holds a {record['kind']} ropekit wrote ({record.get('command', '?')}), "
            f"not an earlier {kind}; choose another --out (or delete it yourself)"
        )
    files, directories = record["files"], set(record["directories"])
    entries: dict[str, Stat] = {}
    for rel, entry in _walk(root):
        st = entry.stat(follow_symlinks=False)
        entries[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
        problem = None
        if entry.is_symlink():
            problem = "is a symbolic link (ropekit writes none)"
        elif entry.is_dir():
            problem = None if rel in directories else "is a directory ropekit did not write"
        elif not entry.is_file():
            problem = "is not a regular file (ropekit writes none)"
        elif rel == MANIFEST:
            continue
        elif rel not in files:
            problem = f"is not one of the files ropekit wrote as this {kind}"
        elif files[rel]["size"] != st.st_size or files[rel]["sha256"] != sha256_file(Path(entry.path)):
            problem = "was changed after ropekit wrote it"
        if problem:
            raise RopekitError(f"--overwrite refused: {shown}/{rel} {problem}; {advice}")
    return Snapshot(entries)


def changed_since(root: Path, snapshot: Snapshot) -> str | None:
    """The first entry (relative path) that differs from `snapshot` (added, removed, or modified), or None."""
    now: dict[str, Stat] = {}
    for rel, entry in _walk(root):
        st = entry.stat(follow_symlinks=False)
        now[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
    for rel in sorted(set(now) | set(snapshot.entries)):
        if now.get(rel) != snapshot.entries.get(rel):
            return rel
    return None
