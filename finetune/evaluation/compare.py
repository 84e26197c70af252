"""For CI jobs: compare metrics with a baseline run, and report gates as JUnit XML."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from xml.etree import ElementTree

from finetune.data.tables import data_file_hashes, read_jsonl
from finetune.errors import RecipeError
from finetune.evaluation.intervals import LEVEL, identity, match_units
from finetune.files import write_text_atomic

if TYPE_CHECKING:
    from datasets import Dataset

    from finetune.recipe.schema import Recipe

LOWER_IS_BETTER = {"eval_loss", "hamming_loss"}
NOT_A_QUALITY = {
    "mean_length",
    "logps_chosen",
    "logps_rejected",
}  # a description of the outputs, neither better nor worse when it moves


class Baseline(NamedTuple):
    """`--compare`: where the baseline came from, its metrics.json, the tolerance, whether a baseline evaluated
    on other data may be compared anyway (`--allow-different-data`), and the level of the paired tests."""

    source: str
    document: dict
    tolerance: float
    allow_different_data: bool = False
    level: float = LEVEL


def eval_data_record(recipe: Recipe, rows: Dataset) -> dict:
    """What an evaluation was scored on, for `--compare` to tell like from unlike: the eval source as the recipe
    names it, the number of rows, and a SHA-256 of the rows themselves (every field, in order)."""
    data = recipe.data
    if data.eval is not None:
        source = data.eval if isinstance(data.eval, str) else ", ".join(data.eval)
    else:
        train = data.train if isinstance(data.train, str) else ", ".join(data.train)
        source = f"{train} (data.eval_split {data.eval_split}, seed {recipe.train.seed})"
    digest = hashlib.sha256()
    for batch in rows.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    record: dict = {"source": source, "rows": len(rows), "sha256": digest.hexdigest()}
    if data.knowledge_base is not None:  # the rows' contexts were retrieved from it: name it, so a change is named
        record["knowledge_base"] = data_file_hashes(data, ("knowledge_base",))
    return record


def _describe(record: dict) -> str:
    text = f"{record.get('source', '?')} ({record.get('rows', '?')} rows, sha256 {str(record.get('sha256'))[:12]})"
    base = record.get("knowledge_base")
    if isinstance(base, dict):
        text += " with the knowledge base " + ", ".join(f"{k} (sha256 {str(v)[:12]})" for k, v in base.items())
    return text


def matched_rows(rows: Sequence[dict], other: Sequence[dict], fields: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """The rows both evaluations scored, each side's own copy (with its own prediction), in this side's order and
    aligned; the n-th repeat of a row matches the n-th repeat of it on the other side (the paired tests' matching,
    `intervals.match_units`, one row a unit)."""
    ours, theirs = match_units(
        rows, [[i] for i in range(len(rows))], other, [[j] for j in range(len(other))], identity(rows, other, fields)
    )
    return [rows[i] for i in ours], [other[j] for j in theirs]


def _contents(rows: Sequence[dict], fields: Sequence[str]) -> Counter:
    """The rows as a multiset of their `id` and input and reference fields (what makes two evaluations' data the
    same, whatever the order; predictions left out)."""
    return Counter(
        json.dumps({"id": r.get("id"), **{f: r[f] for f in fields if f in r}}, sort_keys=True, default=str)
        for r in rows
    )


def same_data(
    document: dict, baseline: Baseline, rows: Sequence[dict] | None = None, fields: Sequence[str] = ()
) -> bool | None:
    """Whether this evaluation and the baseline scored the same rows. Refuses (exit 2), naming both, when they
    differ, unless the baseline allows different data (then False).

    By metrics.json's `eval_data` when both recorded it; else (saved predictions re-scored, or a metrics.json from
    before finetune recorded them) by the rows themselves when this evaluation's prediction `rows` are given and
    the baseline has its predictions.jsonl: the same rows (by `id`, else the input `fields`) on both sides, as many
    times each. None when neither tells."""
    ours, theirs = document.get("eval_data"), baseline.document.get("eval_data")
    if isinstance(ours, dict) and isinstance(theirs, dict) and ours.get("sha256") and theirs.get("sha256"):
        # A ranking's rows hold no passage text: a knowledge base edited under the same queries changes every metric
        # all the same (where both recorded one; a metrics.json from before they were recorded has none).
        bases = [side.get("knowledge_base") for side in (ours, theirs)]
        if None in bases or bases[0] == bases[1]:
            if ours["sha256"] == theirs["sha256"]:
                return True
            other = baseline_rows(baseline.source) if rows is not None else None
            if rows is not None and other is not None and _contents(rows, fields) == _contents(other, fields):
                return True  # the same rows in another order (a regenerated or shuffled eval file): the same data
        described = f"was evaluated on {_describe(theirs)}, this evaluation on {_describe(ours)}"
    else:
        other = baseline_rows(baseline.source) if rows is not None else None
        if rows is None or other is None:
            return None
        # Each row's identity and its content (inputs and references): rows matched by `id` whose references were
        # edited are other data (a paired test over them compared the same predictions against other labels).
        mine, their_keys = _contents(rows, fields), _contents(other, fields)
        if mine == their_keys:
            return True
        matched = sum((mine & their_keys).values())
        described = (
            f"scored {len(other)} rows, this evaluation {len(rows)}, and {matched} of them match (by id, inputs and "
            "references)"
        )
    if not baseline.allow_different_data:
        raise RecipeError(
            f"--compare: the baseline {baseline.source} {described}; metrics on different data are not comparable. "
            "Evaluate on the baseline's data, or give --allow-different-data to compare on the rows both scored"
        )
    return False


def read_baseline(source: str) -> dict:
    """metrics.json of a run directory, or a metrics.json file itself."""
    path = Path(source)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise RecipeError(f"--compare {source}: no metrics.json there (give a finished run or a metrics.json file)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        document["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f"--compare {source}: {path} is not a finetune metrics.json") from None
    return document


def baseline_rows(source: str) -> list[dict] | None:
    """The baseline's prediction rows: predictions.jsonl beside its metrics.json (a run directory and an
    evaluation's output both hold one), for the paired tests; None when there is none."""
    path = Path(source)
    predictions = (path if path.is_dir() else path.parent) / "predictions.jsonl"
    return read_jsonl(predictions) if predictions.is_file() else None


