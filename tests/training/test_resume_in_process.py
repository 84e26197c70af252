"""Exact resume inside one process: a stop asked for at step N checkpoints and exits 75, and `--resume auto`
then gives the adapter bytes and the losses of an uninterrupted run.

test_resume.py proves the same across kill -9 in real subprocesses (slow tier); this one runs in the fast
tier and in-process, so mutation testing (tests/README.md) sees checkpoint.py's save, verify and restore.
"""

from __future__ import annotations

import errno
import io
import json
import signal

import pytest
from conftest import classification_recipe
from helpers import invoke

from finetune import cli
from finetune.training import loop as train
from tests.training.test_resume import adapter_bytes, log_losses


def stop_at_step(monkeypatch, step: int) -> None:
    """Ask the loop to stop (as SIGTERM would) at optimizer step `step`, in this process."""
    original, calls = train.NonFiniteGuard.check, [0]

    def check(self, grad_norm, stop, progress):
        calls[0] += 1
        if calls[0] == step:
            stop.received = signal.SIGTERM
        return original(self, grad_norm, stop, progress)

    monkeypatch.setattr(train.NonFiniteGuard, "check", check)


# The last step (16 of 16) too: a stop there was dropped, and the run went on to evaluate and exit 0.
@pytest.mark.parametrize("kind, stop_step", [("gpt2", 5), ("bert", 10), ("bert", 16)])
def test_a_stopped_run_resumes_to_the_same_adapter_bytes(
    kind, stop_step, monkeypatch, tiny_models, topic_data, write_recipe, tmp_path
):
    # Dropout on (random masks to restore), accumulation over 2 batches, 2 epochs of 8 steps.
    settings = dict(checkpoint_every=3, keep_checkpoints=2, grad_accum=2, log_every=1)
    whole_recipe = write_recipe(
        classification_recipe(tiny_models[kind], topic_data, tmp_path / "whole", **settings), "whole.yaml"
    )
    stopped_recipe = write_recipe(
        classification_recipe(tiny_models[kind], topic_data, tmp_path / "stopped", **settings), "stopped.yaml"
    )
    assert invoke("run", whole_recipe).exit_code == 0

    with monkeypatch.context() as patch:
        stop_at_step(patch, stop_step)
        stopped = invoke("run", stopped_recipe)
    assert stopped.exit_code == 75, stopped.output
    assert f"step-{stop_step:08d}" in stopped.output
    assert not (tmp_path / "stopped" / "adapter").exists()

    resumed = invoke("run", stopped_recipe, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    metrics = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert metrics["training"]["resumed_from"].endswith(f"step-{stop_step:08d}")
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / "whole")
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / "whole")


class _ReaderStopsAfterFirstStep(io.StringIO):
    """Standard output piped to a reader that stops reading after the first progress line (`finetune run R | head`)."""

    def write(self, text: str) -> int:
        if "training step" in self.getvalue():
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        return super().write(text)


def test_a_closed_output_pipe_stops_training_at_a_checkpoint_that_resumes_exactly(
    monkeypatch, tiny_models, topic_data, write_recipe, tmp_path
):
    """The progress lines' pipe closed mid-run exited 141 at once, and every step since the last checkpoint was lost
    (none at all before the first): the run now stops at the next step as on SIGTERM, checkpointed (exit 75)."""
    settings = dict(checkpoint_every=50, log_every=1)
    whole_recipe = write_recipe(
        classification_recipe(tiny_models["bert"], topic_data, tmp_path / "whole", **settings), "whole.yaml"
    )
    stopped_recipe = write_recipe(
        classification_recipe(tiny_models["bert"], topic_data, tmp_path / "stopped", **settings), "stopped.yaml"
    )
    assert invoke("run", whole_recipe).exit_code == 0

    with monkeypatch.context() as patch:
        patch.setattr(cli, "console", cli._Console(file=_ReaderStopsAfterFirstStep(), force_terminal=False))
        stopped = invoke("run", stopped_recipe)
    assert stopped.exit_code == 75, stopped.output
    assert "closed standard output" in stopped.output and "resumable checkpoint saved" in stopped.output
    assert not (tmp_path / "stopped" / "adapter").exists()

    resumed = invoke("run", stopped_recipe, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / "whole")
    assert log_losses(tmp_path / "stopped") == log_losses(tmp_path / "whole")
