"""The evaluation store: cells measured once, persistent, shared by processes, keyed by what a plan does."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
import torch

import ropekit
from conftest import tiny_llama
from ropekit.eval.store import (
    AS_SAVED,
    CellKey,
    EvalStore,
    documents_fingerprint,
    model_fingerprint,
    plan_fingerprint,
    plan_record,
    state_fingerprint,
)

SPEC = ropekit.RopeSpec(head_dim=8, base=10000.0, context_length=512)


def key(task: str = "ppl", **settings) -> CellKey:
    return CellKey(model="m" * 64, plan=AS_SAVED, task=task, settings=settings or {"length": 1024})


def test_a_stored_cell_is_not_measured_again_and_survives_reopening(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"nll": 1.25, "tokens": 100}

    with EvalStore(tmp_path / "s.sqlite") as store:
        assert store.measure(key(), compute) == ({"nll": 1.25, "tokens": 100}, False)
        assert store.measure(key(), compute) == ({"nll": 1.25, "tokens": 100}, True)
    with EvalStore(tmp_path / "s.sqlite") as store:
        assert store.measure(key(), compute)[1] is True
        assert len(store) == 1
    assert len(calls) == 1


def test_every_key_part_separates_cells(tmp_path):
    base = dict(model="a", plan="p", task="ppl", settings={"length": 8}, documents="d")
    variants = [
        CellKey(**base),
        CellKey(**{**base, "model": "b"}),
        CellKey(**{**base, "plan": "q"}),
        CellKey(**{**base, "task": "passkey"}),
        CellKey(**{**base, "settings": {"length": 9}}),
        CellKey(**{**base, "documents": "e"}),
    ]
    assert len({k.digest for k in variants}) == len(variants)
    # settings are canonical: key order does not matter
    assert (
        CellKey(**{**base, "settings": {"a": 1, "b": 2}}).digest
        == CellKey(**{**base, "settings": {"b": 2, "a": 1}}).digest
    )
    with EvalStore(tmp_path / "s.sqlite") as store:
        for i, k in enumerate(variants):
            store.put(k, {"i": i})
        assert [store.get(k) for k in variants] == [{"i": i} for i in range(len(variants))]


def test_first_stored_value_wins(tmp_path):
    with EvalStore(tmp_path / "s.sqlite") as store:
        assert store.put(key(), {"v": 1}) == {"v": 1}
        assert store.put(key(), {"v": 2}) == {"v": 1}


def test_fresh_replaces_and_a_non_finite_measurement_is_returned_unstored(tmp_path):
    with EvalStore(tmp_path / "s.sqlite") as store:
        store.measure(key(), lambda: {"v": 1})
        assert store.measure(key(), lambda: {"v": 2}, fresh=True) == ({"v": 2}, False)
        assert store.get(key()) == {"v": 2} and len(store) == 1
        cell = store.cell(key())
        assert cell is not None and cell.value == {"v": 2} and cell.seconds is not None and cell.seconds >= 0
        nan = {"nll": float("nan"), "rows": [1.0, float("inf")]}
        value, stored = store.measure(key("nll"), lambda: nan)
        assert value is nan and stored is False and key("nll") not in store and store.cell(key("nll")) is None


def test_an_interrupted_measurement_stores_nothing(tmp_path):
    def interrupted():
        raise KeyboardInterrupt

    with EvalStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            store.measure(key(), interrupted)
        assert key() not in store
        assert store.measure(key(), lambda: {"v": 3}) == ({"v": 3}, False)


def test_non_finite_values_and_foreign_files_are_refused(tmp_path):
    with EvalStore(tmp_path / "s.sqlite") as store, pytest.raises(ropekit.RopekitError, match="non-finite"):
        store.put(key(), {"nll": float("nan")})
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("my notes\n" * 100)
    with pytest.raises(ropekit.RopekitError, match="not a usable ropekit evaluation store"):
        EvalStore(not_a_db)
    assert not_a_db.read_text() == "my notes\n" * 100
    with pytest.raises(ropekit.RopekitError, match="must be a file"):
        EvalStore(tmp_path)
    with pytest.raises(ropekit.RopekitError, match="no such directory"):
        EvalStore(tmp_path / "missing" / "s.sqlite")


def test_identical_plans_share_a_fingerprint_whatever_their_method():
    pi = ropekit.make_plan(SPEC, 2048, "pi")
    same = ropekit.make_plan(SPEC, 2048, "longrope", factors=[4.0] * 4, attention_factor=1.0)
    louder = ropekit.make_plan(SPEC, 2048, "longrope", factors=[4.0] * 4, attention_factor=1.1)
    yarn = ropekit.make_plan(SPEC, 2048, "yarn")
    assert plan_fingerprint(pi) == plan_fingerprint(same)
    assert len({plan_fingerprint(p) for p in (pi, louder, yarn)}) == 3
    assert plan_fingerprint(None) == AS_SAVED
    record = plan_record(yarn)
    assert record["method"] == "yarn" and record["factors"] == list(yarn.runtime_factors)
    assert record["attention_factor"] == yarn.attention_factor


def test_model_fingerprint_covers_weights_not_ropekits_own_record(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_fingerprint(model)
    (model / "ropekit.json").write_text("{}")
    (model / "README.md").write_text("notes")
    assert model_fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert model_fingerprint(model) != first
    with EvalStore(tmp_path / "s.sqlite") as store:  # remembered hashes give the same answer
        assert model_fingerprint(model, store) == model_fingerprint(model) == model_fingerprint(model, store)
    with pytest.raises(ropekit.RopekitError, match="no model files"):
        model_fingerprint(_empty_dir(tmp_path))


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_state_fingerprint_sees_weights_but_not_rotary_frequencies():
    model = tiny_llama(64)
    first = state_fingerprint(model)
    plan = ropekit.make_plan(ropekit.apply.patch.model_spec(model), 2048, "pi")
    ropekit.apply_plan(model, plan)
    assert state_fingerprint(model) == first
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert state_fingerprint(model) != first


def test_documents_fingerprint_is_order_and_boundary_sensitive():
    a = documents_fingerprint([[1, 2, 3], [4]])
    assert a == documents_fingerprint([[1, 2, 3], [4]])
    assert a != documents_fingerprint([[1, 2], [3, 4]])
    assert a != documents_fingerprint([[4], [1, 2, 3]])


def _writer(path: str, worker: int, count: int) -> None:
    with EvalStore(path) as store:
        for i in range(count):
            shared = CellKey(model="m", plan=str(i), task="t", settings={})  # both workers write these
            store.measure(shared, lambda i=i: {"i": i})
            own = CellKey(model="m", plan=str(i), task="t", settings={"worker": worker})
            store.put(own, {"i": i, "worker": worker})


@pytest.mark.slow
def test_two_processes_share_one_store_without_corrupting_it(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    EvalStore(path).close()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w, 150)) for w in (0, 1)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0]
    with EvalStore(path) as store:
        assert len(store) == 150 + 2 * 150
        for i in range(150):
            assert store.get(CellKey(model="m", plan=str(i), task="t", settings={})) == {"i": i}
            for w in (0, 1):
                assert store.get(CellKey(model="m", plan=str(i), task="t", settings={"worker": w})) == {
                    "i": i,
                    "worker": w,
                }
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _open_new_stores(paths: list[str], barrier, failures) -> None:
    for path in paths:
        barrier.wait(timeout=60)  # both processes open the same new file at the same moment
        try:
            with EvalStore(path) as store:
                store.put(key(), {"x": 1.0})
        except ropekit.RopekitError as exc:
            failures.put(str(exc))


@pytest.mark.slow
def test_two_processes_creating_one_new_store_at_once_both_open_it(tmp_path):
    # Both connections take a shared lock and then want the exclusive one to switch the new file to
    # WAL: SQLite answers one of them "database is locked" at once, whatever the busy timeout. Before
    # the retry, about 3 in 10 of these races failed; 30 races all passing is then a 1e-4 event.
    paths = [str(tmp_path / f"new{i}.sqlite") for i in range(30)]
    ctx = mp.get_context("spawn")
    barrier, failures = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_open_new_stores, args=(paths, barrier, failures)) for _ in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0]
    assert failures.empty()
    for path in paths:
        with EvalStore(path) as store:
            assert store.get(key()) == {"x": 1.0} and len(store) == 1


def test_a_store_locked_for_longer_than_the_timeout_is_a_clear_error(tmp_path):
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # a rollback-journal file: nobody else may read it now
    try:
        with pytest.raises(ropekit.RopekitError, match="not a usable ropekit evaluation store .*locked"):
            EvalStore(path, timeout_s=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with EvalStore(path) as store:  # once the lock is gone, the same file opens
        assert len(store) == 0
