"""Pairs and thumbs written as conversations (TRL's conversational preference layout): a prompt of turns with
one assistant turn per answer, or two whole conversations whose shared opening is the prompt. Read into the prompt's
turns and the answers' text, each answer trained on exactly the tokens SFT on the same conversation trains on, and
refused row by row where a conversation cannot be one prompt and one answer."""

from __future__ import annotations

import json

import pytest
from conftest import WORDS, write_jsonl
from datasets import Dataset
from helpers import invoke

from finetune.data.conversations import judged_conversations
from finetune.errors import DataError
from tests.tasks.test_conversations import TINY_CHAT, chat_model  # noqa: F401 (the fixture)

TOPICS = list(WORDS)


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _pairs(n: int, layout: str) -> list[dict]:
    """Pairs about a topic: the chosen answer its own words, the rejected another topic's."""
    rows = []
    for i in range(n):
        topic, other = TOPICS[i % len(TOPICS)], TOPICS[(i + 1) % len(TOPICS)]
        good, bad = " ".join(WORDS[topic].split()[:4]), " ".join(WORDS[other].split()[:4])
        prompt = [_turn("system", "be brief")] if i % 2 else []
        prompt += [_turn("user", f"{topic} {i}")]
        if layout == "explicit":
            rows.append({"prompt": prompt, "chosen": [_turn("assistant", good)], "rejected": [_turn("assistant", bad)]})
        else:  # the whole conversations; the prompt is what they share
            rows.append({"chosen": [*prompt, _turn("assistant", good)], "rejected": [*prompt, _turn("assistant", bad)]})
    return rows


def _place(index: int) -> str:
    return f"row {index + 1}"


def test_explicit_and_implicit_prompts_read_alike():
    explicit = judged_conversations(
        Dataset.from_list(_pairs(4, "explicit")), {}, "prompt", "completion", "data.train", _place
    )
    implicit = judged_conversations(
        Dataset.from_list(_pairs(4, "implicit")), {}, "prompt", "completion", "data.train", _place
    )
    assert explicit is not None and implicit is not None
    assert explicit.to_list() == implicit.to_list()
    from trl.data_utils import extract_prompt  # the reference of the implicit prompt

    for row, ours in zip(_pairs(4, "implicit"), implicit.to_list()):
        theirs = extract_prompt(row)
        assert theirs["prompt"] == ours["messages"]
        assert theirs["chosen"] == [_turn("assistant", ours["chosen"])]
        assert theirs["rejected"] == [_turn("assistant", ours["rejected"])]
    first = explicit[1]
    assert first["messages"] == [_turn("system", "be brief"), _turn("user", f"{TOPICS[1]} 1")]
    assert isinstance(first["chosen"], str) and first["chosen"] != first["rejected"]


def test_text_rows_are_left_to_the_text_path_and_a_text_prompt_is_a_user_turn():
    text = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert judged_conversations(text, {}, "prompt", "completion", "data.train", _place) is None
    mixed = Dataset.from_list([{"ask": "p", "chosen": [_turn("assistant", "a")], "rejected": "b"}])
    (row,) = judged_conversations(mixed, {"prompt": "ask"}, "prompt", "completion", "data.train", _place).to_list()
    assert row == {"messages": [_turn("user", "p")], "chosen": "a", "rejected": "b"}


