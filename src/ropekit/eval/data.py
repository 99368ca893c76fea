"""Long documents for evaluation and training: text files, folders of them, or JSONL with a
`text` field. Tokenised once per (file content, tokenizer) and cached as int32 arrays."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ropekit.errors import RopekitError

CACHE_DIR = Path(".ropekit-cache")


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) per document. A folder contributes its *.txt and *.jsonl files, sorted."""
    p = Path(path)
    if not p.exists():
        raise RopekitError(f"{path}: no such file or directory")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()) if p.is_dir() else [p]
    if not files:
        raise RopekitError(f"{path}: folder holds no .txt or .jsonl files")
    docs = [doc for f in files for doc in _read_file(f)]
    if not any(text.strip() for _, text in docs):
        raise RopekitError(f"{path}: every document is empty")
    return [(name, text) for name, text in docs if text.strip()]


def _read_file(path: Path) -> list[tuple[str, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RopekitError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [(path.name, raw)]
    docs = []
    for number, record in jsonl_records(path, raw):
        if not isinstance(record.get("text"), str):
            raise RopekitError(f"{path}:{number}: a JSONL record needs a string field 'text'")
        docs.append((f"{path.name}:{number}", record["text"]))
    return docs


def jsonl_records(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; one clear error for invalid JSON or a non-object."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RopekitError(f"{path}: not UTF-8 text") from None
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


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable id for a tokenizer's behaviour (its serialised backend when it has one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_documents(docs: list[tuple[str, str]], tokenizer, *, cache_dir: Path | None = CACHE_DIR) -> list[np.ndarray]:
    """Token ids (int32) per document, with a leading BOS when the tokenizer adds one. Cached."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    out = []
    for _, text in docs:
        key = hashlib.sha256((fingerprint + "\0" + text).encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            out.append(np.load(path))
            continue
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            tmp.replace(path)
        out.append(ids)
    return out


def gutenberg_body(text: str) -> str:
    """A Project Gutenberg file's text between the '*** START OF …' line and '*** END OF' (all of it
    when the markers are absent), with Windows line ends made '\\n'."""
    import re

    text = text.replace("\r\n", "\n")
    start = re.search(r"\*\*\*\s*START OF.*\n", text)
    end = re.search(r"\*\*\*\s*END OF", text)
    return text[start.end() if start else 0: end.start() if end else len(text)]
