"""TRL's conversational prompt-completion layout (`{"prompt": [turns], "completion": [one assistant turn]}`) for SFT
and evaluation, and its prompt-only layout for predict: read as the conversation the prompt's turns and the
completion make, so a run trains, scores and answers exactly as it does on the same rows written as `messages`."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from datasets import Dataset
from helpers import invoke, invoke_wide

from finetune.data.conversations import prompt_completion_conversations
from finetune.errors import DataError
from tests.tasks.test_conversations import chat_model, chat_recipe, chat_rows  # noqa: F401 (the fixture)


def _split(row: dict) -> dict:
    """A `messages` row as TRL's prompt-completion row: the turns before the final assistant turn, then that turn."""
    turns = row["messages"]
    return {"prompt": turns[:-1], "completion": turns[-1:]}


def _read(rows: list[dict], labeled: bool = True, columns: dict | None = None) -> Dataset | None:
    return prompt_completion_conversations(
        Dataset.from_list(rows), columns or {}, "prompt", "completion", "data.train", labeled=labeled
    )


def test_a_prompt_and_its_completion_are_the_conversation_they_make():
    rows = chat_rows(6)
    read = _read([_split(r) for r in rows])
    assert read is not None and read["messages"] == [r["messages"] for r in rows]
    # A text prompt is one user turn, a text completion the assistant's; mapped columns and ids are kept.
    text = _read([{"ask": "hi", "say": "hello", "id": "a"}], columns={"prompt": "ask", "completion": "say"})
    assert text is None  # no field holds turns here: the text path reads these rows
    turns = _read(
        [{"ask": [{"role": "user", "content": "hi"}], "say": "hello", "id": "a"}],
        columns={"prompt": "ask", "completion": "say"},
    )
    assert turns is not None and turns.to_list() == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": "a"}
    ]
    # predict's rows: the prompt's turns alone (a reference beside them is passed through by predict, not read)
    asked = _read([_split(r) for r in rows], labeled=False)
    assert asked is not None and asked["messages"] == [r["messages"][:-1] for r in rows]


def test_several_reference_answers_are_not_turns():
    """Generative QA's `answer` may be a list of texts (several gold answers): not a conversation."""
    rows = [{"question": "q", "answer": ["Paris", "paris"]}]
    assert prompt_completion_conversations(Dataset.from_list(rows), {}, "prompt", "answer", "data.eval") is None


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion": "c"},
            "row 1: field 'prompt' must end with a user (or system) turn",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
            "row 1: field 'completion' must answer the prompt with one assistant turn, got user",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "completion": None},
            "row 1: field 'completion' must hold the answer, got nothing (null)",
        ),
        ({"completion": [{"role": "assistant", "content": "b"}]}, "no 'prompt' field"),
        ({"prompt": [{"role": "user", "content": "a"}]}, "the rows have no 'completion' field"),
    ],
)
def test_a_row_that_is_not_a_prompt_and_one_answer_is_named(row, words):
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _read([row])