def compare(
    document: dict,
    baseline: dict | Baseline,
    tolerance: float,
    rows: Sequence[dict] | None = None,
    fields: Sequence[str] = (),
    rescore: Callable[[list[dict]], dict] | None = None,
) -> dict[str, dict]:
    """Per metric of both documents: did this evaluation regress by more than `tolerance` (absolute)?

    Metrics this evaluation does not measure (eval_loss when re-scoring saved
    predictions) are not compared; gate them with --gate to require them.

    Given the `Baseline`, this evaluation's prediction `rows` (with the input `fields` that identify a row) and
    `rescore` (prediction rows -> metrics): a baseline scored on other rows is refused (exit 2, `same_data`)
    unless it allows different data, and then each metric is compared on the rows both evaluations scored (the
    metric of each side's matched rows, `rows: {"this", "baseline", "matched"}` on every result) so that the change
    is the one the paired test measures; with no row in common the comparison is refused (exit 2).
    """
    source = baseline if isinstance(baseline, Baseline) else None
    before_document = baseline.document if isinstance(baseline, Baseline) else baseline
    if before_document.get("task") != document["task"]:
        raise RecipeError(f"--compare: the baseline is a {before_document.get('task')} run, this is {document['task']}")
    now_metrics, before_metrics, on_rows = document["metrics"], before_document["metrics"], None
    if source is not None and rows is not None and same_data(document, source, rows, fields) is False:
        other = baseline_rows(source.source)
        if other is not None and rescore is not None:
            mine, theirs = matched_rows(rows, other, fields)
            on_rows = {"this": len(rows), "baseline": len(other), "matched": len(mine)}
            if not mine:  # a regression check that checks nothing must not pass
                raise RecipeError(
                    f"--compare: no row of this evaluation is one the baseline scored ({len(rows)} rows here, "
                    f"{len(other)} there, matched by their fields): nothing to compare"
                )
            now_metrics, before_metrics = rescore(mine), rescore(theirs)
    results = {}
    for name, before in before_metrics.items():
        if name in NOT_A_QUALITY or not isinstance(before, (int, float)):
            continue
        now = now_metrics.get(name)
        if now is None or name not in before_document["metrics"] or name not in document["metrics"]:
            continue
        change = now - before
        # Written as "within tolerance" so that a NaN on either side (a broken model's loss) fails: every
        # comparison with NaN is false, and "not worse" read it as no regression.
        within = change <= tolerance if name in LOWER_IS_BETTER else change >= -tolerance
        regressed = not within
        results[name] = {"baseline": before, "value": now, "change": change, "passed": not regressed}
        if on_rows is not None:
            results[name]["rows"] = on_rows
    return results


def write_junit(document: dict, path: str | Path) -> None:
    write_text_atomic(Path(path), junit_xml(document))  # its folder is created as named, like reports/gates.xml


def junit_xml(document: dict) -> str:
    """One test case per gate and per baseline comparison, so CI systems list them as tests."""
    cases = []
    for name, result in document.get("gates", {}).items():
        value = result["value"]
        message = f"{result['metric']} is {'missing' if value is None else f'{value:.6g}'}; the gate is {name}"
        if result.get("level") is not None:
            bound = result.get("bound")
            message += (
                f", judged on its {result['level'] * 100:g}% interval's {result['side']} bound "
                f"({'none: no interval' if bound is None else f'{bound:.6g}'})"
            )
        cases.append(("finetune.gates", name, result["passed"], message))
    comparison = document.get("comparison")
    if comparison:
        for metric, result in comparison["metrics"].items():
            message = (
                f"{metric} {result['value']} against baseline {result['baseline']} ({result['change']:+.6g}; "
                f"tolerance {comparison['tolerance']})"
            )
            if result.get("p_value") is not None:
                verdict = "significant" if result["significant"] else "not significant"
                message += f"; {result['method']} p={result['p_value']:.4g}, {verdict}"
            cases.append(("finetune.compare", f"{metric} vs baseline", result["passed"], message))
    failures = sum(1 for *_, passed, _ in cases if not passed)
    suites = ElementTree.Element("testsuites", tests=str(len(cases)), failures=str(failures))
    suite = ElementTree.SubElement(
        suites,
        "testsuite",
        name=f"finetune {document['task']}",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    for classname, name, passed, message in cases:
        case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name)
        if passed:
            ElementTree.SubElement(case, "system-out").text = message
        else:
            ElementTree.SubElement(case, "failure", message=message, type="QualityGate").text = message
    ElementTree.indent(suites)
    return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
