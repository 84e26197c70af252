"""An evaluation conversation is scored on its final assistant turn: one that ends with a later request (which
would be dropped unanswered) or whose final assistant turn is empty (a reference of nothing) is refused with exit 3
naming the row, never scored silently. Training and `predict` still take conversations that end with a request."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from helpers import invoke

from finetune.errors import DataError
from finetune.tasks.conversations import check_evaluation_conversation
from tests.tasks.test_conversations import chat_model, chat_recipe, chat_rows  # noqa: F401 (chat_model: a fixture)

ASK = {"role": "user", "content": "Copy for Kestrel?"}
ANSWER = {"role": "assistant", "content": "Meet Kestrel."}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([ASK, ANSWER, {"role": "user", "content": "Shorter."}], "ends with a user turn (turn 3), after its last"),
        ([ASK, ANSWER, {"role": "system", "content": "x"}], "ends with a system turn (turn 3)"),
        ([ASK, {"role": "assistant", "content": ""}], "the final assistant turn (turn 2) is empty"),
        ([ASK, {"role": "assistant", "content": " \n"}], "the final assistant turn (turn 2) is empty"),
        ([ASK], "no assistant turn"),
    ],
)
def test_an_unscorable_evaluation_conversation_is_refused(messages, words):
    with pytest.raises(DataError) as caught:
        check_evaluation_conversation(messages, "data.eval: row 4")
    assert caught.value.exit_code == 3
    assert str(caught.value).startswith("data.eval: row 4: ") and words in str(caught.value)


@pytest.mark.unit
def test_a_conversation_ending_with_its_assistant_turn_is_scored():
    check_evaluation_conversation([ASK, ANSWER, {"role": "user", "content": "Shorter."}, ANSWER], "data.eval: row 1")


@pytest.mark.parametrize(
    ("last", "words"),
    [
        ({"role": "user", "content": "again"}, "eval.jsonl:3: the conversation ends with a user turn (turn 5)"),
        (None, "eval.jsonl:3: the final assistant turn (turn 4) is empty"),
    ],
)
def test_eval_refuses_the_row_and_training_takes_a_trailing_request(
    chat_model,  # noqa: F811
    tmp_path,
    write_recipe,
    last,
    words,
):
    rows = chat_rows(12)
    odd = rows[10]["messages"]
    if last is None:
        odd[-1] = odd[-1] | {"content": ""}
    else:
        odd.append(last)
    # Training rows 0-7 (one ends with a request, which has no loss and is fine); eval rows 8-11, the third odd.
    rows[0]["messages"].append({"role": "user", "content": "again"})
    files = {
        "train": write_jsonl(tmp_path / "chat" / "train.jsonl", rows[:8]),
        "eval": write_jsonl(tmp_path / "chat" / "eval.jsonl", rows[8:]),
    }
    recipe = write_recipe(chat_recipe(chat_model, files, tmp_path / "run"))
    result = invoke("eval", recipe, "--output", tmp_path / "eval")
    assert result.exit_code == 3, result.output
    assert f"data.eval: {files['eval']}" in result.output and words in " ".join(result.output.split()), result.output
    assert "internal error" not in result.output
    checked = invoke("validate", recipe)  # validate refuses what run and eval refuse, with their message
    assert checked.exit_code == 3 and words in " ".join(checked.output.split()), checked.output
    files["eval"] = write_jsonl(tmp_path / "chat" / "eval.jsonl", rows[8:10] + rows[11:])
    result = invoke("eval", recipe, "--output", tmp_path / "eval2")
    assert result.exit_code in (0, 4), result.output  # scored (a gate may fail on an untrained model)
