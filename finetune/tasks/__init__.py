"""The task registry: one module per task, one entry per module (qa: one per mode)."""

from __future__ import annotations

from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe
from finetune.tasks.base import Task
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.codegen import CodegenTask
from finetune.tasks.copywriting import CopywritingTask
from finetune.tasks.qa import ExtractiveQATask, GenerativeQATask
from finetune.tasks.rerank import RerankTask
from finetune.tasks.retrieval import RetrievalTask

TASKS: dict[str, Task] = {
    "classification": ClassificationTask(),
    "copywriting": CopywritingTask(),
    "codegen": CodegenTask(),
    "qa": ExtractiveQATask(),
    "retrieval": RetrievalTask(),
    "rerank": RerankTask(),
}
MODES: dict[tuple[str, str | None], Task] = {
    ("qa", "extractive"): TASKS["qa"],
    ("qa", "generative"): GenerativeQATask(),
}


def get_task(name: str, mode: str | None = None) -> Task:
    """The task of a recipe (`task`, and `mode` for qa). Both qa modes score predictions the same way."""
    if name not in TASKS:
        raise RecipeError(f"task: {name!r} is not a task (tasks: {', '.join(TASKS)})")
    return MODES.get((name, mode), TASKS[name])


def recipe_task(recipe: Recipe) -> Task:
    return get_task(recipe.task, recipe.mode)


__all__ = ["TASKS", "Features", "Task", "get_task", "recipe_task"]
