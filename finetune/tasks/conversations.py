"""Conversations through the tokenizer's chat template: which tokens are the assistant's (the loss), and the prompt
that asks for the final assistant turn (evaluation, predict).

The assistant spans come from the template itself:

- a template with `{% generation %}` markers: transformers' `return_assistant_tokens_mask`, the spans the markers
  enclose (what TRL's assistant-only loss trains on);
- any other template: the conversation is rendered prefix by prefix. An assistant turn starts where the turns before
  it, rendered with the generation prompt (the role header), end, and ends where the conversation up to and
  including it ends, trailing whitespace left out: its content and the end-of-turn token (`<|im_end|>` for
  ChatML). Every prefix must be a prefix of the whole rendering; a template that renders earlier turns differently
  once later ones follow cannot be split this way and is refused (RecipeError, exit 2) rather than trained with a
  wrong mask.

Either way a token is trained when its characters overlap a span, as transformers maps generation spans to tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.data.conversations import encoder_decoder_problem, final_turn
from finetune.data.features import Features
from finetune.data.tables import apply_overflow, map_batches
from finetune.errors import DataError, RecipeError
from finetune.models.families import FamilySpec
from finetune.recipe.schema import Recipe
from finetune.tasks.text2text import IGNORE, _keep_end, fit, no_chat_template
from finetune.tasks.text2text import Encoded as Fitted

# `{% generation %}`, `{%- generation %}`, `{%- generation -%}`: the markers transformers reads.
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = Sequence[dict[str, str]]


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and GENERATION_MARKER.search(cast(str, template)) is not None


def chat_template(tokenizer: PreTrainedTokenizerBase, model_name: str) -> str:
    """The tokenizer's chat template; conversations need one, and a fast tokenizer (token offsets)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named variants: the default one renders plain conversations
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise RecipeError(no_chat_template(model_name, "model"))
    if not tokenizer.is_fast:
        raise RecipeError(
            f"model: the tokenizer of {model_name} is not a fast tokenizer; conversations need its token offsets"
        )
    return template


