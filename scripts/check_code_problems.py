"""Check the code-RL problem sets (data/code_rl/{train,eval}.jsonl), HumanEval layout.

For every row:
  - the fields are task_id, prompt, completion, test, entry_point (all strings);
  - task_id is "coderl/<split>/<index>" and unique; the prompt defines entry_point with a docstring;
  - test defines check(candidate) whose body is 4-8 one-line assert statements;
  - prompt + completion + test + check(entry_point) passes under `python -I` within 10 s;
  - the docstring examples hold for the reference completion (doctest);
  - a wrong body (`return None`) fails the tests.
Across files: no entry point or prompt appears twice.

Exits non-zero on any problem, printing file:line. Run: python scripts/check_code_problems.py [train.jsonl eval.jsonl]
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = [ROOT / "data/code_rl/train.jsonl", ROOT / "data/code_rl/eval.jsonl"]
FIELDS = {"task_id", "prompt", "completion", "test", "entry_point"}
WRONG_BODY = "    return None\n"
TIMEOUT_S = 10
MIN_ASSERTS, MAX_ASSERTS = 4, 8


def run_program(source: str, workdir: Path) -> tuple[bool, str]:
    """Run source with `python -I` in workdir; return (passed, error tail)."""
    path = workdir / "program.py"
    path.write_text(source)
    try:
        proc = subprocess.run(
            [sys.executable, "-I", str(path)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TIMEOUT_S} s"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return proc.returncode == 0, " | ".join(tail)


def static_problems(row: dict, split: str, index: int) -> list[str]:
    """Problems visible without running anything."""
    if set(row) != FIELDS:
        return [f"fields are {sorted(row)}, expected {sorted(FIELDS)}"]
    if not all(isinstance(row[k], str) for k in FIELDS):
        return ["every field must be a string"]
    found = []
    if row["task_id"] != f"coderl/{split}/{index}":
        found.append(f"task_id {row['task_id']!r}, expected 'coderl/{split}/{index}'")
    name, prompt, completion = row["entry_point"], row["prompt"], row["completion"]
    if not prompt.endswith('"""\n'):
        found.append("prompt must end right after the closing docstring line")
    if not re.search(rf"^def {re.escape(name)}\(", prompt, re.MULTILINE):
        found.append(f"prompt does not define {name}")
    if not completion.strip() or any(line and not line.startswith("    ") for line in completion.splitlines()):
        found.append("completion must be a non-empty body indented 4 spaces")
    try:
        module = ast.parse(prompt + completion)
        funcs = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name]
        doc = ast.get_docstring(funcs[0]) if funcs else None
        if not doc or ">>> " not in doc:
            found.append("prompt needs a docstring with at least one >>> example")
    except SyntaxError as exc:
        found.append(f"prompt + completion does not parse: {exc}")
    try:
        test = ast.parse(row["test"])
        checks = [n for n in test.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
        if len(checks) != 1 or [a.arg for a in checks[0].args.args] != ["candidate"]:
            found.append("test must define check(candidate) once")
        else:
            body = checks[0].body
            if not all(isinstance(s, ast.Assert) and s.lineno == s.end_lineno for s in body):
                found.append("check body must be only one-line assert statements")
            if not MIN_ASSERTS <= len(body) <= MAX_ASSERTS:
                found.append(f"check has {len(body)} statements, expected {MIN_ASSERTS}-{MAX_ASSERTS}")
    except SyntaxError as exc:
        found.append(f"test does not parse: {exc}")
    return found


def run_problems(row: dict, workdir: Path) -> list[str]:
    """Problems found by running the reference, its doctests and a wrong solution."""
    found = []
    tail = "\n" + row["test"] + "\n" + f"check({row['entry_point']})\n"
    ok, err = run_program(row["prompt"] + row["completion"] + tail, workdir)
    if not ok:
        found.append(f"reference fails its tests: {err}")
    doctest_run = "\nimport doctest\nimport sys\nsys.exit(1 if doctest.testmod().failed else 0)\n"
    ok, err = run_program(row["prompt"] + row["completion"] + doctest_run, workdir)
    if not ok:
        found.append(f"docstring examples do not hold for the reference: {err or 'doctest failed'}")
    ok, _ = run_program(row["prompt"] + WRONG_BODY + tail, workdir)
    if ok:
        found.append("a wrong solution (return None) passes the tests")
    return found


def normalize(prompt: str) -> str:
    return " ".join(prompt.split()).lower()


def main(argv: list[str]) -> int:
    files = [Path(p) for p in argv] if argv else DEFAULT_FILES
    errors: list[str] = []
    seen_ids: dict[str, str] = {}
    seen_names: dict[str, str] = {}
    seen_prompts: dict[str, str] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for path in files:
            split = path.stem
            if not path.exists():
                errors.append(f"{path}: missing")
                continue
            count = 0
            for lineno, line in enumerate(path.read_text().splitlines(), start=1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    errors.append(f"{where}: blank line")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    errors.append(f"{where}: not JSON: {exc}")
                    continue
                if not isinstance(row, dict):
                    errors.append(f"{where}: not a JSON object")
                    continue
                count += 1
                found = static_problems(row, split, count - 1)
                if set(row) == FIELDS:
                    for label, key, seen in (
                        ("task_id", row["task_id"], seen_ids),
                        ("entry_point", row["entry_point"], seen_names),
                        ("prompt", normalize(str(row["prompt"])), seen_prompts),
                    ):
                        if key in seen:
                            found.append(f"{label} duplicates {seen[key]}")
                        else:
                            seen[key] = where
                if not found:
                    found = run_problems(row, workdir)
                errors.extend(f"{where}: {row.get('task_id', '?')}: {problem}" for problem in found)
            counts[str(path)] = count
    for path_name, count in counts.items():
        print(f"{path_name}: {count} problems")
    for error in errors:
        print(error)
    if errors:
        print(f"FAILED: {len(errors)} problem(s)")
        return 1
    print(f"OK: {sum(counts.values())} problems; references pass, doctests hold, wrong solutions fail")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
