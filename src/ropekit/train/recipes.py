"""Named recipes: the distributional paper's LLaMA-2 fine-tuning (Wu et al. 2024, §5):
PG19, AdamW lr 2e-5, no warmup, no weight decay, global batch 64, ZeRO-3;
1000 steps at 8k, 500 steps at 16k. Explicit flags override a recipe's values."""

from __future__ import annotations

from ropekit.errors import did_you_mean

_PAPER = dict(method="dprope", global_batch=64, lr=2e-5, warmup_steps=0, weight_decay=0.0, gradient_checkpointing=True)

RECIPES: dict[str, dict] = {
    "dprope-llama2-8k": {**_PAPER, "target_length": 8192, "steps": 1000},
    "dprope-llama2-16k": {**_PAPER, "target_length": 16384, "steps": 500},
}


def get_recipe(name: str) -> dict:
    if name not in RECIPES:
        raise did_you_mean("recipe", name, RECIPES)
    return dict(RECIPES[name])
