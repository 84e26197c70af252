"""Training rows of the objectives beyond SFT: pairs (prompt, chosen, rejected) for DPO and ORPO, thumbs (prompt,
completion, label) for KTO, tokenised exactly as supervised rows are (same template, chat template, overflow); and
GRPO's prompts, whose completions are sampled during training.

Each side of a pair is one prompt -> completion example of `text2text.encode`, so the loss falls on the same
completion tokens SFT trains on. The collator lays a batch out as TRL does: for pairs, the chosen sequences
then the rejected ones in one padded batch (one forward for both); for thumbs, each row with its mismatched
(prompt, other completion) sequence, whose log-probability estimates KTO's KL term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

import finetune.tasks.sandbox as sandbox
from finetune.data.conversations import conversation_texts
from finetune.data.features import Features
from finetune.data.tables import LengthReport, TooLong, checked_texts, renumbered
from finetune.errors import DataError
from finetune.models.families import FamilySpec
from finetune.recipe.schema import Recipe
from finetune.tasks.base import named_metrics
from finetune.tasks.conversations import encode_turns
from finetune.tasks.text2text import IGNORE, Encoded, encode

PAIR_FIELDS = ("chosen", "rejected")
THUMB_FIELD = "label"  # KTO: true for a desirable completion, false for an undesirable one
# Per-row reference log-probabilities, added to the features before training (finetune.training.objectives).
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


# The two sides of a preference feature row: a pair's answers, or a thumb's completion and its KL sequence.
PAIR_SIDES, THUMB_SIDES = ("chosen", "rejected"), ("completion", "kl")


def sides_of(columns: Iterable[str]) -> tuple[str, str] | None:
    """Which sides preference features hold, read from their column names; None: not preference features."""
    for sides in (PAIR_SIDES, THUMB_SIDES):
        if f"{sides[0]}_input_ids" in columns:
            return sides
    return None


def is_pairs(rows: Dataset) -> bool:
    return all(name in rows.column_names for name in PAIR_FIELDS)


def pair_metrics_problems(recipe: Recipe, eval_rows: Dataset) -> list[str]:
    """KTO evaluated on thumbs reports no log-probabilities of chosen and rejected answers (there are none): a gate
    or best metric naming one passed validate and failed as "missing" after training. Checked where the eval rows
    are read (validate, run, eval), one rule for all three."""
    if recipe.train.objective != "kto" or is_pairs(eval_rows):
        return []
    return [
        f"{place}: {metric} is reported when data.eval holds pairs (prompt, chosen, rejected); its rows are thumbs"
        for place, metric in named_metrics(recipe.eval)
        if metric in ("logps_chosen", "logps_rejected")
    ]


def preference_fields(objective: str, prompt_field: str, answer_field: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) row fields under a preference objective. KTO trains on thumbs and may be evaluated
    on pairs, so its fields are all optional beyond the prompt; featurize checks what each split needs."""
    if objective == "kto":
        return (prompt_field,), (answer_field, THUMB_FIELD, *PAIR_FIELDS)
    return (prompt_field, *PAIR_FIELDS), (answer_field,)


def _thumbs(values: list, split: str, first_row: int = 1) -> list[bool]:
    """KTO labels: booleans (or 0/1, also as 0.0/1.0 as pandas writes a column of them, the strings true/false),
    anything else named by row."""
    out = []
    for number, value in enumerate(values, start=first_row):
        if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
            out.append(bool(value))
        elif isinstance(value, str) and value.strip().lower() in ("true", "false"):
            out.append(value.strip().lower() == "true")
        else:
            raise DataError(
                f"{split}: row {number}: field {THUMB_FIELD!r} must be true (desirable) or false (undesirable), "
                f"got {value!r}"
            )
    return out


