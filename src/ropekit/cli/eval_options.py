"""`ropekit eval`'s task options, generated from the task records (as method options come from the methods').

One option per task option name over every registered task (`ropekit.eval.registry.task_options`):
its flag, type, help and default come from the task's options dataclass, so none is written here;
an option several tasks share (--trials: passkey and ruler) is one option whose help names them.
The generated options default to None ("not given"), so the task records' defaults apply. typer
reads the signature each time it builds the CLI, so a task registered later has its options (and
its name in --tasks' help) too.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from typing import Annotated, Any

import typer

from ropekit.cli.options import GeneratedOption, GeneratedOptions
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


class with_task_options(GeneratedOptions):  # noqa: N801 (used as a decorator)
    """Give `ropekit eval` one option per task option of the registered tasks, and --tasks' help.

    The command body takes `task_options`: {option name: value} of the options the user set
    (list options already split into tuples).
    """

    keyword = "task_options"
    prefix = PREFIX
    kind = "task option"

    def options(self) -> dict[str, GeneratedOption]:
        return {
            name: GeneratedOption(
                shared.spec.flag, str if shared.spec.many else shared.spec.kind, shared.help(), TASK_PANEL
            )
            for name, shared in task_options().items()
            if shared.spec.flag is not None
        }

    def own_parameter(self, p: inspect.Parameter) -> inspect.Parameter:
        return _with_tasks_help(p)

    def parse(self, given: dict[str, Any]) -> dict[str, Any]:
        shared = task_options()
        return {k: shared[k].spec.parse(v) for k, v in given.items()}

    def clash_message(self, flag: str) -> str:
        return f"task option {flag} clashes with an option of `ropekit eval` itself"


def _with_tasks_help(p: inspect.Parameter) -> inspect.Parameter:
    """The --tasks parameter with its help listing the tasks registered now."""
    if p.name != "tasks":
        return p
    return p.replace(annotation=Annotated[str | None, typer.Option("--tasks", help=tasks_help())])
