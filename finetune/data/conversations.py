"""Conversations as rows: a `messages` column of {role, content} turns, for the generation tasks.

Rows come in three layouts (`data.format`, or detected from the file's columns when it is `auto`):

- messages: a list of {role, content} turns, roles system / user / assistant, several assistant turns per row;
- alpaca: `instruction`, optional `input`, `output` (and optional `system`): one user turn (the instruction, then
  a blank line and the input when there is one) and one assistant turn;
- sharegpt: `conversations`, a list of {from, value} turns with from human / gpt / system (user / assistant too),
  and an optional `system` column.

Each is mapped by `data.columns` (its own field names to the file's columns) and becomes a `messages` column,
every row checked on the way: a turn that is not an object, an unknown role, content that is not text, and (for
training and evaluation) a conversation without an assistant turn are data errors naming the file and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
from datasets import Dataset

from finetune.errors import DataError
from finetune.recipe.schema import DataSection, Recipe

ROLES = ("system", "user", "assistant")
# data.format values that are conversations; `prompt` is the task's own fields (prompt/completion, question/answer).
CONVERSATION_FORMATS = ("messages", "alpaca", "sharegpt")
# (required, optional) fields of each layout, as data.columns names them.
LAYOUT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("id",)),
    "alpaca": (("instruction", "output"), ("input", "system", "id")),
    "sharegpt": (("conversations",), ("system", "id")),
}
# The fields that tell a layout apart (`system` and `id` belong to several).
_DISTINCT = {"messages": {"messages"}, "alpaca": {"instruction", "input", "output"}, "sharegpt": {"conversations"}}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROWS_PER_BATCH = 10_000


def recipe_layout(data: DataSection) -> str | None:
    """The layout a recipe decides by itself: `data.format`, else (auto) the fields `data.columns` maps or a prompt
    template. `prompt` for the task's own fields; None when the file's columns decide (auto, nothing mapped)."""
    if data.format != "auto":
        return data.format
    keys = set(data.columns)
    for layout in CONVERSATION_FORMATS:
        if keys & _DISTINCT[layout]:
            return layout
    return "prompt" if keys or data.template is not None else None


def conversation_fields(data: DataSection) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(required, optional) fields of the conversation layout the recipe names, or None (the task's own fields)."""
    layout = recipe_layout(data)
    return LAYOUT_FIELDS.get(layout) if layout is not None else None


def conversation_problems(recipe: Recipe, conversations: bool = False) -> list[str]:
    """What conversations (`messages`, alpaca or sharegpt rows) cannot be combined with; `conversations`: the rows
    are conversations whatever the recipe says (data.format auto, decided by the file's columns)."""
    data, problems = recipe.data, []
    layout = recipe_layout(data)
    if conversations or layout in CONVERSATION_FORMATS:
        if data.template is not None:
            problems.append("data.template: conversations carry their own turns; remove the template")
        # DPO, ORPO and KTO read pairs or thumbs written as conversations (judged_conversations); a layout the
        # recipe names holds plain conversations, which none of them can learn from. GRPO samples the final
        # assistant turn of each conversation and rewards it against that turn's content; a codegen reward runs the
        # row's tests, which conversation rows do not carry.
        judged = recipe.train.learns_from_judgements and layout not in CONVERSATION_FORMATS
        if recipe.train.objective == "grpo" and recipe.task == "codegen":
            problems.append(
                "train.objective: grpo on codegen rewards each answer by its row's tests, which conversation rows do "
                "not carry; give the rows prompt, test and entry_point"
            )
        elif recipe.train.learns_from_judgements and not judged:
            problems.append(
                f"train.objective: {recipe.train.objective} trains on prompts and judged completions, and "
                f"data.format {layout} holds plain conversations; pairs written as conversations are read with "
                "data.format auto (a prompt field of turns, or 'chosen' and 'rejected' conversations)"
            )
        if recipe.eval.watermark is not None:
            problems.append("eval.watermark: watermarking conversations is not supported yet; remove eval.watermark")
    elif layout == "prompt" and data.assistant_turns != "all":
        problems.append(
            "data.assistant_turns: only conversations have assistant turns (data.format messages, alpaca or "
            "sharegpt); remove it"
        )
    return problems


def encoder_decoder_problem(family: str, place: str = "model") -> str:
    """Conversations on an encoder-decoder: refused in the same words by validate and run."""
    return (
        f"{place}: conversations are trained through a decoder's chat template (GPT family); this is a "
        f"{family}-family model"
    )


