"""For CI jobs: compare metrics with a baseline run, and report gates as JUnit XML."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

from finetune.errors import RecipeError
from finetune.files import write_text_atomic

LOWER_IS_BETTER = {"eval_loss"}
NOT_A_QUALITY = {"mean_length"}  # a description of the outputs, neither better nor worse when it moves


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


def compare(document: dict, baseline: dict, tolerance: float) -> dict[str, dict]:
    """Per metric of both documents: did this evaluation regress by more than `tolerance` (absolute)?

    Metrics this evaluation does not measure (eval_loss when re-scoring saved
    predictions) are not compared; gate them with --gate to require them.
    """
    if baseline.get("task") != document["task"]:
        raise RecipeError(f"--compare: the baseline is a {baseline.get('task')} run, this is {document['task']}")
    results = {}
    for name, before in baseline["metrics"].items():
        if name in NOT_A_QUALITY or not isinstance(before, (int, float)):
            continue
        now = document["metrics"].get(name)
        if now is None:
            continue
        change = now - before
        regressed = change > tolerance if name in LOWER_IS_BETTER else change < -tolerance
        results[name] = {"baseline": before, "value": now, "change": change, "passed": not regressed}
    return results


def write_junit(document: dict, path: str | Path) -> None:
    """One test case per gate and per baseline comparison, so CI systems list them as tests."""
    cases = []
    for name, result in document.get("gates", {}).items():
        value = result["value"]
        message = f"{result['metric']} is {'missing' if value is None else f'{value:.6g}'}; the gate is {name}"
        cases.append(("finetune.gates", name, result["passed"], message))
    comparison = document.get("comparison")
    if comparison:
        for metric, result in comparison["metrics"].items():
            message = (
                f"{metric} {result['value']} against baseline {result['baseline']} ({result['change']:+.6g}; "
                f"tolerance {comparison['tolerance']})"
            )
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
    text = ElementTree.tostring(suites, encoding="unicode", xml_declaration=True)
    write_text_atomic(Path(path), text + "\n")  # its folder is created as named, like reports/gates.xml
