"""Text classification: a sequence-classification head on any family.

BERT-style models read the pooled [CLS] token, BART the final EOS state, and
GPT-style models the last non-pad token (the pad token is set on the config).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.features import Features
from finetune.data.tables import apply_overflow, checked_texts, map_batches
from finetune.errors import DataError
from finetune.evaluation.scoring import eval_loader
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.base import Task

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

BATCH_WIDTH_MULTIPLE = 32  # padded batch widths come in multiples of this (see collate)


def _label_key(label: object) -> str:
    """Labels compare as text, so 3 in one file and "3" in another are the same class."""
    return str(label)


class ClassificationTask(Task):
    name = "classification"
    required_fields = ("text", "label")
    optional_fields = ("text_pair",)
    reference_fields = ("label",)
    metric_names = ("accuracy", "macro_f1", "weighted_f1")
    head_candidates = ("classifier", "score", "classification_head", "pooler")
    head = "sequence_classification"

    # ------------------------------------------------------------ model
    def fit_state(
        self, train_rows: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> dict[str, Any]:
        seen = _checked_labels(train_rows["label"][:], "data.train")
        if recipe.data.labels is not None:
            labels = list(recipe.data.labels)
            known = {_label_key(x) for x in labels}
            unknown = sorted({_label_key(x) for x in seen} - known)
            if unknown:
                raise DataError(f"data.train: labels {unknown} are not in data.labels {labels}")
        else:
            distinct = {_label_key(x): x for x in seen}
            labels = sorted(
                distinct.values(), key=lambda x: (not isinstance(x, int), x if isinstance(x, int) else str(x))
            )
        if len(labels) < 2:
            raise DataError(f"data.train: classification needs at least two classes, found {labels}")
        return {"labels": labels}

    def model_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        names = [_label_key(x) for x in state["labels"]]
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)},
        }

    # ------------------------------------------------------------ data
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
        max_length = recipe.data.max_length
        has_pairs = "text_pair" in rows.column_names
        label_index = {_label_key(x): i for i, x in enumerate(state["labels"])} if labeled else None
        truncate = Truncation(tokenizer, max_length)

        def encode(batch: dict, indices: list[int]) -> dict:
            first = indices[0] + 1
            texts = checked_texts(batch["text"], split, "text", first)
            pairs = checked_texts(batch["text_pair"], split, "text_pair", first) if has_pairs else None
            encoded, lengths = truncate(texts, pairs)
            encoded[LENGTH_COLUMN] = lengths
            if label_index is not None:
                encoded["labels"] = _label_ids(batch["label"], label_index, state["labels"], split, first)
            return encoded

        features = map_batches(
            rows,
            encode,
            recipe.data.num_workers,
            fingerprint=f"{rows._fingerprint}-features",
            description=f"tokenising {split}",
            output=workdir / f"{split.removeprefix('data.')}-features.arrow" if workdir else None,
        )
        lengths = features.data.column(LENGTH_COLUMN).to_numpy()
        keep, report = apply_overflow(lengths, max_length, recipe.data.overflow, split)
        features = features.remove_columns(LENGTH_COLUMN)
        if len(keep) < len(rows):
            rows, features = rows.select(keep), features.select(keep)
        return Features(features, rows, report)

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> DataCollatorWithPadding:
        from transformers import DataCollatorWithPadding

        tokenizer.padding_side = "right"
        # Widths rounded up to a multiple of 32 (never past max_length): length-grouped batches then come in a few
        # shapes instead of dozens, and the CPU allocator and oneDNN's primitive cache stop growing with each new
        # shape (peak RSS 2.2 -> 1.35 GB over 60 MiniLM steps at the same speed; bench/README.md).
        multiple = BATCH_WIDTH_MULTIPLE if max_length is not None and max_length % BATCH_WIDTH_MULTIPLE == 0 else None
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)

    # ------------------------------------------------------------ evaluation
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
        labeled = "labels" in features.dataset.column_names
        logits_parts, label_parts = [], []
        model.eval()
        for batch in eval_loader(
            features.dataset, self.collate(tokenizer, recipe.data.max_length), recipe.eval_batch_size, accelerator
        ):
            labels = batch.pop("labels", None)
            with accelerator.autocast():
                logits = model(**batch).logits.float()
            if labeled:
                logits, labels = accelerator.gather_for_metrics((logits, labels))
                label_parts.append(labels.cpu())
            else:
                logits = accelerator.gather_for_metrics(logits)
            logits_parts.append(logits.cpu())
        logits = torch.cat(logits_parts)
        probabilities = logits.softmax(-1)
        scores, predicted = probabilities.max(-1)
        loss = None
        if labeled:
            gold = torch.cat(label_parts)
            loss = torch.nn.functional.cross_entropy(logits, gold).item()

        names = state["labels"]
        out = []
        for index, row in enumerate(features.rows):
            row = dict(row)
            row["prediction"] = names[int(predicted[index])]
            row["score"] = round(float(scores[index]), 6)
            out.append(row)
        return out, loss

    def prediction_fields(self) -> tuple[str, ...]:
        return ("label", "prediction")

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

        y_true = [_label_key(r["label"]) for r in rows]
        y_pred = [_label_key(r["prediction"]) for r in rows]
        classes = sorted(set(y_true) | set(y_pred))
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, zero_division=0
        )
        metrics = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        }
        per_class = {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        }
        matrix = confusion_matrix(y_true, y_pred, labels=classes).tolist()
        return {
            "metrics": metrics,
            "details": {"per_class": per_class, "confusion_matrix": {"labels": classes, "matrix": matrix}},
        }


def _checked_labels(values: list, split: str, first_row: int = 1) -> list:
    for number, value in enumerate(values, start=first_row):
        if value is None or (isinstance(value, str) and not value.strip()) or isinstance(value, (float, list, dict)):
            raise DataError(f"{split}: row {number}: label must be a string or an integer, got {value!r}")
    return list(values)


class Truncation:
    """The tokenizer's own truncation at max_length, and each row's untruncated token length, from one tokenisation.

    For single texts on a fast tokenizer it runs the Rust tokenizer directly: its encodings keep what truncation
    cut off (`overflowing`, stride 0), so the untruncated length is counted without turning those tokens into
    Python lists (the tokenizer's Python wrapper would). tests/test_units.py checks the result against the
    wrapper's `truncation=True` output on BERT, BART, GPT-2 and Llama tokenizers. Text pairs (which truncation
    cuts longest-first) and slow tokenizers: untruncated, then only the long rows again with truncation.
    """

    FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer, self.max_length = tokenizer, max_length
        self.keys = list(tokenizer("probe").keys())
        self.backend = None
        if tokenizer.is_fast and all(key in self.FIELDS for key in self.keys):
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.no_padding()
            self.backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
            self.specials = self.backend.num_special_tokens_to_add(False)

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> tuple[dict, list[int]]:
        if pairs is None and self.backend is not None:
            encodings = self.backend.encode_batch(texts)
            lengths = [len(e) + sum(len(o) - self.specials for o in e.overflowing) for e in encodings]
            return {key: [getattr(e, self.FIELDS[key]) for e in encodings] for key in self.keys}, lengths
        encoded = dict(self.tokenizer(texts, pairs, truncation=False))
        lengths = [len(ids) for ids in encoded["input_ids"]]
        long_rows = [i for i, n in enumerate(lengths) if n > self.max_length]
        if long_rows:
            cut = self.tokenizer(
                [texts[i] for i in long_rows],
                [pairs[i] for i in long_rows] if pairs is not None else None,
                truncation=True,
                max_length=self.max_length,
            )
            for name, values in encoded.items():
                for j, i in enumerate(long_rows):
                    values[i] = cut[name][j]
        return encoded, lengths


# The untruncated token length of each row, kept while featurising for the length report and data.overflow.
LENGTH_COLUMN = "untruncated_length"


def _label_ids(values: list, index: dict[str, int], labels: list, split: str, first_row: int = 1) -> list[int]:
    ids = []
    for number, value in enumerate(_checked_labels(values, split, first_row), start=first_row):
        key = _label_key(value)
        if key not in index:
            raise DataError(
                f"{split}: row {number}: label {value!r} is not one of the {len(labels)} training labels "
                f"({', '.join(map(str, labels[:10]))}{', ...' if len(labels) > 10 else ''})"
            )
        ids.append(index[key])
    return ids