def judged_rows(
    rows: Dataset, objective: str, split: str, prompt_field: str, answer_field: str
) -> tuple[list[str], list[list[str]], list[bool] | None]:
    """Every check of pairs or thumbs that needs no tokenizer, shared by training (featurize_preferences) and
    `finetune validate` (finetune.flows.resolve.check_rows), so both refuse the same rows with the same message.
    Returns the prompts (a conversation's: its turns as one text, what tells prompts apart) and, for pairs,
    ([chosen, rejected], None); for thumbs, ([completions], labels)."""
    prompts = prompt_keys(rows, split, prompt_field)
    if is_pairs(rows):
        return prompts, _checked_pairs(rows, split), None

    if split == "data.train" and objective != "kto":
        raise DataError(
            f"{split}: train.objective {objective} trains on pairs: the rows need 'chosen' and 'rejected' fields "
            "(map them with data.columns)"
        )
    missing = [name for name in (answer_field, THUMB_FIELD) if name not in rows.column_names]
    if missing:
        raise DataError(
            f"{split}: train.objective kto needs pairs (chosen, rejected) or thumbs ({answer_field}, "
            f"{THUMB_FIELD}); missing field(s) {', '.join(missing)} (map them with data.columns)"
        )
    completions = checked_texts(rows[answer_field][:], split, answer_field)
    thumbs = _thumbs(rows[THUMB_FIELD][:], split)
    for number, text in enumerate(completions, start=1):
        if not text.strip():
            raise DataError(f"{split}: row {number}: {answer_field!r} is empty; there is nothing to judge")
    if len(set(thumbs)) < 2 and split == "data.train":
        kind = "desirable" if thumbs and thumbs[0] else "undesirable"
        raise DataError(f"{split}: every row is {kind}; KTO learns from both kinds (label true and false)")
    if len(set(prompts)) < 2:  # each prompt's KL sequence pairs it with another prompt's completion
        raise DataError(
            f"{split}: KTO needs rows with at least 2 different prompts (each prompt is also paired "
            "with another prompt's completion)"
        )
    return prompts, [completions], thumbs


def prompt_keys(rows: Dataset, split: str, prompt_field: str) -> list[str]:
    """Each row's prompt as text: the prompt field, or a conversation's turns (`messages`, judged_conversations)."""
    if "messages" in rows.column_names:
        return conversation_texts(rows).to_pylist()
    return checked_texts(rows[prompt_field][:], split, prompt_field, turns_read=True)


def _checked_pairs(rows: Dataset, split: str) -> list[list[str]]:
    """[chosen, rejected] of pair rows; a side empty, or both the same, is named by row."""
    chosen = checked_texts(rows["chosen"][:], split, "chosen")
    rejected = checked_texts(rows["rejected"][:], split, "rejected")
    for number, (good, bad) in enumerate(zip(chosen, rejected), start=1):
        if not good.strip() or not bad.strip():
            side = "chosen" if not good.strip() else "rejected"
            raise DataError(f"{split}: row {number}: {side!r} is empty; a pair needs two answers to compare")
        if good.strip() == bad.strip():  # spaces around alone: a tokenizer that splits on them sees one answer twice
            raise DataError(
                f"{split}: row {number}: 'chosen' equals 'rejected'; the pair prefers nothing (remove the row)"
            )
    return [chosen, rejected]


UNPAIR_BATCH = 1000


def kto_rows(rows: Dataset, objective: str, split: str, prompt_field: str, answer_field: str) -> Dataset:
    """The rows KTO trains on: thumbs as they are; pairs (rows without thumbs) as two thumbs each, the chosen
    answer desirable and the rejected one undesirable, as TRL's `unpair_preference_dataset` makes them (each
    batch's chosen answers, then its rejected ones). Pairs were trained as thumbs and failed (internal error).
    Every other split and objective: `rows` unchanged (KTO is evaluated on pairs by preference accuracy)."""
    if objective != "kto" or split != "data.train" or not is_pairs(rows):
        return rows
    if answer_field in rows.column_names and THUMB_FIELD in rows.column_names:  # thumbs beside pairs: the thumbs
        return rows.remove_columns(list(PAIR_FIELDS))
    prompt_keys(rows, split, prompt_field)  # checked
    asked = "messages" if "messages" in rows.column_names else prompt_field  # a conversation's turns, or text
    prompts = rows[asked][:]
    chosen, rejected = _checked_pairs(rows, split)
    unpaired: dict[str, list] = {asked: [], answer_field: [], THUMB_FIELD: []}
    for start in range(0, len(prompts), UNPAIR_BATCH):  # datasets.map's default batch, as TRL maps them
        batch = slice(start, start + UNPAIR_BATCH)
        unpaired[asked] += prompts[batch] + prompts[batch]
        unpaired[answer_field] += chosen[batch] + rejected[batch]
        unpaired[THUMB_FIELD] += [True] * len(chosen[batch]) + [False] * len(rejected[batch])
    return Dataset.from_dict(unpaired)


