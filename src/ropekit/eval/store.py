"""The evaluation store: every measured cell once, in one SQLite file, resumable and shared.

A **cell** is one measurement of one model under one plan: the key is

    (model fingerprint, plan fingerprint, task, task settings, documents fingerprint)

and the value is the task's JSON result. `EvalStore.measure(key, compute)` returns the stored
value when the key is there and otherwise runs `compute()` and stores what it returns, so an
interrupted evaluation or search, rerun, measures nothing twice, and plans that are identical
(the same per-pair factors and attention factor, whatever their method is called) share cells.

Fingerprints:
  * model: sha256 of the weight and config files (`model_fingerprint`; remembered per
    path, size and modification time in the store, so a large model is hashed once), or of
    the weights of a model in memory (`state_fingerprint`);
  * plan: the runtime per-pair factors F_i (relative to the model's plain base frequencies),
    the attention factor and the layer type, written exactly (`plan_fingerprint`); the model
    as saved is `AS_SAVED`;
  * documents: sha256 of the token ids (`documents_fingerprint`);
  * settings: canonical JSON of the task's settings (sorted keys).

Concurrency: SQLite in WAL mode with a busy timeout; each write is its own transaction, so a
Ctrl-C or a killed process leaves every finished cell and nothing half-written, and several
processes (one per core or GPU, or optuna workers) can share one file. When two processes
measure the same missing cell at once, both compute it and the first stored value is kept
(`INSERT OR IGNORE`); nothing is corrupted. SQLite needs a local file system for this (not NFS).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.errors import RopekitError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ropekit.plan.scaling import Plan

AS_SAVED = "as-saved"  # the plan fingerprint of the model as loaded, with no plan applied
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    digest TEXT PRIMARY KEY,      -- sha256 of the canonical key
    model TEXT NOT NULL,
    plan TEXT NOT NULL,
    task TEXT NOT NULL,
    settings TEXT NOT NULL,       -- canonical JSON
    documents TEXT NOT NULL,
    value TEXT NOT NULL,          -- the task's JSON result
    plan_record TEXT,             -- JSON: method, factors, attention factor (for reading the store back)
    seconds REAL,                 -- wall time of the measurement
    created REAL NOT NULL,        -- Unix time
    ropekit_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_by_model_task ON cells (model, task);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class CellKey:
    """What identifies one measurement. `settings` must be JSON-serialisable."""

    model: str  # model fingerprint (`model_fingerprint` / `state_fingerprint`)
    plan: str  # plan fingerprint (`plan_fingerprint`), or AS_SAVED
    task: str  # the task's name, e.g. "ppl" or "window_nll"
    settings: Mapping[str, Any] = field(default_factory=dict)  # everything else the value depends on
    documents: str = ""  # `documents_fingerprint` of the token ids, "" for a task without documents

    @property
    def settings_json(self) -> str:
        return canonical_json(self.settings)

    @property
    def digest(self) -> str:
        """sha256 of the canonical key: the cell's identity."""
        parts = [self.model, self.plan, self.task, self.settings_json, self.documents]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    """A stored cell: its key, value and provenance."""

    key: CellKey
    value: Any
    plan_record: dict[str, Any] | None
    seconds: float | None
    created: float
    ropekit_version: str


