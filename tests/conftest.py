"""Shared test helpers: where the shared assets live, and how a missing one is handled.

Outside CI a test that needs ../shared/assets skips with a clear message; under CI=true a
missing asset fails the run (CI always has them, so a skip would hide a broken path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("ROPEKIT_SHARED", REPO.parent / "shared")) / "assets"


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Point ropekit's user cache (tokenisation, GGUF conversions) at a folder of this test session."""
    previous = os.environ.get("ROPEKIT_CACHE")
    os.environ["ROPEKIT_CACHE"] = str(tmp_path_factory.mktemp("ropekit-cache"))
    yield
    if previous is None:
        os.environ.pop("ROPEKIT_CACHE", None)
    else:
        os.environ["ROPEKIT_CACHE"] = previous


def require_asset(relative: str) -> Path:
    path = SHARED_ASSETS / relative
    if not path.exists():
        message = f"shared asset {path} is missing (expected ../shared/assets beside the repository)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def tiny_llama(vocab_size: int, *, seed: int = 0):
    """A small random LlamaForCausalLM (2 layers, hidden 64) for protocol tests."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()