def featurize_preferences(
    rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
    prompt_field: str,
    answer_field: str,
    completion_text: Callable[[str], str] = lambda text: text,
) -> Features:
    """Pairs or thumbs -> features. Rows whose sides are identical or empty are refused: a pair that says
    nothing would be trained on as if it did. `completion_text`: the task's text trained on for an answer (QA's
    leading space), applied to every side as supervised training applies it."""
    pairs = len(rows)
    rows = kto_rows(rows, recipe.train.objective, split, prompt_field, answer_field)
    # KTO's thumbs made from pairs: a message about a thumb names the pair it came from.
    numbers = unpaired_numbers(pairs) if len(rows) != pairs else None
    with _numbered_as_pairs(split, numbers):
        prompts, answers, thumbs = judged_rows(rows, recipe.train.objective, split, prompt_field, answer_field)
        turns = rows["messages"][:] if "messages" in rows.column_names else None

        def encode_side(texts: list[str]) -> Encoded:
            """A prompt answered by each text: as SFT trains on it, as text or as a conversation's next turn (where
            the chat template places the answer; QA's leading space is the template's to give)."""
            if turns is None:
                return encode(prompts, [completion_text(t) for t in texts], tokenizer, family, recipe, split)
            return encode_turns(turns, texts, tokenizer, family, recipe, split)

        if thumbs is None:
            columns, keep, report, prompt_ids = _encode_sides(len(prompts), answers, PAIR_SIDES, encode_side, split)
            dataset = Dataset.from_dict(columns)
            kept = rows.select(keep) if len(keep) < len(prompts) else rows
            if answer_field not in kept.column_names:  # generation is scored against the preferred answer
                # A mapped copy, not add_column: the feature cache stores the rows by their Arrow files, and a column
                # added in memory is in none of them.
                kept = kept.map(lambda row: {answer_field: row["chosen"]}, desc=None)
            return Features(dataset, kept, report, prompts=prompt_ids)

        # The KL term's mismatched pairs: each prompt with the completion of the nearest earlier row (file order,
        # cyclic) that answers another prompt, fixed per row so its reference log-probability is computed once.
        texts = answers[0]
        shifted = [texts[_other_prompt(prompts, i)] for i in range(len(prompts))]
        columns, keep, report, prompt_ids = _encode_sides(
            len(prompts), [texts, shifted], THUMB_SIDES, encode_side, split
        )
        dataset = Dataset.from_dict({**columns, "desirable": [thumbs[int(i)] for i in keep]})
        kept = rows.select(keep) if len(keep) < len(prompts) else rows
        contradicted = _thumbed_both_ways(prompts, answers[0], thumbs)
        if contradicted:  # real feedback can disagree: said, not refused (a pair equal on both sides is refused)
            first, second = contradicted[0] if numbers is None else sorted(numbers[n - 1] for n in contradicted[0])
            report.notes.append(
                f"{len(contradicted)} prompt and completion(s) thumbed both up and down (first: rows {first} and {second}); "
                "they pull the model both ways"
            )
        return Features(dataset, kept, report, prompts=prompt_ids)


