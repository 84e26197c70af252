"""`finetune validate`: everything that can be checked without loading weights."""

from __future__ import annotations

from pathlib import Path

from finetune.config import load_recipe
from finetune.data import FILE_SUFFIXES, local_data_path
from finetune.errors import DataError, RecipeError
from finetune.models import config_without_weights, detect_family
from finetune.tasks import recipe_task


def validate_recipe_file(path: Path) -> str:
    """Raise on the first failing layer (schema, model family, data files); return a one-line summary."""
    recipe = load_recipe(path)
    task = recipe_task(recipe)
    config = config_without_weights(recipe.model.name_or_path, recipe.model.revision)
    if config is None and recipe.model.family == "auto":
        family_note = "family not checked (hub checkpoint not in the local cache; set model.family to check it)"
    else:
        family = detect_family(config, recipe.model.family)
        if family in task.refused_families:
            raise RecipeError(f"{path}: {task.refusal(family)}")
        family_note = f"{family} family"
    missing = [
        f"{key}: file not found: {item}"
        for key, spec in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval))
        for item in ([] if spec is None else [spec] if isinstance(spec, str) else spec)
        if _looks_like_file(item) and not local_data_path(item, key).is_file()
    ]
    if missing:
        raise DataError(f"{path}: " + "; ".join(missing))
    return f"{recipe.task} on {recipe.model.name_or_path} ({family_note})"


def _looks_like_file(spec: str) -> bool:
    return spec.startswith("pkg:") or Path(spec).suffix.lower() in FILE_SUFFIXES
