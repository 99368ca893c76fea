"""The record of one evaluation task: everything `ropekit eval` knows about it, in one place.

A task module defines

* its options: a frozen dataclass deriving from `TaskOptions`, every field made with `option(...)`
  (default, help, unit, CLI flag and valid values, each written once);
* the function that measures one **cell** (one plan × task × cell coordinates, e.g. a length);
* a `TASK = Task(...)` record naming those, the CSV/table rows it adds, its report section and
  figure.

`ropekit.eval.registry` registers the records. The runner asks a task for its cells, measures each
one through the evaluation store (keyed by model, plan, task, settings and documents, so an
interrupted run resumes and identical plans share cells), gathers the values into the task's
results.json entry and takes its rows, report section and figure from the record; the CLI builds
`ropekit eval`'s task options from the dataclasses. Nothing outside the task's module tests its name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ropekit.domains import POSITIVE_INTEGER, SEED, Domain
from ropekit.errors import RopekitError
from ropekit.eval.backend import LOGPROBS, Scorer

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from ropekit.eval.store import EvalStore

Cell = dict[str, Any]  # a cell's coordinates, e.g. {"length": 512}: JSON, part of the cell's key
Row = dict[str, Any]  # one results.csv row (see ROW_FIELDS)
ROW_FIELDS = ("method", "task", "length", "depth", "value", "convention", "stride", "tokens_scored")
_META = "ropekit"  # the dataclass field metadata key holding an `Option`


@dataclass(frozen=True)
class Option:
    """What ropekit knows of one task option besides its name, type and default (the dataclass field's)."""

    help: str  # one phrase, without the task's name or the default
    unit: str = ""  # of the value and its default, e.g. "tokens"
    flag: str | None = ""  # CLI flag: "" gives --name-with-dashes, None keeps the option off the CLI
    # The valid values, checked by `TaskOptions.check` (for a tuple option, of each item) and stated by --help.
    choices: tuple[Any, ...] | None = None
    domain: Domain | None = None  # of a number (`ropekit.domains`); any number is finite
    nonempty: bool = False  # a tuple option needs at least one item
    path: bool = False  # names a file or folder: cell keys record its content's sha256, not its name
    shown_default: str | None = None  # what --help says of the default instead of its value, e.g. "--data"


def option(
    default: Any,
    help: str,
    *,
    unit: str = "",
    flag: str | None = "",
    choices: Sequence[Any] | None = None,
    domain: Domain | None = None,
    nonempty: bool = False,
    path: bool = False,
    shown_default: str | None = None,
) -> Any:
    """A field of a `TaskOptions` dataclass: its default and its `Option` record.

    A tuple default makes a list option (comma-separated on the command line).
    """
    choices = None if choices is None else tuple(choices)
    record = Option(help, unit, flag, choices, domain, nonempty, path, shown_default)
    return field(default=default, metadata={_META: record})


@dataclass(frozen=True)
class OptionSpec:
    """One option resolved from its dataclass field: name, value type, default and record."""

    name: str
    kind: type  # of the value, or of each item of a list option: int, float, str or bool
    many: bool  # a tuple of `kind` (comma-separated on the CLI)
    optional: bool  # None is allowed (and usually the default)
    default: Any
    record: Option

    @property
    def flag(self) -> str | None:
        """The CLI flag, e.g. `--stride`; None when the option has none."""
        if self.record.flag is None:
            return None
        return self.record.flag or "--" + self.name.replace("_", "-")

    @property
    def shown(self) -> str:
        """The flag, or the option's name for an option kept off the CLI (for error messages)."""
        return self.flag or self.name

    def default_text(self) -> str | None:
        """The default as --help shows it (e.g. "0,0.25,0.5" for a list, or its description), or None."""
        if self.record.shown_default is not None or self.default is None:
            return self.record.shown_default
        if self.many:
            return ",".join(_plain(v) for v in self.default) or "none"
        return _plain(self.default)

    def describe(self) -> str:
        """`help` with the default and unit, and the valid range where it is one, as --help shows it."""
        text, shown = self.record.help, self.default_text()
        if shown is not None and self.record.shown_default is not None:  # a described default, e.g. "--data"
            text = f"{text} (default: {shown})"
        elif shown is not None:
            text = f"{text} (default {shown}{f' {self.record.unit}' if self.record.unit else ''})"
        domain = self.record.domain
        if domain is not None and (domain.low is not None or domain.high is not None):
            text = f"{text} (valid: {'each ' if self.many else ''}{domain.describe()})"
        return text

    def parse(self, text: str) -> Any:
        """A command-line value into the option's value: comma-separated items for a list option."""
        if not self.many:
            return text
        try:
            return tuple(self.kind(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            raise RopekitError(
                f"{self.shown} expects a comma-separated list of {self.kind.__name__} values, got {text!r}"
            ) from None

    def coerce(self, value: Any) -> Any:
        """An API value into the option's value (a list becomes a tuple), refusing the wrong type."""
        if value is None and self.optional:
            return None
        items = (tuple(value) if isinstance(value, (list, tuple)) else None) if self.many else (value,)
        if items is None or not all(_fits(v, self.kind) for v in items):
            expected = f"a list of {self.kind.__name__} values" if self.many else f"{self.kind.__name__}"
            raise RopekitError(f"{self.shown} must be {expected}, got {value!r}")
        items = tuple(float(v) if self.kind is float else v for v in items)
        return items if self.many else items[0]

    def check(self, value: Any) -> None:
        """Refuse a value outside the option's valid values (one line naming the flag)."""
        if value is None:
            return
        record = self.record
        if self.many and record.nonempty and not value:
            raise RopekitError(f"{self.shown} needs at least one value")
        for item in value if self.many else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise RopekitError(f"{self.shown} must be a finite number, got {item}")
            if record.choices is not None and item not in record.choices:
                from difflib import get_close_matches

                close = get_close_matches(str(item), [str(c) for c in record.choices], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RopekitError(
                    f"{self.shown} must be one of {', '.join(map(str, record.choices))}, got {item!r}{hint}"
                )
            if record.domain is not None:
                record.domain.check(f"each {self.shown} value" if self.many else self.shown, item)


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True)
class TaskOptions:
    """Base of every task's options dataclass (fields made with `option`)."""

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        """Option name → its `OptionSpec`, in field order."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            record = f.metadata.get(_META)
            if record is None:
                raise RopekitError(f"{cls.__name__}.{f.name}: make every task option with ropekit's option(...)")
            kind, many, optional = _value_type(hints[f.name], f"{cls.__name__}.{f.name}")
            out[f.name] = OptionSpec(f.name, kind, many, optional, f.default, record)
        return out

    @classmethod
    def build(cls, given: dict[str, Any]) -> TaskOptions:
        """The options with the values in `given` (the others at their defaults), type-checked and checked."""
        specs = cls.specs()
        options = cls(**{name: specs[name].coerce(value) for name, value in given.items() if name in specs})
        options.check()
        return options

    def check(self) -> None:
        """Refuse values outside each option's valid values."""
        for name, spec in self.specs().items():
            spec.check(getattr(self, name))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def key_settings(self, store: EvalStore | None) -> dict[str, Any]:
        """What the options put into every cell key: their values, with file and folder options replaced
        by their content's sha256 (moving a file keeps its cells; editing it does not)."""
        from ropekit.eval.store import path_fingerprint

        out = self.as_dict()
        for name, spec in self.specs().items():
            value = out[name]
            if spec.record.path and value is not None and Path(value).exists():
                out[name] = {"sha256": path_fingerprint(value, store)}
        return out


def _value_type(hint: Any, where: str) -> tuple[type, bool, bool]:
    """(item type, is a tuple, allows None) of an option's annotation."""
    args = typing.get_args(hint)
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    optional = union and type(None) in args
    if union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise RopekitError(f"{where}: an option holds one type (or None), got {hint}")
        hint = rest[0]
    many = typing.get_origin(hint) is tuple
    if many:
        hint = typing.get_args(hint)[0]
    if hint not in (int, float, str, bool):
        raise RopekitError(f"{where}: option values are int, float, str, bool or tuples of them, got {hint}")
    return hint, many, optional


@dataclass(frozen=True)
class Trials(TaskOptions):
    """Options shared by the tasks that draw seeded samples (passkey keys, RULER samples)."""

    trials: int = option(5, "seeded trials per cell (passkey keys, RULER samples)", domain=POSITIVE_INTEGER)
    seed: int = option(0, "seed of the generated samples", domain=SEED)


OptionsT = TypeVar("OptionsT", bound=TaskOptions)


@dataclass
class TaskRun(Generic[OptionsT]):
    """What a task sees of the run: its options, the run's lengths and inputs (no weights)."""

    options: OptionsT
    lengths: list[int]  # the context lengths asked for, in tokens
    limit: int  # the run's longest context: the plans' target, else the model's own
    tokenizer: PreTrainedTokenizerBase
    documents: list[np.ndarray]  # tokenised --data, each cut to --max-tokens (empty unless a task reads them)
    data: str | None  # the --data path
    trained_length: int | None  # the context the model was trained at (its spec's original length)
    model: str  # the model as the user named it
    inputs: Any = None  # what the task's `prepare` returned
    label: str = ""  # the method being measured, for progress bars
    progress: bool = False
    warnings: list[str] = field(default_factory=list)  # lines for results.json and stderr


def per_length(run: TaskRun[Any]) -> list[Cell]:
    """The default cells: one per length."""
    return [{"length": n} for n in run.lengths]


def by_length(run: TaskRun[Any], measured: list[tuple[Cell, Any]]) -> dict[str, Any]:
    """The default results.json entry: length (as a string) → the cell's value."""
    return {str(cell["length"]): value for cell, value in measured}


def merged(
    measured: list[tuple[Cell, Any]], *, unions: Sequence[str], concat: str = "rows", **fields: Any
) -> dict[str, Any]:
    """One result dict from per-cell result dicts of the same shape: the first cell's fields, the union of
    each of their `unions` dicts, the concatenation of their `concat` lists (in cell order), and `fields` set."""
    parts = [value for _, value in measured]
    return {
        **parts[0],
        **{union: {k: v for part in parts for k, v in part[union].items()} for union in unions},
        concat: [item for part in parts for item in part[concat]],
        **fields,
    }


def first_entry(results: dict[str, Any], task: str) -> Any:
    """The first method's results.json entry of `task` (None when no method has one): for what every method's
    entry records alike, such as a protocol's sources and settings."""
    return next((entry[task] for entry in results["methods"].values() if entry.get(task)), None)


def row(method: str, task: str, value: Any, **columns: Any) -> Row:
    """One results.csv row; the columns not given are empty."""
    return {**dict.fromkeys(ROW_FIELDS, ""), **columns, "method": method, "task": task, "value": value}


@dataclass(frozen=True)
class Task(Generic[OptionsT]):
    """A registered evaluation task. Only `name`, `summary`, `options`, `measure` and `rows` are required.

    The callables, in the order the runner uses them:

    * `check(options, lengths)`: pure validation against the run's lengths, before any file is read;
    * `prepare(run)`: read and check inputs before any weights load (prompts that must fit, files);
      its return value is `run.inputs`;
    * `cells(run)`: the cells of one plan, each a JSON dict of coordinates (default: one per length);
    * `measure(scorer, run, cell)`: one cell's JSON value, computed with the model under the plan;
    * `collect(run, [(cell, value), …])`: the task's results.json entry for one method (default:
      length → value); None leaves the task out of that method's entry;
    * `rows(method, entry)`: results.csv rows (`row(...)`), read back from results.json alone;
    * `report(results, rows)`: the report.md section (default: a table of the rows' values);
    * `plot(results, rows, directory)`: a figure written into `directory`, or None.
    """

    name: str  # --tasks name and results.json key
    summary: str  # one line for --help
    options: type[OptionsT]
    measure: Callable[[Scorer, TaskRun[OptionsT], Cell], Any]
    rows: Callable[[str, Any], list[Row]]
    cells: Callable[[TaskRun[OptionsT]], list[Cell]] = per_length
    collect: Callable[[TaskRun[OptionsT], list[tuple[Cell, Any]]], Any] = by_length
    check: Callable[[OptionsT, Sequence[int]], None] | None = None
    prepare: Callable[[TaskRun[OptionsT]], Any] | None = None
    report: Callable[[dict[str, Any], list[Row]], list[str]] | None = None
    plot: Callable[[dict[str, Any], list[Row], Path], Path | None] | None = None
    needs: frozenset[str] = frozenset({LOGPROBS})  # backend capabilities (ropekit.eval.backend)
    uses_documents: bool = False  # reads --data (the documents' fingerprint keys its cells)
    protocol: str = ""  # version of the protocol, in every cell key: bump it when the numbers change
    better: str | None = None  # "lower" or "higher": how `best_by_length` ranks methods on rows of this task
    metric: str = ""  # what the rows' value is, e.g. "perplexity"
    value_format: str = "{:.4g}"  # how summaries show a value (passkey: "{:.0%}")

    def __post_init__(self) -> None:
        self.options.specs()  # every field is an option of a supported type
        if self.better not in (None, "lower", "higher"):
            raise RopekitError(f"task {self.name!r}: better must be 'lower', 'higher' or None")
