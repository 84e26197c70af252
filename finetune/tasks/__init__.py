"""The task registry: one module per task, one entry per module."""

from __future__ import annotations

from finetune.tasks.base import Features, Task
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.codegen import CodegenTask
from finetune.tasks.copywriting import CopywritingTask

TASKS: dict[str, Task] = {
    "classification": ClassificationTask(),
    "copywriting": CopywritingTask(),
    "codegen": CodegenTask(),
}


def get_task(name: str) -> Task:
    from finetune.errors import RecipeError

    if name not in TASKS:
        raise RecipeError(f"task: {name!r} is not available yet (available: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["TASKS", "Features", "Task", "get_task"]
