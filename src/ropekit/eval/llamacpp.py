"""Run a GGUF in the real llama.cpp (llama-cpp-python, the optional extra `ropekit[llamacpp]`).

* `LlamaCppBackend` is `ropekit eval --backend llama.cpp`: the file as saved, or extended on the fly
  by each plan (`ropekit.apply.gguf.write_extended_gguf` into a temporary folder, so llama.cpp
  runs the plan exactly as `ropekit extend X.gguf` writes it). Its `LlamaCppScorer` gives the tasks
  log-probabilities over token ids and greedy generation, through llama.cpp's low-level API.
* `llama_cpp_logits` returns the logits at the positions asked for (float32, shape (K, vocab));
  positions are 0-based token indices and the context is sized to the input. Only the asked-for
  positions are kept, so an 8k-token pass stores K × vocab floats, not 8k × vocab.

The comparison with transformers (`runtime_parity`) is in `ropekit.eval.gguf_parity`.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ropekit.errors import RopekitError
from ropekit.eval.backend import GENERATE, LOGPROBS, Backend, Scorer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ropekit.apply.gguf import GgufRope
    from ropekit.eval.store import EvalStore
    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.scaling import Plan


INSTALL_HINT = "pip install 'ropekit[llamacpp]' (compiles llama.cpp from source; see the README)"
N_BATCH = 512  # tokens per llama_decode call


def require_llama_cpp() -> ModuleType:
    """The `llama_cpp` module, or one clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise RopekitError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return llama_cpp


def _load_model(lib: ModuleType, gguf_path: str | os.PathLike[str]) -> Any:
    """A llama.cpp model for `gguf_path` (CPU, quiet); free it with `lib.llama_model_free`."""
    _silence(lib)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
    if not model:
        raise RopekitError(f"{gguf_path}: llama.cpp could not load this GGUF")
    return model


def _new_context(lib: ModuleType, model: Any, *, n_ctx: int, n_batch: int, n_threads: int | None, where: str) -> Any:
    """A context of `n_ctx` tokens on `model`; free it with `lib.llama_free`."""
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RopekitError(f"{where}: llama.cpp could not create a {n_ctx}-token context")
    return ctx


@contextmanager
def llama_context(
    gguf_path: str | os.PathLike[str], *, n_ctx: int, n_batch: int = N_BATCH, n_threads: int | None = None
) -> Iterator[tuple[ModuleType, Any, Any]]:
    """(llama_cpp module, model, context) for `gguf_path`, freed on exit."""
    lib = require_llama_cpp()
    model = _load_model(lib, gguf_path)
    try:
        ctx = _new_context(lib, model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, where=str(gguf_path))
    except RopekitError:
        lib.llama_model_free(model)
        raise
    try:
        yield lib, model, ctx
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def llama_cpp_logits(
    gguf_path: str | os.PathLike[str],
    ids: Sequence[int],
    positions: Sequence[int],
    *,
    n_batch: int = N_BATCH,
    n_threads: int | None = None,
) -> np.ndarray:
    """llama.cpp's logits for `ids` at `positions` (0-based), float32 of shape (len(positions), vocab)."""
    wanted = sorted(set(int(p) for p in positions))
    if not ids or wanted[0] < 0 or wanted[-1] >= len(ids):
        raise RopekitError(f"positions must lie in 0 … {len(ids) - 1}")
    rows: dict[int, np.ndarray] = {}
    with llama_context(gguf_path, n_ctx=len(ids), n_batch=n_batch, n_threads=n_threads) as (lib, model, ctx):
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        for p, logits in _logits_at(lib, ctx, list(ids), wanted, n_batch=n_batch, vocab=vocab):
            rows[p] = logits.copy()
    return np.stack([rows[int(p)] for p in positions])


