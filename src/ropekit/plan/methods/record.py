"""The record of one method: everything the rest of ropekit knows about it, in one place.

A method module defines its function `(spec, target_length, *, ...) -> Scaling` and a
`METHOD = Method(...)` record next to it; `ropekit.plan.registry` registers the records.
The CLI builds its method options from `Method.params`, the exports take the native form
from `Method.native`, and `ropekit.apply_plan` reads `Method.exact_inv_freq`; nothing outside the
module tests a method's name.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ropekit.domains import Domain
from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.scaling import Plan, Scaling


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a method function, and the CLI option that sets it."""

    name: str  # the keyword the method function takes
    type: type  # of the CLI value: float, int, str or pathlib.Path
    help: str  # one phrase, without the method's name or the default
    default: Any = None  # what the method uses when it is not given, for --help (a value or e.g. "s")
    unit: str = ""  # of the value and its default, e.g. "tokens"
    flag: str | None = ""  # CLI flag: "" gives --name-with-dashes, None keeps the parameter off the CLI
    read: Callable[[Any], Any] | None = None  # CLI value → API value, or a RopekitError before any work
    domain: Domain | None = None  # the valid range of a number, checked by make_plan and stated by --help

    @property
    def option(self) -> str | None:
        """The CLI flag, e.g. `--base-rule` for `rule`; None when it has none."""
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """`help` with the default and unit, as --help shows it."""
        unit = f" {self.unit}" if self.unit else ""
        text = self.help + ("" if self.default is None else f" (default {self.default}{unit})")
        return text + ("" if self.domain is None else f" {self.domain.help()}")

    def check(self, method: str, value: Any) -> None:
        """Refuse a value outside the parameter's domain, naming the keyword and its CLI flag."""
        if self.domain is not None and value is not None:
            flag = f" ({self.option})" if self.option else ""
            self.domain.check(f"{method}: {self.name}{flag}", value)


@dataclass(frozen=True)
class NativeForm:
    """A runtime's own form of a method: transformers' `rope_type` and the block that reproduces a plan."""

    rope_type: str  # transformers' rope_type the block uses
    block: Callable[[Plan], dict[str, Any]]  # the config block (rope_theta only when the method changes it)


@dataclass(frozen=True)
class Method:
    """A registered method. Only `name`, `function`, `summary` and `paper` are required."""

    name: str
    function: Callable[..., Scaling]
    summary: str
    paper: str
    params: tuple[Param, ...] = ()  # documented parameters; those with a flag become CLI method options
    aliases: tuple[str, ...] = ()  # other names `get_method` accepts, e.g. "linear" for "pi"
    native: NativeForm | None = None  # how a runtime implements it natively (every plan also exports as longrope)
    exact_inv_freq: bool = False  # its inv_freq is 1/(f_i·b^(2i/d)) as longrope computes it: applied bit for bit
    wraps: str | None = None  # the parameter naming a wrapped method, which takes the remaining parameters
    paper_setting: Callable[[RopeSpec, int], tuple[str, dict[str, Any]]] | None = None  # (label, params) or error
    needs_factors: bool = False  # cannot run without user-given factors
    in_default_comparison: bool = True  # False for searches too slow to run on every `ropekit plan`

    def __post_init__(self) -> None:
        sig = inspect.signature(self.function)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [p.name for p in self.params if p.name not in self.parameters and not takes_any]
        if unknown:
            raise RopekitError(f"method {self.name!r}: {self.function.__name__} takes no parameter {unknown[0]!r}")

    @property
    def parameters(self) -> tuple[str, ...]:
        """Keyword parameters the method accepts (beyond spec and target_length)."""
        sig = inspect.signature(self.function)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)

    @property
    def uses_bins(self) -> bool:
        """Chooses by disturbance, so `plan(..., bins=K)` passes its K on."""
        return "bins" in self.parameters

    @property
    def transformers_type(self) -> str | None:
        """The rope_type of the native form (None: only the longrope export reproduces it)."""
        return self.native.rope_type if self.native else None

    @property
    def renamed_keywords(self) -> dict[str, str]:
        """{old keyword: new keyword} the function still accepts, with a DeprecationWarning (`renamed_keywords`)."""
        return dict(getattr(self.function, "renamed_keywords", {}))

    def current_keywords(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with deprecated keyword names replaced by the current ones (warning once per name)."""
        return translate_keywords(params, self.renamed_keywords, f"method {self.name!r}")

    def default_of(self, name: str) -> Any:
        """The function's default for keyword `name` (None if it has none)."""
        p = inspect.signature(self.function).parameters.get(name)
        return None if p is None or p.default is p.empty else p.default


Function = TypeVar("Function", bound=Callable[..., Any])


def renamed_keywords(**renamed: str) -> Callable[[Function], Function]:
    """Keep a method function's old keyword names working, with a DeprecationWarning.

    `@renamed_keywords(factor="scale")`: a call with `factor=` runs as `scale=`. The function's
    signature (what `Method.parameters` and the CLI read) shows only the new names.
    """

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **translate_keywords(kwargs, renamed, function.__name__))

        wrapper.renamed_keywords = dict(renamed)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def translate_keywords(params: dict[str, Any], renamed: dict[str, str], owner: str) -> dict[str, Any]:
    """`params` with each old name in `renamed` replaced by its new one, warning that the old one is deprecated."""
    out = dict(params)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise RopekitError(f"{owner}: give {new} or its deprecated name {old}, not both")
        warnings.warn(
            f"{owner}: keyword {old!r} is deprecated, use {new!r} (the scalar scale s; per-pair factors are f_i)",
            DeprecationWarning,
            stacklevel=4,
        )
        out[new] = out.pop(old)
    return out
