"""Running a task's evaluation, scoring prediction rows, checking gates, showing the table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from datasets import Dataset
from torch.utils.data import DataLoader

from finetune.data.tables import read_jsonl
from finetune.errors import DataError
from finetune.evaluation.compare import Baseline, compare, same_data
from finetune.evaluation.preference import has_preferences, preference_metrics
from finetune.recipe.gates import Gate, evaluate_gates, parse_gate
from finetune.recipe.schema import EvalSection

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.console import Console, JustifyMethod


class ScoresRows(Protocol):
    """What scoring needs of a task (finetune.tasks sits above this layer): metrics from prediction rows."""

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]: ...


def eval_loader(
    dataset: Dataset, collate: Callable[[list[dict]], dict], batch_size: int, accelerator: Accelerator
) -> DataLoader:
    """In-order batches, sharded over processes; gather_for_metrics drops the padding duplicates."""
    return accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))


def score(
    task: ScoresRows, rows: list[dict], settings: EvalSection, eval_loss: float | None = None, generated: bool = True
) -> dict:
    """{"metrics": {...}, "details": {...}} from prediction rows; `settings.metrics` filters the headline metrics.

    `generated=False`: the rows hold no predictions (judged preference rows only), so the task's metrics are skipped.
    """
    # A thumbs-down row's completion is what not to write: generation is scored against the desirable rows only.
    references = [row for row in rows if row.get("desirable", True)]
    scored = task.compute_metrics(references, settings) if generated else {"metrics": {}, "details": {}}
    metrics = dict(scored["metrics"])
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    wanted = settings.metrics
    if wanted:
        metrics = {name: metrics[name] for name in wanted if name in metrics}
    # Reported whenever their feature is on, whatever eval.metrics lists: they describe the run, not the task.
    if rows and "retrieved_gold" in rows[0]:  # knowledge-base rows (finetune.retrieval)
        metrics["retrieval_recall@k"] = sum(bool(r["retrieved_gold"]) for r in rows) / len(rows)
    if has_preferences(rows):  # rows judged by a preference objective (finetune.training.objectives)
        metrics.update(preference_metrics(rows))
    if rows and "watermarked" in rows[0]:  # rows scored by the watermark detector (finetune.watermark)
        metrics["watermark_detected"] = sum(bool(r["watermarked"]) for r in rows) / len(rows)
    return {"metrics": metrics, "details": scored.get("details", {})}


def multi_label_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Multi-label classification metrics (scikit-learn) from each row's reference and chosen labels.

    The labels scored are those that occur in either (as single-label classification scores its classes).
    """
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    classes = sorted({label for labels in (*gold, *predicted) for label in labels})
    if not classes:  # no label anywhere: every row rightly has none
        metrics = {"micro_f1": 0.0, "macro_f1": 0.0, "weighted_f1": 0.0, "subset_accuracy": 1.0, "hamming_loss": 0.0}
        return {"metrics": metrics, "details": {"per_label": {}}}
    binarizer = MultiLabelBinarizer(classes=classes)
    y_true, y_pred = binarizer.fit_transform(gold), binarizer.transform(predicted)
    metrics = {
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
    }
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    per_label = {
        c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for c, p, r, f, n in zip(classes, precision, recall, f1, support)
    }
    rows = max(len(gold), 1)
    return {
        "metrics": metrics,
        "details": {
            "per_label": per_label,
            "labels_per_text": {
                "reference": sum(map(len, gold)) / rows,
                "predicted": sum(map(len, predicted)) / rows,
            },
        },
    }


def watermark_cost(marked: dict, unmarked: dict) -> dict:
    """Each metric both evaluations of one model report: watermarked, unwatermarked, and what the mark cost."""
    return {
        name: {"watermarked": marked[name], "unwatermarked": value, "difference": marked[name] - value}
        for name, value in unmarked.items()
        if name != "watermark_detected"
        and isinstance(marked.get(name), (int, float))
        and isinstance(value, (int, float))
    }


def collect_gates(recipe_gates: dict[str, str] | None, cli_gates: list[str] | None) -> list[Gate]:
    """Recipe gates, then command-line gates; a command-line gate on the same metric and operator wins."""
    gates = {}
    for text in [f"{m}{c}" for m, c in (recipe_gates or {}).items()] + list(cli_gates or []):
        gate = parse_gate(text)
        gates[(gate.metric, gate.op)] = gate
    return list(gates.values())


def metrics_document(task_name: str, scored: dict, gates: list[Gate], extra: dict | None = None) -> dict:
    return {
        "schema": 1,
        "task": task_name,
        "metrics": scored["metrics"],
        "gates": evaluate_gates(gates, scored["metrics"]),
        **(extra or {}),
        "details": scored["details"],
    }


def attach_comparison(document: dict, baseline: Baseline | None) -> dict:
    """Add `comparison` (each metric against a baseline run's, within a tolerance) to a metrics document; a
    baseline evaluated on other data is refused (exit 2) unless it allows that, and then marked `same_data: false`."""
    if baseline is not None:
        metrics = compare(document, baseline.document, baseline.tolerance)
        document["comparison"] = {
            "baseline": baseline.source,
            "tolerance": baseline.tolerance,
            "same_data": same_data(document, baseline),
            "metrics": metrics,
        }
    return document


def failed_gates(document: dict) -> list[str]:
    """Failed gates, then metrics that regressed against the baseline."""
    failed = [name for name, result in document["gates"].items() if not result["passed"]]
    comparison = document.get("comparison") or {"metrics": {}}
    failed += [
        f"{name} regressed against {comparison['baseline']}"
        for name, result in comparison["metrics"].items()
        if not result["passed"]
    ]
    return failed


def read_prediction_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no prediction rows")
    return rows


def print_checkpoints(console: Console, rows: list[dict]) -> None:
    """`eval --all-checkpoints`: one row per step, a column per metric."""
    from rich.table import Table

    table = Table(title="checkpoints", show_header=True, header_style="bold")
    table.add_column("step", justify="right")
    table.add_column("weights")
    names = list(rows[0]["metrics"]) if rows else []
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        values = [row["metrics"].get(n) for n in names]
        table.add_row(str(row["step"]), row["weights"], *("-" if v is None else f"{v:.4f}" for v in values))
    console.print(table)


def print_metrics(console: Console, document: dict, title: str = "metrics") -> None:
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in document["metrics"].items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if document["gates"]:
        gates = Table(title="gates", show_header=True, header_style="bold")
        gates.add_column("gate")
        gates.add_column("value", justify="right")
        gates.add_column("result")
        for name, result in document["gates"].items():
            value = "missing" if result["value"] is None else f"{result['value']:.4f}"
            gates.add_row(name, value, "[green]pass[/]" if result["passed"] else "[red]FAIL[/]")
        console.print(gates)
    comparison = document.get("comparison")
    if comparison:
        table = Table(
            title=f"against {comparison['baseline']} (tolerance {comparison['tolerance']:g})", header_style="bold"
        )
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("metric", "left"),
            ("baseline", "right"),
            ("now", "right"),
            ("change", "right"),
            ("result", "left"),
        )
        for column, justify in columns:
            table.add_column(column, justify=justify)
        for name, result in comparison["metrics"].items():
            table.add_row(
                name,
                f"{result['baseline']:.4f}",
                f"{result['value']:.4f}",
                f"{result['change']:+.4f}",
                "[green]ok[/]" if result["passed"] else "[red]REGRESSED[/]",
            )
        console.print(table)


def dumps(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)