def test_ultrafeedbacks_layout_reads_the_prompt_from_the_conversations():
    """UltraFeedback binarized: the prompt's text and each answer with the user turn before it (and the columns a
    run does not read). The conversations' shared turns are the prompt; the text must say the same."""
    turns = [_turn("user", "Name a colour")]
    row = {
        "prompt": "Name a colour",
        "prompt_id": "x1",
        "chosen": [*turns, _turn("assistant", "Teal.")],
        "rejected": [*turns, _turn("assistant", "No.")],
        "score_chosen": 9.0,
    }
    (read,) = judged_conversations(Dataset.from_list([row]), {}, "prompt", "completion", "data.train", _place).to_list()
    assert read == {"messages": turns, "chosen": "Teal.", "rejected": "No."}
    row["prompt"] = "Name a fruit"
    with pytest.raises(DataError, match="row 1: field 'prompt' is not the turns 'chosen' and 'rejected' open with"):
        judged_conversations(Dataset.from_list([row]), {}, "prompt", "completion", "data.train", _place)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            {
                "chosen": [_turn("user", "a"), _turn("assistant", "x")],
                "rejected": [_turn("user", "b"), _turn("assistant", "y")],
            },
            "share no opening turn",
        ),
        (
            {
                "prompt": [_turn("user", "a")],
                "chosen": [_turn("assistant", "x"), _turn("user", "more")],
                "rejected": "y",
            },
            "field 'chosen' must answer the prompt with one assistant turn, got assistant, user",
        ),
        (
            {"prompt": [_turn("user", "a"), _turn("assistant", "b")], "chosen": "x", "rejected": "y"},
            "the prompt ends with an assistant turn",
        ),
        ({"prompt": [_turn("robot", "a")], "chosen": "x", "rejected": "y"}, "turn 1 of 'prompt' has role 'robot'"),
        (
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "chosen": "x", "rejected": "y"},
            "content must be text, got a list; content parts",
        ),
        ({"completion": [_turn("assistant", "x")], "label": True}, "no 'prompt' field"),
    ],
)
def test_a_conversation_that_is_not_one_prompt_and_one_answer_is_named(row, words):
    rows = Dataset.from_list([row])
    with pytest.raises(DataError, match=r"^data\.train: ") as caught:
        judged_conversations(rows, {}, "prompt", "completion", "data.train", _place)
    assert words in str(caught.value)


def _recipe(model, tmp_path, objective: str, train_rows: list[dict], eval_rows: list[dict]) -> dict:
    return {
        "task": "copywriting",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(write_jsonl(tmp_path / "data" / "train.jsonl", train_rows)),
            "eval": str(write_jsonl(tmp_path / "data" / "eval.jsonl", eval_rows)),
            "max_length": 48,
        },
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "seed": 0, "precision": "fp32", "objective": objective},
        "eval": {"max_new_tokens": 6, "every": 6},
        "output": {"dir": str(tmp_path / f"run-{objective}")},
    }


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_conversational_pairs_train_evaluate_and_predict(chat_model, tmp_path, write_recipe, objective):  # noqa: F811
    recipe = write_recipe(_recipe(chat_model, tmp_path, objective, _pairs(48, "explicit"), _pairs(12, "implicit")))
    checked = invoke("validate", recipe)
    assert checked.exit_code == 0, checked.output
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / f"run-{objective}"
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert {"preference_accuracy", "reward_margin", "rougeL"} <= set(metrics)
    assert metrics["preference_accuracy"] >= 0.75, metrics  # the pairs are learnable: one phrase per topic
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["messages"][-1]["role"] == "user" and isinstance(predictions[0]["prediction"], str)
    assert predictions[0]["completion"] == predictions[0]["chosen"]  # scored against the preferred answer
    asked = write_jsonl(tmp_path / "ask.jsonl", [{"messages": [_turn("user", f"{TOPICS[0]} 99")]}])
    answered = invoke("predict", run, "--input", asked)
    assert answered.exit_code == 0, answered.output
    # TRL's conversational prompt (the eval file's own layout) is the same question as `messages`
    as_prompt = write_jsonl(tmp_path / "ask2.jsonl", [{"prompt": [_turn("user", f"{TOPICS[0]} 99")]}])
    prompted = invoke("predict", run, "--input", as_prompt)
    assert prompted.exit_code == 0, prompted.output

    def answer(result) -> str:
        return next(json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))["prediction"]

    assert answer(prompted) == answer(answered)


def _features(model, rows: list[dict], chat_template: bool, objective: str = "dpo", width: int = 24):
    from transformers import AutoTokenizer

    from finetune.data.conversations import judged_conversations
    from finetune.flows.resolve import build_recipe
    from finetune.tasks import TASKS

    recipe = build_recipe(
        {
            "task": "copywriting",
            "model": {"name_or_path": str(model)},
            "data": {"train": "unused.jsonl", "eval_split": 0.1, "max_length": width, "chat_template": chat_template},
            "train": {"objective": objective},
        }
    )
    table = Dataset.from_list(rows)
    table = judged_conversations(table, {}, "prompt", "completion", "data.train", _place) or table
    tokenizer = AutoTokenizer.from_pretrained(model)
    return TASKS["copywriting"].featurize(table, tokenizer, recipe, {"family": "gpt"}, "data.train")


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_one_turn_conversation_trains_as_the_text_pair_through_the_chat_template(chat_model, objective):  # noqa: F811
    """A pair whose prompt is one user turn is the text pair with `data.chat_template: true`, token for token
    (the path TRL's losses were checked on), long answers cut alike under data.overflow."""
    text = [
        {"prompt": f"{topic} please", "chosen": WORDS[topic], "rejected": " ".join(WORDS[topic].split()[:2])}
        for topic in TOPICS
    ]
    turns = [
        {"prompt": [_turn("user", r["prompt"])], "chosen": [_turn("assistant", r["chosen"])], "rejected": r["rejected"]}
        for r in text
    ]
    plain, conversational = _features(chat_model, text, True, objective), _features(chat_model, turns, False, objective)
    columns = plain.dataset.column_names
    assert columns == conversational.dataset.column_names
    for column in columns:
        assert plain.dataset[column] == conversational.dataset[column], column
    assert plain.prompts == conversational.prompts
    assert plain.report.truncated == conversational.report.truncated > 0  # WORDS' phrases overflow 24 tokens