@dataclass
class Encoded:
    """One batch of conversations as tokens."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)  # -100 where no loss falls
    prompt_ids: list[list[int]] = field(default_factory=list)  # the turns before the final assistant turn


class ConversationEncoder:
    """Tokens, loss labels and generation prompts of conversations under one tokenizer's chat template.

    `turns`: the assistant turns the loss falls on, `all` or `last`. `model_name` names the model in refusals.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, turns: str, model_name: str):
        self.tokenizer, self.turns, self.model_name = tokenizer, turns, model_name
        self.markers = has_generation_markers(chat_template(tokenizer, model_name))

    @property
    def method(self) -> str:
        """How the assistant tokens are found, for the data report."""
        return (
            "the chat template's {% generation %} markers"
            if self.markers
            else "rendering each conversation turn by turn (the template has no {% generation %} markers)"
        )

    def render(self, messages: Messages, generation_prompt: bool, where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja's TemplateError and raise_exception(...) in the template
            raise DataError(
                f"{where}: the chat template of {self.model_name} cannot render this conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return cast(str, text)

    def encode(self, conversations: Sequence[Messages], split: str, first_row: int, labeled: bool) -> Encoded:
        """Each conversation's tokens and labels (`labeled`), and the prompt for its final assistant turn (or, when
        it has none, for the next one). Rows are named `split: row N` from `first_row` in refusals."""
        out = Encoded()
        texts = []
        spans: list[list[tuple[int, int]]] = []
        for number, messages in enumerate(conversations, start=first_row):
            where = f"{split}: row {number}"
            # Evaluation generates the final assistant turn from the turns before it; predict does too when the
            # conversation ends with one (its reference), else it generates the next assistant turn.
            final = final_turn(messages)
            ends_with_answer = final is not None and (labeled or final == len(messages) - 1)
            before = messages[:final] if ends_with_answer else messages
            out.prompt_ids.append(self._ids(self._prompt(before, where)))
            if not labeled:
                continue
            if self.markers:
                ids, mask = self._marked(messages, where)
                out.input_ids.append(ids)
                out.labels.append([t if m else IGNORE for t, m in zip(ids, mask)])
            else:
                text, found = self._spans(messages, where)
                texts.append(text)
                spans.append(found)
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for ids, offsets, found in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
                mask = overlap_mask(offsets, found)
                out.input_ids.append(ids)
                out.labels.append([t if m else IGNORE for t, m in zip(ids, mask)])
        return out

    def _prompt(self, before: Messages, where: str) -> str:
        if before:
            return self.render(before, True, where)
        try:  # a conversation that opens with the assistant: the generation prompt alone, where the template has one
            return self.render([], True, where)
        except DataError:
            return ""

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _marked(self, messages: Messages, where: str) -> tuple[list[int], list[int]]:
        """Tokens and assistant mask from the template's generation markers (transformers, as TRL uses it)."""
        try:
            output = self.tokenizer.apply_chat_template(
                list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as exc:
            raise DataError(
                f"{where}: the chat template of {self.model_name} cannot render this conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        result = cast(dict[str, Any], output)
        ids, mask = list(result["input_ids"]), list(result["assistant_masks"])
        if not any(mask):
            raise RecipeError(
                f"model: the {{% generation %}} markers of the chat template of {self.model_name} mark no token of "
                f"the assistant turns ({where}); the template cannot say what to train on"
            )
        if self.turns == "last":
            mask = last_run(mask)
        return ids, mask

    def _spans(self, messages: Messages, where: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and the character spans of the assistant turns the loss falls on."""
        full = self.render(messages, False, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.turns == "last":
            turns = turns[-1:]
        found = []
        for index in turns:
            if index:
                before = self.render(messages[:index], True, where)
            else:
                before = self._opening_header(messages[0], where, full)
            through = self.render(messages[: index + 1], False, where)
            if not (full.startswith(before) and through.startswith(before) and full.startswith(through)):
                raise self._unstable(index, where, before, through, full)
            end = len(through.rstrip())
            if end > len(before):
                found.append((len(before), end))
        return full, found

    def _opening_header(self, turn: dict[str, str], where: str, full: str) -> str:
        """What precedes a conversation's opening assistant turn: a template may put a default system prompt there,
        which the generation prompt of no turns lacks. Read off the turn rendered with a placeholder content."""
        placeholder = "\ue000"  # a private-use character: no template writes it
        probe = self.render([{**turn, "content": placeholder}], False, where)
        cut = probe.find(placeholder)
        if cut >= 0 and full.startswith(probe[:cut]):
            return probe[:cut]
        try:
            return self.render([], True, where)
        except DataError:  # a template that needs a turn to render anything
            return ""

    def _unstable(self, index: int, where: str, before: str, through: str, full: str) -> RecipeError:
        if index == 0 and not full.startswith(before):
            return RecipeError(
                f"{where}: the conversation opens with an assistant turn, and the chat template of {self.model_name} "
                "renders nothing before it that the whole conversation starts with; start it with a system or user "
                "turn"
            )
        shown = before if not full.startswith(before) else through
        cut = next((i for i, (a, b) in enumerate(zip(shown, full)) if a != b), min(len(shown), len(full)))
        return RecipeError(
            f"model: the chat template of {self.model_name} renders earlier turns differently once later turns "
            f"follow ({where}, before turn {index + 1}: {shown[max(0, cut - 30) : cut + 30]!r} becomes "
            f"{full[max(0, cut - 30) : cut + 30]!r}), so the assistant tokens cannot be found by rendering turn by "
            "turn; use a checkpoint whose chat template has {% generation %} markers or renders turns stably"
        )

    def end_of_turn_ids(self) -> list[int]:
        """The special token(s) that end an assistant turn (ChatML's <|im_end|>): generation stops at them too."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        try:
            encoded = self.encode([probe], "probe", 1, labeled=True)
        except (DataError, RecipeError):
            return []
        trained = [t for t, label in zip(encoded.input_ids[0], encoded.labels[0]) if label != IGNORE]
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.get_added_vocab().values())
        return trained[-1:] if trained and trained[-1] in special else []


def encode_turns(
    prompts: Sequence[Messages],
    answers: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
) -> Fitted:
    """Each prompt's turns answered by an assistant turn holding `answers[i]`, as one prompt -> completion example
    (pairs and thumbs written as conversations): the completion the tokens SFT on conversations trains on for
    that turn (its content and end-of-turn token, found as `ConversationEncoder` finds them), the prompt the tokens
    before it, both within data.max_length as `text2text.fit` keeps a text pair; generation's prompt is the turns
    rendered with the generation prompt, as for any conversation."""
    if family.encoder_decoder:
        raise RecipeError(encoder_decoder_problem(family.name))
    encoder = ConversationEncoder(tokenizer, "last", recipe.model.name_or_path)
    answered = [[*turns, {"role": "assistant", "content": answer}] for turns, answer in zip(prompts, answers)]
    encoded = encoder.encode(answered, split, 1, labeled=True)
    prompt_ids, completion_ids = [], []
    for number, (ids, labels) in enumerate(zip(encoded.input_ids, encoded.labels), start=1):
        trained = [i for i, label in enumerate(labels) if label != IGNORE]
        if not trained:  # an empty answer is refused before; a template that drops the content is not
            raise DataError(
                f"{split}: row {number}: the chat template of {recipe.model.name_or_path} rendered no "
                "token of the answer"
            )
        prompt_ids.append(ids[: trained[0]])
        completion_ids.append(ids[trained[0] : trained[-1] + 1])  # not what follows the turn (a newline)
    fitted = fit(prompt_ids, completion_ids, tokenizer.bos_token_id, family, recipe, split)
    width, bos = recipe.data.max_length, tokenizer.bos_token_id
    fitted.prompt_ids = [_keep_end(encoded.prompt_ids[int(i)], width, bos) for i in fitted.keep]
    return fitted


def rollout_conversations(
    rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
    answer_field: str,
) -> Features:
    """GRPO's training features from conversations: each prompt the turns before the final assistant turn, asked
    as evaluation asks it (within data.max_length as `text2text.fit` keeps a prompt), and that turn's content the
    reward's reference (the task's answer field of the kept rows). Each conversation must end with that turn and
    hold a reference, as an evaluation conversation must."""
    if family.encoder_decoder:
        raise RecipeError(encoder_decoder_problem(family.name))
    conversations = rows["messages"][:]
    for number, messages in enumerate(conversations, start=1):
        check_evaluation_conversation(messages, f"{split}: row {number}")
    encoder = ConversationEncoder(tokenizer, "last", recipe.model.name_or_path)
    encoded = encoder.encode(conversations, split, 1, labeled=False)
    fitted = fit(encoded.prompt_ids, None, tokenizer.bos_token_id, family, recipe, split)
    kept = rows.select(fitted.keep) if len(fitted.keep) < len(rows) else rows
    # A mapped copy, not add_column: the feature cache stores the rows by their Arrow files.
    kept = kept.map(lambda row: {answer_field: row["messages"][-1]["content"]}, desc=None)
    dataset = Dataset.from_dict({"input_ids": fitted.prompt_ids, "row": list(range(len(kept)))})
    return Features(dataset, kept, fitted.report, prompts=fitted.prompt_ids)


def overlap_mask(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (spans and offsets in order), as transformers'
    `return_assistant_tokens_mask` maps generation spans to tokens."""
    mask = [0] * len(offsets)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[index] = 1
    return mask


def last_run(mask: Sequence[int]) -> list[int]:
    """The mask with only its last run of ones kept (the last assistant turn)."""
    out = [0] * len(mask)
    index = len(mask) - 1
    while index >= 0 and not mask[index]:
        index -= 1
    while index >= 0 and mask[index]:
        out[index] = 1
        index -= 1
    return out


# --------------------------------------------------------------------------- features

_LENGTH, _PROMPT_LENGTH, _TRAINED = "conversation_tokens", "prompt_tokens", "trained_tokens"
_BLANK = "blank_answer"  # a trained assistant turn with no text (a data mistake, said in the report)


def featurize_conversations(
    rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
    labeled: bool,
    workdir: Path | None = None,
) -> Features:
    """`messages` rows as model inputs: the whole conversation with labels on the assistant tokens (`labeled`), and
    the prompt for the final assistant turn (generation). Over-long conversations follow `data.overflow`;
    truncation keeps their start (the later turns are cut), and a training conversation left with no assistant
    token is left out (it has nothing to learn)."""
    if family.encoder_decoder:
        raise RecipeError(encoder_decoder_problem(family.name))
    data = recipe.data
    encoder = ConversationEncoder(tokenizer, data.assistant_turns, recipe.model.name_or_path)
    max_length, bos = data.max_length, tokenizer.bos_token_id

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if labeled and split != "data.train":
            for number, messages in enumerate(batch["messages"], start=indices[0] + 1):
                check_evaluation_conversation(messages, f"{split}: row {number}")
        encoded = encoder.encode(batch["messages"], split, indices[0] + 1, labeled)
        out: dict[str, list] = {
            "prompt_ids": [_keep_end(p, max_length, bos) for p in encoded.prompt_ids],
            _PROMPT_LENGTH: [len(p) for p in encoded.prompt_ids],
        }
        if labeled:
            labels = [row[:max_length] for row in encoded.labels]
            out.update(
                {
                    "input_ids": [row[:max_length] for row in encoded.input_ids],
                    "labels": labels,
                    _LENGTH: [len(row) for row in encoded.input_ids],
                    _TRAINED: [sum(1 for t in row if t != IGNORE) for row in labels],
                    _BLANK: [_blank_answer(messages, data.assistant_turns) for messages in batch["messages"]],
                }
            )
        return out

    mapped = map_batches(
        rows.select_columns(["messages"]),
        encode_batch,
        data.num_workers,
        fingerprint=f"{rows._fingerprint}-conversations",
        description=f"tokenising {split} (conversations)",
        # Into the feature cache's work directory, as classification's: with worker processes, the shards go to disk
        # (else a temporary folder, read back into memory).
        output=workdir / f"{split.removeprefix('data.')}-conversations.arrow" if workdir else None,
    )
    lengths = np.asarray(mapped[_LENGTH if labeled else _PROMPT_LENGTH][:])
    keep, report = apply_overflow(lengths, max_length, data.overflow, split, what="conversation")
    if labeled:
        if report.truncated:
            cut = (
                "were cut at the end (their later turns are not trained)"
                if split == "data.train"
                else "were cut to it (the eval loss reads each one's beginning; generation keeps the end of its prompt)"
            )
            report.notes.append(
                f"{report.truncated} conversation(s) longer than max_length={max_length} {cut}; raise data.max_length "
                "or use data.overflow=drop"
            )
        trained = np.asarray(mapped[_TRAINED][:])
        if split == "data.train":
            empty = int((trained[keep] == 0).sum())
            keep = keep[trained[keep] > 0]
            if empty:
                report.notes.append(
                    f"{empty} conversation(s) have no assistant token within max_length={max_length} and are left "
                    "out of training"
                )
            if not len(keep):
                raise DataError(f"{split}: no conversation has an assistant token within data.max_length={max_length}")
            blank = int(np.asarray(mapped[_BLANK][:]).sum())
            if blank:  # legal, and almost always a data mistake: it teaches the model to answer nothing
                report.notes.append(
                    f"{blank} conversation(s) have an empty assistant turn that is trained on: an answer of nothing "
                    "(its end-of-turn token alone); fill or remove those turns"
                )
        turns = "every assistant turn" if data.assistant_turns == "all" else "the last assistant turn"
        report.notes.append(f"conversations: loss on {turns}, its tokens found by {encoder.method}")
    selected = mapped.select(keep) if len(keep) < len(mapped) else mapped
    prompts = [list(p) for p in selected["prompt_ids"][:]]
    if labeled:
        inputs = selected["input_ids"][:]
        dataset = Dataset.from_dict(
            {"input_ids": inputs, "attention_mask": [[1] * len(x) for x in inputs], "labels": selected["labels"][:]}
        )
    else:
        dataset = Dataset.from_dict({"input_ids": prompts})
    rows = rows.select(keep) if len(keep) < len(rows) else rows
    return Features(dataset, rows, report, prompts=prompts)


def _blank_answer(messages: Messages, assistant_turns: str) -> bool:
    """Whether an assistant turn the loss falls on (all of them, or the last) has no text."""
    answers = [t for t in messages if t.get("role") == "assistant"]
    trained = answers if assistant_turns == "all" else answers[-1:]
    return any(not str(t.get("content") or "").strip() for t in trained)


def check_evaluation_conversation(messages: Messages, where: str) -> None:
    """An evaluation conversation (and a GRPO training one, whose samples are rewarded the same way) is scored on
    its final assistant turn, generated from the turns before it, so that turn must end the conversation and hold a
    reference: turns after it (a last request) would be silently dropped, and an empty reference would score every
    answer against nothing. Either is refused (exit 3) naming the row."""
    scored = "rewarded" if where.startswith("data.train") else "scored"
    final = final_turn(messages)
    if final is None:  # the data layer refuses these first, naming the file
        raise DataError(f"{where}: no assistant turn, so there is nothing to score")
    if final != len(messages) - 1:
        after = ", ".join(m["role"] for m in messages[final + 1 :])
        raise DataError(
            f"{where}: the conversation ends with a {messages[-1]['role']} turn (turn {len(messages)}), after its "
            f"last assistant turn (turn {final + 1}); the final assistant turn is the one {scored}, so the {after} "
            f"turn(s) after it would be dropped unanswered. End each such conversation with the assistant turn "
            "(`finetune predict` answers a conversation that ends with a request)"
        )
    if not str(messages[final].get("content") or "").strip():
        raise DataError(
            f"{where}: the final assistant turn (turn {final + 1}) is empty; it is the reference answers are {scored} "
            "against, so give its expected content"
        )


def references(rows: Sequence[dict[str, Any]], answer_field: str) -> None:
    """Evaluation rows: the final assistant turn's content as the task's reference field, what metrics compare."""
    for row in rows:
        final = final_turn(row["messages"])
        if final is not None:
            row[answer_field] = row["messages"][final]["content"]
