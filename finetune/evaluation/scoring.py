"""Running a task's evaluation, scoring prediction rows, checking gates, showing the table."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from datasets import Dataset
from torch.utils.data import DataLoader

from finetune.data.tables import read_jsonl
from finetune.errors import DataError
from finetune.evaluation.compare import LOWER_IS_BETTER, Baseline, baseline_rows, compare, same_data
from finetune.evaluation.intervals import (
    LEVEL,
    UNBOUNDED_METRICS,
    Intervals,
    Scorer,
    estimate_intervals,
    paired_tests,
)
from finetune.evaluation.preference import PREFERENCE_METRICS, has_preferences, preference_metrics
from finetune.files import json_text
from finetune.recipe.gates import Gate, evaluate_gates, parse_gate
from finetune.recipe.schema import EvalSection

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.console import Console, JustifyMethod


class ScoresRows(Protocol):
    """What scoring needs of a task (finetune.tasks sits above this layer): metrics from prediction rows."""

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]: ...


class RewardsRows(ScoresRows, Protocol):
    """A task that rewards predictions (train.objective grpo): one reward per row (`Rewards.values`)."""

    def rewards(self, rows: list[dict], settings: EvalSection) -> Any: ...


# GRPO's metric: the mean over the counted prediction rows of the task's own reward of each (task.rewards, the
# score GRPO trains on before train.grpo.reward's extra terms), with its interval as a mean over units. Each row
# keeps its reward in this field, so resampling and predictions.jsonl reuse it, and code runs once for it.
REWARD_MEAN = "reward_mean"
REWARD_FIELD = "task_reward"


def eval_loader(
    dataset: Dataset, collate: Callable[[list[dict]], dict], batch_size: int, accelerator: Accelerator
) -> DataLoader:
    """In-order batches, sharded over processes; gather_for_metrics drops the padding duplicates."""
    return accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))


def score(
    task: ScoresRows,
    rows: list[dict],
    settings: EvalSection,
    eval_loss: float | None = None,
    generated: bool = True,
    intervals: bool = False,
    rewards: bool = False,
) -> dict:
    """{"metrics": {...}, "details": {...}} from prediction rows; `settings.metrics` filters the headline metrics.

    `generated=False`: the rows hold no predictions (judged preference rows only), so the task's metrics are skipped.
    `intervals`: also "intervals", each metric's interval estimate (finetune.evaluation.intervals), for the final
    evaluation of a run and `finetune eval` (not for evaluations during training: they only pick weights).
    `rewards` (train.objective grpo): also `reward_mean`, each row's reward kept on it as `task_reward`.
    """
    if rewards and generated:
        add_rewards(task, rows, settings)  # type: ignore[arg-type]  # grpo trains only tasks with a reward
    metrics, details = _metrics(task, rows, settings, generated, eval_loss=eval_loss)
    scored: dict[str, Any] = {"metrics": metrics, "details": details}
    if intervals:
        scored["intervals"] = estimate_intervals(row_scorer(task, settings, generated), rows, metrics)
    return scored


def add_rewards(task: RewardsRows, rows: list[dict], settings: EvalSection) -> None:
    """Each counted row's reward by the task (`task_reward`); rows that already hold one keep it."""
    missing = [row for row in rows if _counted(row) and REWARD_FIELD not in row]
    if missing:
        for row, value in zip(missing, task.rewards(missing, settings).values, strict=True):
            row[REWARD_FIELD] = float(value)


# Metrics scoring adds to the task's own, from fields other features leave on the rows.
ADDED_METRICS = frozenset(
    {"retrieval_recall@k", "watermark_detected", "watermark_bit_accuracy", REWARD_MEAN, *PREFERENCE_METRICS}
)


def _counted(row: dict) -> bool:
    """Whether the task's metrics count a row: a thumbs-down row's completion is what not to write, so generation
    is scored against the desirable rows only."""
    return bool(row.get("desirable", True))


