"""RoPE geometry of well-known models, copied from their public `config.json` files.

Each entry records where its numbers come from. `length` is the context the
model was pre-trained at (for Llama 3.1 that is the `original_max_position_embeddings`
of its shipped llama3 block, not the already-extended 131072).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One model's RoPE figures (plain numbers: `RopeSpec.from_preset(name)` builds the spec)."""

    name: str
    source: str  # hub id whose config.json the figures are from
    head_dim: int
    base: float
    length: int  # pre-training context, tokens
    partial_rotary_factor: float = 1.0
    note: str = ""  # anything a user should know before extending it


def _preset(
    name: str, source: str, *, head_dim: int, base: float, length: int, prf: float = 1.0, note: str = ""
) -> Preset:
    return Preset(name, source, head_dim, base, length, prf, note)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset("llama2-7b", "meta-llama/Llama-2-7b-hf", head_dim=128, base=10000.0, length=4096),
        _preset("llama2-13b", "meta-llama/Llama-2-13b-hf", head_dim=128, base=10000.0, length=4096),
        _preset("llama2-70b", "meta-llama/Llama-2-70b-hf", head_dim=128, base=10000.0, length=4096),
        _preset("llama3-8b", "meta-llama/Meta-Llama-3-8B", head_dim=128, base=500000.0, length=8192),
        _preset(
            "llama3.1-8b",
            "meta-llama/Llama-3.1-8B",
            head_dim=128,
            base=500000.0,
            length=8192,
            note="plain RoPE at its 8192 pre-training length (the pre-3.1 view); the shipped model runs llama3 scaling "
            "(factor 8) to 131072: plan with --model on its config.json to start from those frequencies",
        ),
        _preset(
            "mistral-7b-v0.1",
            "mistralai/Mistral-7B-v0.1",
            head_dim=128,
            base=10000.0,
            length=32768,
            note="config max_position_embeddings is 32768 with a 4096 sliding window; the paper trained at 8k",
        ),
        _preset(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B-Instruct",
            head_dim=128,
            base=1000000.0,
            length=32768,
            note="the model card extends 32768 → 131072 with YaRN factor 4",
        ),
        _preset("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", head_dim=96, base=10000.0, length=4096),
        _preset("gemma-7b", "google/gemma-7b", head_dim=256, base=10000.0, length=8192),
        _preset("pythia-1.4b", "EleutherAI/pythia-1.4b", head_dim=128, base=10000.0, length=2048, prf=0.25),
        _preset("phi-2", "microsoft/phi-2", head_dim=80, base=10000.0, length=2048, prf=0.4),
        _preset(
            "stories260k",
            "karpathy/tinyllamas stories260K",
            head_dim=8,
            base=10000.0,
            length=512,
            note="llama2.c toy model: only 4 rotary pairs",
        ),
    ]
}