def test_sft_on_prompt_completion_turns_trains_evaluates_and_predicts_as_on_messages(
    chat_model,  # noqa: F811
    tmp_path,
    write_recipe,
):
    rows = chat_rows(40)
    files = {
        "messages": {
            "train": write_jsonl(tmp_path / "m" / "train.jsonl", rows[:32]),
            "eval": write_jsonl(tmp_path / "m" / "eval.jsonl", rows[32:]),
        },
        "turns": {
            "train": write_jsonl(tmp_path / "t" / "train.jsonl", [_split(r) for r in rows[:32]]),
            "eval": write_jsonl(tmp_path / "t" / "eval.jsonl", [_split(r) for r in rows[32:]]),
        },
    }
    metrics = {}
    for name, data in files.items():
        recipe = chat_recipe(chat_model, data, tmp_path / f"run-{name}", data={"columns": {}})
        path = write_recipe(recipe, name=f"{name}.yaml")
        checked = invoke("validate", path)
        assert checked.exit_code == 0, checked.output
        result = invoke("run", path)
        assert result.exit_code == 0, result.output
        metrics[name] = json.loads((tmp_path / f"run-{name}" / "metrics.json").read_text())["metrics"]
    assert metrics["turns"] == metrics["messages"]  # the same conversations, trained and scored alike
    # predict on the run, given TRL's prompt-only rows: the answers it gives the same turns as `messages`
    run = tmp_path / "run-turns"
    prompts = [r["messages"][:-1] for r in rows[32:36]]
    as_messages = invoke(
        "predict", run, "--input", write_jsonl(tmp_path / "m.jsonl", [{"messages": p} for p in prompts])
    )
    as_prompts = invoke(
        "predict",
        run,
        "--input",
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "tag": i} for i, p in enumerate(prompts)]),
    )
    assert as_messages.exit_code == 0 and as_prompts.exit_code == 0, as_prompts.output

    def answers(result) -> list[dict]:
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    assert [a["prediction"] for a in answers(as_prompts)] == [a["prediction"] for a in answers(as_messages)]
    assert [a["tag"] for a in answers(as_prompts)] == [0, 1, 2, 3] and answers(as_prompts)[0]["prompt"] == prompts[0]
    # Text prompts to the run trained on conversations: asked as a user turn through the chat template, as it was
    # trained (they went in as raw text, after which the model had never learnt to answer).
    questions = [r["messages"][-2]["content"] for r in rows[32:36]]
    as_turns = invoke(
        "predict",
        run,
        "--input",
        write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in questions]),
    )
    as_text = invoke("predict", run, "--input", write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in questions]))
    assert as_turns.exit_code == 0 and as_text.exit_code == 0, as_text.output
    assert [a["prediction"] for a in answers(as_text)] == [a["prediction"] for a in answers(as_turns)]


def test_text_eval_prompts_are_asked_as_the_training_conversations_were(chat_model, tmp_path, write_recipe):  # noqa: F811
    """A run trained on conversations scored a text eval file's prompts raw, prompts it never trained on (a note said
    so), and `finetune eval RUN data.eval=TEXT` did so silently while predict asked the same rows through the chat
    template. Each text prompt is now asked as a user turn through the template, as data.chat_template: true asks
    it: the same scores written either way, and again by `eval RUN`."""
    rows = chat_rows(40)
    text = [{"prompt": r["messages"][-2]["content"], "completion": r["messages"][-1]["content"]} for r in rows[32:]]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", text),
    }
    note = "data.eval: its text prompts are asked as user turns through the chat template, as data.train's"
    metrics = {}
    for chat in (False, True):
        recipe = chat_recipe(chat_model, data, tmp_path / f"run-{chat}", data={"columns": {}, "chat_template": chat})
        path = write_recipe(recipe, name=f"{chat}.yaml")
        planned = invoke_wide("run", path, "--dry-run")
        assert planned.exit_code == 0, planned.output
        assert (note in " ".join(planned.output.split())) == (not chat), planned.output
        assert invoke("run", path).exit_code == 0
        metrics[chat] = json.loads((tmp_path / f"run-{chat}" / "metrics.json").read_text())["metrics"]
    assert metrics[False] == metrics[True]
    again = invoke("eval", tmp_path / "run-False", "--output", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["metrics"] == metrics[False]


def test_a_column_of_text_lists_and_text_is_named_as_the_fields_type_not_as_turns(tmp_path):
    from finetune.data.tables import read_split
    from finetune.flows.resolve import build_recipe
    from finetune.tasks import recipe_task

    rows = [{"question": "q1", "answer": ["a", "b"]}, {"question": "q2", "answer": "c"}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    recipe = build_recipe(
        {
            "task": "qa",
            "mode": "generative",
            "model": {"name_or_path": "x"},
            "data": {"train": str(path), "eval": str(path)},
        }
    )
    task = recipe_task(recipe)
    with pytest.raises(DataError, match=r"eval.jsonl:1: column 'answer' must be text, got a list"):
        read_split(str(path), "data.eval", recipe, *task.fields(recipe), **task.reading())