def _metrics(
    task: ScoresRows,
    rows: list[dict],
    settings: EvalSection,
    generated: bool,
    eval_loss: float | None = None,
    names: frozenset[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics and the task's details; `names` (resampling) skips the task's scoring when none of its metrics
    is wanted, and a resample the task counts no row of (thumbs-down rows only) has none of the task's metrics."""
    references = [row for row in rows if _counted(row)]
    wants_task = names is None or bool(names - ADDED_METRICS)
    skip = not generated or not wants_task or (names is not None and not references)
    scored = {"metrics": {}, "details": {}} if skip else task.compute_metrics(references, settings)
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
    rewarded = [r[REWARD_FIELD] for r in references if r.get(REWARD_FIELD) is not None]
    if rewarded:  # rows a GRPO run's evaluation rewarded (`add_rewards`)
        metrics[REWARD_MEAN] = sum(rewarded) / len(rewarded)
    accuracies = [r["bit_accuracy"] for r in rows if r.get("bit_accuracy") is not None]
    if accuracies:  # a learned watermark's rows: the share of the message's bits read back
        metrics["watermark_bit_accuracy"] = sum(accuracies) / len(accuracies)
    return metrics, scored.get("details", {})


def row_scorer(task: ScoresRows, settings: EvalSection, generated: bool = True) -> Scorer:
    """This evaluation's scoring of any rows, for resampling (intervals, paired tests)."""

    def rescore(rows: list[dict], names: frozenset[str]) -> dict[str, Any]:
        return _metrics(task, rows, settings, generated, names=names)[0]

    return Scorer(rescore, _counted)


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
    """Recipe gates, then command-line gates, every one judged (the same gate twice, once): a `--gate accuracy>=0.8`
    beside the recipe's `>=0.85` adds a gate, it never loosens one (a CI line silently passed what the recipe
    refused). To change a recipe's gate, override it: `eval.gates.accuracy='">=0.8"'`."""
    gates: dict[str, Gate] = {}
    for text in [f"{m}{c}" for m, c in (recipe_gates or {}).items()] + list(cli_gates or []):
        gate = parse_gate(text)
        gates.setdefault(str(gate), gate)
    return list(gates.values())


def metrics_document(task_name: str, scored: dict, gates: list[Gate], extra: dict | None = None) -> dict:
    """metrics.json: the metrics, their intervals (when scored with them), the gates, and what was evaluated;
    `warnings` when a gate's verdict is within the noise of the eval set."""
    metrics = scored["metrics"]
    intervals: Intervals | None = scored.get("intervals")
    document = {
        "schema": 1,
        "task": task_name,
        "metrics": metrics,
        **({"intervals": intervals.document(), "interval_settings": intervals.settings()} if intervals else {}),
        "gates": evaluate_gates(gates, metrics, intervals.bounds if intervals else None),
        **(extra or {}),
        "details": scored["details"],
    }
    warnings = gate_warnings(gates, metrics, intervals)
    if warnings:
        document["warnings"] = warnings
    return document


def _rows_needed(units: int, reach: float, margin: float) -> str:
    """How many rows would pull the interval's edge on the threshold's side (`reach` from the value) in to the
    margin (an interval's reach scales as 1/sqrt(rows)). The threshold lies inside the interval, so the reach is
    larger than the margin and more rows than the eval set's are needed; at least one more, whatever the rounding."""
    if margin <= 0:
        return ""
    rows = max(units + 1, math.ceil(units * (reach / margin) ** 2))
    return f"; about {rows} rows would resolve a margin of {margin:.4g}"


def guards_nothing(gate: Gate) -> str | None:
    """The warning for a gate on a fraction that no value can fail (`accuracy>=0`), said by eval and validate."""
    if gate.metric in UNBOUNDED_METRICS or gate.can_fail_within(0.0, 1.0):
        return None
    return f"gate {gate} can never fail: {gate.metric} is a fraction in [0, 1], so it guards nothing"


def gate_warnings(gates: list[Gate], metrics: dict, intervals: Intervals | None) -> list[str]:
    """A plain gate whose threshold lies inside the metric's LEVEL interval is decided by noise: the eval set is
    too small for the margin between the value and the threshold. A gate on a fraction that no value can fail."""
    out = []
    for gate in gates:
        idle = guards_nothing(gate)
        if idle is not None:
            out.append(idle)
            continue
        if gate.level is not None:  # judged on the interval's bound already: noise cannot decide it
            continue
        value = metrics.get(gate.metric)
        level = LEVEL
        interval = intervals.get(gate.metric, level) if intervals is not None else None
        if interval is None or not isinstance(value, (int, float)) or not interval.low < gate.threshold < interval.high:
            continue
        assert intervals is not None
        margin = abs(value - gate.threshold)
        # The edge on the threshold's side, not the half-width: a bootstrap interval is asymmetric (rougeL 0.1455
        # in [0, 0.3]: a mean half-width of 0.15 is below the margin 0.1545 that the upper edge still covers).
        reach = interval.high - value if gate.threshold > value else value - interval.low
        needed = _rows_needed(intervals.units, reach, margin)
        out.append(
            f"gate {gate}: the eval set ({intervals.units} rows) is too small for its margin: {gate.metric} "
            f"{value:.4f} has the {_percent(level)} interval [{interval.low:.4f}, {interval.high:.4f}], which holds "
            f"{gate.threshold:g}{needed}"
        )
    return out


def _percent(level: float) -> str:
    return f"{level * 100:g}%"


def _rescored(task: ScoresRows, settings: EvalSection | None, rows: list[dict]) -> dict:
    """The metrics of some prediction rows, as this evaluation scores them (a comparison on the matched rows)."""
    return score(task, rows, settings or EvalSection())["metrics"]


def attach_comparison(
    document: dict,
    baseline: Baseline | None,
    task: ScoresRows | None = None,
    rows: list[dict] | None = None,
    settings: EvalSection | None = None,
    fields: tuple[str, ...] = (),
) -> dict:
    """Add `comparison` (each metric against a baseline run's, within a tolerance) to a metrics document; a
    baseline evaluated on other data is refused (exit 2) unless it allows that, and then marked `same_data: false`.

    With this evaluation's prediction rows (and the task, its eval settings and input `fields`, which say which
    rows are the same), each metric also gets a paired test over the rows both evaluated, from the baseline's
    predictions.jsonl: `p_value`, `method` (mcnemar_exact, paired_bootstrap), `significant` at the baseline's
    level, and the interval of the difference; a warning when that interval holds the tolerance's limit (the
    eval set is too small to tell a regression beyond the tolerance from noise)."""
    if baseline is None:
        return document
    rescore = None if task is None else partial(_rescored, task, settings)
    metrics = compare(document, baseline, baseline.tolerance, rows, fields, rescore)
    comparison: dict[str, Any] = {
        "baseline": baseline.source,
        "tolerance": baseline.tolerance,
        "same_data": same_data(document, baseline, rows, fields),
        "level": baseline.level,
        "metrics": metrics,
    }
    document["comparison"] = comparison
    theirs = baseline_rows(baseline.source) if rows is not None and task is not None else None
    if rows is None or task is None:
        comparison["paired"] = {"note": "re-scored without prediction rows: no paired test"}
    elif theirs is None:
        comparison["paired"] = {"note": f"no predictions.jsonl beside {baseline.source}'s metrics.json: no paired test"}
    else:
        matched, results = paired_tests(
            row_scorer(task, settings or EvalSection()),
            rows,
            document["metrics"],
            theirs,
            baseline.document["metrics"],
            list(metrics),
            fields,
            baseline.level,
        )
        comparison["paired"] = {"rows": matched}
        for name, result in results.items():
            metrics[name].update(
                {
                    "p_value": result.p_value,
                    "method": result.method,
                    "significant": None if result.p_value is None else result.p_value < 1 - baseline.level,
                    "difference_interval": list(result.interval) if result.interval else None,
                    **({"note": result.note} if result.note else {}),
                }
            )
            if result.interval is not None and result.difference is not None:
                # The regression gate's limit: a drop of `tolerance` (a rise, for lower-is-better metrics).
                limit = baseline.tolerance if name in LOWER_IS_BETTER else -baseline.tolerance
                low, high = result.interval
                if low < limit < high:
                    change = result.difference
                    needed = _rows_needed(
                        matched, high - change if limit > change else change - low, abs(change - limit)
                    )
                    document.setdefault("warnings", []).append(
                        f"--compare: {name}: the {_percent(baseline.level)} interval of its change, [{low:+.4f}, "
                        f"{high:+.4f}], holds the tolerance's limit {limit:+g}: the eval set ({matched} rows) is too "
                        f"small to tell a regression beyond {baseline.tolerance:g} from noise{needed}"
                    )
    return document


def failed_gates(document: dict) -> list[str]:
    """Failed gates, then metrics that regressed against the baseline."""
    failed = []
    for name, result in document["gates"].items():
        if result["passed"]:
            continue
        if result.get("level") is not None:
            bound = result.get("bound")
            side = "upper" if result.get("side") == "high" else "lower"
            failed.append(
                f"{name} ({'no interval' if bound is None else f'{side} bound {bound:.4f}'} at {_percent(result['level'])})"
            )
        else:
            failed.append(name)
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
    from rich.markup import escape
    from rich.table import Table

    intervals = document.get("intervals") or {}
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if intervals:
        level = next(iter(intervals.values()))["level"]
        table.add_column(f"{_percent(level)} interval", justify="right")
        table.add_column("method")
    for name, value in document["metrics"].items():
        cells = [name, f"{value:.4f}" if isinstance(value, float) else str(value)]
        if intervals:
            interval = intervals.get(name)
            cells += [f"[{interval['low']:.4f}, {interval['high']:.4f}]", interval["method"]] if interval else ["-", ""]
        table.add_row(*cells)
    console.print(table)
    if document["gates"]:
        gates = Table(title="gates", show_header=True, header_style="bold")
        gates.add_column("gate")
        gates.add_column("value", justify="right")
        gates.add_column("judged on", justify="right")
        gates.add_column("result")
        for name, result in document["gates"].items():
            value = "missing" if result["value"] is None else f"{result['value']:.4f}"
            judged = "value"
            if result.get("level") is not None:
                bound = result.get("bound")
                judged = "no interval" if bound is None else f"{result['side']} {bound:.4f}"
            gates.add_row(name, value, judged, "[green]pass[/]" if result["passed"] else "[red]FAIL[/]")
        console.print(gates)
    comparison = document.get("comparison")
    if comparison:
        paired = comparison.get("paired") or {}
        tested = (
            f"; paired tests at {_percent(comparison.get('level', LEVEL))} over {paired['rows']} rows"
            if "rows" in paired
            else ""
        )
        table = Table(
            title=f"against {comparison['baseline']} (tolerance {comparison['tolerance']:g}{tested})",
            header_style="bold",
        )
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("metric", "left"),
            ("baseline", "right"),
            ("now", "right"),
            ("change", "right"),
            ("p", "right"),
            ("significant", "left"),
            ("result", "left"),
        )
        for column, justify in columns:
            table.add_column(column, justify=justify)
        for name, result in comparison["metrics"].items():
            p_value, significant = result.get("p_value"), result.get("significant")
            table.add_row(
                name,
                f"{result['baseline']:.4f}",
                f"{result['value']:.4f}",
                f"{result['change']:+.4f}",
                "-" if p_value is None else f"{p_value:.3g}",
                "-" if significant is None else ("yes" if significant else "no"),
                "[green]ok[/]" if result["passed"] else "[red]REGRESSED[/]",
            )
        console.print(table)
        if "note" in paired:
            console.print(f"paired tests: {paired['note']}", highlight=False, soft_wrap=True)
    for warning in document.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def dumps(document: dict) -> str:
    return json_text(document, indent=2)
