"""Name → evaluation task registry.

Each task module in `ropekit.eval.tasks` declares its record (`Task`: options, measurement,
rows, report section, figure) next to its code; this module registers them. Users add tasks with
`register_task` (and take them out again with `unregister_task`); `ropekit eval --tasks NAME` and
its options pick them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.tasks import longbench, longppl, nll, passkey, ppl, ruler
from ropekit.eval.tasks.record import Option, OptionSpec, Task, TaskOptions, TaskRun, Trials, option, row

__all__ = [
    "TASKS",
    "Option",
    "OptionSpec",
    "SharedOption",
    "Task",
    "TaskOptions",
    "TaskRun",
    "Trials",
    "get_task",
    "option",
    "register_task",
    "row",
    "task_options",
    "unregister_task",
]

TASKS: dict[str, Task[Any]] = {}


def register_task(task: Task[Any]) -> None:
    """Add (or replace) a task under `task.name`; its options must agree with any other task's of the same name."""
    previous = TASKS.pop(task.name, None)
    TASKS[task.name] = task
    try:
        task_options()
    except RopekitError:
        del TASKS[task.name]
        if previous is not None:
            TASKS[task.name] = previous
        raise


def unregister_task(name: str, *, missing_ok: bool = False) -> None:
    """Remove the task registered as `name`."""
    if name not in TASKS:
        if missing_ok:
            return
        raise did_you_mean("task", name, TASKS)
    del TASKS[name]


def get_task(name: str) -> Task[Any]:
    if name not in TASKS:
        raise did_you_mean("task", name, TASKS)
    return TASKS[name]


@dataclass(frozen=True)
class SharedOption:
    """One option name over every registered task that has it (e.g. --trials: passkey and ruler)."""

    specs: dict[str, OptionSpec]  # task name → its spec (they agree on type, default and flag)

    @property
    def spec(self) -> OptionSpec:
        return next(iter(self.specs.values()))

    def help(self) -> str:
        """'passkey/ruler: …', or one clause per task where their texts differ."""
        texts = {spec.describe() for spec in self.specs.values()}
        if len(texts) == 1:
            return "/".join(self.specs) + ": " + texts.pop() + "."
        return "; ".join(f"{task}: {spec.describe()}" for task, spec in self.specs.items()) + "."


def task_options() -> dict[str, SharedOption]:
    """Option name → the option over every registered task that has it; refuses disagreeing definitions."""
    found: dict[str, dict[str, OptionSpec]] = {}
    for task in TASKS.values():
        for name, spec in task.options.specs().items():
            owners = found.setdefault(name, {})
            first = next(iter(owners.values()), spec)
            if (first.kind, first.many, first.default, first.flag) != (spec.kind, spec.many, spec.default, spec.flag):
                raise RopekitError(
                    f"tasks {next(iter(owners))!r} and {task.name!r} define option {name!r} differently "
                    "(type, default or flag); share one definition (e.g. a common TaskOptions base)"
                )
            owners[task.name] = spec
    return {name: SharedOption(specs) for name, specs in found.items()}


def options_for(task: Task[Any], given: dict[str, Any]) -> TaskOptions:
    """`task`'s options with the values in `given` that are its own, type-checked and range-checked."""
    return task.options.build({k: v for k, v in given.items() if k in task.options.specs()})


for _module in (ppl, longppl, passkey, ruler, longbench, nll):
    register_task(_module.TASK)
