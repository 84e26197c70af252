"""Pictures in the run directory: the loss and learning-rate curves, and a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def training_curves(train_log: Path, target: Path) -> bool:
    """loss and lr against optimizer step, from train_log.jsonl. False when the log is empty."""
    entries = [json.loads(line) for line in train_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not entries:
        return False
    plt = _pyplot()
    steps = [e["step"] for e in entries]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    loss_axis.plot(steps, [e["loss"] for e in entries], marker="." if len(steps) < 50 else None)
    loss_axis.set_ylabel("training loss")
    loss_axis.grid(alpha=0.3)
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