class EvalStore:
    """A SQLite file of measured cells (see the module docstring). Use as a context manager or `close()`.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d, EvalStore(pathlib.Path(d) / "s.sqlite") as store:
    ...     key = CellKey(model="m", plan=AS_SAVED, task="demo", settings={"n": 1})
    ...     store.measure(key, lambda: {"x": 2.0})
    ...     store.measure(key, lambda: {"x": 3.0})  # stored: not measured again
    ({'x': 2.0}, False)
    ({'x': 2.0}, True)
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 120.0) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise RopekitError(f"{self.path}: the evaluation store must be a file, and this is not one")
        if not self.path.parent.is_dir():
            raise RopekitError(f"{self.path.parent}: no such directory for the evaluation store")
        deadline = time.monotonic() + timeout_s
        for pause in _backoff():
            db = None
            try:
                db = self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
                self._prepare()
                return
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise RopekitError(f"{self.path}: not a usable ropekit evaluation store ({exc})") from None
                time.sleep(pause)

    def _prepare(self) -> None:
        """WAL mode, the schema, and the schema's version checked.

        Two processes opening a new store at once can deadlock in SQLite's lock upgrade (each holds a
        shared lock and wants the exclusive one to switch to WAL); SQLite then answers SQLITE_BUSY at
        once, without waiting out the busy timeout, so `__init__` retries the whole opening."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._check_schema()

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RopekitError(
                f"{self.path}: evaluation store of schema {row[0]}; this ropekit reads schema {SCHEMA_VERSION}"
            )

    # ---- cells ---------------------------------------------------------------------------------

    def get(self, key: CellKey) -> Any | None:
        """The stored value of `key`, or None."""
        row = self._db.execute("SELECT value FROM cells WHERE digest = ?", (key.digest,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(
        self,
        key: CellKey,
        value: Any,
        *,
        plan_record: Mapping[str, Any] | None = None,
        seconds: float | None = None,
        replace: bool = False,
    ) -> Any:
        """Store `value` under `key` unless a value is there already (first wins; `replace`: this one wins);
        returns the stored value."""
        text = canonical_json(value)
        record = None if plan_record is None else canonical_json(plan_record)
        self._db.execute(
            f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.digest,
                key.model,
                key.plan,
                key.task,
                key.settings_json,
                key.documents,
                text,
                record,
                seconds,
                time.time(),
                __version__,
            ),
        )
        return self.get(key)

    def measure(
        self,
        key: CellKey,
        compute: Callable[[], Any],
        *,
        plan_record: Mapping[str, Any] | None = None,
        fresh: bool = False,
    ) -> tuple[Any, bool]:
        """(value, was_stored): the stored value of `key`, or `compute()` stored and returned.

        `fresh`: compute even when stored, and replace the stored value. A value holding NaN or inf
        (e.g. a model with NaN weights) is returned but never stored, so it is measured again next time.
        """
        found = None if fresh else self.get(key)
        if found is not None:
            return found, True
        started = time.perf_counter()
        value = compute()
        if not is_finite(value):
            return value, False
        seconds = time.perf_counter() - started
        return self.put(key, value, plan_record=plan_record, seconds=seconds, replace=fresh), False

    def cell(self, key: CellKey) -> Cell | None:
        """The stored cell of `key` with its provenance (seconds it took, when, which ropekit), or None."""
        row = self._db.execute("SELECT * FROM cells WHERE digest = ?", (key.digest,)).fetchone()
        return None if row is None else _cell_of(row)

    def __contains__(self, key: CellKey) -> bool:
        return self._db.execute("SELECT 1 FROM cells WHERE digest = ?", (key.digest,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    def cells(self, *, model: str | None = None, task: str | None = None) -> Iterator[Cell]:
        """Every stored cell (optionally of one model and/or task), oldest first."""
        query, args = _filtered("SELECT * FROM cells", model=model, task=task)
        for row in self._db.execute(query + " ORDER BY created", args).fetchall():
            yield _cell_of(row)

    # ---- remembered file hashes ----------------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file, remembered per (absolute path, size, modification time)."""
        st = path.stat()
        where = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        row = self._db.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?", where
        ).fetchone()
        if row is not None:
            return str(row[0])
        digest = file_sha256(path)
        self._db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*where, digest))
        return digest

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EvalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary result codes of "another connection holds a lock"


def _backoff(first_s: float = 0.01, most_s: float = 0.5) -> Iterator[float]:
    """Pauses between retries: doubling from `first_s` up to `most_s`, without end."""
    pause = first_s
    while True:
        yield pause
        pause = min(2 * pause, most_s)


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite refused because another connection holds a lock (SQLITE_BUSY / SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)  # set on every error SQLite itself raised (Python ≥ 3.11)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in BUSY_CODES


def _cell_of(row: tuple[Any, ...]) -> Cell:
    _, m, p, t, settings, docs, value, record, seconds, created, version = row
    key = CellKey(model=m, plan=p, task=t, settings=json.loads(settings), documents=docs)
    return Cell(key, json.loads(value), json.loads(record) if record else None, seconds, created, version)