def table_layout(
    data: DataSection, column_names: Sequence[str], columns: Mapping[str, str], required: Sequence[str]
) -> str | None:
    """The conversation layout of a table's rows, or None for the task's own fields.

    What the recipe decides wins; otherwise (`auto` with nothing mapped) the task's own fields win when the table has
    them all, then a `messages` column, a `conversations` column (ShareGPT), `instruction` and `output` (Alpaca).
    `columns` is the mapping in force (predict passes the recipe's, kept to the columns its input has).
    """
    decided = recipe_layout(data)
    if decided is not None:
        return None if decided == "prompt" else decided
    names = set(column_names)
    if columns or all(columns.get(f, f) in names for f in required):
        return None
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    if {"instruction", "output"} <= names:
        return "alpaca"
    return None


def layout_fields(layout: str, labeled: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) fields of a layout's rows; predict's (`labeled` False) Alpaca rows need no output."""
    required, optional = LAYOUT_FIELDS[layout]
    if layout == "alpaca" and not labeled:
        return ("instruction",), ("output", *optional)
    return required, optional


def as_messages(
    table: Dataset, layout: str, key: str, place: Callable[[int], str] | None = None, *, labeled: bool = True
) -> Dataset:
    """A layout's rows (its fields already mapped by data.columns) as checked `messages` rows (and `id` where the
    file has one). A bad row is a DataError `key: place: ...`, `place(i)` naming the row at 0-based index i in the
    file (default `row i+1`). `labeled`: training and evaluation rows, which need an assistant turn (predict's do
    not)."""
    where = place or (lambda index: f"row {index + 1}")
    convert = {"messages": _checked_messages, "alpaca": _alpaca, "sharegpt": _sharegpt}[layout]
    messages = []
    index = 0
    for batch in _batches(table):
        for row in _row_dicts(batch):
            named = f"{key}: {where(index)}"
            turns = convert(row, named)
            if labeled and not any(t["role"] == "assistant" for t in turns):
                raise DataError(
                    f"{named}: no assistant turn, so there is nothing to learn or score; every training and "
                    "evaluation conversation needs at least one"
                )
            messages.append(turns)
            index += 1
    out: dict[str, Any] = {"messages": messages}
    if "id" in table.column_names:
        out["id"] = table["id"][:]
    return Dataset.from_dict(out)


def _batches(table: Dataset) -> Iterator[dict[str, list]]:
    for start in range(0, len(table), ROWS_PER_BATCH):
        yield table[start : start + ROWS_PER_BATCH]


def _row_dicts(batch: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(batch)
    for values in zip(*(batch[n] for n in names)):
        yield dict(zip(names, values))


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _turns(value: object, field: str, named: str) -> list:
    if not isinstance(value, list):
        raise DataError(
            f"{named}: field {field!r} must be a list of turns, got {_kind(value)}"
            + ("; text holding JSON is not read as turns" if isinstance(value, str) else "")
        )
    if not value:
        raise DataError(f"{named}: field {field!r} holds no turns")
    return value


def _checked_messages(row: dict[str, Any], named: str) -> list[dict[str, str]]:
    return _checked_turns(row["messages"], "messages", named)


def _checked_turns(value: object, field: str, named: str) -> list[dict[str, str]]:
    """A field's list of {role, content} turns, each checked (named by the field where a row holds several)."""
    out = []
    of = "" if field == "messages" else f" of {field!r}"
    for index, turn in enumerate(_turns(value, field, named), start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{named}: turn {index}{of} must be an object with role and content, got {_kind(turn)}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(
                f"{named}: turn {index}{of} has role {role!r}; roles are {', '.join(ROLES)}"
                + ("" if "role" in turn else " (the turn has no role)")
            )
        if not isinstance(content, str):
            parts = (
                isinstance(content, list)
                and bool(content)
                and all(isinstance(p, dict) and "text" in p for p in content)
            )
            raise DataError(
                f"{named}: turn {index}{of} ({role}): content must be text, got {_kind(content)}"
                + ("; content parts ([{type: text, text: ...}]) are not read: give the text itself" if parts else "")
            )
        out.append({"role": role, "content": content})
    return out


def judged_conversations(
    table: Dataset,
    columns: Mapping[str, str],
    prompt_field: str,
    answer_field: str,
    key: str,
    place: Callable[[int], str],
) -> Dataset | None:
    """Preference rows written as conversations, TRL's conversational layout, as `messages` rows (the prompt's
    turns) with each answer's text; None when no field of the table holds turns (the rows are text).

    - the prompt field a list of turns (or text: one user turn), each answer (`chosen` and `rejected`; KTO's
      `answer_field`, beside its `label`) a list holding one assistant turn, or text;
    - no prompt field: `chosen` and `rejected` whole conversations, whose shared opening turns are the prompt and
      whose one differing turn, the assistant's, is the answer (TRL's implicit prompt).

    The prompt must end with a user or system turn: the answer is the assistant turn that follows it."""
    names = {field: columns.get(field, field) for field in (prompt_field, *_PAIR, answer_field, "label", "id")}
    present = {field for field, column in names.items() if column in table.column_names}
    if not any(_holds_lists(table, names[field]) for field in present - {"label", "id"}):
        return None
    pairs = set(_PAIR) <= present
    # Every answer the rows hold, as text rows keep them: KTO's thumbs beside pairs are what it trains on (kto_rows).
    sides = tuple(side for side in (*_PAIR, answer_field) if side in present)
    if prompt_field not in present and not pairs:
        raise DataError(
            f"{key}: the rows hold turns but no {prompt_field!r} field; conversations without one are pairs, whose "
            "'chosen' and 'rejected' conversations share their opening turns (the prompt)"
        )
    out: dict[str, list] = {"messages": [], **{side: [] for side in sides}}
    asked = names[prompt_field] if prompt_field in present else None  # the prompt's column
    index = 0
    for batch in _batches(table.select_columns([names[f] for f in present])):
        for row in _row_dicts(batch):
            named = f"{key}: {place(index)}"
            prompt, answers = _judged_turns(row, names, sides, asked, named)
            if prompt[-1]["role"] == "assistant":
                raise DataError(
                    f"{named}: the prompt ends with an assistant turn; the answers are the assistant turn that "
                    "follows a user (or system) turn"
                )
            out["messages"].append(prompt)
            for side, text in zip(sides, answers):
                out[side].append(text)
            index += 1
    for field in ("label", "id"):
        if field in present:
            out[field] = table[names[field]][:]
    return Dataset.from_dict(out)


def prompt_completion_conversations(
    table: Dataset,
    columns: Mapping[str, str],
    prompt_field: str,
    answer_field: str,
    key: str,
    place: Callable[[int], str] | None = None,
    *,
    labeled: bool = True,
) -> Dataset | None:
    """TRL's conversational prompt-completion layout (SFT, GRPO, evaluation) and its prompt-only layout (predict)
    as `messages` rows; None when neither field holds turns (the rows are the task's text).

    The prompt field a list of {role, content} turns ending with a user or system turn (or text: one user turn);
    the answer field a list holding one assistant turn (or text), which becomes the conversation's final assistant
    turn. `labeled` (training and evaluation rows) needs the answer; predict's rows (`labeled` False) are answered
    from the prompt's turns alone, a reference answer beside them passed through, never read."""
    names = {field: columns.get(field, field) for field in (prompt_field, answer_field, "id")}
    present = {field for field, column in names.items() if column in table.column_names}
    if not any(_holds_turn_lists(table, names[field]) for field in present - {"id"}):
        return None
    if prompt_field not in present:
        raise DataError(
            f"{key}: field {names[answer_field]!r} holds turns but the rows have no {names[prompt_field]!r} field "
            "(the turns it answers); whole conversations are read as a 'messages' field"
        )
    where = place or (lambda index: f"row {index + 1}")
    answered = labeled and answer_field in present
    if labeled and not answered:
        raise DataError(f"{key}: the rows have no {names[answer_field]!r} field (the assistant turn to learn)")
    messages = []
    index = 0
    read = [names[field] for field in (prompt_field, answer_field) if field in present]
    for batch in _batches(table.select_columns(read)):
        for row in _row_dicts(batch):
            named = f"{key}: {where(index)}"
            value = row[names[prompt_field]]
            if value is None:
                raise DataError(f"{named}: field {names[prompt_field]!r} must hold turns or text, got nothing (null)")
            prompt = _prompt_turns(value, names[prompt_field], named)
            if not prompt or prompt[-1]["role"] == "assistant":
                raise DataError(
                    f"{named}: field {names[prompt_field]!r} must end with a user (or system) turn; its answer is "
                    f"the assistant turn in {names[answer_field]!r}"
                )
            if answered:
                answer = _answer_text(row[names[answer_field]], names[answer_field], named)
                if answer is None:
                    raise DataError(f"{named}: field {names[answer_field]!r} must hold the answer, got nothing (null)")
                prompt = [*prompt, {"role": "assistant", "content": answer}]
            messages.append(prompt)
            index += 1
    out: dict[str, Any] = {"messages": messages}
    if "id" in present:
        out["id"] = table[names["id"]][:]
    return Dataset.from_dict(out)


def _holds_turn_lists(table: Dataset, column: str) -> bool:
    """A column of lists of objects (turns): a list of strings (several reference answers) is not one."""
    kind = table.data.schema.field(column).type
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)