def unpaired_numbers(pairs: int) -> list[int]:
    """For each of KTO's thumbs made from `pairs` pairs (`kto_rows`), the 1-based row of its pair."""
    numbers: list[int] = []
    for start in range(0, pairs, UNPAIR_BATCH):
        batch = list(range(start + 1, min(start + UNPAIR_BATCH, pairs) + 1))
        numbers += batch + batch  # the batch's chosen answers, then its rejected ones
    return numbers


@contextlib.contextmanager
def _numbered_as_pairs(split: str, numbers: list[int] | None) -> Iterator[None]:
    """A row's message about KTO's thumbs made from pairs, with the pair's row (`numbers`, `unpaired_numbers`)."""
    try:
        yield
    except DataError as exc:
        if numbers is None:
            raise
        raise renumbered(exc, split, numbers) from None


def _thumbed_both_ways(prompts: list[str], completions: list[str], thumbs: list[bool]) -> list[tuple[int, int]]:
    """(row, row) numbers, 1-based, of each prompt and completion labelled desirable once and undesirable once."""
    first_of: dict[tuple[str, str, bool], int] = {}
    found = []
    for number, key in enumerate(zip(prompts, completions, thumbs), start=1):
        other = first_of.get((key[0], key[1], not key[2]))
        if other is not None and (key[0], key[1], key[2]) not in first_of:
            found.append((other, number))
        first_of.setdefault(key, number)
    return found


def _other_prompt(prompts: list[str], index: int) -> int:
    """The nearest earlier row (cyclic) whose prompt differs from row `index`'s."""
    for step in range(1, len(prompts)):
        other = (index - step) % len(prompts)
        if prompts[other] != prompts[index]:
            return other
    return (index - 1) % len(prompts)


def _encode_sides(
    rows: int, sides: list[list[str]], names: tuple[str, str], encode_side: Callable[[list[str]], Encoded], split: str
) -> tuple[dict[str, list], np.ndarray, LengthReport, list[list[int]]]:
    """Each row's prompt with each of two completions, as SFT examples (`encode_side`): the `<name>_input_ids` /
    `<name>_labels` columns of the rows both of whose sequences survived data.overflow (none left is an error, not
    an empty run), those rows' indices, the length report and the prompts' ids."""
    both: list[Encoded] = []
    too_long: list[TooLong] = []
    for texts in sides:  # data.overflow: error names the rows either side of which is too long, all at once
        try:
            both.append(encode_side(texts))
        except TooLong as exc:
            too_long.append(exc)
    if too_long:
        named = too_long[0]
        rows_named = np.concatenate([exc.rows for exc in too_long])
        raise TooLong(named.split, rows_named, named.max_length, "pair" if names == PAIR_SIDES else named.what)
    first, second = both
    keep = np.intersect1d(first.keep, second.keep)
    if not keep.size:
        raise DataError(f"{split}: data.overflow=drop dropped every row (one side of each was too long)")
    columns: dict[str, list] = {}
    for name, encoded in zip(names, (first, second)):
        assert encoded.features is not None  # completions were given
        at = {int(i): n for n, i in enumerate(encoded.keep)}
        selected = encoded.features.select([at[int(i)] for i in keep])
        columns[f"{name}_input_ids"], columns[f"{name}_labels"] = selected["input_ids"], selected["labels"]
    at = {int(i): n for n, i in enumerate(first.keep)}
    truncated = int(np.union1d(first.too_long, second.too_long).size)  # rows with either side cut
    report = _merged_report(first.report, second.report, rows, len(keep), names, truncated)
    return columns, keep, report, [first.prompt_ids[at[int(i)]] for i in keep]


