"""Backends: what an evaluation task may ask of a model, whatever runs it.

Two levels:

* a **`Backend`** is one model as a runtime sees it before any weights load: its RoPE geometry
  (what plans start from), tokenizer, trained and saved context, and fingerprint (the model part
  of every stored cell's key). `load(plan)` loads the weights with a plan applied.
* a **`Scorer`** is that model under one plan: log-probabilities over token ids, next-token
  argmax at the last positions, and greedy generation. `capabilities` says which of these a
  backend gives, so a task that needs more is refused before any work.

`TransformersBackend` (the reference) is defined here; `ropekit.eval.llamacpp.LlamaCppBackend`
runs a GGUF in llama.cpp itself. Log-probabilities are natural logs, float32, on the CPU; token
positions are 0-based indices into the ids given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ropekit.eval.store import EvalStore
    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.scaling import Plan

LOGPROBS = "logprobs"  # token_logprobs and next_token_argmax
GENERATE = "generate"  # generate_greedy
TRANSFORMERS = "transformers"  # Scorer.model: a transformers model, for protocols written against one


# ---- the transformers primitives ----------------------------------------------------------------


def final_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on hidden states, float32, with the model's logit soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel, ids: torch.Tensor, *, score_from: int = 1, loss_chunk: int = 512
) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = score_from … T−1 (window-relative), float32, shape (T − score_from,).

    ids: (T,) token ids of one window. The decoder runs once; the LM head runs on `loss_chunk`
    positions at a time, so full-length logits (T × vocab) are never materialised.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)[None]  # (1, T)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # (1, T, H)
    parts = []
    for a in range(score_from - 1, ids.shape[1] - 1, loss_chunk):
        b = min(a + loss_chunk, ids.shape[1] - 1)
        logits = final_logits(model, hidden[:, a:b])  # (1, b−a, V) float32
        targets = ids[:, a + 1 : b + 1]
        parts.append(-F.cross_entropy(logits[0], targets[0], reduction="none"))
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    no_stop_first: bool = False,
) -> list[int]:
    """Greedy continuation with the model's KV cache, as `model.generate(do_sample=False)`.

    Stops after emitting a token in `stop_ids` (that token is returned, as generate returns
    the EOS). `no_stop_first`: the first token may not be a stop token (its logits are masked,
    as generate's `min_length = prompt + 1` does).
    """
    ids = torch.tensor([list(prompt_ids)], device=_device(model))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    stops = set(stop_ids)
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1]
        if no_stop_first and not generated and stops:
            logits = logits.clone()
            logits[list(stops)] = -float("inf")
        token = int(logits.argmax())
        generated.append(token)
        if token in stops or len(generated) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=ids.device)
        out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return generated


# ---- the interface --------------------------------------------------------------------------------


class Scorer(ABC):
    """One model under one plan, as tasks use it (see the module docstring)."""

    backend: ClassVar[str]  # the backend's name, e.g. "transformers"
    capabilities: ClassVar[frozenset[str]]  # of LOGPROBS, GENERATE, TRANSFORMERS

    @abstractmethod
    def token_logprobs(self, ids: Sequence[int] | torch.Tensor, *, score_from: int = 1) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t = score_from … T−1, float32 on the CPU, shape (T − score_from,)."""

    @abstractmethod
    def next_token_argmax(self, ids: Sequence[int], *, last: int) -> list[int]:
        """The argmax next token after each of the last `last` positions of `ids` (one pass)."""

    @abstractmethod
    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        stop_ids: Sequence[int] = (),
        no_stop_first: bool = False,
    ) -> list[int]:
        """Greedy continuation of `prompt_ids`, as `generate_greedy` (stop token included, at most max_new_tokens)."""

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model, for protocols written against one (capability TRANSFORMERS)."""
        raise RopekitError(f"the {self.backend} backend runs no transformers model; use --backend transformers")

    def close(self) -> None:  # noqa: B027 (a hook: nothing to free by default)
        """Free what the scorer holds (weights, contexts, temporary files)."""


class TransformersScorer(Scorer):
    """A transformers causal LM (or any module with its call signature) as a `Scorer`."""

    backend = "transformers"
    capabilities = frozenset({LOGPROBS, GENERATE, TRANSFORMERS})

    def __init__(self, model: torch.nn.Module, *, loss_chunk: int = 512) -> None:
        self._model = model
        self.loss_chunk = loss_chunk

    @property
    def model(self) -> PreTrainedModel:
        return self._model  # type: ignore[return-value]  # any module with the causal-LM call signature

    def token_logprobs(self, ids: Sequence[int] | torch.Tensor, *, score_from: int = 1) -> torch.Tensor:
        window = torch.as_tensor(ids, dtype=torch.long)
        return token_logprobs(self.model, window, score_from=score_from, loss_chunk=self.loss_chunk)

    @torch.no_grad()
    def next_token_argmax(self, ids: Sequence[int], *, last: int) -> list[int]:
        batch = torch.tensor([list(ids)], device=_device(self._model))
        logits = self._model(input_ids=batch, logits_to_keep=last).logits[0]  # (last, V)
        return [int(t) for t in logits.argmax(-1).cpu()]

    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        stop_ids: Sequence[int] = (),
        no_stop_first: bool = False,
    ) -> list[int]:
        return generate_greedy(self._model, prompt_ids, max_new_tokens, stop_ids=stop_ids, no_stop_first=no_stop_first)


def as_scorer(model: Scorer | torch.nn.Module, *, loss_chunk: int = 512) -> Scorer:
    """A `Scorer` as given, or a transformers model wrapped as one (the eval functions take either)."""
    return model if isinstance(model, Scorer) else TransformersScorer(model, loss_chunk=loss_chunk)


class Backend(ABC):
    """One model as a runtime sees it before its weights load (see the module docstring).

    `source` is what the user named (a directory, hub id or .gguf file). Everything here reads
    configuration only; `load` is the one place weights are read.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]
    dtype: str = "float32"  # of the computation, recorded in every cell's settings
    device: str = "cpu"

    def __init__(self, source: str) -> None:
        self.check_source(source)
        self.source = str(source)

    @classmethod  # noqa: B027 (a hook: any source by default)
    def check_source(cls, source: str) -> None:
        """Refuse, before anything is read, a model this backend cannot run (e.g. not a .gguf for llama.cpp)."""

    @property
    @abstractmethod
    def spec(self) -> RopeSpec:
        """The geometry plans start from (the model as saved)."""

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (a RopekitError when it has none)."""
        tokenizer = self.read_tokenizer()
        if tokenizer is None:
            raise RopekitError(f"{self.source}: no tokenizer found for this model")
        return tokenizer

    @abstractmethod
    def read_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer as its files give it, or None when they hold none."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The context the saved model runs at: the longest length it may be evaluated at without a plan."""

    @property
    def trained_length(self) -> int | None:
        """The context the model was trained at (its spec's context_length), or None when unknown."""
        try:
            return self.spec.context_length
        except RopekitError:
            return None

    @abstractmethod
    def fingerprint(self, store: EvalStore | None = None) -> str:
        """The model part of every cell key: sha256 of the weights and configuration."""

    def settings(self) -> dict[str, Any]:
        """What every cell measured on this backend depends on besides model, plan, task and documents."""
        return {"backend": self.name, "dtype": self.dtype, "device": self.device}

    def plan(self, method: str, target_length: int, *, bins: int, params: dict[str, Any]) -> Plan:
        """The plan `method` makes for this model at `target_length` (from the spec, no weights)."""
        from ropekit.plan.registry import plan as make_plan

        return make_plan(self.spec, target_length, method, bins=bins, **params)

    @abstractmethod
    def load(self, plan: Plan | None) -> Scorer:
        """The weights, with `plan` applied (None: as saved). The caller closes the scorer."""

    def describe(self) -> dict[str, Any]:
        """What results.json records of the backend (the same keys for every backend)."""
        return {"name": self.name, "model": self.source, "dtype": self.dtype, "weights": self.weights}

    @property
    def weights(self) -> str:
        """Where the weights that run come from."""
        return "as saved"