def _filtered(query: str, **filters: str | None) -> tuple[str, list[str]]:
    used = {k: v for k, v in filters.items() if v is not None}
    if not used:
        return query, []
    return query + " WHERE " + " AND ".join(f"{k} = ?" for k in used), list(used.values())


# ---- fingerprints -------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces; floats written exactly (repr); NaN/inf refused."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise RopekitError(f"cannot store a non-finite number: {value!r}") from None
    except TypeError as exc:
        raise RopekitError(f"cannot store {type(value).__name__} values as JSON ({exc})") from None


def is_finite(value: Any) -> bool:
    """No NaN or inf anywhere in a JSON-like value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_finite(v) for v in value)
    return True


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".pt", ".pth")


def model_fingerprint(path: str | Path, store: EvalStore | None = None) -> str:
    """sha256 over a model: a single file (e.g. `.gguf`), or a directory's weight, config and tokenizer files.

    A directory's files are taken in sorted order, each as (relative name, its sha256); files
    ropekit writes beside a model but that do not change it (`ropekit.json`) are left out. With
    a `store`, each file's hash is remembered, so an unchanged file is read once.
    """
    p = Path(path)
    if not p.exists():
        raise RopekitError(f"{path}: no such file or directory")
    hash_of = store.file_sha256 if store is not None else file_sha256
    if p.is_file():
        return hash_of(p)
    files = sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES and f.name != "ropekit.json"
    )
    if not files:
        raise RopekitError(f"{path}: no model files in this directory")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(p).as_posix()}\0{hash_of(f)}\n".encode())
    return digest.hexdigest()


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model in memory: every parameter and buffer (name, dtype, shape, bytes), in order.

    Rotary frequency buffers are left out: a plan changes them, and the plan is keyed separately.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "inv_freq" in name:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def documents_fingerprint(documents: Sequence[Sequence[int] | np.ndarray]) -> str:
    """sha256 of token-id documents (their order and every id)."""
    import numpy as np

    digest = hashlib.sha256()
    for doc in documents:
        ids = np.asarray(doc, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
    return digest.hexdigest()


def plan_fingerprint(plan: Plan | None) -> str:
    """The identity of what a plan does to a model: runtime factors F_i, attention factor, layer type.

    Two plans with equal fingerprints give the model the same frequencies, whatever their
    method names; None (no plan) is `AS_SAVED`.
    """
    if plan is None:
        return AS_SAVED
    record = plan_identity(plan)
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def plan_identity(plan: Plan) -> dict[str, Any]:
    """The fields `plan_fingerprint` hashes, written exactly."""
    factors = [float(f) for f in plan.runtime_factors]
    if not all(math.isfinite(f) for f in factors):
        raise RopekitError(f"plan {plan.method!r} has non-finite factors; it cannot be measured")
    return {
        "factors": factors,
        "attention_factor": float(plan.attention_factor),
        "layer_type": plan.spec.layer_type,
    }


def plan_record(plan: Plan) -> dict[str, Any]:
    """What the store keeps beside a cell to read it back: the method, its parameters and the identity."""
    params = {k: v for k, v in plan.params.items() if _is_plain(v)}
    return {"method": plan.method, "params": params, "target_length": plan.target_length, **plan_identity(plan)}


def _is_plain(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def describe(cell: Cell) -> dict[str, Any]:
    """A JSON-ready view of a cell (for listings and exports)."""
    return {**asdict(cell.key), "value": cell.value, "plan_record": cell.plan_record, "seconds": cell.seconds}


def path_fingerprint(path: str | Path, store: EvalStore | None = None) -> str:
    """sha256 over a file's bytes, or over every file of a folder (relative name and sha256, sorted).

    Unlike `model_fingerprint`, every file counts (a folder of text, JSONL or prompt files).
    """
    p = Path(path)
    hash_of = store.file_sha256 if store is not None else file_sha256
    if p.is_file():
        return hash_of(p)
    digest = hashlib.sha256()
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        digest.update(f"{f.relative_to(p).as_posix()}\0{hash_of(f)}\n".encode())
    return digest.hexdigest()
