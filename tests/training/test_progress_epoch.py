"""The plain progress line's epoch: the current epoch and the total are rounded alike, so the current one never
shows above the total (a GRPO run of 0.00926 epochs showed "epoch 0.01/0.00926")."""

from __future__ import annotations

import re

import pytest

from finetune.training.loop import PlainProgress, TrainPlan


def epochs_shown(total_steps: int, steps_per_epoch: int, step: int) -> tuple[str, str]:
    plan = TrainPlan(
        examples=steps_per_epoch,
        batches_per_epoch=steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=0,
        epochs=-(-total_steps // steps_per_epoch),
        world_size=1,
    )
    progress = PlainProgress(console=None, plan=plan, logger=None, clock=lambda: 0.0)
    progress.first_step, progress.step = 0, step
    found = re.search(r"  epoch (\S+)/(\S+)  ", progress.line(1.0))
    assert found, progress.line(1.0)
    return found.group(1), found.group(2)


@pytest.mark.parametrize(
    ("total_steps", "steps_per_epoch"), [(4, 432), (1, 3), (200, 50), (7, 3), (30_000, 10), (5, 100_000)]
)
def test_the_current_epoch_never_shows_above_the_total(total_steps, steps_per_epoch):
    for step in range(1, total_steps + 1, max(1, total_steps // 50)):
        current, total = epochs_shown(total_steps, steps_per_epoch, step)
        assert float(current) <= float(total), (current, total)
    assert (
        epochs_shown(total_steps, steps_per_epoch, total_steps)[0]
        == epochs_shown(total_steps, steps_per_epoch, total_steps)[1]
    )


def test_the_epoch_keeps_three_significant_digits_of_the_total():
    assert epochs_shown(4, 432, 3) == ("0.00694", "0.00926")
    assert epochs_shown(200, 50, 12) == ("0.24", "4.00")
    assert epochs_shown(30_000, 10, 1234) == ("123", "3000")
