"""The output contract every ropekit command follows: never destroy a file ropekit did not write.

Two calls, used by every command that writes a directory (plan, analyze, convert, extend,
eval, finetune):

    target = prepare_output(out, kind="plan", overwrite=overwrite, inputs=(model, data))  # first, before any work
    ...                                                                                   # the long computation
    with atomic_directory(target) as tmp:                                                 # at the end
        write files into tmp                                              # renamed to `out` on success

The rule of `--overwrite` (see `ropekit.manifest`): every output directory carries a manifest of
the files ropekit wrote (path, size, sha256), the command and the kind of output; a directory is
replaced only if its manifest is valid, of the same kind, and every entry on disk is in it,
unchanged. Anything else is refused with one line naming the first offending file.

`prepare_output` refuses, with one `RopekitError` line and without writing anything:
  * `out` equal to, inside, or containing one of `inputs` (model, data, checkpoint paths)
    or the working directory (`--out .`);
  * `out` naming an existing file, or a path whose parent is a file;
  * `out` an existing non-empty directory, unless `overwrite`; and even with `overwrite`,
    anything but an unchanged ropekit output of the same kind (`ropekit.manifest.verify`);
  * `overwrite` that is not a bool (`overwrite="no"` would read as True);
  * a place where nothing can be written (read-only mount, immutable or unwritable parent):
    it creates and removes a probe directory, so this fails in seconds, not after the work.

A symbolic link given as `out` is resolved: the output goes where it points (the link keeps working).

`atomic_directory` builds the output in a temporary sibling directory (normal permissions:
0777/0666 minus the umask, not mkdtemp's 0700), writes the marker (`marker`, by default
`ropekit.json`; an existing marker file gets the signature merged in) and the manifest, and
renames it into place only when the body finished. If the body fails (an error, Ctrl-C,
SIGTERM), only the temporary directory is removed. If `out` changed while the run worked
(another run wrote it, a file was added), nothing is replaced: the new results are kept under a
free sibling name and the error says where.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ropekit import manifest
from ropekit.errors import RopekitError
from ropekit.manifest import MANIFEST, Snapshot

MARKER = "ropekit.json"
MARKER_FILES = ("ropekit.json", "results.json", "plan.json")  # files that may carry ropekit's signature
SIGNATURE = {"written_by": "ropekit"}
KIND_OF_MARKER = {"plan.json": "plan", "results.json": "eval report"}  # when a caller gives the marker only


@dataclass(frozen=True)
class OutputTarget:
    """An output directory that passed `prepare_output`; pass it to `atomic_directory`."""

    path: Path  # absolute, a symbolic link resolved
    overwrite: bool
    marker: str
    replaces: tuple[int, int] | None  # (device, inode) of the ropekit output it may replace
    kind: str = "plan"  # of output (`ropekit.manifest.KINDS`), recorded in its manifest
    snapshot: Snapshot | None = None  # what `verify` saw in the output it may replace


def prepare_output(
    out: str | Path,
    *,
    kind: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    marker: str = MARKER,
    in_place: bool = False,
    existing_ok: bool = False,
) -> OutputTarget:
    """Check `out` before any work (see the module docstring); returns the target to write.

    `kind`: the kind of output (`ropekit.manifest.KINDS`; inferred from `marker` for plan.json and
    results.json). `inputs`: paths the command reads (hub ids and None are ignored). `in_place`: the
    command writes inside the directory as it goes instead of through `atomic_directory` (finetune's
    run directory). `existing_ok`: an existing output of this kind is continued (`finetune --resume`).
    """
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise RopekitError(f"output directory must be a path, got {out!r}")
    if not isinstance(overwrite, bool):
        raise RopekitError(f"overwrite must be True or False, got {overwrite!r}")
    kind = kind or KIND_OF_MARKER.get(marker)
    if kind is None:
        raise TypeError("prepare_output needs kind= (one of ropekit.manifest.KINDS)")
    manifest.check_kind(kind)
    path = resolve_output_path(out)
    _refuse_overlaps(path, out, inputs)
    _refuse_file_in_the_way(path, out)
    replaces, snapshot = None, None
    if path.is_dir() and any(path.iterdir()):
        if existing_ok:
            _require_continuable(path, out, kind)
        elif not overwrite:
            raise RopekitError(
                f"{out} already exists and is not empty; choose another output directory "
                f"(or --overwrite to replace an earlier, unchanged {kind} ropekit wrote there)"
            )
        else:
            snapshot = manifest.verify(path, kind, shown=out, legacy_signed=is_ropekit_output(path))
            replaces = _identity(path)
    _check_writable(path, out, in_place=in_place)
    return OutputTarget(path=path, overwrite=overwrite, marker=marker, replaces=replaces, kind=kind, snapshot=snapshot)


def resolve_output_path(out: str | os.PathLike[str]) -> Path:
    """`out` as an absolute path; a symbolic link (also a dangling one) is replaced by where it points."""
    path = Path(os.path.abspath(os.path.expanduser(out)))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _require_continuable(path: Path, shown: str | Path, kind: str) -> None:
    """An existing output continued in place (`--resume`) must be ropekit's, of this kind."""
    record = manifest.read_manifest(path)
    if record is None and not is_ropekit_output(path):
        raise RopekitError(f"{shown} is not a {kind} ropekit wrote (no {MANIFEST}); choose another --out")
    if record is not None and record["kind"] != kind:
        raise RopekitError(f"{shown} holds a {record['kind']} ropekit wrote, not a {kind}; choose another --out")


