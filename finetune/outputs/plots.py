"""Pictures in the run directory: the loss and learning-rate curves, and a confusion matrix (bounded, with the whole
matrix as CSV beside it)."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from types import ModuleType

from finetune import files


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
    _save(figure, target)
    plt.close(figure)
    return True


# The confusion picture shows at most this many classes (the most confused ones) in at most this many inches (at
# 100 dpi), whatever the number of classes: 200 classes would otherwise make a 12,200-pixel picture. The whole
# matrix goes to a CSV file beside it.
MAX_PICTURE_CLASSES = 20
MAX_PICTURE_INCHES = 14.0
_LABEL_CHARS = 24


def most_confused(matrix: list[list[int]], k: int) -> list[int]:
    """The indices of the `k` classes with the most errors (wrong predictions of them plus wrong predictions as
    them), in their original order; every class when there are at most `k`."""
    n = len(matrix)
    if n <= k:
        return list(range(n))
    errors = [sum(matrix[i]) + sum(row[i] for row in matrix) - 2 * matrix[i][i] for i in range(n)]
    chosen = sorted(range(n), key=lambda i: (-errors[i], i))[:k]
    return sorted(chosen)


def _short(label: object) -> str:
    text = str(label)
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def confusion_matrix(labels: list, matrix: list[list[int]], target: Path) -> list:
    """Rows are the true labels, columns the predicted ones; each cell shows its count. Bounded: with more than
    MAX_PICTURE_CLASSES classes only the most confused are drawn (the title says so), never more than
    MAX_PICTURE_INCHES square. Returns the labels drawn."""
    plt = _pyplot()
    shown = most_confused(matrix, MAX_PICTURE_CLASSES)
    sub = [[matrix[i][j] for j in shown] for i in shown]
    size = min(MAX_PICTURE_INCHES, max(4.0, 0.6 * len(shown) + 2))
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(sub, cmap="Blues")
    names = [_short(labels[i]) for i in shown]
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(shown) < len(labels):
        axis.set_title(
            f"the {len(shown)} most confused of {len(labels)} classes (all: {target.with_suffix('.csv').name})",
            fontsize="small",
        )
    peak = max((max(row) for row in sub), default=0)
    for i, row in enumerate(sub):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    _save(figure, target)
    plt.close(figure)
    return [labels[i] for i in shown]


def confusion_csv(labels: list, matrix: list[list[int]], target: Path) -> None:
    """The whole confusion matrix as CSV: a header of the predicted labels, then one row per true label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *map(str, labels)])
    for label, row in zip(labels, matrix, strict=True):
        writer.writerow([str(label), *row])
    files.write_text_atomic(target, buffer.getvalue())


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
    _save(figure, target)
    plt.close(figure)


def _save(figure: object, target: Path) -> None:
    """Laid out and written. A label in a script the font lacks (an emoji, say) is drawn as a box, which the CSV
    beside the picture spells out: matplotlib's "Glyph missing" warning on stderr said nothing more."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        figure.tight_layout()  # type: ignore[attr-defined]
        figure.savefig(target, dpi=100)  # type: ignore[attr-defined]