def test_a_longer_conversation_trains_on_the_tokens_sft_trains_on(chat_model):  # noqa: F811
    """Each answer's labels are the tokens SFT on the whole conversation trains on for its last turn."""
    from transformers import AutoTokenizer

    from finetune.tasks.conversations import ConversationEncoder

    prompt = [_turn("system", "be brief"), _turn("user", "a b"), _turn("assistant", "c"), _turn("user", "d e")]
    features = _features(chat_model, [{"prompt": prompt, "chosen": "f g", "rejected": "h"}], False, width=128)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(chat_model), "last", str(chat_model))
    for side, answer in (("chosen", "f g"), ("rejected", "h")):
        sft = encoder.encode([[*prompt, _turn("assistant", answer)]], "data.train", 1, labeled=True)
        trained = [t for t in sft.labels[0] if t != -100]
        assert [t for t in features.dataset[f"{side}_labels"][0] if t != -100] == trained
        ids = features.dataset[f"{side}_input_ids"][0]
        assert ids == sft.input_ids[0][: len(ids)] and len(ids) >= len(sft.input_ids[0]) - 1  # all but a newline
    assert features.prompts[0] == sft.prompt_ids[0]


def test_thumbs_beside_conversational_pairs_are_kept_as_text_rows_keep_them():
    """KTO trains on the thumbs of a file holding both (kto_rows); the conversational reader dropped them."""
    from finetune.tasks.preference import kto_rows

    row = {**_pairs(1, "explicit")[0], "completion": [_turn("assistant", "only this")], "label": True}
    read = judged_conversations(Dataset.from_list([row]), {}, "prompt", "completion", "data.train", _place)
    assert read is not None and {"chosen", "rejected", "completion", "label"} <= set(read.column_names)
    thumbs = kto_rows(read, "kto", "data.train", "prompt", "completion")
    assert thumbs["completion"] == ["only this"] and thumbs["label"] == [True]


def _jsonl_with_blanks(path, rows: list[dict]) -> None:
    """Rows with a blank line after the 2nd and the 4th: row 6 is on line 8."""
    lines = [json.dumps(row) for row in rows]
    lines[2:2], lines[5:5] = [""], [""]
    path.write_text("\n".join(lines) + "\n")


def test_conversational_pair_files_are_named_at_their_lines_and_refused_as_conversations(
    chat_model,  # noqa: F811
    tmp_path,
    write_recipe,
):
    rows = _pairs(10, "explicit")
    for row in rows[5:]:
        row["rejected"] = row["rejected"][0]["content"]  # text from row 6 on: the reader cannot make a table of it
    recipe = _recipe(chat_model, tmp_path, "dpo", _pairs(8, "explicit"), _pairs(4, "implicit"))
    _jsonl_with_blanks(tmp_path / "data" / "train.jsonl", rows)
    clash = invoke("validate", write_recipe(recipe))
    assert clash.exit_code == 3 and "column 'rejected' is a list on line 1 but text on line 8" in clash.output, (
        clash.output
    )
    write_jsonl(tmp_path / "data" / "train.jsonl", _pairs(8, "explicit"))
    recipe["eval"]["watermark"] = {"method": "kirchenbauer", "key": 7}
    marked = invoke("validate", write_recipe(recipe))
    assert marked.exit_code == 2 and "watermarking conversations is not supported yet" in marked.output
    del recipe["eval"]["watermark"]
    recipe["train"]["objective"] = "sft"  # pairs under the default objective: named, not an internal error
    write_jsonl(tmp_path / "data" / "train.jsonl", _pairs(8, "implicit"))
    plain = invoke("validate", write_recipe(recipe))
    assert plain.exit_code == 3 and "read under train.objective dpo, orpo or kto" in plain.output, plain.output
