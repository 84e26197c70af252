"""Pictures in the run directory: the loss and learning-rate curves, and a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_curves(train_log: Path, target: Path, eval_log: Path | None = None) -> bool:
    """Loss and lr against the optimizer step; with evaluations during training, the eval metric and eval loss
    beside them. False when the log is empty."""
    entries = _read_jsonl(train_log)
    if not entries:
        return False
    evaluations = _read_jsonl(eval_log) if eval_log is not None else []
    plt = _pyplot()
    steps = [e["step"] for e in entries]
    rows = 3 if evaluations else 2
    figure, axes = plt.subplots(rows, 1, figsize=(7, 2.5 * rows), sharex=True)
    loss_axis, lr_axis = axes[0], axes[-1]
    loss_axis.plot(steps, [e["loss"] for e in entries], marker="." if len(steps) < 50 else None, label="training loss")
    if evaluations and any("eval_loss" in e["metrics"] for e in evaluations):
        loss_axis.plot(
            [e["step"] for e in evaluations],
            [e["metrics"].get("eval_loss") for e in evaluations],
            marker="o",
            label="eval loss",
        )
        loss_axis.legend()
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    if evaluations:
        metric_axis = axes[1]
        names = [n for n in evaluations[0]["metrics"] if n != "eval_loss"]
        for name in names:
            metric_axis.plot(
                [e["step"] for e in evaluations], [e["metrics"].get(name) for e in evaluations], marker="o", label=name
            )
        metric_axis.set_ylabel("eval metrics")
        metric_axis.legend(fontsize="small")
        metric_axis.grid(alpha=0.3)
    lr_axis.plot(steps, [e["lr"] for e in entries], color="tab:orange")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True


def confusion_matrix(labels: list, matrix: list[list[int]], target: Path) -> None:
    """Rows are the true labels, columns the predicted ones; each cell shows its count."""
    plt = _pyplot()
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(matrix, cmap="Blues")
    names = [str(label) for label in labels]
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)


def checkpoint_metrics(table: list[dict], target: Path) -> None:
    """Each metric against the step, one point per checkpoint (`finetune eval RUN --all-checkpoints`)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    rows = sorted(table, key=lambda row: row["step"] or 0)
    for name in rows[0]["metrics"]:
        axis.plot([r["step"] for r in rows], [r["metrics"].get(name) for r in rows], marker="o", label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("metric")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