def _logits_at(
    lib: ModuleType, ctx: Any, ids: list[int], wanted: Iterable[int], *, n_batch: int, vocab: int, start: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode `ids` at positions start… in batches; yield (position, logits view) for each wanted position.

    A view is valid until the next decode: copy it to keep it."""
    wanted = set(wanted)
    for first in range(0, len(ids), n_batch):
        chunk = ids[first : first + n_batch]
        keep = [p for p in range(start + first, start + first + len(chunk)) if p in wanted]
        _decode(lib, ctx, chunk, start + first, keep)
        for p in keep:
            yield p, np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, p - start - first), shape=(vocab,))


def _decode(lib: ModuleType, ctx: Any, tokens: list[int], start: int, outputs: Iterable[int]) -> None:
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


def _silence(lib: ModuleType) -> None:
    """Route llama.cpp's log lines to nowhere (it prints the model card on every load)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaCppScorer(Scorer):
    """A GGUF in llama.cpp as a `Scorer` (CPU). One model stays loaded; its context is sized to the
    longest input so far and cleared before each pass, so equal windows share one context."""

    backend = "llama.cpp"
    capabilities = frozenset({LOGPROBS, GENERATE})

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        *,
        n_batch: int = N_BATCH,
        n_threads: int | None = None,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.path = str(gguf_path)
        self.n_batch, self.n_threads, self._cleanup = n_batch, n_threads, cleanup
        self._lib = require_llama_cpp()
        self._model = _load_model(self._lib, gguf_path)
        self._vocab = self._lib.llama_vocab_n_tokens(self._lib.llama_model_get_vocab(self._model))
        self._ctx: Any = None
        self._n_ctx = 0

    def _context(self, tokens: int) -> Any:
        """A context of at least `tokens` tokens with nothing in its memory."""
        lib = self._lib
        if self._ctx is not None and self._n_ctx >= tokens:
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            return self._ctx
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        self._ctx = _new_context(
            lib, self._model, n_ctx=tokens, n_batch=self.n_batch, n_threads=self.n_threads, where=self.path
        )
        self._n_ctx = tokens
        return self._ctx

    def token_logprobs(self, ids: Sequence[int] | torch.Tensor, *, score_from: int = 1) -> torch.Tensor:
        window = [int(t) for t in ids]
        ctx = self._context(len(window))
        out = np.zeros(max(len(window) - score_from, 0), dtype=np.float32)
        predicting = range(score_from - 1, len(window) - 1)  # logits at p predict token p + 1
        for p, logits in _logits_at(self._lib, ctx, window, predicting, n_batch=self.n_batch, vocab=self._vocab):
            out[p - score_from + 1] = _log_softmax(logits.astype(np.float64))[window[p + 1]]
        return torch.from_numpy(out)

    def next_token_argmax(self, ids: Sequence[int], *, last: int) -> list[int]:
        tokens = [int(t) for t in ids]
        ctx = self._context(len(tokens))
        wanted = range(len(tokens) - last, len(tokens))
        found = _logits_at(self._lib, ctx, tokens, wanted, n_batch=self.n_batch, vocab=self._vocab)
        return [int(logits.argmax()) for _, logits in found]  # in position order

    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        stop_ids: Sequence[int] = (),
        no_stop_first: bool = False,
    ) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        ctx = self._context(len(prompt) + max_new_tokens)
        logits = None
        for _, view in _logits_at(self._lib, ctx, prompt, [len(prompt) - 1], n_batch=self.n_batch, vocab=self._vocab):
            logits = view.copy()
        generated: list[int] = []
        stops = set(stop_ids)
        while logits is not None and len(generated) < max_new_tokens:
            if no_stop_first and not generated and stops:
                logits[list(stops)] = -np.inf
            token = int(logits.argmax())
            generated.append(token)
            if token in stops or len(generated) == max_new_tokens:
                break
            position = len(prompt) + len(generated) - 1
            step = _logits_at(self._lib, ctx, [token], [position], n_batch=1, vocab=self._vocab, start=position)
            logits = next(step)[1].copy()
        return generated

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


class LlamaCppBackend(Backend):
    """A .gguf in llama.cpp itself (the weights as stored, quantised or not)."""

    name = "llama.cpp"
    capabilities = LlamaCppScorer.capabilities
    dtype = "gguf"  # each tensor's own type (F32, F16, Q4_1, …)

    def __init__(self, source: str) -> None:
        super().__init__(source)
        require_llama_cpp()

    @classmethod
    def check_source(cls, source: str) -> None:
        if not str(source).lower().endswith(".gguf"):
            raise RopekitError("--backend llama.cpp runs a .gguf MODEL")

    @cached_property
    def rope(self) -> GgufRope:
        from ropekit.apply.gguf import read_rope

        return read_rope(self.source)

    @cached_property
    def spec(self) -> RopeSpec:
        return self.rope.spec()

    def read_tokenizer(self) -> PreTrainedTokenizerBase | None:
        from ropekit.apply.gguf_convert import load_gguf_tokenizer

        return load_gguf_tokenizer(self.source)

    @property
    def context_length(self) -> int:
        return int(self.rope.context_length)

    def fingerprint(self, store: EvalStore | None = None) -> str:
        from ropekit.eval.store import model_fingerprint

        return model_fingerprint(self.source, store)

    @property
    def weights(self) -> str:
        return "as stored in the GGUF; a plan is written into a temporary extended copy (ropekit extend's file)"

    def plan(self, method: str, target_length: int, *, bins: int, params: dict[str, Any]) -> Plan:
        """The plan, refused in one line (before any work) where llama.cpp cannot run it on this file."""
        from ropekit.apply.gguf import check_extension

        plan = super().plan(method, target_length, bins=bins, params=params)
        check_extension(self.rope, plan)
        return plan

    def load(self, plan: Plan | None) -> Scorer:
        if plan is None:
            return LlamaCppScorer(self.source)
        from ropekit.apply.gguf import write_extended_gguf

        folder = tempfile.TemporaryDirectory(prefix="ropekit-gguf-")
        try:
            path = write_extended_gguf(self.source, plan, Path(folder.name) / f"{plan.method}.gguf")
            return LlamaCppScorer(path, cleanup=folder.cleanup)
        except BaseException:
            folder.cleanup()
            raise
