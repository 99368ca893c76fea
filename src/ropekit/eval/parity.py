"""Does llama.cpp run the plan? Logits of llama.cpp against transformers on the same weights.

`runtime_parity` compares llama.cpp on an extended GGUF with transformers + the plan on the same
(dequantised) weights, beside two references: the unextended GGUF (what losing the plan looks
like) and the two runtimes on identical math inside the trained window (the noise floor:
quantised activations and kernels). `bench/llamacpp_parity.py` and the slow SmolLM2 test run it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ropekit.eval.llamacpp import llama_cpp_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ropekit.plan.scaling import Plan


def transformers_logits(model: PreTrainedModel, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """A transformers causal LM's logits for `ids` at `positions`, float32 (len(positions), vocab).

    Runs the decoder once over all ids and applies the output head only at `positions`."""
    import torch

    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0]  # (T, hidden)
        return model.lm_head(hidden[list(positions)]).float().numpy()


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float | int]:
    """Top-1 agreement (fraction of positions with the same argmax) and |Δlogit| mean and max."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    return {
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit_diff": float(diff.max()),
        "positions": int(logits.shape[0]),
    }


def runtime_parity(
    original_gguf: str | os.PathLike[str],
    extended_gguf: str | os.PathLike[str],
    plan: Plan,
    model_dir: str | os.PathLike[str],
    ids: Sequence[int],
    *,
    compare_last: int = 256,
    noise_window: int = 1024,
    n_threads: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Does llama.cpp run the plan? Logits at the last `compare_last` positions of `ids`:

    - `extended_vs_plan`: llama.cpp on the extended GGUF vs transformers + `plan` on the same
      (dequantised) weights in `model_dir` — the check itself;
    - `unextended_vs_plan`: llama.cpp on the original GGUF vs the same reference — what losing the
      plan looks like;
    - `noise_floor`: llama.cpp vs transformers on the original model inside the trained window
      (`noise_window` tokens): identical math, so what is left is quantised activations and kernels.
    """
    from ropekit.apply.extend import load_model
    from ropekit.apply.patch import apply

    ids = list(ids)
    positions = list(range(len(ids) - compare_last, len(ids)))
    short, short_positions = ids[:noise_window], list(range(noise_window - compare_last, noise_window))
    model = load_model(str(model_dir), dtype="float32")
    floor_reference = transformers_logits(model, short, short_positions)
    reference = transformers_logits(apply(model, plan), ids, positions)
    return {
        "extended_vs_plan": agreement(llama_cpp_logits(extended_gguf, ids, positions, n_threads=n_threads), reference),
        "unextended_vs_plan": agreement(
            llama_cpp_logits(original_gguf, ids, positions, n_threads=n_threads), reference
        ),
        "noise_floor": agreement(
            llama_cpp_logits(original_gguf, short, short_positions, n_threads=n_threads), floor_reference
        ),
    }
