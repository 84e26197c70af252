"""Question answering: extractive spans (SQuAD layout) and generative answers; SQuAD v1.1 EM/F1 for both.

Extractive QA follows transformers' run_qa: the question first, the context
split into overlapping windows (`data.doc_stride`), offsets mapped back to
characters, and n-best post-processing (`eval.n_best`, `eval.max_answer_length`).
The window bookkeeping lives in qa_spans.py.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import finetune.tasks.qa_spans as qa_spans
from finetune.data.features import Features
from finetune.data.tables import checked_texts
from finetune.errors import DataError
from finetune.evaluation.scoring import eval_loader
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.base import Task
from finetune.tasks.generative import GenerationTask, Rewards

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

# --------------------------------------------------------------------------- SQuAD v1.1 metrics (official script)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def gold_answers(row: dict) -> list[str]:
    """The reference answers of a row: SQuAD `answers` ({text: [...]}) or a list, or a generative `answer`."""
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, dict):
        answers = answers.get("text", [])
    if isinstance(answers, str):
        answers = [answers]
    return [a for a in answers or [] if isinstance(a, str)]


def unanswerable(golds: list[str]) -> bool:
    """A row none of whose gold answers survives SQuAD's normalisation (none at all, SQuAD v2's "" at -1, or only
    texts such as "The"): the official SQuAD v2 script scores it as a question without an answer."""
    return not any(normalize_answer(gold) for gold in golds)


def row_scores(prediction: str | None, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction as the official SQuAD v2 script scores it: over the golds that survive
    normalisation, the maximum (SQuAD v1.1's scores where every gold does); with none, 1 for an answer that
    normalises to nothing, else 0. (Unanswerable rows were left out of the mean, and an empty answer to one was
    EM 1 but F1 0.)"""
    prediction = prediction or ""
    kept = [gold for gold in golds if normalize_answer(gold)]
    if not kept:
        abstained = float(not normalize_answer(prediction))
        return abstained, abstained
    return max(exact_match_score(prediction, g) for g in kept), max(f1_score(prediction, g) for g in kept)


def squad_metrics(rows: list[dict]) -> dict[str, Any]:
    """Exact match and F1 (`row_scores`) averaged over every row."""
    golds = [gold_answers(row) for row in rows]
    scores = [row_scores(row["prediction"], gold) for row, gold in zip(rows, golds)]
    count = len(scores)
    metrics = {
        "exact_match": sum(em for em, _ in scores) / count if count else 0.0,
        "f1": sum(f1 for _, f1 in scores) / count if count else 0.0,
    }
    without = sum(unanswerable(gold) for gold in golds)
    details = {"examples": count, **({"unanswerable": without} if without else {})}
    return {"metrics": metrics, "details": details}


def answer_reward(prediction: str, golds: list[str]) -> float:
    """GRPO's reward for an answer: `row_scores`' F1, except where every gold with text is one the normalisation
    empties (a multiple-choice "A"): SQuAD scores any empty answer 1 there, which a policy learns to exploit, so
    such a gold is matched as written (case and surrounding spaces aside)."""
    bare = [gold for gold in golds if gold.strip() and not normalize_answer(gold)]
    if bare and unanswerable(golds):
        return float(any(prediction.strip().casefold() == gold.strip().casefold() for gold in bare))
    return row_scores(prediction, golds)[1]


class _SquadScoring:
    metric_names: tuple[str, ...] = ("exact_match", "f1")

    def main_metric(self, settings: EvalSection) -> str:
        return "f1"

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        return squad_metrics(rows)

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        """Each row's prediction text (null: no answer) and its gold answers: SQuAD's {text: [...]}, a list of
        texts, or one text. A number as the prediction was an internal error; a gold answer that is no text was
        dropped without a word."""
        for number, row in enumerate(rows, start=1):
            if "prediction" not in row or ("answers" not in row and "answer" not in row):
                raise DataError(
                    f"{source}:{number}: a qa prediction row needs `prediction` and `answers` (or `answer`)"
                )
            if row["prediction"] is not None and not isinstance(row["prediction"], str):
                raise DataError(f"{source}:{number}: prediction must be text, got {row['prediction']!r}")
            field = "answers" if "answers" in row else "answer"
            golds = row[field]
            texts = golds.get("text") if isinstance(golds, dict) else golds
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise DataError(
                    f"{source}:{number}: {field} must be SQuAD's {{text: [...], answer_start: [...]}}, a list of "
                    f"answer texts or one text, got {golds!r}"
                )