def _judged_turns(
    row: dict[str, Any], names: Mapping[str, str], sides: Sequence[str], asked: str | None, named: str
) -> tuple[list[dict[str, str]], list[str]]:
    """One row's prompt turns (from column `asked`, where the file has one) and answers' text. Pairs whose answers
    are whole conversations (several turns) give their shared opening as the prompt, beside a prompt column or
    without one (UltraFeedback's binarized layout has both: the prompt's text, and each answer with the user turn
    before it); the column must then say the same."""
    values = {side: row.get(names[side]) for side in sides}
    whole = all(isinstance(value := values.get(side), list) and len(value) > 1 for side in _PAIR)
    if asked is not None and not whole:
        prompt = _prompt_turns(row[asked], asked, named)
        return prompt, [_answer_text(values[side], names[side], named) for side in sides]
    prompt, pair = _shared_opening(values["chosen"], values["rejected"], names["chosen"], names["rejected"], named)
    given = row[asked] if asked is not None else prompt
    if given != prompt and not (isinstance(given, str) and given == prompt[-1]["content"]):
        raise DataError(
            f"{named}: field {asked!r} is not the turns {names['chosen']!r} and {names['rejected']!r} open with "
            "(their shared turns are the prompt); leave it out, or make it the same"
        )
    rest = [_answer_text(values[side], names[side], named) for side in sides if side not in _PAIR]
    return prompt, [*pair, *rest]


