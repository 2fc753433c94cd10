"""Embedded synthetic reasoning tasks: the project's default data for SFT, RL, reward models and search.

Each task generates problems with a step-by-step chain of thought at graded
levels and judges model output (`Task.verify`, `Task.check_steps`,
`Task.corrupt`). See `base` for the record and response format.
"""

from __future__ import annotations

from posttrain.data.tasks.arith import ArithTask
from posttrain.data.tasks.base import Problem, Task, extract_answer, split_steps
from posttrain.data.tasks.countdown import CountdownTask
from posttrain.data.tasks.registry import TASKS, get_task, register_task
from posttrain.data.tasks.sort import SortTask
from posttrain.data.tasks.split import (
    find_test_question,
    held_out_fraction,
    in_any_test,
    in_test,
    make_split,
    task_problems,
)

__all__ = [
    "TASKS",
    "ArithTask",
    "CountdownTask",
    "Problem",
    "SortTask",
    "Task",
    "extract_answer",
    "get_task",
    "held_out_fraction",
    "in_any_test",
    "find_test_question",
    "in_test",
    "make_split",
    "register_task",
    "split_steps",
    "task_problems",
]
