"""The small-eval-set warning: a gate whose threshold lies inside the metric's interval is decided by noise, and
the rows it says would resolve the margin are always more than the eval set holds (an asymmetric bootstrap
interval's mean half-width can be below the margin that its edge on the threshold's side still covers)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from finetune.evaluation.intervals import Interval
from finetune.evaluation.scoring import gate_warnings
from finetune.recipe.gates import parse_gate


@dataclass
class FixedIntervals:
    """The part of `Intervals` the warning reads: one metric's interval, and the units it was drawn from."""

    interval: Interval
    units: int

    def get(self, metric: str, level: float = 0.95) -> Interval:
        return self.interval


def rows_needed(warning: str) -> int:
    found = re.search(r"about (\d+) rows would resolve", warning)
    assert found, warning
    return int(found.group(1))


def test_an_asymmetric_interval_asks_for_more_rows_than_held():
    # logs/chatodd.log: rougeL 0.1455 on 4 rows, 95% interval [0, 0.30004]: "about 4 rows would resolve" before.
    intervals = FixedIntervals(Interval(0.0, 0.30004, 0.95, "bootstrap"), units=4)
    (warning,) = gate_warnings([parse_gate("rougeL>=0.3")], {"rougeL": 0.1455}, intervals)  # type: ignore[arg-type]
    assert "the eval set (4 rows) is too small" in warning
    # The upper edge reaches 0.15454 above the value, against a margin of 0.1545: (0.15454 / 0.1545)**2 x 4 rows.
    assert rows_needed(warning) == 5


def test_the_edge_on_the_thresholds_side_decides():
    # Value 0.5 in [0.1, 0.6]: a threshold above it is 0.1 from the upper edge, one below it 0.4 from the lower.
    intervals = FixedIntervals(Interval(0.1, 0.6, 0.95, "bootstrap"), units=100)
    (above,) = gate_warnings([parse_gate("f1>=0.55")], {"f1": 0.5}, intervals)  # type: ignore[arg-type]
    (below,) = gate_warnings([parse_gate("f1>=0.2")], {"f1": 0.5}, intervals)  # type: ignore[arg-type]
    assert rows_needed(above) == 400  # (0.1 / 0.05)**2 x 100
    assert rows_needed(below) == 178  # ceil((0.4 / 0.3)**2 x 100)


def test_no_warning_when_the_threshold_is_outside_the_interval():
    intervals = FixedIntervals(Interval(0.4, 0.6, 0.95, "bootstrap"), units=50)
    assert gate_warnings([parse_gate("f1>=0.3")], {"f1": 0.5}, intervals) == []  # type: ignore[arg-type]


def test_a_command_line_gate_is_refused_by_the_rules_a_recipe_gate_is(tmp_path):
    """`--gate f1>=1.5` can never pass: exit 2 before scoring, as the same gate in a recipe is, not a FAIL (4);
    a gate on the loss of saved predictions, which have none: exit 2, not "missing"."""
    from conftest import write_jsonl
    from helpers import invoke

    rows = [
        {
            "question": f"q{i}",
            "context": f"a{i}",
            "answers": {"text": [f"a{i}"], "answer_start": [0]},
            "prediction": f"a{i}",
        }
        for i in range(6)
    ]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", rows)
    never = invoke("eval", "--predictions", predictions, "--task", "qa", "--gate", "f1>=1.5")
    assert never.exit_code == 2 and "can never pass" in never.output, never.output
    loss = invoke("eval", "--predictions", predictions, "--task", "qa", "--gate", "eval_loss<=0.5")
    assert loss.exit_code == 2 and "saved predictions have none" in loss.output, loss.output
    fine = invoke("eval", "--predictions", predictions, "--task", "qa", "--gate", "f1>=0.5")
    assert fine.exit_code == 0, fine.output


def test_a_gate_on_a_metric_the_saved_predictions_do_not_report_is_refused(tmp_path):
    """micro_f1 of single-label predictions: the gate was judged "missing" and failed (exit 4), read by a CI job as
    a regression of the model; the same gate on a run is exit 2 before anything loads."""
    from conftest import write_jsonl
    from helpers import invoke

    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "prediction": "a"} for i in range(8)]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", rows)
    wrong = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "micro_f1>=0.1")
    assert wrong.exit_code == 2 and "micro_f1 is not reported for these predictions" in wrong.output, wrong.output
    right = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "macro_f1>=0.1")
    assert right.exit_code == 0, right.output


def test_an_interval_gate_gets_no_small_set_warning():
    """An interval gate is judged on its bound: noise cannot decide it, and the README promises the warning for
    plain gates (an `accuracy>=0.55@95` inside the interval was warned as "decided by noise" too)."""
    intervals = FixedIntervals(Interval(0.1, 0.6, 0.95, "bootstrap"), units=100)
    assert gate_warnings([parse_gate("f1>=0.55@95")], {"f1": 0.5}, intervals) == []  # type: ignore[arg-type]
    assert len(gate_warnings([parse_gate("f1>=0.55")], {"f1": 0.5}, intervals)) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("gate", ["accuracy>=0", "accuracy>-0.5", "f1<=1", "accuracy<1.5", "accuracy>=-1@95"])
def test_a_gate_on_a_fraction_that_can_never_fail_is_warned(gate):
    """`accuracy>=0` passes whatever the model does: a CI job reading it as a quality bar would be misled."""
    (warning,) = gate_warnings([parse_gate(gate)], {"accuracy": 0.5, "f1": 0.5}, None)
    assert "can never fail" in warning and "guards nothing" in warning


@pytest.mark.parametrize("gate", ["accuracy>0", "accuracy>=0.01", "f1<1", "accuracy==1", "eval_loss>=0"])
def test_a_gate_that_can_fail_is_not_warned(gate):
    assert gate_warnings([parse_gate(gate)], {"accuracy": 0.5, "f1": 0.5, "eval_loss": 1.0}, None) == []


def test_validate_warns_of_a_recipe_gate_that_can_never_fail(tiny_models, topic_data, write_recipe, tmp_path):
    """eval warned of `accuracy>=0`; validate, where a CI job checks its recipe first, said only "ok"."""
    from conftest import classification_recipe
    from helpers import invoke

    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["eval"] = {"gates": {"accuracy": ">=0"}}
    checked = invoke("validate", write_recipe(recipe))
    assert checked.exit_code == 0 and "warning: gate accuracy>=0 can never fail" in checked.output, checked.output
