"""The Task interface: everything the training loop and evaluation need to know about a task.

The loop never asks which task it runs; it calls these hooks:

    check_recipe   recipe-level rules (fields, metrics, families), before any weights load
    fit_state      what the task learns from the training rows (e.g. the label set); saved with the adapter
    auto_class     the transformers Auto class for a family, with model_kwargs from the state
    featurize      rows -> model features (+ a length report), under data.max_length / data.overflow
    collate        a batch of features -> padded tensors (padded to the batch's longest row)
    predict        the eval rows -> prediction rows (reference fields + `prediction`) and eval loss
    compute_metrics  prediction rows -> metrics: a pure function, so saved predictions can be re-scored
    check_eval_rows  refuse early what evaluation could not do (e.g. run code without the opt-ins)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from datasets import Dataset

from finetune.data import LengthReport


@dataclass
class Features:
    """Model inputs for one split, aligned with the rows they came from."""

    dataset: Dataset  # tokenised features, one row per model input
    rows: Dataset  # the task-field rows they were built from (after overflow drops)
    report: LengthReport
    prompts: list[list[int]] | None = None  # generation tasks: prompt token ids, one per row
    windows: Any = None  # extractive QA: which example and character offsets each window holds


class Task:
    name: str = ""
    required_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    # Required fields that hold the answer: not needed by `finetune predict`.
    reference_fields: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    # family -> why this task is refused on it
    refused_families: dict[str, str] = {}
    # Task heads trained in full and saved with the adapter.
    head_candidates: tuple[str, ...] = ()
    peft_task_type: str | None = None
    # Generation tasks build their prompt from `data.template` when a recipe gives one.
    uses_template: bool = False

    # ------------------------------------------------------------ recipe
    def check_recipe(self, recipe) -> list[str]:
        problems = []
        if recipe.model.family in self.refused_families:
            problems.append(f"model.family: {self.refusal(recipe.model.family)}")
        fields = (*self.required_fields, *self.optional_fields)
        for name in recipe.data.columns:
            if name not in fields:
                from finetune.config import did_you_mean

                problems.append(
                    f"data.columns.{name}: not a field of task {self.name}{did_you_mean(name, fields)} "
                    f"(fields: {', '.join(fields)})"
                )
        for metric in recipe.eval.metrics or []:
            if not self.knows_metric(metric):
                problems.append(self._unknown_metric("eval.metrics", metric))
        for metric in recipe.eval.gates:
            if not self.knows_metric(metric):
                problems.append(self._unknown_metric(f"eval.gates.{metric}", metric))
        if recipe.data.template is not None and not self.uses_template:
            problems.append(f"data.template: task {self.name} does not build prompts; remove the template")
        if recipe.data.template is not None and "prompt" in recipe.data.columns:
            problems.append("data.template: the template builds the prompt; remove data.columns.prompt")
        if recipe.data.chat_template and not self.uses_template:
            problems.append(f"data.chat_template: task {self.name} does not generate text")
        if recipe.data.eval is None and recipe.data.eval_split is None:
            problems.append("data: give an eval file (data.eval) or a held-out fraction (data.eval_split)")
        if recipe.data.eval is not None and recipe.data.eval_split is not None:
            problems.append("data: data.eval and data.eval_split are exclusive; give one (data.eval=null to split)")
        return problems

    def knows_metric(self, metric: str) -> bool:
        return metric in self.metric_names or metric == "eval_loss"

    def _unknown_metric(self, place: str, metric: str) -> str:
        from finetune.config import did_you_mean

        return (
            f"{place}: unknown metric {metric!r} for task {self.name}{did_you_mean(metric, self.metric_names)} "
            f"(metrics: {', '.join(self.metric_names)}, eval_loss)"
        )

    def refusal(self, family: str) -> str:
        return f"task {self.name} is not supported on the {family} family: {self.refused_families[family]}"

    # ------------------------------------------------------------ model
    def fit_state(self, train_rows: Dataset, recipe) -> dict[str, Any]:
        return {}

    def auto_class(self, family: str):
        raise NotImplementedError

    def model_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def peft_task(self, family: str) -> str | None:
        """peft's task type (SEQ_CLS, CAUSAL_LM, ...), which lets AutoPeftModelFor... reload the adapter."""
        return self.peft_task_type

    def prepare_model(self, model, tokenizer, family: str) -> None:
        """Last touches after loading (pad token id into the config, etc.)."""
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------ data
    def featurize(self, rows: Dataset, tokenizer, recipe, state, split: str, labeled: bool = True) -> Features:
        raise NotImplementedError

    def collate(self, tokenizer) -> Callable[[list[dict]], dict]:
        raise NotImplementedError

    # ------------------------------------------------------------ evaluation
    def predict(self, model, tokenizer, features: Features, accelerator, recipe, state) -> tuple[list[dict], float | None]:
        raise NotImplementedError

    def compute_metrics(self, rows: list[dict], settings=None) -> dict[str, Any]:
        """Metrics from prediction rows: {"metrics": {name: fraction}, "details": {...}}.

        `settings` is the recipe's eval section (code execution limits, pass@k), or None for defaults.
        """
        raise NotImplementedError

    def check_eval_rows(self, rows: Dataset, settings) -> None:
        """Called before any model loads, so a run is refused before it trains rather than after."""

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        """Prediction files re-scored with `eval --predictions` must carry the task's reference fields."""
        from finetune.errors import DataError

        needed = self.prediction_fields()
        for number, row in enumerate(rows, start=1):
            missing = [f for f in needed if f not in row]
            if missing:
                raise DataError(f"{source}:{number}: missing field(s) {', '.join(missing)} for task {self.name}")

    def prediction_fields(self) -> tuple[str, ...]:
        return ("prediction",)
