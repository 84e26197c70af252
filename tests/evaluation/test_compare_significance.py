"""`finetune eval --compare BASELINE`: paired tests over the rows both evaluated, against statsmodels' McNemar and a
plain paired bootstrap (the task's own metrics on every resample, same seed); on a small eval set a noise-level
difference is not significant and a real one is."""

from __future__ import annotations

import json
import random
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from helpers import invoke

from finetune.evaluation import intervals as iv
from finetune.evaluation.compare import Baseline, write_junit
from finetune.evaluation.scoring import attach_comparison, metrics_document, score
from finetune.recipe.schema import EvalSection
from finetune.tasks import get_task
from tests.conftest import write_jsonl
from tests.evaluation.test_intervals import WORDS

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "refund", "other"]


def labelled(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": i, "text": f"ticket {i}", "label": rng.choice(LABELS)} for i in range(n)]


def predicted(rows: list[dict], right: set[int], seed: int = 1) -> list[dict]:
    """Each row right when its index is in `right`, else a wrong label (chosen at random, seeded)."""
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        wrong = rng.choice([x for x in LABELS if x != row["label"]])
        out.append(row | {"prediction": row["label"] if i in right else wrong})
    return out


def evaluation_dir(path: Path, rows: list[dict]) -> Path:
    """What `finetune eval --output` leaves: metrics.json beside predictions.jsonl."""
    path.mkdir(parents=True)
    scored = score(get_task("classification"), rows, EvalSection())
    (path / "metrics.json").write_text(json.dumps(metrics_document("classification", scored, [])))
    write_jsonl(path / "predictions.jsonl", rows)
    return path


def test_mcnemar_equals_statsmodels_exact():
    from statsmodels.stats.contingency_tables import mcnemar

    for b in range(0, 26):
        for c in range(0, 26):
            reference = mcnemar([[11, b], [c, 4]], exact=True).pvalue
            assert abs(iv.mcnemar_exact(b, c) - reference) < 1e-12, (b, c)


def compare_on_the_command_line(tmp_path: Path, baseline: list[dict], candidate: list[dict], *extra: str) -> dict:
    base = evaluation_dir(tmp_path / "baseline", baseline)
    path = write_jsonl(tmp_path / "candidate.jsonl", candidate)
    result = invoke("eval", "--predictions", path, "--task", "classification", "--compare", base, "--json", *extra)
    assert result.exit_code in (0, 4), result.output
    return json.loads(result.stdout)["comparison"]


def test_noise_on_a_small_eval_set_is_not_significant(tmp_path):
    """40 rows, 30 right before; after: 2 of them wrong, 3 others right (31 right): McNemar on 2 vs 3 discordant
    rows, and the paired bootstrap of macro F1, both far from significant."""
    rows = labelled()
    before = set(range(30))
    after = (before - {0, 1}) | {30, 31, 32}
    comparison = compare_on_the_command_line(tmp_path, predicted(rows, before), predicted(rows, after))
    assert comparison["paired"] == {"rows": 40}
    accuracy, macro = comparison["metrics"]["accuracy"], comparison["metrics"]["macro_f1"]
    assert accuracy["method"] == "mcnemar_exact" and accuracy["p_value"] == pytest.approx(1.0)
    assert accuracy["significant"] is False
    assert macro["method"] == "paired_bootstrap" and macro["p_value"] > 0.2 and macro["significant"] is False


def test_a_few_rows_broken_all_one_way_are_not_significant(tmp_path):
    """160 rows all right before, 3 wrong after: McNemar's p is 2 / 2^3 = 0.25, and the paired bootstrap of the F1
    averages (its null imposed by centring) agrees that 3 rows are not enough."""
    rows = labelled(160, seed=2)
    comparison = compare_on_the_command_line(
        tmp_path, predicted(rows, set(range(160))), predicted(rows, set(range(160)) - {3, 50, 90})
    )
    assert comparison["metrics"]["accuracy"]["p_value"] == pytest.approx(0.25, abs=1e-12)
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        assert comparison["metrics"][name]["significant"] is False, (name, comparison["metrics"][name])


def test_a_real_difference_on_the_same_small_set_is_significant(tmp_path):
    """20 of 40 right before, 36 after (17 fixed, 1 broken): both tests say significant at 95%."""
    rows = labelled()
    before = set(range(20))
    after = (before - {0}) | set(range(20, 37))
    comparison = compare_on_the_command_line(tmp_path, predicted(rows, before), predicted(rows, after))
    accuracy, macro = comparison["metrics"]["accuracy"], comparison["metrics"]["macro_f1"]
    from statsmodels.stats.contingency_tables import mcnemar

    assert abs(accuracy["p_value"] - mcnemar([[19, 1], [17, 3]], exact=True).pvalue) < 1e-12
    assert accuracy["significant"] is True and accuracy["p_value"] < 0.001
    assert macro["significant"] is True and macro["p_value"] < 0.01
    assert macro["difference_interval"][0] > 0


def test_the_paired_bootstrap_equals_the_plain_one(monkeypatch):
    """p-value and the difference's interval from scoring both evaluations' rows, resample by resample, with the
    task's own compute_metrics: same seed, same units, same numbers."""
    monkeypatch.setattr(iv, "RESAMPLES", 120)
    task = get_task("classification")
    rows = labelled(30, seed=5)
    baseline, candidate = predicted(rows, set(range(0, 30, 2))), predicted(rows, set(range(0, 30, 3)) | {1, 5})
    matched, results = paired("classification", candidate, baseline, ["macro_f1", "weighted_f1"], ("text", "label"))
    assert matched == 30
    drawn = np.random.default_rng(iv.SEED).integers(0, 30, size=(120, 30))
    for name in ("macro_f1", "weighted_f1"):
        d = np.array(
            [
                task.compute_metrics([candidate[i] for i in picks])["metrics"][name]
                - task.compute_metrics([baseline[i] for i in picks])["metrics"][name]
                for picks in drawn
            ]
        )
        observed = task.compute_metrics(candidate)["metrics"][name] - task.compute_metrics(baseline)["metrics"][name]
        p = min(1.0, ((np.abs(d - observed) >= abs(observed) - 1e-12).sum() + 1) / (len(d) + 1))
        assert results[name].method == "paired_bootstrap"
        assert abs(results[name].p_value - p) < 1e-12
        low, high = np.percentile(d, [2.5, 97.5])
        assert abs(results[name].interval[0] - low) < 1e-12 and abs(results[name].interval[1] - high) < 1e-12


def test_rows_are_matched_by_id_whatever_their_order(tmp_path):
    """The baseline's predictions shuffled and missing 5 rows: the same pairs are tested, on 35 rows."""
    rows = labelled()
    baseline, candidate = predicted(rows, set(range(25))), predicted(rows, set(range(5, 40)))
    shuffled = baseline[5:]
    random.Random(9).shuffle(shuffled)
    aligned = compare_on_the_command_line(tmp_path / "a", baseline[5:], candidate[5:])
    matched = compare_on_the_command_line(tmp_path / "b", shuffled, candidate, "--allow-different-data")
    assert matched["paired"] == {"rows": 35}
    for name in ("accuracy", "macro_f1"):
        assert matched["metrics"][name]["p_value"] == aligned["metrics"][name]["p_value"]


def paired(
    task_name: str, candidate: list[dict], baseline: list[dict], names: list[str], fields: tuple[str, ...]
) -> tuple[int, dict[str, iv.PairedResult]]:
    """A task's paired tests of `names`, candidate against baseline, rows matched by `fields`, as eval scores them."""
    task, settings = get_task(task_name), EvalSection()
    document = metrics_document(task_name, score(task, candidate, settings), [])
    base = metrics_document(task_name, score(task, baseline, settings), [])
    scorer = iv.Scorer(lambda r, _: score(task, r, settings)["metrics"])
    return iv.paired_tests(scorer, candidate, document["metrics"], baseline, base["metrics"], names, fields)


def paired_copy(candidate: list[dict], baseline: list[dict], name: str) -> iv.PairedResult:
    """The copywriting task's paired test of one metric, candidate against baseline, on the same briefs."""
    return paired("copywriting", candidate, baseline, [name], ("prompt", "completion"))[1][name]


def test_a_text_metric_noise_and_real_difference():
    """Copywriting ROUGE-L on 16 briefs (a mean over rows: the paired bootstrap): one word changed in two
    predictions is noise; predictions rewritten to the reference in most rows is real."""
    rng = random.Random(3)
    words = WORDS
    rows = [{"prompt": f"brief {i}", "completion": " ".join(rng.choice(words) for _ in range(8))} for i in range(16)]
    baseline = [r | {"prediction": " ".join(rng.choice(words) for _ in range(8))} for r in rows]
    noise = [dict(r) for r in baseline]
    for i in (0, 1):
        noise[i]["prediction"] = noise[i]["prediction"].replace(noise[i]["prediction"].split()[0], "shoes", 1)
    real = [r | {"prediction": r["completion"]} if i % 8 else r for i, r in enumerate(baseline)]

    def p_value(candidate: list[dict], name: str) -> tuple[float, bool]:
        result = paired_copy(candidate, baseline, name)
        assert result.method == "paired_bootstrap"
        return result.p_value, result.p_value < 0.05

    assert not p_value(noise, "rougeL")[1]
    assert p_value(real, "rougeL")[1] and p_value(real, "bleu")[1]


def test_a_tolerance_finer_than_the_noise_warns_and_junit_carries_the_test(tmp_path):
    rows = labelled()
    baseline, candidate = predicted(rows, set(range(30))), predicted(rows, set(range(1, 31)))
    base = evaluation_dir(tmp_path / "baseline", baseline)
    document = metrics_document("classification", score(get_task("classification"), candidate, EvalSection()), [])
    attach_comparison(
        document,
        Baseline(str(base), json.loads((base / "metrics.json").read_text()), 0.01),
        get_task("classification"),
        candidate,
        EvalSection(),
        ("text", "label"),
    )
    warning = next(w for w in document["warnings"] if w.startswith("--compare: accuracy: the 95% interval"))
    assert "holds the tolerance's limit -0.01" in warning and "(40 rows) is too small" in warning
    assert "rows would resolve" in warning
    far = metrics_document("classification", score(get_task("classification"), baseline, EvalSection()), [])
    attach_comparison(
        far,
        Baseline(str(base), json.loads((base / "metrics.json").read_text()), 0.5),
        get_task("classification"),
        baseline,
        EvalSection(),
        ("text", "label"),
    )
    assert "warnings" not in far  # a tolerance of 0.5 is far outside the noise of identical predictions
    write_junit(document, tmp_path / "gates.xml")
    cases = ElementTree.parse(tmp_path / "gates.xml").getroot().iter("testcase")
    accuracy = next(c for c in cases if c.get("name") == "accuracy vs baseline")
    assert "mcnemar_exact p=1" in ElementTree.tostring(accuracy, encoding="unicode")


def test_without_the_baselines_predictions_there_is_no_paired_test(tmp_path):
    rows = labelled()
    base = evaluation_dir(tmp_path / "baseline", predicted(rows, set(range(30))))
    (base / "predictions.jsonl").unlink()
    path = write_jsonl(tmp_path / "candidate.jsonl", predicted(rows, set(range(31))))
    result = invoke("eval", "--predictions", path, "--task", "classification", "--compare", base, "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)["comparison"]
    assert "no predictions.jsonl" in comparison["paired"]["note"]
    assert all("p_value" not in result for result in comparison["metrics"].values())


def test_distinct_bigrams_are_compared_by_the_paired_jackknife():
    """Distinct-2 of two evaluations on the same briefs: the difference with each brief left out of both (the
    task's own metric recomputed), its jackknife standard error, the normal p-value and interval; predictions
    that repeat one slogan are a real loss of diversity, one word changed is not."""
    from scipy.stats import norm

    task = get_task("copywriting")
    rng = random.Random(4)
    words = [*WORDS, "deal"]
    rows = [{"prompt": f"brief {i}", "completion": " ".join(rng.choice(words) for _ in range(8))} for i in range(24)]
    baseline = [r | {"prediction": " ".join(rng.choice(words) for _ in range(8))} for r in rows]
    slogan = "best price today on every summer sale"
    repeated = [r | {"prediction": slogan} if i % 3 else r for i, r in enumerate(baseline)]
    tweaked = [dict(r) for r in baseline]
    tweaked[0]["prediction"] = "shoes " + tweaked[0]["prediction"]

    def distinct(picked: list[dict]) -> float:
        return task.compute_metrics(picked)["metrics"]["distinct_2"]

    def compared(candidate: list[dict]) -> iv.PairedResult:
        return paired_copy(candidate, baseline, "distinct_2")

    for candidate in (repeated, tweaked):
        result = compared(candidate)
        observed = distinct(candidate) - distinct(baseline)
        n = len(rows)
        left_out = np.array(
            [
                distinct(candidate[:i] + candidate[i + 1 :]) - distinct(baseline[:i] + baseline[i + 1 :])
                for i in range(n)
            ]
        )
        error = np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum())
        assert result.method == "paired_jackknife"
        assert abs(result.difference - observed) < 1e-12
        assert abs(result.p_value - 2 * norm.sf(abs(observed) / error)) < 1e-9
        z = norm.ppf(0.975)
        assert abs(result.interval[0] - (observed - z * error)) < 1e-12
    assert compared(repeated).p_value < 0.01 and compared(tweaked).p_value > 0.2
