"""Extractive QA bookkeeping: context windows, span labels, and n-best answers back in characters.

The same steps as transformers' run_qa.py (prepare_train_features,
prepare_validation_features, postprocess_qa_predictions), kept apart because
this is the messy part of the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from finetune.data.tables import LengthReport
from finetune.errors import DataError


@dataclass
class Windows:
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    example: list[int]  # window -> index of its example
    offsets: list[list[tuple[int, int] | None]]  # window -> per token: character span in the context, or None
    cls_index: list[int]  # the token a window points at for "no answer here"
    report: LengthReport


# What a line break becomes for tokenizers that drop it (BERT's normaliser does): one visible character, so
# character offsets do not move and paragraph ends, where long answers stop, stay visible to the model.
LINE_BREAK_MARK = "|"


def visible_line_breaks(contexts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The contexts as the model reads them. Answers are still cut from the original text by offset."""
    probe = tokenizer("a\nb", add_special_tokens=False, return_offsets_mapping=True)
    keeps_newline = any(start <= 1 < end for start, end in probe["offset_mapping"])
    if keeps_newline:
        return contexts
    return [context.replace("\n", LINE_BREAK_MARK) for context in contexts]


def windows(
    questions: list[str],
    contexts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    stride: int,
    split: str,
) -> Windows:
    """Question first, then overlapping windows of the context (`stride` tokens shared between neighbours)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("extractive qa needs a fast tokenizer (offset mappings)")
    contexts = visible_line_breaks(contexts, tokenizer)
    question_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    too_long = [i for i, n in enumerate(question_lengths) if n > max_length // 2]
    if too_long:
        raise DataError(
            f"{split}: row {too_long[0] + 1}: the question takes {question_lengths[too_long[0]]} tokens, more than half "
            f"of data.max_length={max_length}; shorten it or raise max_length"
        )
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    longest = max(question_lengths, default=0)
    room = max_length - longest - specials  # the context tokens a window of the longest question holds
    if stride >= room:  # the tokenizer panics (a Rust backtrace) on an overlap as wide as the window
        row = question_lengths.index(longest) + 1
        raise DataError(
            f"{split}: row {row}: data.doc_stride {stride} (the recipe's, or derived from the training rows) must be "
            f"below the context's room in a window: data.max_length {max_length} minus this row's question "
            f"({longest} tokens, the longest) and {specials} special tokens is {room}; shorten the question, lower "
            "data.doc_stride or raise data.max_length"
        )
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    offsets, cls_index = [], []
    context_tokens = [0] * len(questions)  # each example's whole context, counted from its windows
    for window, ids in enumerate(encoded["input_ids"]):
        sequence = encoded.sequence_ids(window)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][window], sequence)])
        cls_index.append(ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0)
        example = encoded["overflow_to_sample_mapping"][window]
        # A window after the first starts `stride` tokens before the end of the one before it.
        context_tokens[example] += sum(1 for s in sequence if s == 1) - (stride if context_tokens[example] else 0)
    # The untruncated length without tokenising again: question + whole context + the pair's special tokens.
    lengths = [q + c + specials for q, c in zip(question_lengths, context_tokens)]
    report = LengthReport.from_lengths(split, lengths, max_length)
    report.truncated = sum(n > max_length for n in lengths)  # split into windows, not cut
    if report.truncated:
        report.notes.append(
            f"{report.truncated} context(s) longer than max_length are read in {len(offsets)} overlapping windows "
            f"(doc_stride {stride}); nothing is cut"
        )
    return Windows(
        list(encoded["input_ids"]),
        list(encoded["attention_mask"]),
        list(encoded["overflow_to_sample_mapping"]),
        offsets,
        cls_index,
        report,
    )


def span_labels(w: Windows, answers: list[tuple[str, int] | None]) -> tuple[list[int], list[int], int]:
    """Start/end token labels per window; a window without the whole answer points at its CLS token.

    Returns (starts, ends, examples whose answer lies in no window).
    """
    starts, ends = [], []
    found: dict[int, bool] = {}
    for window, example in enumerate(w.example):
        answer = answers[example]
        start = end = w.cls_index[window]
        if answer is not None:
            text, first_char = answer
            last_char = first_char + len(text)
            spans = {i: o for i, o in enumerate(w.offsets[window]) if o is not None}  # the context's tokens
            tokens = list(spans)
            if tokens and spans[tokens[0]][0] <= first_char and spans[tokens[-1]][1] >= last_char:
                start = next(i for i in tokens if spans[i][1] > first_char)
                end = next(i for i in reversed(tokens) if spans[i][0] < last_char)
                found[example] = True
            else:
                found.setdefault(example, False)
        starts.append(start)
        ends.append(end)
    missed = sum(1 for hit in found.values() if not hit)
    return starts, ends, missed


def best_answers(
    w: Windows,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    contexts: list[str],
    n_best: int,
    max_answer_length: int,
    within: list[tuple[int, int] | None] | None = None,
    abstains: bool = False,
) -> list[str]:
    """The highest-scoring valid span (start + end logit) over all windows of each example, as context text;
    with `within`, only spans inside that example's character range (None: anywhere). `abstains` (a model trained
    on questions without an answer, pointed at the CLS token): "" where the no-answer score, the lowest over the
    example's windows, beats every span, as transformers' postprocess_qa_predictions does with
    version_2_with_negative; without it such a model always answered, and SQuAD v2 scoring gave those rows 0.

    Raw logits, as transformers' postprocess_qa_predictions compares them: normalising each window's scores
    (log-softmax) was measured worse on paragraph answers (F1 0.57 against 0.68 on data/faq_paragraphs).
    """
    best: dict[int, tuple[float, str]] = {}
    no_answer: dict[int, float] = {}
    for window, example in enumerate(w.example):
        offsets = w.offsets[window]
        start_scores, end_scores = start_logits[window], end_logits[window]
        cls = w.cls_index[window]
        null = float(start_scores[cls] + end_scores[cls])
        no_answer[example] = min(null, no_answer.get(example, null))
        allowed = within[example] if within is not None else None
        if allowed is not None:  # the n best are counted inside the range: spans outside it cannot be chosen
            outside = np.array([o is None or o[0] < allowed[0] or o[1] > allowed[1] for o in offsets])
            outside = np.pad(outside, (0, len(start_scores) - len(outside)), constant_values=True)
            start_scores, end_scores = np.where(outside, -np.inf, start_scores), np.where(outside, -np.inf, end_scores)
        top_starts = np.argsort(start_scores)[::-1][:n_best]
        top_ends = np.argsort(end_scores)[::-1][:n_best]
        for s in top_starts:
            for e in top_ends:
                if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                    continue
                if e < s or e - s + 1 > max_answer_length:
                    continue
                if allowed is not None and not np.isfinite(start_scores[s] + end_scores[e]):
                    continue
                score = float(start_scores[s] + end_scores[e])
                if example not in best or score > best[example][0]:
                    best[example] = (score, contexts[example][offsets[s][0] : offsets[e][1]])
    if abstains:
        return ["" if i not in best or no_answer[i] > best[i][0] else best[i][1] for i in range(len(contexts))]
    return [best[i][1] if i in best else "" for i in range(len(contexts))]