class TransformersBackend(Backend):
    """transformers, SDPA attention, on `device` in `dtype` (default float32 on the CPU). A `.gguf` source is
    dequantised once into ropekit's cache (`ropekit.apply.gguf_convert.converted_dir`) and that directory is
    the model.

    By default each plan gets freshly loaded weights with the plan applied through the model's config (as
    `ropekit extend` saves it). `reuse_weights=True` loads the weights once and applies each plan by
    overwriting the rotary frequencies (`apply(..., route="inv_freq")`): for many plans on one model, as a
    search measures them. Other dtypes than float32 keep the rotary `inv_freq` in float32 (bfloat16 would
    round θ'_i by up to 0.4%). `warmup_tokens`: one untimed pass of that many tokens after loading, so no
    measured cell pays the first pass's one-time costs.
    """

    name = "transformers"
    capabilities = TransformersScorer.capabilities

    def __init__(
        self,
        source: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        reuse_weights: bool = False,
        warmup_tokens: int = 0,
    ) -> None:
        super().__init__(source)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise RopekitError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype, self.device = dtype, device
        self.reuse_weights, self.warmup_tokens = reuse_weights, warmup_tokens
        self._weights: PreTrainedModel | None = None  # kept when reuse_weights

    @cached_property
    def directory(self) -> str:
        """The transformers model directory (or hub id) the weights load from."""
        if self.source.lower().endswith(".gguf"):
            from ropekit.apply.gguf_convert import converted_dir

            return str(converted_dir(self.source))
        return self.source

    @cached_property
    def spec(self) -> RopeSpec:
        from ropekit.plan.geometry import RopeSpec

        return RopeSpec.from_pretrained(self.directory)

    def read_tokenizer(self) -> PreTrainedTokenizerBase | None:
        from ropekit.apply.extend import load_tokenizer

        return load_tokenizer(self.directory)

    @property
    def context_length(self) -> int:
        if self.source.lower().endswith(".gguf"):
            from ropekit.apply.gguf import read_rope

            return int(read_rope(self.source).context_length)
        from ropekit.apply.readers import load_config_dict

        return int(load_config_dict(self.source).get("max_position_embeddings") or 0)

    def fingerprint(self, store: EvalStore | None = None) -> str:
        from ropekit.eval.store import model_fingerprint, state_fingerprint

        if Path(self.source).exists():  # the file (a GGUF is converted deterministically) or directory
            return model_fingerprint(self.source, store)
        return state_fingerprint(self._load_model())  # a hub id: the weights themselves

    def settings(self) -> dict[str, Any]:
        # the two routes give the same frequencies up to float32 rounding (see `ropekit.apply_plan`): kept apart
        return {**super().settings(), "route": "inv_freq" if self.reuse_weights else "config"}

    def _load_model(self) -> PreTrainedModel:
        """The weights as saved, float32 on the CPU (a subclass may read them otherwise)."""
        from ropekit.apply.extend import load_model

        return load_model(self.directory, dtype="float32")

    def _ready(self, model: PreTrainedModel) -> PreTrainedModel:
        """`model` on the device in the dtype (rotary frequencies kept float32), warmed up."""
        torch.nn.Module.to(model, self.device)  # in place (transformers' wrapper of `to` confuses the types)
        if self.dtype != "float32":
            model = cast_keeping_rotary_float32(model, getattr(torch, self.dtype))
        if self.warmup_tokens:
            with torch.no_grad():
                model(input_ids=torch.arange(self.warmup_tokens, device=self.device)[None])
        return model

    def load(self, plan: Plan | None) -> Scorer:
        from ropekit.apply.patch import apply

        if self.reuse_weights and plan is not None:
            if self._weights is None:
                self._weights = self._ready(self._load_model())
            return TransformersScorer(apply(self._weights, plan, route="inv_freq"))
        model = self._load_model()
        return TransformersScorer(self._ready(model if plan is None else apply(model, plan)))

    @property
    def weights(self) -> str:
        if self.source.lower().endswith(".gguf"):
            return f"the GGUF dequantised to float32 in {self.directory}"
        return "as saved"


def cast_keeping_rotary_float32(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`model` cast to `dtype` in place, its rotary `inv_freq` buffers kept float32 with their exact values.

    `Module.to(bfloat16)` rounds inv_freq to 8 mantissa bits (θ'_i wrong by up to 0.4%); transformers
    computes cos/sin in float32 from it, so keeping it float32 keeps the plan exact.
    """
    from ropekit.apply.patch import rotary_modules

    kept = [
        (module, name, buffer.detach().clone())
        for _, _, module in rotary_modules(model)
        for name in ("inv_freq", "original_inv_freq")
        if isinstance(buffer := getattr(module, name, None), torch.Tensor)
    ]
    torch.nn.Module.to(model, dtype)  # in place
    for module, name, buffer in kept:
        module.register_buffer(name, buffer, persistent=False)
    return model
