"""`ropekit.eval.gguf_parity`: the transformers side of the llama.cpp check, run in chunks with a KV cache,
must give the logits of one plain forward pass (sliding-window layers included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ropekit.eval.gguf_parity import chunked_logits, transformers_logits


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [lambda: tiny_llama(97, seed=2), tiny_gemma3], ids=["llama", "gemma3-sliding"])
def test_chunked_logits_equal_one_forward_pass(make):
    model = make()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = [0, 31, 32, 100, 255, 299]
    whole = transformers_logits(model, ids, positions)
    chunked = chunked_logits(model, ids, positions, chunk=64)
    assert np.abs(whole - chunked).max() < 1e-5
