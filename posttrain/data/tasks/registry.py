"""The task registry: name -> configured `Task` instance.

Built-in entries: ``arith`` (the easy default), ``arith_hard`` (``* `` and
parentheses, values kept in 0..99), ``arith_mag`` (three numbers; the level is the band of
the largest: 0-9, 10-14, 15-19, 20-29), ``countdown`` and ``sort``. A task variant
is a configured instance under its own name; `register_task` adds one.
"""

from __future__ import annotations

import difflib

from posttrain.data.tasks.arith import ArithTask, MagnitudeArithTask
from posttrain.data.tasks.base import Task
from posttrain.data.tasks.countdown import CountdownTask
from posttrain.data.tasks.sort import SortTask
from posttrain.errors import ConfigError

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        ArithTask(),
        ArithTask(name="arith_hard", ops=("+", "-", "*"), parens=True, max_abs=99),
        MagnitudeArithTask(),
        CountdownTask(),
        SortTask(),
    )
}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` under ``task.name``; an existing name is an error unless ``replace``."""
    if task.name in TASKS and not replace:
        raise ConfigError(
            f"task {task.name!r} is already registered",
            where="tasks",
            fix="pick another name or pass replace=True",
        )
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; unknown names list the valid ones."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown task {name!r}",
        where="task",
        fix=f"{hint}valid tasks: {', '.join(sorted(TASKS))}",
    )