# --------------------------------------------------------------------------- extractive


class ExtractiveQATask(_SquadScoring, Task):
    name = "qa"
    required_fields = ("question", "context", "answers")
    optional_fields = ("id",)
    reference_fields = ("answers", "answer")  # `answer`: rows answered from a knowledge base
    head_candidates = ("qa_outputs",)
    head = "question_answering"

    def fields(self, recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """With a knowledge base, rows hold a question and its answer; the context comes from retrieval (a row's own
        is read only to say that retrieval replaces it)."""
        if recipe.data.knowledge_base is not None:
            return ("question", "answer"), ("id", "context")
        return self.required_fields, self.optional_fields

    def loss_plan(self, recipe: Recipe, state: Mapping[str, Any]) -> str:
        return "cross-entropy on the answer span's start and end tokens"

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        stride = recipe.data.doc_stride
        if stride is not None and stride >= recipe.data.max_length:
            problems.append(f"data.doc_stride: {stride} must be below data.max_length ({recipe.data.max_length})")
        return problems

    def fit_state(self, train_rows: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The span settings the recipe leaves open, from the training answers (see span_settings)."""
        answers = checked_answers(
            train_rows["answers"][:],
            checked_texts(train_rows["context"][:], "data.train", "context"),
            "data.train",
            retrieved=recipe.data.knowledge_base is not None,
        )
        questions = checked_texts(train_rows["question"][:], "data.train", "question")
        found = [a for a in answers if a is not None and a[1] >= 0]
        settings = span_settings(questions, [a[0] for a in found], tokenizer, recipe)
        # Trained on questions the context does not answer (SQuAD v2's empty answers): the model may abstain. (Not a
        # knowledge base's answer its retrieved passages miss: that row has an answer.)
        abstains = recipe.data.knowledge_base is None and any(
            unanswerable(gold_answers({"answers": value})) for value in train_rows["answers"][:]
        )
        return {**settings, **({"abstains": True} if abstains else {})}

    def featurize(
        self,
        rows: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        recipe: Recipe,
        state: dict[str, Any],
        split: str,
        labeled: bool = True,
        workdir: Path | None = None,
    ) -> Features:
        questions = checked_texts(rows["question"][:], split, "question")
        contexts = checked_texts(rows["context"][:], split, "context")
        retrieved = recipe.data.knowledge_base is not None
        answers = checked_answers(rows["answers"][:], contexts, split, retrieved) if labeled else None
        stride = recipe.data.doc_stride or state["doc_stride"]
        windows = qa_spans.windows(questions, contexts, tokenizer, recipe.data.max_length, stride, split)
        report = windows.report
        if split == "data.train":
            report.notes.extend(state.get("span_notes", []))
        columns: dict[str, list] = {"input_ids": windows.input_ids, "attention_mask": windows.attention_mask}
        if answers is not None:
            starts, ends, missed = qa_spans.span_labels(windows, answers)
            columns.update(start_positions=starts, end_positions=ends)
            if missed:
                report.notes.append(
                    f"{missed} answer(s) fall outside every window (trained as 'no answer' like the SQuAD tooling); "
                    "raise data.max_length or data.doc_stride"
                )
        if recipe.data.overflow == "error" and report.truncated:
            raise DataError(
                f"{split}: {report.truncated} contexts need more than one window of data.max_length={recipe.data.max_length} "
                "tokens; raise max_length or set data.overflow to truncate (windows are used either way)"
            )
        return Features(Dataset.from_dict(columns), rows, report, windows=windows)

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> DataCollatorWithPadding:
        from transformers import DataCollatorWithPadding

        tokenizer.padding_side = "right"
        return DataCollatorWithPadding(tokenizer)

    @torch.no_grad()
    def predict(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        features: Features,
        accelerator: Accelerator,
        recipe: Recipe,
        state: dict[str, Any],
    ) -> tuple[list[dict], float | None]:
        model.eval()
        width = recipe.data.max_length
        starts, ends, losses = [], [], []
        for batch in eval_loader(features.dataset, self.collate(tokenizer), recipe.eval_batch_size, accelerator):
            start_positions, end_positions = batch.pop("start_positions", None), batch.pop("end_positions", None)
            with accelerator.autocast():
                output = model(**batch)
            start, end = (_pad_to(x.float(), width) for x in (output.start_logits, output.end_logits))
            parts: tuple[torch.Tensor, ...] = (start, end)
            if start_positions is not None:
                parts += (_span_loss(start, end, start_positions, end_positions),)
            gathered = [x.cpu() for x in accelerator.gather_for_metrics(parts)]
            starts.append(gathered[0])
            ends.append(gathered[1])
            losses.extend(gathered[2:])
        answers = qa_spans.best_answers(
            features.windows,
            torch.cat(starts).numpy(),
            torch.cat(ends).numpy(),
            features.rows["context"][:],
            n_best=recipe.eval.n_best,
            max_answer_length=recipe.eval.max_answer_length or state["max_answer_length"],
            within=answer_ranges(features.rows, recipe),
            abstains=bool(state.get("abstains")),
        )
        out = [dict(row) | {"prediction": answer} for row, answer in zip(features.rows, answers)]
        loss = torch.cat(losses).mean().item() if losses else None
        return out, loss

    def prediction_fields(self) -> tuple[str, ...]:
        return ("answers", "prediction")


def answer_ranges(rows: Dataset, recipe: Recipe) -> list[tuple[int, int] | None] | None:
    """Knowledge-base rows with data.retrieval.answer_from first: each row's answer is read from its
    highest-ranked passage (its character range in the context). None: anywhere in the context."""
    if recipe.data.retrieval.answer_from != "first" or "passage_spans" not in rows.column_names:
        return None
    return [tuple(spans[0]) if spans else None for spans in rows["passage_spans"][:]]


# SQuAD's answer limit in tokens: the floor of the derived one, since short answers need no more.
SQUAD_MAX_ANSWER_TOKENS = 30
# SQuAD's window overlap, used when the answers are short enough.
SQUAD_DOC_STRIDE = 128


def span_settings(
    questions: list[str], answers: list[str], tokenizer: PreTrainedTokenizerBase, recipe: Recipe
) -> dict[str, Any]:
    """eval.max_answer_length and data.doc_stride where the recipe leaves them open, and why.

    SQuAD's defaults (30 answer tokens, 128 overlap) cut paragraph answers. Here the answer limit covers the
    longest training answer (+10%), and the overlap between windows is at least that long, so every answer
    lies whole in some window wherever the window has room for it, up to half a window's room: windows advance
    by at least half their room, so a context costs at most about twice the windows of a reading without overlap.
    Without that bound one answer nearly a window long made the windows advance by a few tokens (the FAQ bench of
    bench/retrieval.py: about 13 windows per question over five retrieved passages, about 3,900 in all, where the
    bound reads them in about 1,300); answers longer than the overlap are counted in the warning below.
    """
    lengths = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] if answers else [0]
    longest = max(lengths)
    longest_question = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
    room = (
        recipe.data.max_length - longest_question - 3
    )  # context tokens in a window: the question and specials take the rest
    notes = []
    max_answer = recipe.eval.max_answer_length
    if max_answer is None:
        max_answer = max(SQUAD_MAX_ANSWER_TOKENS, math.ceil(1.1 * longest))
        notes.append(
            f"eval.max_answer_length {max_answer}: derived from the training answers (longest {longest} tokens, "
            f"p95 {int(np.percentile(lengths, 95))})"
        )
    stride = recipe.data.doc_stride
    if stride is None:
        wanted = max(min(SQUAD_DOC_STRIDE, room // 2), longest + 8)
        stride = max(1, min(wanted, room // 2))  # windows advance by at least half their room
        notes.append(
            f"data.doc_stride {stride}: windows overlap by at least the longest answer, so each lies whole "
            "in some window"
            if stride == wanted
            else f"data.doc_stride {stride}: windows overlap by half their room, not by the longest answer "
            f"({longest} tokens): windows advance by at least half their room, so a context is read in at most "
            "about twice the windows of a reading without overlap"
        )
    too_long = sum(n > max_answer for n in lengths)
    if too_long:
        notes.append(
            f"warning: {too_long} training answer(s) are longer than eval.max_answer_length={max_answer} tokens "
            "and can never be predicted whole"
        )
    straddling = sum(n > stride for n in lengths)
    if straddling:
        notes.append(
            f"warning: {straddling} training answer(s) are longer than data.doc_stride={stride}; in long "
            "contexts they may lie whole in no window (raise data.max_length)"
        )
    return {
        "max_answer_length": max_answer,
        "doc_stride": stride,
        "longest_answer_tokens": longest,
        "span_notes": notes,
    }


def _pad_to(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Windows are padded per batch; gathering across processes needs one width."""
    return torch.nn.functional.pad(logits, (0, width - logits.shape[1]), value=-1e4)


def _span_loss(
    start: torch.Tensor, end: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """Per-window span loss (mean of start and end cross-entropy), as the QA heads compute it."""
    ce = torch.nn.functional.cross_entropy
    return (ce(start, start_positions, reduction="none") + ce(end, end_positions, reduction="none")) / 2


def checked_answers(
    values: list, contexts: list[str], split: str, retrieved: bool = False
) -> list[tuple[str, int] | None]:
    """The first gold answer of each row as (text, start char), checked against its context. `retrieved`: contexts
    built from a knowledge base, where answer_start -1 marks an answer its retrieved passages miss; in a user's rows
    -1 is an answer nobody located, refused rather than trained as "no answer"."""
    out: list[tuple[str, int] | None] = []
    for number, (value, context) in enumerate(zip(values, contexts), start=1):
        if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
            raise DataError(
                f"{split}: row {number}: answers must be {{text: [...], answer_start: [...]}}, got {value!r}"
            )
        texts, starts = value["text"], value["answer_start"]
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(
                f"{split}: row {number}: answers.text and answers.answer_start must be lists of equal length"
            )
        if not texts:
            out.append(None)
            continue
        text, start = texts[0], starts[0]
        if isinstance(start, float) and start.is_integer():  # 53.0: what a CSV or pandas export writes for 53
            start = int(start)
        if not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{split}: row {number}: answers.answer_start must be whole numbers, got {start!r}")
        # A knowledge-base row whose retrieved passages miss the answer; or "no answer" written as an empty text at -1.
        if start == -1 and (retrieved or text == ""):
            out.append(None)
            continue
        if start == -1:
            raise DataError(
                f"{split}: row {number}: answer {text!r} has answer_start -1 (not located in its context); give "
                "where it starts, or empty text and answer_start lists for a question the context does not answer"
            )
        if context[start : start + len(text)] != text:
            raise DataError(
                f"{split}: row {number}: answer {text!r} is not at answer_start={start} in the context "
                f"(found {context[start : start + len(text)]!r})"
            )
        out.append((text, start))
    return out


# --------------------------------------------------------------------------- generative


class GenerativeQATask(_SquadScoring, GenerationTask):
    name = "qa"
    required_fields = ("question", "answer")
    optional_fields = ("context", "id", "prompt")  # prompt: built by data.template when one is given
    reference_fields = ("answer",)
    answer_field = "answer"
    default_stops = ("\n",)

    def fields(self, recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The prompt is built from the question and context, or by data.template (or read from a column the
        recipe maps to it): a file's own `prompt` column is not read, where it silently took the question's place
        in training and predict."""
        required, optional = super().fields(recipe)
        data = recipe.data
        if not recipe.train.learns_from_judgements and data.template is None and "prompt" not in data.columns:
            optional = tuple(name for name in optional if name != "prompt")
        return required, optional

    def featurize(
        self,
        rows: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        recipe: Recipe,
        state: dict[str, Any],
        split: str,
        labeled: bool = True,
        workdir: Path | None = None,
    ) -> Features:
        if "prompt" not in rows.column_names and "messages" not in rows.column_names:  # messages: conversations
            rows = rows.add_column("prompt", [_default_prompt(r, split, n) for n, r in enumerate(rows, start=1)])
        return super().featurize(rows, tokenizer, recipe, state, split, labeled, workdir)

    def completion_text(self, answer: str) -> str:
        return " " + answer.strip()  # the answer follows "Answer:" after a space, as text would

    def text_prompt(self, row: dict) -> str:
        """A row's template-built prompt, else the one featurize builds from its question (and context)."""
        return row["prompt"] if isinstance(row.get("prompt"), str) else _default_prompt(row, "data.train", 0)

    reward_fields = ("answer",)

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """SQuAD F1 of the answer (stripped, as predict strips it), the best over the row's gold answers."""
        return Rewards([answer_reward(r["prediction"].strip(), gold_answers(r)) for r in rows])

    def predict(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        features: Features,
        accelerator: Accelerator,
        recipe: Recipe,
        state: dict[str, Any],
    ) -> tuple[list[dict], float | None]:
        rows, loss = super().predict(model, tokenizer, features, accelerator, recipe, state)
        for row in rows:
            row["prediction"] = row["prediction"].strip()
        return rows, loss


def _default_prompt(row: dict, split: str, number: int) -> str:
    question = row["question"]
    if not isinstance(question, str):
        raise DataError(f"{split}: row {number}: field 'question' must be text, got {question!r}")
    context = row.get("context")
    return f"Context: {context}\nQuestion: {question}\nAnswer:" if context else f"Question: {question}\nAnswer:"
