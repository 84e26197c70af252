"""Progress a CI log can see: with stdout redirected (not a terminal), training prints plain, flushed lines
(step/total, epoch, loss, lr, tokens/s, elapsed, ETA) as it goes; on a terminal the rich bar stays; neither
changes what is trained."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import classification_recipe
from rich.console import Console
from typer.testing import CliRunner

from finetune import cli
from finetune.training.loop import StepLogger, TrainPlan, progress_bar

LINE = re.compile(
    r"^training step (?P<step>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\)  epoch (?P<epoch>[\d.]+)/[\d.]+"
    r"(?:  loss (?P<loss>[\d.]+|nan|inf))?  lr (?P<lr>[\d.]+e[+-]\d+)(?:  (?P<tps>\d+) tok/s)?"
    r"  elapsed (?P<elapsed>\d+:\d\d:\d\d)  eta (?P<eta>\d+:\d\d:\d\d|\?)$"
)


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


class _OneProcess:
    device = torch.device("cpu")
    num_processes = 1

    def reduce(self, tensor, op):
        return tensor

    def log(self, values, step):
        pass


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plan(total: int, steps_per_epoch: int = 10) -> TrainPlan:
    return TrainPlan(total * 8, steps_per_epoch, steps_per_epoch, total, 0, -(-total // steps_per_epoch), 1)


def simulate(console, total: int, stop_at: int | None = None, slow_steps=(), log_every: int = 10):
    """The loop's calls to the display, one per optimizer step, each 0.5 s (30 s for `slow_steps`)."""
    clock, logger = FakeClock(), StepLogger(None, _OneProcess(), every=log_every)
    bar = progress_bar(console, plan(total), True, logger, clock=clock)
    with bar:
        bar.update(0, None)
        for step in range(1, (stop_at or total) + 1):
            logger.add(torch.tensor(2.0 - step / total), torch.tensor(100))
            clock.now += 30.0 if step in slow_steps else 0.5
            entry = logger.maybe_log(step, step / 10, 1e-3, force=step == total)
            bar.update(step, entry, 1e-3 * (1 - step / total))
    return bar


@pytest.mark.unit
def test_plain_lines_at_the_first_step_every_5_percent_every_30_s_and_at_the_end():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)
    bar = simulate(console, 200, slow_steps=(23,))
    assert bar.plain is not None
    text = buffer.getvalue()
    lines = progress_lines(text)
    assert len(lines) == len(text.splitlines()), text  # nothing else, no escape codes
    assert "\x1b" not in text
    steps = [int(m["step"]) for m in lines]
    # Every 10 steps (5% of 200), the first step, and step 23 which came 30 s after the last line.
    assert steps == sorted({1, 23, *range(10, 201, 10)})
    first, slow, last = lines[0], lines[steps.index(23)], lines[-1]
    assert first["total"] == "200" and first["percent"] == "0" and first["epoch"] == "0.1"  # 20.0 epochs
    assert float(first["loss"]) == pytest.approx(2.0 - 1 / 200, abs=1e-4)  # the window before any log line
    assert first["tps"] and first["elapsed"] == "0:00:00" and first["eta"] == "0:01:40"
    assert slow["elapsed"] == "0:00:41"  # 22 steps of 0.5 s, then 30 s
    assert last["step"] == "200" and last["percent"] == "100" and last["eta"] == "0:00:00"
    assert float(last["loss"]) == pytest.approx(sum(2.0 - s / 200 for s in range(191, 201)) / 10, abs=1e-4)


@pytest.mark.unit
def test_an_early_stop_gets_its_final_line_and_a_resume_counts_from_where_it_started():
    buffer = io.StringIO()
    simulate(Console(file=buffer, force_terminal=False), 200, stop_at=37)
    assert [int(m["step"]) for m in progress_lines(buffer.getvalue())][-2:] == [30, 37]
    # A resumed run: its first line is the first step it trains, and its ETA counts only its own steps.
    buffer, clock = io.StringIO(), FakeClock()
    bar = progress_bar(Console(file=buffer, force_terminal=False), plan(100), True, None, clock=clock)
    with bar:
        bar.update(50, None)
        clock.now += 10
        bar.update(51, None, 1e-3)
    (line,) = progress_lines(buffer.getvalue())
    assert line["step"] == "51" and line["eta"] == "0:08:10"  # 10 s per step, 49 to go
    assert line["loss"] is None and line["elapsed"] == "0:00:10"  # no step logger: no loss to show


@pytest.mark.unit
def test_a_terminal_keeps_the_rich_bar_and_other_processes_print_nothing():
    buffer = io.StringIO()
    bar = simulate(Console(file=buffer, force_terminal=True, width=120), 40)
    assert bar.plain is None and not progress_lines(buffer.getvalue())
    assert "40/40" in buffer.getvalue()
    dumb = io.StringIO()  # TERM=dumb cannot redraw a bar: plain lines there too
    assert simulate(Console(file=dumb, force_terminal=True, _environ={"TERM": "dumb"}), 40).plain is not None
    assert progress_lines(dumb.getvalue())
    silent = progress_bar(Console(file=io.StringIO()), plan(40), False, None)
    assert not silent.enabled and silent.plain is None


def test_plain_lines_and_the_bar_train_the_same_adapter(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    runner = CliRunner()
    adapters, outputs = [], []
    for name, terminal in (("plain", False), ("bar", True)):
        buffer = io.StringIO()
        monkeypatch.setattr(cli, "console", Console(file=buffer, force_terminal=terminal, width=120, emoji=False))
        out = tmp_path / name
        recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, out, log_every=4), f"{name}.yaml")
        result = runner.invoke(cli.app, ["run", str(recipe)])
        assert result.exit_code == 0, result.output
        adapters.append((out / "adapter" / "adapter_model.safetensors").read_bytes())
        outputs.append(buffer.getvalue())
    assert adapters[0] == adapters[1]
    plain, bar = (progress_lines(text) for text in outputs)
    assert [m["step"] for m in plain][0] == "1" and plain[-1]["step"] == plain[-1]["total"] == "30"
    assert not bar and "30/30" in outputs[1]


@pytest.mark.slow
def test_a_redirected_cli_run_shows_progress_lines_while_it_trains(tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, out, epochs=8, log_every=5))
    log = tmp_path / "ci.log"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    seen_while_training: list[int] = []  # the last step shown in the log, at each look before the adapter existed
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune", "run", str(recipe)], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + 600
        try:
            while process.poll() is None and time.time() < deadline:
                lines = progress_lines(log.read_text())
                # The final adapter is written only after the last step: a line read before it exists was
                # printed (and flushed) while the model was still training.
                if lines and not (out / "adapter").exists():
                    seen_while_training.append(int(lines[-1]["step"]))
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert seen_while_training, text[-3000:]
    # The lines came one after another as it trained, not all at the end.
    assert seen_while_training[0] < 120 and len(set(seen_while_training)) >= 2, seen_while_training
    lines = progress_lines(text)
    steps = [int(m["step"]) for m in lines]
    assert steps[0] == 1 and steps[-1] == int(lines[-1]["total"]) == 120  # 15 steps per epoch, 8 epochs
    assert steps == sorted(set(steps)) and len(steps) >= 10
    assert "\x1b" not in text
    # Every line has the loss and tokens/s; the last line's loss is the train_log's last line's.
    assert all(m["loss"] and m["tps"] for m in lines)
    last_logged = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert last_logged["step"] == 120 and float(lines[-1]["loss"]) == pytest.approx(last_logged["loss"], abs=1e-4)
