"""RoPE geometry of a model: what every scaling method is a function of.

Conventions (see docs/rope-methods.md in the shared reference):
    rotary_dim d = int(head_dim * partial_rotary_factor)   (as transformers computes it)
    pairs i = 0 … d/2 − 1, rotate-half pairing as in transformers
    inv_freq θ_i = 1 / base**(2i/d)   [rad/token], float32, computed exactly as
        transformers' ``1.0 / (base ** (torch.arange(0, d, 2).float() / d))``
    wavelength λ_i = 2π / θ_i          [tokens]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ropekit.domains import Domain
from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.presets import PRESETS

MAX_LENGTH = 1 << 22  # 4,194,304 tokens (LongRoPE's 2048k fits): disturbance costs O(L' · d/2), ~1 min per method
# The valid ranges of the geometry's numbers; the CLI's --help states them (ropekit.cli.options).
HEAD_DIM = Domain(2, 1024, integer=True, why="memory: the histograms hold d/2 × K counts; released models use ≤ 512")
ROPE_THETA = Domain(1, 1e12, low_open=True, why="beyond 1e12 the float32 frequencies underflow")
CONTEXT_LENGTH = Domain(1, MAX_LENGTH, integer=True, why="2^22 tokens, ropekit's bound on lengths")
TARGET_LENGTH = Domain(2, MAX_LENGTH, integer=True, why="2^22 tokens; planning cost grows with the length")
PARTIAL_ROTARY_FACTOR = Domain(0, 1, low_open=True)


@dataclass(frozen=True, init=False)
class RopeSpec:
    """The RoPE geometry of one attention head, and the two lengths that matter for extending it.

    `context_length` L is the context the spec's frequencies run at: every method scales from it
    (s = L'/L) and the disturbance compares against angles over 0 … L−1. `pretrained_length` L_0 is
    the context of pre-training, before any scaling block; exports write it as
    `original_max_position_embeddings`. For plain RoPE they are one length; for an already-extended
    model (Llama 3.1: L_0 = 8192, L = 131072, see `ropekit.plan.trained`) they differ.

    >>> spec = RopeSpec(head_dim=128, base=10000.0, context_length=4096)
    >>> spec.rotary_dim, spec.num_pairs, spec.pretrained_length
    (128, 64, 4096)
    """

    head_dim: int  # channels per attention head
    base: float  # RoPE base (rope_theta), e.g. 10000.0
    context_length: int  # L: the context the current frequencies run at, in tokens (what methods scale from)
    partial_rotary_factor: float  # fraction of head_dim that is rotated (GPT-NeoX, Phi)
    name: str | None  # where it came from: preset name, model path or id
    current_scaling: dict[str, Any] | None = field(compare=False)  # existing rope block, if any
    # An already-extended model (see `ropekit.plan.trained`): its current frequencies are θ_i / g_i with
    # g = prior_factors and attention factor prior_attention_factor. None: plain RoPE.
    prior_factors: tuple[float, ...] | None
    current_inv_freq: tuple[float, ...] | None  # float32 values of the current θ_i / g_i, runtime arithmetic
    prior_attention_factor: float
    pretrained_length: int  # L_0: the pre-training context before any scaling block (= L for plain RoPE)
    layer_type: str | None  # per-layer-type RoPE (Gemma 3): which layers' block this is
    length_source: str | None = field(compare=False)  # why context_length is what it is

    def __init__(
        self,
        head_dim: int,
        base: float,
        context_length: int | None = None,
        partial_rotary_factor: float = 1.0,
        name: str | None = None,
        current_scaling: dict[str, Any] | None = None,
        prior_factors: tuple[float, ...] | None = None,
        current_inv_freq: tuple[float, ...] | None = None,
        prior_attention_factor: float = 1.0,
        pretrained_length: int | None = None,
        layer_type: str | None = None,
        length_source: str | None = None,
        *,
        original_length: int | None = None,
    ) -> None:
        """`pretrained_length` defaults to `context_length`; `original_length` is the deprecated name of
        `context_length`."""
        if original_length is not None:
            warnings.warn(
                "RopeSpec(original_length=...) is deprecated: it is context_length (the context the frequencies "
                "run at); pretrained_length is the length before any scaling block",
                DeprecationWarning,
                stacklevel=2,
            )
            if context_length is not None and context_length != original_length:
                raise RopekitError("give context_length or its old name original_length, not both")
            context_length = original_length
        if context_length is None:
            raise RopekitError("RopeSpec needs context_length: the context its RoPE frequencies were trained at")
        values = dict(
            head_dim=head_dim,
            base=base,
            context_length=context_length,
            partial_rotary_factor=partial_rotary_factor,
            name=name,
            current_scaling=current_scaling,
            prior_factors=prior_factors,
            current_inv_freq=current_inv_freq,
            prior_attention_factor=prior_attention_factor,
            pretrained_length=context_length if pretrained_length is None else pretrained_length,
            layer_type=layer_type,
            length_source=length_source,
        )
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self._validate()

    def _validate(self) -> None:
        HEAD_DIM.check("head_dim", self.head_dim)
        CONTEXT_LENGTH.check("context_length", self.context_length)
        CONTEXT_LENGTH.check("pretrained_length", self.pretrained_length)
        ROPE_THETA.check("rope base (rope_theta)", self.base)
        prf = self.partial_rotary_factor
        PARTIAL_ROTARY_FACTOR.check("partial_rotary_factor", prf)
        if prf == 1.0 and self.head_dim % 2:
            raise RopekitError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise RopekitError(
                f"rotary dimension int(head_dim × partial_rotary_factor) = {self.rotary_dim} must be even and ≥ 2"
            )
        for what in ("prior_factors", "current_inv_freq"):
            values = getattr(self, what)
            if values is not None and len(values) != self.num_pairs:
                raise RopekitError(f"{what} has {len(values)} entries; this geometry has {self.num_pairs} pairs")

    @property
    def original_length(self) -> int:
        """Deprecated name of `context_length`."""
        warnings.warn(
            "RopeSpec.original_length is deprecated: use context_length (the context the frequencies run at) "
            "or pretrained_length (the length before any scaling block)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.context_length

    def with_context_length(self, length: int) -> RopeSpec:
        """The same geometry trained at `length` tokens (`--original-length`); for plain RoPE both lengths move."""
        return replace(
            self, context_length=length, pretrained_length=self.pretrained_length if self.is_extended else length
        )

    @property
    def is_extended(self) -> bool:
        """True when planning starts from an existing scaling (frequencies θ_i / g_i), not plain RoPE."""
        return self.prior_factors is not None

    @property
    def rotary_dim(self) -> int:
        """d = int(head_dim × partial_rotary_factor): channels that rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_pairs(self) -> int:
        """d/2 rotary pairs (frequencies)."""
        return self.rotary_dim // 2

    def inv_freq(self, base: float | None = None) -> torch.Tensor:
        """The frequencies planning starts from, float32, shape (d/2,).

        Plain RoPE: θ_i = 1/b^(2i/d) with transformers' exact arithmetic. An already-extended
        spec: its current frequencies θ_i / g_i. With `base`: plain RoPE at that base.
        """
        if base is None and self.current_inv_freq is not None:
            return torch.tensor(self.current_inv_freq, dtype=torch.float32)
        return self.base_inv_freq(base)

    def base_inv_freq(self, base: float | None = None) -> torch.Tensor:
        """Plain θ_i = 1/b^(2i/d) in float32 (transformers' arithmetic), ignoring any existing scaling."""
        b = self.base if base is None else base
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (b**exponent)

    def wavelengths(self) -> torch.Tensor:
        """λ_i = 2π/θ_i in tokens (float64), shape (d/2,)."""
        return 2 * math.pi / self.inv_freq().double()

    def with_base(self, base: float) -> RopeSpec:
        return replace(self, base=float(base))

    def describe(self) -> str:
        prf = f", partial_rotary_factor={self.partial_rotary_factor:g}" if self.partial_rotary_factor < 1 else ""
        layers = f"{self.layer_type} layers: " if self.layer_type else ""
        text = (
            f"{layers}head_dim={self.head_dim}{prf} (rotary_dim={self.rotary_dim}, {self.num_pairs} pairs), "
            f"rope_theta={self.base:g}, context_length={self.context_length}"
        )
        if self.is_extended:
            kind = (self.current_scaling or {}).get("rope_type", "existing")
            text += f" (already extended: its {kind} frequencies, from {self.pretrained_length})"
        return text

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> RopeSpec:
        """Geometry of a well-known model, from its public config (see `PRESETS`)."""
        key = name.lower()
        if key not in PRESETS:
            raise did_you_mean("preset", name, PRESETS)
        p = PRESETS[key]
        return cls(
            head_dim=p.head_dim,
            base=p.base,
            context_length=p.length,
            partial_rotary_factor=p.partial_rotary_factor,
            name=p.name,
        )

    @classmethod
    def from_config(
        cls, config: Any, *, name: str | None = None, from_scratch: bool = False, layer_type: str | None = None
    ) -> RopeSpec:
        """Geometry from a transformers `PretrainedConfig` (`ropekit.apply.readers.spec_from_config`)."""
        return _reader("spec_from_config")(config, name=name, from_scratch=from_scratch, layer_type=layer_type)

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, from_scratch: bool = False, layer_type: str | None = None) -> RopeSpec:
        """Geometry from a model directory, a `config.json` path, a `.gguf` file, or a hub id (needs the hub);
        see `ropekit.apply.readers.spec_from_pretrained`."""
        return _reader("spec_from_pretrained")(path_or_id, from_scratch=from_scratch, layer_type=layer_type)

    @classmethod
    def from_gguf(cls, path: str, *, original_length: int | None = None) -> RopeSpec:
        """Geometry from a GGUF file's metadata (`ropekit.apply.gguf.spec_from_gguf`)."""
        return _reader("spec_from_gguf")(path, original_length=original_length)


