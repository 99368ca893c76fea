"""Long documents for evaluation and training: text files, folders of them, JSONL with a
`text` field, or a JSON array of such objects (or of strings). Tokenised once per (file
content, tokenizer) and cached as int32 arrays in uncompressed .npz files, whose zip CRC-32
detects a corrupted entry; a corrupted entry is rebuilt, with a note on stderr."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ropekit.errors import RopekitError
from ropekit.paths import cache_root

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) per document. A folder contributes its *.txt and *.jsonl files, sorted."""
    p = Path(path)
    if not p.exists():
        raise RopekitError(f"{path}: no such file or directory")
    files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()) if p.is_dir() else [p]
    if not files:
        raise RopekitError(f"{path}: folder holds no .txt or .jsonl (or .json) files")
    docs = [doc for f in files for doc in _read_file(f)]
    if not any(text.strip() for _, text in docs):
        raise RopekitError(f"{path}: every document is empty")
    return [(name, text) for name, text in docs if text.strip()]


def read_utf8(path: Path) -> str:
    """The file's text, or one clear error for a file that is not UTF-8 or cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RopekitError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RopekitError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _read_file(path: Path) -> list[tuple[str, str]]:
    raw = read_utf8(path)
    if path.suffix == ".json":
        return _json_documents(path, raw)
    if path.suffix != ".jsonl":
        return [(path.name, raw)]
    docs = []
    for number, record in jsonl_records(path, raw):
        if not isinstance(record.get("text"), str):
            raise RopekitError(f"{path}:{number}: a JSONL record needs a string field 'text'")
        docs.append((f"{path.name}:{number}", record["text"]))
    return docs


SUFFIXES = (".txt", ".jsonl", ".json")


def _json_documents(path: Path, raw: str) -> list[tuple[str, str]]:
    """A .json file: an array of strings or of objects with a string 'text' (or one such object)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RopekitError(
            f"{path}: not valid JSON (line {exc.lineno}); for one document per line use .jsonl"
        ) from None
    items = data if isinstance(data, list) else [data]
    docs = []
    for number, item in enumerate(items):
        text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise RopekitError(f"{path}: item {number} is neither a string nor an object with a string field 'text'")
        docs.append((f"{path.name}[{number}]", text))
    return docs


def jsonl_records(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; one clear error for invalid JSON or a non-object."""
    if text is None:
        text = read_utf8(path)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RopekitError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise RopekitError(f"{path}:{number}: each JSONL line must be a JSON object")
        yield number, record


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable id for a tokenizer's behaviour (its serialised backend when it has one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_documents(
    docs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, *, cache_dir: Path | str | None = "user"
) -> list[np.ndarray]:
    """Token ids (int32) per document, with a leading BOS when the tokenizer adds one.

    Cached in `cache_dir`: "user" (default) is `ropekit.paths.cache_root() / "tokens"`, None disables it."""
    if cache_dir == "user":
        cache_dir = cache_root() / "tokens"
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    fingerprint = tokenizer_fingerprint(tokenizer)
    out = []
    for _, text in docs:
        key = hashlib.sha256((fingerprint + "\0" + text).encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.npz" if cache_dir is not None else None
        ids = _read_cached(path) if path is not None and path.is_file() else None
        if ids is not None:
            out.append(ids)
            continue
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, ids=ids)
            tmp.replace(path)
        out.append(ids)
    return out


def _read_cached(path: Path) -> np.ndarray | None:
    """The cached ids, or None (with a note) when the entry is corrupted: bad zip, CRC, dtype or shape."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            ids = archive["ids"]
        if ids.dtype == np.int32 and ids.ndim == 1:
            return ids
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    print(f"note: tokenisation cache entry {path} was corrupted; rebuilding it", file=sys.stderr)
    return None


def gutenberg_body(text: str) -> str:
    """A Project Gutenberg file's text between the '*** START OF …' line and '*** END OF' (all of it
    when the markers are absent), with Windows line ends made '\\n'."""
    import re

    text = text.replace("\r\n", "\n")
    start = re.search(r"\*\*\*\s*START OF.*\n", text)
    end = re.search(r"\*\*\*\s*END OF", text)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def gutenberg_lines(text: str) -> str:
    """A Project Gutenberg file's text between its header and footer, cut line by line as the reference and
    real-model studies read PG19 (`bench/`): a '*** START OF' header may run over several lines, up to the one
    ending '***'; old e-texts end theirs at '*END*THE SMALL PRINT'; the footer starts at '*** END OF' or
    'End of the Project Gutenberg'. Stripped; Windows line ends made '\\n'. (`gutenberg_body` is the simpler
    cut the llama.cpp parity check was measured with.)"""
    lines = text.replace("\r\n", "\n").split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if "***START OF" in line or "*** START OF" in line:
            j = i
            while j < len(lines) and not lines[j].rstrip().endswith("***"):
                j += 1
            start = j + 1
            break
        if line.startswith("*END*THE SMALL PRINT"):
            start = i + 1
            break
    for i in range(start, len(lines)):
        if lines[i].startswith(
            ("***END OF", "*** END OF", "End of The Project Gutenberg", "End of the Project Gutenberg")
        ):
            end = i
            break
    return "\n".join(lines[start:end]).strip()


def decode_text(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int] | torch.Tensor | np.ndarray,
    *,
    skip_special_tokens: bool = False,
) -> str:
    """`tokenizer.decode` of one sequence of token ids, as the one string it returns for one sequence."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return text if isinstance(text, str) else "".join(text)
