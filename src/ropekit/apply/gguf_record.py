"""The manifest of a single-file output: an extended GGUF records its own hash.

A directory output keeps its manifest in a file beside the outputs (`ropekit.manifest`). A GGUF is
one file the user moves, renames and copies on its own, so its record lives *inside* it, as three
metadata keys that llama.cpp ignores:

    ropekit.output_kind   "extended gguf"
    ropekit.command       the command that wrote it
    ropekit.sha256        sha256 of the whole file with these 64 hex digits read as "0" × 64

Why inside and not a sidecar file: the record travels with the file (a sidecar is lost on a move,
left behind on a delete, and adds a file to the user's folder), and it covers every byte of it. A
requantised or edited copy that kept ropekit's keys (llama.cpp's tools copy metadata) no longer
matches its hash, so `--overwrite` refuses it: it replaces only a file whose recorded hash matches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.manifest import current_command

KIND = "extended gguf"
KIND_KEY, COMMAND_KEY, HASH_KEY = "ropekit.output_kind", "ropekit.command", "ropekit.sha256"
PLACEHOLDER = "0" * 64


def record_keys() -> dict[str, tuple[Any, Any]]:
    """The keys to add to a GGUF being written, as `{key: (value, GGUFValueType)}`; `seal` fills in the hash."""
    from gguf import GGUFValueType

    return {
        KIND_KEY: (KIND, GGUFValueType.STRING),
        COMMAND_KEY: (current_command(), GGUFValueType.STRING),
        HASH_KEY: (PLACEHOLDER, GGUFValueType.STRING),
    }


def _fields(path: Path) -> dict[str, Any] | None:
    """The GGUF's metadata fields, or None when the file is not a readable GGUF."""
    from gguf import GGUFReader

    try:
        return dict(GGUFReader(path).fields)
    except Exception:  # noqa: BLE001 - gguf raises many types for a file that is not a GGUF
        return None


def _string(fields: dict[str, Any], key: str) -> str | None:
    field = fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _hash_slot(fields: dict[str, Any]) -> int | None:
    """Byte offset of the 64 hex digits of `ropekit.sha256` in the file, or None when it has no such key."""
    field = fields.get(HASH_KEY)
    if field is None or int(field.parts[-1].nbytes) != 64:
        return None
    return int(field.offset) + sum(int(part.nbytes) for part in field.parts[:-1])


def _digest(path: Path, slot: int) -> str:
    """sha256 of the file with the 64 bytes at `slot` read as the placeholder."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(slot))
        fh.seek(64, 1)
        digest.update(PLACEHOLDER.encode())
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def seal(path: Path) -> None:
    """Write the file's hash into its `ropekit.sha256` placeholder (the file was written with `record_keys`)."""
    slot = _hash_slot(_fields(path) or {})
    if slot is None:
        raise RuntimeError(f"{path}: no {HASH_KEY} placeholder to seal")
    value = _digest(path, slot)
    with open(path, "r+b") as fh:
        fh.seek(slot)
        fh.write(value.encode())


def check_replaceable(path: Path, shown: str | os.PathLike[str]) -> None:
    """Refuse, with one line, to replace `path` unless it is an extended GGUF ropekit wrote, unchanged."""
    advice = f"choose another --out (or delete {shown} yourself)"
    fields = _fields(path)
    if fields is None:
        raise RopekitError(f"--overwrite refused: {shown} is not a GGUF ropekit wrote; {advice}")
    slot = _hash_slot(fields)
    if slot is None or _string(fields, KIND_KEY) != KIND:
        what = (
            "was written by an earlier ropekit version that recorded no hash, so nothing proves it is unchanged"
            if "ropekit.method" in fields
            else "is not a GGUF ropekit wrote"
        )
        raise RopekitError(f"--overwrite refused: {shown} {what}; {advice}")
    with open(path, "rb") as fh:
        fh.seek(slot)
        recorded = fh.read(64).decode("ascii", errors="replace")
    if recorded != _digest(path, slot):
        raise RopekitError(f"--overwrite refused: {shown} was changed after ropekit wrote it; {advice}")
