"""Run a GGUF in the real llama.cpp (llama-cpp-python, the optional extra `ropekit[llamacpp]`).

`llama_cpp_logits` feeds token ids to llama.cpp's low-level API in batches and returns the
logits at the positions asked for (float32, shape (K, vocab)); positions are 0-based token
indices, and the context is sized to the input. Only the asked-for positions are kept, so an
8k-token pass stores K × vocab floats, not 8k × vocab. `llama_cpp_perplexity` scores documents
with the same windows and conventions as `ropekit.eval.perplexity`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


INSTALL_HINT = "pip install 'ropekit[llamacpp]' (compiles llama.cpp from source; see the README)"


def require_llama_cpp():
    """The `llama_cpp` module, or one clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise RopekitError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return llama_cpp


@contextmanager
def llama_context(gguf_path: str | os.PathLike, *, n_ctx: int, n_batch: int = 512, n_threads: int | None = None):
    """A llama.cpp model and context for `gguf_path` (CPU, quiet), freed on exit."""
    lib = require_llama_cpp()
    _silence(lib)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
    if not model:
        raise RopekitError(f"{gguf_path}: llama.cpp could not load this GGUF")
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        lib.llama_model_free(model)
        raise RopekitError(f"{gguf_path}: llama.cpp could not create a {n_ctx}-token context")
    try:
        yield lib, model, ctx
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def llama_cpp_logits(
    gguf_path: str | os.PathLike,
    ids: Sequence[int],
    positions: Sequence[int],
    *,
    n_batch: int = 512,
    n_threads: int | None = None,
) -> np.ndarray:
    """llama.cpp's logits for `ids` at `positions` (0-based), float32 of shape (len(positions), vocab)."""
    wanted = sorted(set(int(p) for p in positions))
    if not ids or wanted[0] < 0 or wanted[-1] >= len(ids):
        raise RopekitError(f"positions must lie in 0 … {len(ids) - 1}")
    rows: dict[int, np.ndarray] = {}
    with llama_context(gguf_path, n_ctx=len(ids), n_batch=n_batch, n_threads=n_threads) as (lib, model, ctx):
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        for start in range(0, len(ids), n_batch):
            chunk = list(ids[start : start + n_batch])
            keep = [p for p in wanted if start <= p < start + len(chunk)]
            _decode(lib, ctx, chunk, start, keep)
            for p in keep:
                ptr = lib.llama_get_logits_ith(ctx, p - start)
                rows[p] = np.ctypeslib.as_array(ptr, shape=(vocab,)).copy()
    return np.stack([rows[int(p)] for p in positions])


def llama_cpp_perplexity(
    gguf_path: str | os.PathLike,
    documents: Sequence[Any],  # token-id sequences: lists of ints or 1-D integer arrays
    *,
    length: int,
    convention: str = "strided",
    stride: int = 256,
    n_batch: int = 512,
    n_threads: int | None = None,
):
    """Token-weighted perplexity in llama.cpp with the windows of `ropekit.eval.perplexity.windows`
    (same conventions, same scored tokens as the transformers backend); a `PerplexityResult`."""
    from ropekit.eval.perplexity import PerplexityResult, scored_windows

    plan = scored_windows(documents, length, convention=convention, stride=stride)
    nll, count = 0.0, 0
    with llama_context(gguf_path, n_ctx=length, n_batch=n_batch, n_threads=n_threads) as (lib, model, ctx):
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        memory = lib.llama_get_memory(ctx)
        for d, w in plan:
            window = [int(t) for t in documents[d][w.start : w.end]]
            first = w.score_from - w.start - 1  # window index of the first logit that is scored
            lib.llama_memory_clear(memory, True)
            for start in range(0, len(window), n_batch):
                chunk = window[start : start + n_batch]
                outputs = [i for i in range(start, start + len(chunk)) if first <= i < len(window) - 1]
                _decode(lib, ctx, chunk, start, outputs)
                for i in outputs:
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i - start), shape=(vocab,))
                    nll -= float(_log_softmax(logits.astype(np.float64))[window[i + 1]])
                count += len(outputs)
    return PerplexityResult.from_sums(
        nll, count, windows=len(plan), documents=len(documents), length=length, stride=stride, convention=convention
    )


def _decode(lib, ctx, tokens: list[int], start: int, outputs) -> None:
    """One llama_decode of `tokens` at positions start…, sequence 0, logits only at `outputs`."""
    outputs = set(outputs)
    batch = lib.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = (start + i) in outputs
        batch.n_tokens = len(tokens)
        code = lib.llama_decode(ctx, batch)
        if code != 0:
            raise RopekitError(f"llama.cpp failed to decode tokens {start}…{start + len(tokens) - 1} (code {code})")
    finally:
        lib.llama_batch_free(batch)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


_LOG_CALLBACK = None


def _silence(lib) -> None:
    """Route llama.cpp's log lines to nowhere (it prints the model card on every load)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def transformers_logits(model: PreTrainedModel, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """A transformers causal LM's logits for `ids` at `positions`, float32 (len(positions), vocab).

    Runs the decoder once over all ids and applies the output head only at `positions`."""
    import torch

    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0]  # (T, hidden)
        return model.lm_head(hidden[list(positions)]).float().numpy()


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (fraction of positions with the same argmax) and |Δlogit| mean and max."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    return {
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit_diff": float(diff.max()),
        "positions": int(logits.shape[0]),
    }


def evaluate_llama_cpp(cfg, limit: int) -> dict:
    """`ropekit eval X.gguf --backend llama.cpp --tasks ppl`: perplexity in llama.cpp, the file as saved or
    extended on the fly by each `--method` to `limit` tokens (an extended GGUF in a temporary directory);
    the same report files as the transformers backend."""
    import tempfile
    from dataclasses import asdict

    from ropekit._version import __version__
    from ropekit.apply.gguf import extend_gguf
    from ropekit.apply.gguf_convert import load_gguf_tokenizer
    from ropekit.data.documents import read_documents, tokenize_documents
    from ropekit.eval.runner import AS_SAVED, _jsonable, plan_entry, write_report

    require_llama_cpp()
    tokenizer = load_gguf_tokenizer(cfg.model)
    if tokenizer is None:
        raise RopekitError(f"{cfg.model}: transformers cannot read this GGUF's tokenizer")
    documents = tokenize_documents(read_documents(cfg.data), tokenizer)
    documents = [doc[: cfg.max_tokens] for doc in documents] if cfg.max_tokens else documents
    results: dict = {"ropekit_version": __version__, "config": _jsonable(asdict(cfg)), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="ropekit-gguf-") as tmp:
        for method in cfg.methods or [AS_SAVED]:
            path, entry = cfg.model, {}
            if method != AS_SAVED:
                path = f"{tmp}/{method}.gguf"
                params = cfg.method_params.get(method, {})
                plan = extend_gguf(cfg.model, path, target_length=limit, method=method, bins=cfg.bins, **params)
                entry["plan"] = plan_entry(plan, cfg.bins)
            entry["ppl"] = {
                str(n): llama_cpp_perplexity(
                    path, documents, length=n, convention=cfg.convention, stride=min(cfg.stride, n)
                ).as_dict()
                for n in cfg.lengths
            }
            results["methods"][method] = entry
    if cfg.out is not None:
        write_report(results, cfg.out)
    return results
