"""Plans are measured once through the store: a second request of the same cell runs no forward pass."""

from __future__ import annotations

import numpy as np

import ropekit
from conftest import generated_stories, tiny_llama, trained_tokenizer
from ropekit.choose.measure import Documents, Measurer
from ropekit.eval.passkey import passkey_grid
from ropekit.eval.store import EvalStore, state_fingerprint


def test_window_and_passkey_cells_are_measured_once_and_match_the_eval_functions(tmp_path):
    tokenizer = trained_tokenizer(generated_stories(80))
    model = tiny_llama(len(tokenizer), seed=2)
    spec = ropekit.RopeSpec.from_config(model.config)
    plan = ropekit.make_plan(spec, 1024, "yarn")
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    docs = Documents("tuning", "generated", ("a", "b"), (rng.integers(3, vocab, 700), rng.integers(3, vocab, 650)))
    with EvalStore(tmp_path / "cells.sqlite") as store:
        m = Measurer(model, store, state_fingerprint(model), spec.context_length, bucket=100, tokenizer=tokenizer)
        first = m.window(plan, docs, 600, prefixes=(64,))
        accuracy = m.passkey(plan, length=256, depths=(0.2, 0.8), trials=1, seed=3)
        passes = m.passes
        assert m.window(plan, docs, 600, prefixes=(64,)) == first
        assert m.passkey(plan, length=256, depths=(0.2, 0.8), trials=1, seed=3) == accuracy
        assert m.passes == passes == 2 + 2  # two documents, two passkey trials; nothing more on the second asks
    direct = passkey_grid(
        ropekit.apply_plan(tiny_llama(len(tokenizer), seed=2), plan, route="inv_freq"),
        tokenizer,
        lengths=[256],
        depths=[0.2, 0.8],
        trials=1,
        seed=3,
        scorer="teacher-forced",
        agreement_every=0,
    )
    assert accuracy == np.mean([row["correct"] for row in direct.rows])
    assert first["length"] == 600 and first["trained_length"] == 512 and first["nll_beyond"] > 0
