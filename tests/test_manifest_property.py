"""The `--overwrite` rule over generated directory states (hypothesis, 500 examples, derandomized).

Each example builds, in a fresh folder, an output ropekit wrote (through the real `atomic_directory`)
or a user's folder, then applies random changes a person makes: add a file, edit one (same size or
not), delete one, drop a symbolic link or an empty folder in, copy in another output's manifest,
remove or damage the manifest, leave only an earlier version's signed marker. Then it asks
`prepare_output(..., overwrite=True)` for the output, sometimes with an input inside it, and checks:

  * the directory may be replaced iff it is an output of the asked kind whose every entry on disk is
    in its manifest, unchanged, and no input lies inside it;
  * a refusal is one line naming a file of the directory (or the directory) and changes no byte;
  * an accepted replacement loses only files ropekit wrote there, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ropekit.errors import RopekitError
from ropekit.manifest import MANIFEST
from ropekit.output import atomic_directory, prepare_output

KINDS = ("plan", "extended model")
NAMES = ("a.json", "b.txt", "sub/c.bin", "sub/deeper/d.txt")
USER_CHANGES = ("add", "edit_same_size", "edit_longer", "symlink", "empty_dir", "foreign_manifest", "damage_manifest")
HARMLESS_CHANGES = ("delete",)


def fingerprint(root: Path) -> dict[str, str]:
    """Every entry under root: files by sha256, links by target, folders by name."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_output(path: Path, kind: str, files: dict[str, bytes]) -> None:
    with atomic_directory(prepare_output(path, kind=kind)) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory-backed where there is one: fast
OTHER_OUTPUT = (
    Path(tempfile.mkdtemp(prefix="manifest-property-other-", dir=SCRATCH)) / "other"
)  # whose manifest gets copied
write_output(OTHER_OUTPUT, "plan", {"x.json": b"{}", "y.txt": b"other output"})

state = st.fixed_dictionaries(
    {
        "origin": st.sampled_from(("ropekit", "ropekit", "ropekit", "user folder", "earlier version")),
        "written_kind": st.sampled_from(KINDS),
        "asked_kind": st.sampled_from(KINDS),
        "files": st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True),
        "contents": st.lists(st.binary(min_size=1, max_size=64), min_size=4, max_size=4),
        "changes": st.lists(st.tuples(st.sampled_from(USER_CHANGES + HARMLESS_CHANGES), st.integers(0, 3)), max_size=3),
        "input_inside": st.booleans(),
        "via_symlink": st.booleans(),
    }
)


def unchanged_output(root: Path, written: dict[str, bytes], manifest: bytes) -> bool:
    """The oracle, from the bytes ropekit wrote (not from any hash): every entry on disk is a file ropekit
    wrote with the same bytes, its manifest as written, or a folder holding such files."""
    folders = {str(Path(name).parent) for name in written} - {"."}
    folders |= {str(p) for name in folders for p in Path(name).parents if str(p) != "."}
    for path in root.rglob("*"):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            return False
        if path.is_dir():
            if rel not in folders:
                return False
        elif path.read_bytes() != (manifest if rel == MANIFEST else written.get(rel)):
            return False
    return True


def apply_change(root: Path, change: str, index: int, other_manifest: Path) -> None:
    """Make one change a person might make to the directory."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)
    target = files[index % len(files)] if files else None
    if change == "add":
        (root / f"NOTES-{index}.md").write_text("my notes")
    elif change == "edit_same_size" and target is not None:
        data = target.read_bytes()
        target.write_bytes(bytes([(data[0] + 1) % 256]) + data[1:])  # never back to the original in 3 edits
    elif change == "edit_longer" and target is not None:
        target.write_bytes(target.read_bytes() + b"!")
    elif change == "symlink":
        if not (root / f"link-{index}").is_symlink():
            os.symlink(other_manifest, root / f"link-{index}")
    elif change == "empty_dir":
        (root / f"folder-{index}").mkdir(exist_ok=True)
    elif change == "foreign_manifest":
        shutil.copy(other_manifest, root / MANIFEST)
    elif change == "damage_manifest" and (root / MANIFEST).exists():
        (root / MANIFEST).write_text("{not json")
    elif change == "delete" and target is not None:
        target.unlink()


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(state)
def test_overwrite_replaces_exactly_the_unchanged_outputs_of_its_kind(case):
    base = Path(tempfile.mkdtemp(prefix="manifest-property-", dir=SCRATCH))
    try:
        out = base / "out"
        other = OTHER_OUTPUT
        files = {name: data for name, data in zip(case["files"], case["contents"])}
        if case["origin"] == "ropekit":
            write_output(out, case["written_kind"], files)
        else:
            for name, data in files.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
            if case["origin"] == "earlier version":
                (out / "plan.json").write_text(json.dumps({"written_by": "ropekit", "ropekit_version": "0.1"}))
        written = {  # every byte ropekit wrote (the files and its signed marker), read back right after
            str(p.relative_to(out)): p.read_bytes()
            for p in out.rglob("*")
            if case["origin"] == "ropekit" and p.is_file() and p.name != MANIFEST
        }
        manifest = (out / MANIFEST).read_bytes() if case["origin"] == "ropekit" else b""
        for change, index in case["changes"]:
            apply_change(out, change, index, other / MANIFEST)
        touched = case["origin"] != "ropekit" or not unchanged_output(out, written, manifest)
        inputs = [out / case["files"][0]] if case["input_inside"] and (out / case["files"][0]).exists() else []
        given_path = out
        if case["via_symlink"]:
            given_path = base / "link-to-out"
            os.symlink(out, given_path)
        allowed = not touched and case["written_kind"] == case["asked_kind"] and not inputs
        before = fingerprint(out)
        ropekit_files = set(fingerprint(out))
        try:
            target = prepare_output(given_path, kind=case["asked_kind"], overwrite=True, inputs=inputs)
        except RopekitError as exc:
            message = str(exc)
            assert not allowed, message
            assert "\n" not in message and (str(given_path) in message or str(out) in message), message
            assert fingerprint(out) == before  # not one byte changed
            return
        assert allowed, f"accepted a directory it must refuse: {case}"
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("replacement")
        assert (out / "new.txt").read_text() == "replacement" and ropekit_files  # the old output is replaced
        assert not [p for p in base.iterdir() if ".replaced-" in p.name or ".partial-" in p.name]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_file_added_between_the_check_and_the_replacement_is_kept(tmp_path):
    """The rule holds at the moment of replacing too: the directory is compared with what was verified."""
    out = tmp_path / "out"
    write_output(out, "plan", {"plan.json": b"{}"})
    target = prepare_output(out, kind="plan", overwrite=True)
    (out / "NOTES.md").write_text("written while the run worked")
    with (
        pytest.raises(RopekitError, match="changed while this run was writing") as info,
        atomic_directory(target) as tmp,
    ):
        (tmp / "plan.json").write_text("{}")
    assert (out / "NOTES.md").read_text() == "written while the run worked"
    assert "\n" not in str(info.value) and (tmp_path / "out-2" / "plan.json").is_file()
