"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's own trackers.

Off by default; `train.report_to` names them. None is a dependency of finetune:
a tracker whose package is missing is a recipe error before anything loads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

from finetune.recipe.schema import Recipe, flat_settings
from finetune.secrets import redact_tree

if TYPE_CHECKING:
    from accelerate import Accelerator

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def missing_trackers(names: Sequence[str]) -> list[str]:
    """One message per tracker whose package is not installed."""
    missing = [n for n in names if not any(importlib.util.find_spec(p) for p in PACKAGES[n])]
    return [f"{n} needs the {PACKAGES[n][0]} package (pip install {PACKAGES[n][0]})" for n in missing]


def start(accelerator: Accelerator, recipe: Recipe, run_name: str) -> None:
    """Open the trackers with the recipe (flattened, secrets redacted) as the run's configuration."""
    if not recipe.train.report_to:
        return
    settings = redact_tree(flat_settings(recipe))
    # TensorBoard's hparams accept only scalars and strings.
    settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}
    accelerator.init_trackers(run_name, config=settings)


def finish(accelerator: Accelerator) -> None:
    """Close the trackers. (accelerator.end_training would also tear down the process group.)"""
    for tracker in accelerator.trackers:
        tracker.finish()