def _merged_report(
    first: LengthReport, second: LengthReport, rows: int, kept: int, names: tuple[str, str], truncated: int
) -> LengthReport:
    """Both sides' lengths in one report: each percentile the longer side's, `truncated` the rows with either side
    cut (each side's own count said where they differ), each side's notes under its name (two
    sides' "1 completion(s) ... were cut" are two completions: one note said one), the rows dropped on either side
    counted. It was the first side's alone: a 3,000-token rejected answer cut to max_length showed as max 26
    tokens, 0 truncated."""
    report = first
    report.percentiles = {k: max(v, second.percentiles.get(k, 0)) for k, v in first.percentiles.items()}
    notes = [f"{names[0]}: {note}" for note in first.notes] + [f"{names[1]}: {note}" for note in second.notes]
    if first.truncated != second.truncated:
        notes.append(
            f"truncated to max_length: {first.truncated} {names[0]} and {second.truncated} {names[1]} sequence(s)"
        )
    report.notes, report.truncated = notes, truncated
    if kept < rows - report.dropped:
        report.notes.append(f"{rows - kept} row(s) dropped because one side was too long (data.overflow=drop)")
        report.dropped = rows - kept
    return report


class PreferenceCollator:
    """A batch of pairs or thumbs as one padded batch (right padding; labels -100 where no loss falls).

    Pairs: rows 0..B-1 are the chosen sequences, B..2B-1 the rejected ones. Thumbs: rows 0..B-1 the rows' own
    completions, B..2B-1 their mismatched KL sequences; `desirable` says which rows are thumbs up. For an
    encoder-decoder model `input_ids` is the prompt (the same for both halves) and `labels` the decoder target.
    Reference log-probabilities travel with the rows once computed.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        first, second = sides_of(rows[0]) or PAIR_SIDES
        inputs = [r[f"{first}_input_ids"] for r in rows] + [r[f"{second}_input_ids"] for r in rows]
        labels = [r[f"{first}_labels"] for r in rows] + [r[f"{second}_labels"] for r in rows]
        width = max(len(x) for x in inputs)
        label_width = max(len(x) for x in labels)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([x + [self.pad_id] * (width - len(x)) for x in inputs], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], dtype=torch.long),
            "labels": torch.tensor([x + [IGNORE] * (label_width - len(x)) for x in labels], dtype=torch.long),
        }
        if "desirable" in rows[0]:
            batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows], dtype=torch.bool)
        for name in REFERENCE_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([r[name] for r in rows], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------- GRPO prompts


def check_rollout_rows(rows: Dataset, split: str, reward_fields: tuple[str, ...]) -> None:
    """What GRPO's reward reads from each training row (`reward_fields`) is there, as text: shared by training
    (rollout_prompts) and `finetune validate` (resolve.check_rows), which passed rows run refused."""
    needed = [name for name in reward_fields if name not in rows.column_names]
    if needed:
        raise DataError(
            f"{split}: train.objective grpo scores each sampled completion against the row's "
            f"{', '.join(needed)}; the rows have no such field (map it with data.columns)"
        )
    for name in reward_fields:
        checked_texts(rows[name][:], split, name)


def rollout_prompts(
    rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
    prompt_field: str,
    reward_fields: tuple[str, ...],
) -> Features:
    """GRPO's training features: each row's prompt ids (as generation sees them) and its index among the rows,
    so the reward can read the row's reference (`reward_fields`, text in every row)."""
    check_rollout_rows(rows, split, reward_fields)
    if "test" in reward_fields:  # rewards run generated code: both opt-ins before any weights load
        sandbox.require_opt_in(recipe.eval.execute_code)
        sandbox.check_level(recipe.eval.sandbox)
    prompts = checked_texts(rows[prompt_field][:], split, prompt_field)
    encoded = encode(prompts, None, tokenizer, family, recipe, split)
    kept = rows.select(encoded.keep) if len(encoded.keep) < len(prompts) else rows
    dataset = Dataset.from_dict({"input_ids": encoded.prompt_ids, "row": list(range(len(kept)))})
    return Features(dataset, kept, encoded.report, prompts=encoded.prompt_ids)


class PromptCollator:
    """GRPO batches: the prompts left-padded (generation continues each from its own last token), their rows."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        return {
            "prompt_ids": torch.tensor(
                [[self.pad_id] * (width - len(r["input_ids"])) + r["input_ids"] for r in rows], dtype=torch.long
            ),
            "prompt_mask": torch.tensor(
                [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows], dtype=torch.long
            ),
            "row": torch.tensor([r["row"] for r in rows], dtype=torch.long),
        }
