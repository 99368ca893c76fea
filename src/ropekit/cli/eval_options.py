"""`ropekit eval`'s task options, generated from the task records (as method options come from the methods').

One option per task option name over every registered task (`ropekit.eval.registry.task_options`):
its flag, type, help and default come from the task's options dataclass, so none is written here;
an option several tasks share (--trials: passkey and ruler) is one option whose help names them.
The generated options default to None ("not given"), so the task records' defaults apply. typer
reads the signature each time it builds the CLI, so a task registered later has its options (and
its name in --tasks' help) too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Annotated, Any

import typer

from ropekit.cli.options import _flags_of
from ropekit.errors import RopekitError
from ropekit.eval.registry import TASKS, task_options
from ropekit.eval.runner import EvalConfig

TASK_PANEL = "Task options"
PREFIX = "task_option_"  # of the generated parameters' names, apart from the command's own


def run_default(name: str) -> str:
    """`EvalConfig`'s default for `name`, as --help shows it (lists comma-separated)."""
    f = next(f for f in fields(EvalConfig) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def tasks_help() -> str:
    """--tasks' help: every registered task with its one-line summary."""
    listed = "; ".join(f"{name} ({task.summary})" for name, task in TASKS.items())
    return f"Comma-separated tasks (default {run_default('tasks')}): {listed}."


class with_task_options:  # noqa: N801 (used as a decorator)
    """Give `ropekit eval` one option per task option of the registered tasks, and --tasks' help.

    The command body takes `task_options`: {option name: value} of the options the user set
    (list options already split into tuples).
    """

    def __init__(self, command: Callable[..., Any]) -> None:
        functools.update_wrapper(self, command)
        self.command = command

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self.command, eval_str=True)
        kept = [_with_tasks_help(p) for p in own.parameters.values() if p.name != "task_options"]
        taken = {p.name for p in kept} | {flag for p in kept for flag in _flags_of(p)}
        extra = []
        for name, shared in task_options().items():
            spec = shared.spec
            if spec.flag is None:
                continue
            if {PREFIX + name, spec.flag} & taken:
                raise RopekitError(f"task option {spec.flag} clashes with an option of `ropekit eval` itself")
            kind: type = str if spec.many else spec.kind
            extra.append(
                inspect.Parameter(
                    PREFIX + name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[
                        kind | None, typer.Option(spec.flag, help=shared.help(), rich_help_panel=TASK_PANEL)
                    ],
                )
            )
        return own.replace(parameters=kept + extra)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        given = {k[len(PREFIX) :]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(PREFIX)]}
        shared = task_options()
        values = {k: shared[k].spec.parse(v) for k, v in given.items() if v is not None}
        return self.command(*args, task_options=values, **kwargs)


def _with_tasks_help(p: inspect.Parameter) -> inspect.Parameter:
    """The --tasks parameter with its help listing the tasks registered now."""
    if p.name != "tasks":
        return p
    return p.replace(annotation=Annotated[str | None, typer.Option("--tasks", help=tasks_help())])
