"""A learned watermark with a learning rate of its own (eval.watermark.lr) through `finetune run`: its modules are
checkpointed in their own optimizer group at their own peak, and a run stopped and resumed ends with the
uninterrupted run's bytes."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import invoke

from tests.flows.test_detector_learned import learned_recipe
from tests.training.test_resume import log_losses
from tests.training.test_resume_in_process import stop_at_step


def test_a_stopped_run_with_the_watermarks_own_lr_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    paths = {}
    for name in ("whole", "stopped"):
        recipe = learned_recipe(tiny_models["llama"], tmp_path, lr=5e-2)
        recipe["train"].update({"epochs": 2, "checkpoint_every": 2, "log_every": 1})
        recipe["output"]["dir"] = str(tmp_path / name)
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    lora_lr = recipe["train"]["lr"]
    # --no-estimate: the plan's estimate would run training steps of its own, and the stop counts steps.
    assert invoke("run", paths["whole"], "--no-estimate").exit_code == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert invoke("run", paths["stopped"], "--no-estimate").exit_code == 75
    checkpoint = sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))[-1]
    groups = json.loads((checkpoint / "optimizer.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([lora_lr, 5e-2])
    # The watermark's training settings bind a resume (they shape the optimizer and the loss): refused, named.
    changed = invoke("run", paths["stopped"], "--resume", "auto", "--no-estimate", "eval.watermark.lr=null")
    assert changed.exit_code == 2, changed.output
    assert "eval.watermark" in changed.output and "internal error" not in changed.output
    resumed = invoke("run", paths["stopped"], "--resume", "auto", "--no-estimate")
    assert resumed.exit_code == 0, resumed.output
    for file in ("adapter_model.safetensors", "learned_watermark.safetensors"):
        assert (tmp_path / "stopped" / "adapter" / file).read_bytes() == (
            tmp_path / "whole" / "adapter" / file
        ).read_bytes()
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / "whole")
