"""Evaluation during training: when to evaluate, which weights were best, when to stop early.

The task's own predict + metrics run on the live model (no reload), with every
random generator saved before and restored after, so a run that evaluates
trains exactly like one that does not. The monitor's state (history, best so
far, patience) travels in each checkpoint, so a resumed run decides the same.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from finetune.evaluation.compare import LOWER_IS_BETTER
from finetune.files import json_text
from finetune.recipe.schema import EarlyStopping


class Evaluator(Protocol):
    """Scores the live model on the evaluation rows used during training; returns its metrics."""

    rows: int

    def __call__(self, model: torch.nn.Module) -> dict[str, float]: ...


@dataclass
class MonitorState:
    """What the monitor knows; saved in every checkpoint (JSON)."""

    history: list[dict] = field(default_factory=list)  # {step, epoch, seconds, metrics}
    best_step: int | None = None
    best_value: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    pruned: bool = False  # the judge (a sweep's pruner) stopped the run


@dataclass
class Monitor:
    every: int | str  # N optimizer steps, or "epoch"
    metric: str
    evaluator: Evaluator
    log_path: Path | None  # eval_log.jsonl (main process only)
    early_stopping: EarlyStopping | None = None
    state: MonitorState = field(default_factory=MonitorState)
    # Asked after each evaluation, with (step, metrics), whether to stop now: `finetune sweep`'s pruner.
    judge: Callable[[int, dict[str, float]], bool] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def due(self, step: int, epoch_end: bool, last: bool) -> bool:
        """Evaluate at the schedule's steps, and at the last step so the final weights are a candidate too."""
        if last:
            return True
        return epoch_end if self.every == "epoch" else step % int(self.every) == 0

    def evaluate(self, model: torch.nn.Module, step: int, epoch: float) -> dict:
        """Score the model now; update best and patience; return the history entry."""
        states = _rng_states()
        was_training = model.training
        started = time.perf_counter()
        try:
            metrics = self.evaluator(model)
        finally:
            _restore_rng_states(states)
            model.train(was_training)
        entry = {
            "step": step,
            "epoch": round(epoch, 4),
            "seconds": round(time.perf_counter() - started, 2),
            "metrics": metrics,
        }
        self.state.history.append(entry)
        self._update_best(step, metrics.get(self.metric))
        if self.judge is not None and self.judge(step, metrics):
            self.state.pruned = True
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json_text(entry) + "\n")
        return entry

    def _update_best(self, step: int, value: float | None) -> None:
        state = self.state
        if value is None or not math.isfinite(value):
            state.evals_without_improvement += 1
            return
        delta = self.early_stopping.min_delta if self.early_stopping else 0.0
        if state.best_value is None:
            improved = True
        elif self.higher_is_better:
            improved = value > state.best_value + delta
        else:
            improved = value < state.best_value - delta
        if improved:
            state.best_step, state.best_value, state.evals_without_improvement = step, value, 0
        else:
            state.evals_without_improvement += 1

    def should_stop(self) -> bool:
        if self.state.pruned:
            self.state.stopped_early = True
            return True
        if self.early_stopping is None or self.state.evals_without_improvement < self.early_stopping.patience:
            return False
        self.state.stopped_early = True
        return True

    # ------------------------------------------------------------ resume

    def to_dict(self) -> dict:
        return asdict(self.state)

    def resume(self, saved: dict, step: int) -> None:
        """Continue a checkpointed run: its state, and its evaluation log up to the checkpoint's step."""
        if saved:
            self.state = MonitorState(**saved)
        if self.log_path is not None and self.log_path.is_file():
            kept = [
                line
                for line in self.log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step
            ]
            self.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _rng_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng_states(states: tuple) -> None:
    cpu, cuda, python, numpy_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


def summary(monitor: Monitor | None, kept_step: int, keep: str) -> dict:
    """The `evaluation` block of metrics.json: the history, which weights were kept and why, early stopping."""
    if monitor is None:
        return {}
    state = monitor.state
    if keep == "best" and state.best_step is not None:
        why = f"best {monitor.metric} ({state.best_value:.4f}) among {len(state.history)} evaluations"
    else:
        why = "the last weights (eval.keep: last)"
    return {
        "every": monitor.every,
        "metric": monitor.metric,
        "rows_during_training": monitor.evaluator.rows,
        "history": state.history,
        "best_step": state.best_step,
        "best_value": state.best_value,
        "kept_step": kept_step,
        "kept_because": why,
        "stopped_early": state.stopped_early,
        "pruned": state.pruned,
    }
