"""A learned watermark with a learning rate of its own (eval.watermark.lr) through `finetune run`: its modules are
checkpointed in their own optimizer group at their own peak, and a run stopped and resumed ends with the
uninterrupted run's bytes."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import invoke

from tests.flows.test_detector_learned import resume_to_the_whole_runs_bytes, stop_a_run_and_its_twin


def test_a_stopped_run_with_the_watermarks_own_lr_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    paths = stop_a_run_and_its_twin(tiny_models, tmp_path, monkeypatch, lr=5e-2)
    lora_lr = yaml.safe_load(paths["stopped"].read_text())["train"]["lr"]
    checkpoint = sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))[-1]
    groups = json.loads((checkpoint / "optimizer.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([lora_lr, 5e-2])
    # The watermark's training settings bind a resume (they shape the optimizer and the loss): refused, named.
    changed = invoke("run", paths["stopped"], "--resume", "auto", "--no-estimate", "eval.watermark.lr=null")
    assert changed.exit_code == 2, changed.output
    assert "eval.watermark" in changed.output and "internal error" not in changed.output
    resume_to_the_whole_runs_bytes(paths, tmp_path)