# ---- readers of model files ---------------------------------------------------------------------
# Reading a spec from a model's files (config.json, the hub, GGUF) is apply-level work: plan imports
# nothing above it. `ropekit.apply.readers` registers the readers here when ropekit is imported (the
# package imports it), and the constructors above call them.

_READERS: dict[str, Callable[..., Any]] = {}
# names that lived in this module before the readers moved to ropekit.apply.readers (still importable from here)
_MOVED = (
    "load_config_dict",
    "check_local_source",
    "spec_from_config_dict",
    "text_config_of",
    "layer_rope_blocks",
    "default_layer_type",
)


def register_readers(*readers: Callable[..., Any]) -> None:
    """Make `readers` (functions of `ropekit.apply.readers` and `ropekit.apply.gguf`) available by name."""
    _READERS.update({fn.__name__: fn for fn in readers})


def _reader(name: str) -> Callable[..., Any]:
    if name not in _READERS:  # only when ropekit.apply.readers failed to import
        raise RopekitError(f"{name} needs ropekit.apply.readers; import ropekit first")
    return _READERS[name]


def __getattr__(name: str) -> Any:
    """Names moved to `ropekit.apply.readers` stay importable from here, with a DeprecationWarning."""
    if name in _MOVED:
        warnings.warn(
            f"ropekit.plan.geometry.{name} moved to ropekit.apply.readers.{name}", DeprecationWarning, stacklevel=2
        )
        return _reader(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_spec(spec: Any, name: str = "spec") -> None:
    """Refuse anything but a RopeSpec where the API expects one (`critical_dimension("x")`)."""
    if not isinstance(spec, RopeSpec):
        raise RopekitError(f"{name} must be a RopeSpec (e.g. RopeSpec.from_preset('llama2-7b')), got {spec!r}")
