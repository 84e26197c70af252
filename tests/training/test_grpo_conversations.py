"""GRPO on conversations: each conversation's final assistant turn is sampled from the turns before it (as
evaluation asks it) and rewarded against that turn's content; a user's reward function gets the turns as its
prompt, as TRL passes a conversational prompt; codegen (whose reward runs a row's tests) refuses them."""

from __future__ import annotations

import json

from helpers import invoke

from finetune.tasks import TASKS
from tests.tasks.test_conversations import chat_data, chat_model, chat_recipe  # noqa: F401 (the fixtures)
from tests.training.test_grpo import _recipe as grpo_recipe


def _grpo(chat_model, chat_data, tmp_path, **data) -> dict:  # noqa: F811
    """The chat recipe trained as test_grpo's text recipe trains, for three steps."""
    recipe = chat_recipe(chat_model, chat_data, tmp_path / "run", data={"columns": {}, **data})
    recipe["train"] = {**grpo_recipe(chat_model, tmp_path / "text")["train"], "max_steps": 3}
    return recipe


def test_grpo_samples_each_conversations_final_turn(chat_model, chat_data, tmp_path, write_recipe):  # noqa: F811
    recipe = write_recipe(_grpo(chat_model, chat_data, tmp_path))
    checked = invoke("validate", recipe)
    assert checked.exit_code == 0, checked.output
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(0 <= entry["reward_mean"] <= 1 for entry in log)
    assert any(entry["reward_mean"] > 0 for entry in log)  # samples overlap the reference words somewhere
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert "rougeL" in metrics


def test_a_rollout_conversation_must_end_with_its_reference_turn(chat_model, chat_data, tmp_path, write_recipe):  # noqa: F811
    rows = [json.loads(line) for line in chat_data["train"].read_text().splitlines()]
    rows[2]["messages"].append({"role": "user", "content": "and?"})
    chat_data["train"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(_grpo(chat_model, chat_data, tmp_path))
    for command in ("validate", "run"):
        refused = invoke(command, recipe)
        assert refused.exit_code == 3 and "train.jsonl:3: the conversation ends with a user turn" in refused.output, (
            refused.output
        )


def test_codegen_grpo_refuses_conversations(chat_model, chat_data, tmp_path, write_recipe):  # noqa: F811
    recipe = _grpo(chat_model, chat_data, tmp_path)
    recipe["task"] = "codegen"
    recipe["eval"]["execute_code"] = True
    refused = invoke("validate", write_recipe(recipe))
    assert refused.exit_code == 2 and "conversation rows do not carry" in refused.output, refused.output


def test_a_reward_function_gets_the_conversations_turns_as_its_prompt():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert TASKS["copywriting"].prompt_of({"messages": turns, "completion": "b"}) == turns[:1]
    assert TASKS["copywriting"].prompt_of({"prompt": "p", "completion": "c"}) == "p"


def test_grpo_samples_the_answer_to_a_prompt_of_turns_as_trl_lays_it_out(chat_model, tmp_path, write_recipe):  # noqa: F811
    """TRL's conversational GRPO rows: a prompt of turns, the reference beside it (here as text): the same run as on
    the conversations they make, the same rewards."""
    from tests.conftest import write_jsonl
    from tests.tasks.test_conversations import chat_rows

    rows = chat_rows(40)
    laid_out = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1]["content"]} for r in rows]
    logs = []
    for name, train in (("messages", rows[:32]), ("prompt", laid_out[:32])):
        files = {
            "train": write_jsonl(tmp_path / name / "train.jsonl", train),
            "eval": write_jsonl(tmp_path / name / "eval.jsonl", rows[32:]),
        }
        recipe = _grpo(chat_model, files, tmp_path / name)
        result = invoke("run", write_recipe(recipe, name=f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        log = (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()
        logs.append([{k: v for k, v in json.loads(line).items() if k.startswith("reward")} for line in log])
    assert logs[0] == logs[1] and len(logs[0]) == 3
