"""Measure plans on a model, each (plan, documents, window) once, through the evaluation store.

`Measurer.window(plan, docs, length)` is one causal pass per document over its first `length`
tokens (`ropekit.eval.position_nll`): NLL beyond and within the trained length, the
perplexity of the first P tokens (retention), and NLL by position bucket. The result is a
store cell keyed by the model's fingerprint, the plan's fingerprint (its runtime factors and
attention factor, whatever the method is called), the window settings and the token ids, so
a plan proposed twice, or equal to a screened method, or measured by an earlier run or by
another worker sharing the store, is measured once. `passes` counts the forward passes this
process ran.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ropekit.apply.patch import apply
from ropekit.eval.position_nll import position_nll
from ropekit.eval.store import CellKey, EvalStore, documents_fingerprint, plan_fingerprint, plan_record

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ropekit.plan.scaling import Plan

WINDOW_TASK = "position_nll"
PASSKEY_TASK = "passkey_teacher_forced"


@dataclass(frozen=True)
class Documents:
    """Token-id documents of one role (tuning or held-out), with their fingerprint and source."""

    role: str  # "tuning" or "held-out"
    source: str  # the path they were read from
    names: tuple[str, ...]
    ids: tuple[np.ndarray, ...]

    def windows(self, length: int) -> list[Any]:
        """The first `length` tokens of each document."""
        return [doc[:length] for doc in self.ids]

    def fingerprint(self, length: int) -> str:
        return documents_fingerprint(self.windows(length))


@dataclass
class Measurer:
    """A loaded model, its store and fingerprint; measures plans on documents (see the module docstring)."""

    model: PreTrainedModel
    store: EvalStore
    model_key: str  # `model_fingerprint` of the model's files
    trained_length: int
    bucket: int = 256
    tokenizer: PreTrainedTokenizerBase | None = None
    passes: int = 0
    seconds: float = 0.0  # spent in forward passes by this process
    _applied: str | None = field(default=None, repr=False)

    def use(self, plan: Plan) -> PreTrainedModel:
        """The model running `plan` (its rotary buffers set directly; nothing else changes)."""
        key = plan_fingerprint(plan)
        if key != self._applied:
            apply(self.model, plan, route="inv_freq")
            self._applied = key
        return self.model

    def window_key(self, plan: Plan, docs: Documents, length: int, prefixes: Sequence[int]) -> CellKey:
        settings = {
            "length": length,
            "trained_length": self.trained_length,
            "bucket": self.bucket,
            "prefixes": sorted(int(p) for p in prefixes),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }
        return CellKey(self.model_key, plan_fingerprint(plan), WINDOW_TASK, settings, docs.fingerprint(length))

    def has_window(self, plan: Plan, docs: Documents, length: int, prefixes: Sequence[int]) -> bool:
        return self.window_key(plan, docs, length, prefixes) in self.store

    def window(self, plan: Plan, docs: Documents, length: int, *, prefixes: Sequence[int]) -> dict[str, Any]:
        """`PositionNLL.as_dict()` of `plan` over the first `length` tokens of every document, stored once."""
        key = self.window_key(plan, docs, length, prefixes)

        def compute() -> dict[str, Any]:
            model = self.use(plan)
            self._count(len(docs.ids))
            started = time.perf_counter()
            result = position_nll(
                model,
                docs.windows(length),
                length=length,
                trained_length=self.trained_length,
                bucket=self.bucket,
                prefixes=tuple(prefixes),
            ).as_dict()
            self.seconds += time.perf_counter() - started
            return result

        value, _ = self.store.measure(key, compute, plan_record=plan_record(plan))
        return dict(value)

    def passkey(self, plan: Plan, *, length: int, depths: Sequence[float], trials: int, seed: int) -> float:
        """Teacher-forced passkey accuracy of `plan` at `length` tokens (`ropekit.eval.passkey`), stored once."""
        from ropekit.eval.passkey import passkey_grid

        tokenizer = self.tokenizer
        if tokenizer is None:
            raise RuntimeError("passkey needs the model's tokenizer")
        settings = {"length": length, "depths": [float(d) for d in depths], "trials": trials, "seed": seed}
        key = CellKey(self.model_key, plan_fingerprint(plan), PASSKEY_TASK, settings, "")

        def compute() -> dict[str, Any]:
            model = self.use(plan)
            self._count(len(depths) * trials)
            started = time.perf_counter()
            r = passkey_grid(
                model,
                tokenizer,
                lengths=[length],
                depths=list(depths),
                trials=trials,
                seed=seed,
                scorer="teacher-forced",
                agreement_every=0,
            )
            self.seconds += time.perf_counter() - started
            return {"accuracy": float(np.mean([row["correct"] for row in r.rows])), "trials": len(r.rows)}

        value, _ = self.store.measure(key, compute, plan_record=plan_record(plan))
        return float(value["accuracy"])

    def _count(self, passes: int) -> None:
        self.passes += passes