_PAIR = ("chosen", "rejected")


def _holds_lists(table: Dataset, column: str) -> bool:
    kind = table.data.schema.field(column).type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _prompt_turns(value: object, field: str, named: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _checked_turns(value, field, named)


def _answer_text(value: object, field: str, named: str) -> str:
    """An answer: text, or a list holding one assistant turn."""
    if isinstance(value, str) or value is None:  # a missing answer is the pair checks' to name
        return value  # type: ignore[return-value]
    return _one_assistant_turn(_checked_turns(value, field, named), field, named)


def _one_assistant_turn(turns: list[dict[str, str]], field: str, named: str) -> str:
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = ", ".join(turn["role"] for turn in turns) or "no turn"
        raise DataError(f"{named}: field {field!r} must answer the prompt with one assistant turn, got {roles}")
    return turns[0]["content"]


def _shared_opening(
    chosen: object, rejected: object, chosen_field: str, rejected_field: str, named: str
) -> tuple[list[dict[str, str]], list[str]]:
    """The prompt two whole conversations share (their equal opening turns) and each one's answer after it."""
    first, second = _checked_turns(chosen, chosen_field, named), _checked_turns(rejected, rejected_field, named)
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    if first == second:  # one conversation twice: its last turn is both answers, which the pair checks refuse
        shared -= 1
    if not shared:
        raise DataError(
            f"{named}: {chosen_field!r} and {rejected_field!r} share no opening turn, so no prompt can be read from "
            "them; give the prompt's turns in a prompt field, or both whole conversations"
        )
    return first[:shared], [
        _one_assistant_turn(first[shared:], chosen_field, named),
        _one_assistant_turn(second[shared:], rejected_field, named),
    ]


def _sharegpt(row: dict[str, Any], named: str) -> list[dict[str, str]]:
    out = _system_turn(row, named)
    for index, turn in enumerate(_turns(row["conversations"], "conversations", named), start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{named}: turn {index} must be an object with from and value, got {_kind(turn)}")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{named}: turn {index} is from {speaker!r}; ShareGPT turns are from {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(value, str):
            raise DataError(f"{named}: turn {index} ({speaker}): value must be text, got {_kind(value)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return out


def _alpaca(row: dict[str, Any], named: str) -> list[dict[str, str]]:
    texts = {}
    for field in ("instruction", "input", "output"):
        value = row.get(field)
        if field != "instruction" and value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{named}: field {field!r} must be text, got {_kind(value)}")
        texts[field] = value
    user = texts["instruction"] + (f"\n\n{texts['input']}" if texts.get("input", "").strip() else "")
    out = [*_system_turn(row, named), {"role": "user", "content": user}]
    if "output" in texts:
        out.append({"role": "assistant", "content": texts["output"]})
    return out


def _system_turn(row: dict[str, Any], named: str) -> list[dict[str, str]]:
    """A `system` column's text as the first turn (none when the column is absent, null or empty)."""
    value = row.get("system")
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise DataError(f"{named}: field 'system' must be text, got {_kind(value)}")
    return [{"role": "system", "content": value}]


def final_turn(messages: Sequence[Mapping[str, str]]) -> int | None:
    """Index of the assistant turn evaluation generates (the last one), or None when there is none."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def conversation_texts(rows: Dataset) -> pa.ChunkedArray:
    """Each conversation's turns as one text (`role: content` lines): what duplicates and overlap are judged on."""
    texts = [
        "\n".join(f"{turn['role']}: {turn['content']}" for turn in turns or [])
        for batch in _batches(rows.select_columns(["messages"]))
        for turns in batch["messages"]
    ]
    return pa.chunked_array([pa.array(texts, pa.string())])