def check_target(target: str | Path, *, kind: str, overwrite: bool = False) -> Path:
    """`prepare_output` without inputs, returning the path (kept for existing callers)."""
    return prepare_output(target, kind=kind, overwrite=overwrite).path


def is_ropekit_output(path: str | Path) -> bool:
    """True if `path` holds a marker file (ropekit.json, results.json, plan.json) that is a
    JSON object carrying ropekit's signature: `"written_by": "ropekit"`, or a
    `ropekit_version` key (top level or in `plan`, as earlier versions wrote). A signature proves
    nothing about the files beside it (it can be copied): `--overwrite` asks `ropekit.manifest.verify`."""
    for name in MARKER_FILES:
        record = _read_json_object(Path(path) / name)
        if record is None:
            continue
        nested = record.get("plan")
        plan = nested if isinstance(nested, dict) else {}
        if record.get("written_by") == "ropekit" or "ropekit_version" in record or "ropekit_version" in plan:
            return True
    return False


@contextmanager
def atomic_directory(
    target: OutputTarget | str | Path, *, overwrite: bool = False, marker: str = MARKER, kind: str | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes the target (with its manifest), on error
    it is removed.

    `target` is what `prepare_output` returned (checked before the work), or a path, which
    is checked now with `overwrite`, `marker` and `kind`.
    """
    if not isinstance(target, OutputTarget):
        target = prepare_output(target, overwrite=overwrite, marker=marker, kind=kind)
    path = target.path
    created = [p for p in path.parents if not p.exists()]  # removed again if the body fails
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        _sign(tmp / target.marker)
        manifest.write_manifest(tmp, target.kind)
        set_normal_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first; rmdir leaves any that something else filled
            with suppress(OSError):
                parent.rmdir()
        raise
    _commit(tmp, target)


# ---- checks ------------------------------------------------------------------------------------


def refuse_overlaps(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output path (a file or a directory) equal to, inside or containing one of `inputs`."""
    _refuse_overlaps(resolve_output_path(out), out, inputs)


def _refuse_overlaps(path: Path, shown: str | Path, inputs: Iterable[str | Path | None]) -> None:
    real = Path(os.path.realpath(path))
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise RopekitError(
            f"output directory {shown} is the working directory or contains it; "
            "give a new directory, e.g. --out out/run1"
        )
    for item in inputs:
        if item is None or not os.path.lexists(str(item)):
            continue  # a hub id, or an optional input not given
        source = Path(os.path.realpath(item))
        if real == source or source in real.parents or real in source.parents:
            relation = "is" if real == source else "is inside" if source in real.parents else "contains"
            raise RopekitError(
                f"output directory {shown} {relation} the input {item}; "
                "ropekit never writes over its inputs, choose another output directory"
            )


def _refuse_file_in_the_way(path: Path, shown: str | Path) -> None:
    if path.exists() and not path.is_dir():
        raise RopekitError(f"{shown} is an existing file, not a directory; choose another output directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RopekitError(f"{parent} is a file, so it cannot hold the output directory {shown}")
            return


def _check_writable(path: Path, shown: str | Path, *, in_place: bool) -> None:
    """Create and remove a probe where the output will go; an existing target is renamed and back."""
    ancestor = path if in_place and path.is_dir() else next(p for p in path.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ropekit-probe-", dir=ancestor))
        if path.is_dir() and not in_place:  # the final rename must move it (immutable directory, mount point)
            probe = ancestor / f".{path.name}.ropekit-probe-{os.getpid()}"
            os.rename(path, probe)
            os.rename(probe, path)
    except OSError as exc:
        raise RopekitError(
            f"cannot write the output directory {shown}: {ancestor} is not writable "
            f"({exc.strerror or exc}); choose another output directory"
        ) from None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _read_json_object(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---- writing -----------------------------------------------------------------------------------


def _sign(marker: Path) -> None:
    """Write ropekit's signature into the marker file (merged into it if the command wrote one)."""
    from ropekit._version import __version__

    record = _read_json_object(marker) if marker.exists() else {}
    if record is None:
        raise RuntimeError(f"{marker.name} must be a JSON object to carry ropekit's signature")
    signed = {**SIGNATURE, "ropekit_version": __version__, **record}
    if signed != record:
        marker.write_text(json.dumps(signed, indent=2) + "\n")


def default_modes() -> tuple[int, int]:
    """(directory mode, file mode): 0o777 and 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask, 0o666 & ~umask


def set_normal_permissions(root: Path) -> None:
    dir_mode, file_mode = default_modes()
    for folder, _, files in os.walk(root):
        os.chmod(folder, dir_mode)
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                executable = os.stat(file).st_mode & 0o100
                os.chmod(file, dir_mode if executable else file_mode)


def _commit(tmp: Path, target: OutputTarget) -> None:
    """Rename `tmp` to the target; never replace anything but the output checked at the start."""
    path = target.path
    aside = None
    try:
        current = _identity(path)
        if current is not None and current != target.replaces and not _is_empty_dir(path):
            raise FileExistsError(path)
        if current is not None and current == target.replaces:
            aside = _move_aside(path)
            if _changed(aside, target):  # a file added or changed since the check: not ours to delete
                os.rename(aside, path)
                aside = None
                raise FileExistsError(path)
        elif path.exists():
            os.rmdir(path)  # empty: fails if something arrived meanwhile
        os.rename(tmp, path)  # a directory that appeared meanwhile makes this fail (not empty)
    except OSError:
        kept = _keep_elsewhere(tmp, path)
        previous = f"; the previous output is in {aside}" if aside is not None and aside.exists() else ""
        raise RopekitError(
            f"{path} changed while this run was writing it (another run?); nothing was replaced: "
            f"this run's output is in {kept}{previous}"
        ) from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Rename `path` onto an empty directory made beside it (same filesystem); returns where it is now."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.replaced-", dir=path.parent))
    os.rename(path, aside)
    return aside


def remove_replaced(target: OutputTarget) -> None:
    """For commands that write in place (finetune): delete the earlier ropekit output `--overwrite` lets
    `target` replace, only if it is still the directory `prepare_output` checked (same device and inode);
    anything else found there is put back and refused."""
    if target.replaces is None or _identity(target.path) is None:
        return
    aside = _move_aside(target.path)
    if _identity(aside) != target.replaces or _changed(aside, target):  # changed since the check: not ours
        try:
            os.rename(aside, target.path)
            where = str(target.path)
        except OSError:
            where = str(aside)
        raise RopekitError(
            f"{target.path} changed since it was checked (another run?); nothing was removed (it is in {where})"
        )
    shutil.rmtree(aside, ignore_errors=True)


def _changed(directory: Path, target: OutputTarget) -> bool:
    return target.snapshot is not None and manifest.changed_since(directory, target.snapshot) is not None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _keep_elsewhere(tmp: Path, path: Path) -> Path:
    """Rename `tmp` to the first free `path-2`, `path-3`, …; returns where it is."""
    for n in range(2, 1000):
        candidate = path.with_name(f"{path.name}-{n}")
        if not candidate.exists():
            try:
                os.rename(tmp, candidate)
                return candidate
            except OSError:
                continue
    return tmp
