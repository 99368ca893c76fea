"""Does llama.cpp run a plan? An extended GGUF in llama.cpp against transformers + the same plan.

`runtime_parity` compares logits at the last `compare_last` positions of one token sequence:

- `extended_vs_plan`: llama.cpp on the extended GGUF vs transformers + `plan` on the same (dequantised)
  weights: the check itself;
- `unextended_vs_plan`: llama.cpp on the original GGUF vs the same reference: what losing the plan
  looks like;
- `noise_floor`: llama.cpp vs transformers on the original model inside the trained window
  (`noise_window` tokens): identical math, so what is left is quantised activations and kernels.

The transformers side runs in chunks with a KV cache (`chunked_logits`), so a 33k-token Gemma 3 pass
needs memory for one chunk's attention and its sliding-window layers attend over their window only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ropekit.eval.llamacpp import llama_cpp_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ropekit.plan.scaling import Plan


def transformers_logits(model: PreTrainedModel, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """A transformers causal LM's logits for `ids` at `positions`, float32 (len(positions), vocab): the
    decoder once over all ids, the output head only at `positions` (the reference `chunked_logits` matches)."""
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


def chunked_logits(
    model: PreTrainedModel, ids: Sequence[int], positions: Sequence[int], *, chunk: int = 2048
) -> np.ndarray:
    """A causal LM's logits at `positions` (0-based), float32 (len(positions), vocab): the decoder runs over
    `ids` in chunks of `chunk` tokens with a KV cache, and the output head only at `positions`."""
    import torch
    from transformers import DynamicCache

    wanted = sorted(set(int(p) for p in positions))
    rows: dict[int, np.ndarray] = {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            part = list(ids[start : start + chunk])
            hidden = model.model(input_ids=torch.tensor([part]), past_key_values=cache, use_cache=True)
            keep = [p for p in wanted if start <= p < start + len(part)]
            if keep:
                state = hidden.last_hidden_state[0, [p - start for p in keep]]  # (K, hidden)
                for p, row in zip(keep, model.lm_head(state).float().numpy()):
                    rows[p] = row
    return np.stack([rows[int(p)] for p in positions])


def runtime_parity(
    original_gguf: str | os.PathLike[str],
    extended_gguf: str | os.PathLike[str],
    plan: Plan,
    model_dir: str | os.PathLike[str],
    ids: Sequence[int],
    *,
    compare_last: int = 256,
    noise_window: int = 1024,
    chunk: int = 2048,
    n_threads: int | None = None,
    progress: Callable[[str], object] | None = None,
) -> dict[str, dict[str, float | int]]:
    """The three comparisons of the module docstring, each an `agreement` (top-1, mean and max |Δlogit|)."""
    from ropekit.apply.extend import load_model
    from ropekit.apply.patch import apply

    say: Callable[[str], object] = progress or (lambda message: None)
    ids = list(ids)
    positions = list(range(len(ids) - compare_last, len(ids)))
    short, short_positions = ids[:noise_window], list(range(noise_window - compare_last, noise_window))
    model = load_model(str(model_dir), dtype="float32")
    say(f"transformers, no plan, {noise_window} tokens")
    floor_reference = chunked_logits(model, short, short_positions, chunk=chunk)
    say(f"transformers + {plan.method}, {len(ids)} tokens")
    reference = chunked_logits(apply(model, plan), ids, positions, chunk=chunk)
    out: dict[str, dict[str, float | int]] = {}
    for key, path, tokens, where, ref in (
        ("extended_vs_plan", extended_gguf, ids, positions, reference),
        ("unextended_vs_plan", original_gguf, ids, positions, reference),
        ("noise_floor", original_gguf, short, short_positions, floor_reference),
    ):
        say(f"llama.cpp, {key}, {len(tokens)} tokens")
        out[key] = agreement(llama_cpp_logits(path, tokens, where, n_threads=n_threads), ref)
    return out
