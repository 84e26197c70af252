"""Text classification: a sequence-classification head on any family.

BERT-style models read the pooled [CLS] token, BART the final EOS state, and
GPT-style models the last non-pad token (the pad token is set on the config).

One label per text (softmax, cross-entropy) or several (`data.multi_label`, decided from the data when null: a
sigmoid per label, binary cross-entropy, transformers' `multi_label_classification` problem type). A multi-label
model chooses every label whose score reaches its threshold: `eval.threshold`, or per label the threshold that
maximises the label's F1 on the eval split, saved beside the adapter (thresholds.json) and used by eval and
predict. `train.class_weights` weights the loss by the training distribution; the loss is computed here, from
the logits, by a forward hook on the model (the training loop only reads `model(**batch).loss`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.features import Features
from finetune.data.tables import apply_overflow, checked_texts, is_class_name, label_key, map_batches
from finetune.errors import DataError, RecipeError
from finetune.evaluation.scoring import eval_loader, multi_label_metrics
from finetune.recipe.schema import DataSection, EvalSection, Recipe
from finetune.tasks.base import Task, width_multiple

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger("finetune")

# train.class_weights auto weights the loss when the most frequent class has at least this many times the training
# rows of the rarest (multi-label: rows carrying the label). Below it the classes are near enough balanced.
IMBALANCE_FOR_WEIGHTS = 4.0
DEFAULT_THRESHOLD = 0.5  # multi-label: a label with no tuned threshold (no eval positives, or nothing saved)
SCORE_DECIMALS = 6  # scores are rounded once; decisions and tuning use the rounded values, as predictions.jsonl does

# Metrics of one mode only; the others (macro_f1, weighted_f1) are reported in both.
SINGLE_LABEL_METRICS = ("accuracy",)
MULTI_LABEL_METRICS = ("micro_f1", "subset_accuracy", "hamming_loss")


def _label_value(label: Any) -> Any:
    """A label as the model names it: a text as `label_key` compares it, an integer as it is."""
    return label_key(label) if isinstance(label, str) else label


class ClassificationTask(Task):
    name = "classification"
    required_fields = ("text", "label")
    optional_fields = ("text_pair", "id")  # id: kept in predictions, which --compare matches by it
    reference_fields = ("label",)
    metric_names = ("accuracy", "macro_f1", "weighted_f1", *MULTI_LABEL_METRICS)
    head_candidates = ("classifier", "score", "classification_head", "pooler")
    head = "sequence_classification"

    # ------------------------------------------------------------ recipe
    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        data = recipe.data
        if data.label_separator is not None and data.multi_label is False:
            problems.append(
                "data.label_separator: splits several labels per text, but data.multi_label is false; "
                "remove one of them"
            )
        multi = True if data.label_separator is not None else data.multi_label
        if multi is not None:  # the mode is known without the data
            problems += mode_problems(recipe, multi, "data.multi_label" if data.multi_label is not None else None)
        return problems

    def check_state(self, recipe: Recipe, state: Mapping[str, Any]) -> None:
        """The recipe against the mode the data decided (list labels make a multi-label run)."""
        problems = mode_problems(recipe, bool(state.get("multi_label")), "data.train")
        if problems:
            raise RecipeError("; ".join(problems))

    def unavailable_metrics(
        self, recipe: Recipe, asked: Sequence[str] = (), state: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """The other mode's metrics, where a trained adapter's state says which mode it is (`finetune eval RUN --gate
        micro_f1>=...` on single labels loaded and evaluated the model, then failed the gate as missing: exit 4)."""
        out = super().unavailable_metrics(recipe, asked, state)
        if state is not None and "multi_label" in state:
            multi = bool(state["multi_label"])
            why = f"is not reported when the labels are {'lists (multi-label)' if multi else 'single (one per text)'}"
            for metric in SINGLE_LABEL_METRICS if multi else MULTI_LABEL_METRICS:
                out[metric] = why
        return out

    def main_metric(self, settings: EvalSection) -> str:
        """macro_f1: reported for one label per text and for several, and it weighs rare classes as much as
        frequent ones (accuracy hides a class the model never predicts)."""
        return "macro_f1"

    # ------------------------------------------------------------ model
    def fit_state(
        self, train_rows: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> dict[str, Any]:
        values = train_rows["label"][:]
        multi = _is_multi_label(values, recipe.data)
        if multi:
            label_sets = [_label_set(v, recipe.data.label_separator, "data.train", n) for n, v in enumerate(values, 1)]
            seen = [label for labels in label_sets for label in labels]
        else:
            seen = _checked_labels(values, "data.train", single_only=recipe.data.multi_label is False)
            _refuse_lists_as_text(seen)
        if recipe.data.labels is not None:
            labels = list(recipe.data.labels)
            known = {label_key(x) for x in labels}
            unknown = sorted({label_key(x) for x in seen} - known)
            if unknown:
                raise DataError(f"data.train: labels {unknown} are not in data.labels {labels}")
        else:
            distinct = {label_key(x): _label_value(x) for x in seen}
            labels = sorted(
                distinct.values(), key=lambda x: (not isinstance(x, int), x if isinstance(x, int) else str(x))
            )
        if multi and not labels:
            raise DataError("data.train: multi-label classification found no labels at all (every label list is empty)")
        if not multi and len(labels) < 2:
            raise DataError(f"data.train: classification needs at least two classes, found {labels}")
        # Rows per class (multi-label: rows carrying the label), in label order: what train.class_weights weighs by.
        counts = dict.fromkeys((label_key(x) for x in labels), 0)
        for label in seen:
            counts[label_key(label)] += 1
        # Trained on text pairs or on single texts: every row scored later must be the same (predict took rows
        # without their pair, or a pair the model never saw, silently).
        return {
            "labels": labels,
            "multi_label": multi,
            "label_counts": list(counts.values()),
            "rows": len(values),
            "text_pairs": "text_pair" in train_rows.column_names,
        }

    def label_codes(
        self, values: list, state: Mapping[str, Any], recipe: Recipe, split: str, first_row: int = 1
    ) -> list:
        """Rows' labels as the model's targets (`fit_state`'s labels): one id each, or one 0/1 per label (multi-label:
        the collator makes them floats for binary cross-entropy). A label of the wrong kind or outside the labels is
        refused, naming the row: what featurize encodes, and `validate` checks the same way."""
        index = {label_key(x): i for i, x in enumerate(state["labels"])}
        if state.get("multi_label"):
            return _multi_hot(values, index, state["labels"], recipe.data.label_separator, split, first_row)
        return _label_ids(values, index, state["labels"], split, first_row)

    def model_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        names = [label_key(x) for x in state["labels"]]
        kwargs: dict[str, Any] = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)},
        }
        if state.get("multi_label"):  # a sigmoid per label; transformers' pipelines read it too
            kwargs["problem_type"] = "multi_label_classification"
        return kwargs

    def loss_plan(self, recipe: Recipe, state: Mapping[str, Any]) -> str:
        weighted = loss_weights(state, recipe.train.class_weights) is not None
        loss = (
            "binary cross-entropy per label (multi-label)"
            if state.get("multi_label")
            else "cross-entropy on the labels"
        )
        return loss + (", weighted by the training distribution (train.class_weights)" if weighted else "")

    def set_loss(self, model: PreTrainedModel, recipe: Recipe, state: Mapping[str, Any]) -> None:
        """Class-weighted loss (train.class_weights): computed from the logits after the model's forward pass.

        A forward hook on the transformers model (peft and accelerate call it through `__call__`) replaces the
        model's own unweighted loss; without weights the model's own loss is kept: the same loss, computed once.
        """
        weights = loss_weights(state, recipe.train.class_weights)
        if weights is None:
            return
        multi = bool(state.get("multi_label"))
        tensor = torch.tensor(weights, dtype=torch.float32)

        def weighted(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            labels = kwargs.get("labels")
            if labels is not None:
                output["loss"] = classification_loss(output["logits"], labels, multi, tensor)
            return output

        model.register_forward_hook(weighted, with_kwargs=True)

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
        trained = state.get("text_pairs")  # (None: an adapter saved before it was recorded; either is taken)
        if trained is not None and trained != has_pairs:
            column = f", column {recipe.data.columns['text_pair']!r}" if "text_pair" in recipe.data.columns else ""
            raise DataError(
                f"{split}: the model was trained on text pairs (field 'text_pair'{column}); these rows have none"
                if trained
                else f"{split}: these rows are text pairs (field 'text_pair'{column}); the model was trained on "
                "single texts: drop the column"
            )
        truncate = Truncation(tokenizer, max_length)

        def encode(batch: dict, indices: list[int]) -> dict:
            first = indices[0] + 1
            texts = checked_texts(batch["text"], split, "text", first)
            pairs = checked_texts(batch["text_pair"], split, "text_pair", first) if has_pairs else None
            encoded, lengths = truncate(texts, pairs)
            encoded[LENGTH_COLUMN] = lengths
            if labeled:
                encoded["labels"] = self.label_codes(batch["label"], state, recipe, split, first)
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
        if (
            labeled
            and split == "data.train"
            and (state.get("multi_label") or (imbalance(state) or 0) >= IMBALANCE_FOR_WEIGHTS)
        ):
            report.notes.append(_balance_note(state))
        return Features(features, rows, report)

    def collate(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
    ) -> Callable[[list[dict]], dict]:
        from transformers import DataCollatorWithPadding

        tokenizer.padding_side = "right"
        return LabelCollator(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=width_multiple(max_length)))

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
        multi = bool(state.get("multi_label"))
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
        gold = torch.cat(label_parts) if labeled else None
        loss = None
        if gold is not None:
            weights = loss_weights(state, recipe.train.class_weights)
            tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
            loss = classification_loss(logits, gold, multi, tensor).item()
        if multi:
            return self._multi_label_rows(logits, gold, features, recipe, state), loss

        probabilities = logits.softmax(-1)
        scores, predicted = probabilities.max(-1)
        names = state["labels"]
        out = []
        for index, row in enumerate(features.rows):
            row = dict(row)
            row["prediction"] = names[int(predicted[index])]
            row["score"] = round(float(scores[index]), SCORE_DECIMALS)
            out.append(row)
        return out, loss

    def _multi_label_rows(
        self, logits: torch.Tensor, gold: torch.Tensor | None, features: Features, recipe: Recipe, state: dict
    ) -> list[dict]:
        """Each row's reference as a list, every label's score, and `prediction`: the labels at or above their
        thresholds (see `decide_thresholds`)."""
        names = state["labels"]
        keys = [label_key(x) for x in names]
        scores = np.round(torch.sigmoid(logits).numpy().astype(np.float64), SCORE_DECIMALS)
        truth = gold.numpy() > 0.5 if gold is not None else None
        thresholds, _ = decide_thresholds(scores, truth, recipe.eval, state, keys)
        chosen = scores >= thresholds
        separator = recipe.data.label_separator
        out = []
        for index, row in enumerate(features.rows):
            row = dict(row)
            if "label" in row and row["label"] is not None:  # the reference as a list (a separated text split)
                row["label"] = _label_set(row["label"], separator, "data.eval", index + 1)
            row["prediction"] = [names[j] for j in np.flatnonzero(chosen[index])]
            row["scores"] = {key: float(scores[index, j]) for j, key in enumerate(keys)}
            out.append(row)
        return out

    def adapter_files(self, rows: list[dict], recipe: Recipe, state: Mapping[str, Any]) -> dict[str, Any]:
        """Multi-label: the thresholds the final evaluation used (tuned on its rows, or eval.threshold), to be
        saved beside the adapter as thresholds.json; eval and predict of the run read them back."""
        if not state.get("multi_label") or not rows:
            return {}
        keys = [label_key(x) for x in state["labels"]]
        index = {key: j for j, key in enumerate(keys)}
        scores = np.array([[row["scores"][key] for key in keys] for row in rows], dtype=np.float64)
        truth = np.zeros(scores.shape, dtype=bool)
        for i, row in enumerate(rows):
            for label in row["label"]:
                truth[i, index[label_key(label)]] = True
        thresholds, how = decide_thresholds(scores, truth, recipe.eval, state, keys)
        return {"thresholds": {"thresholds": dict(zip(keys, map(float, thresholds))), "chosen": how}}

    def prediction_fields(self) -> tuple[str, ...]:
        return ("label", "prediction")

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        """Saved predictions re-scored: each `label` and `prediction` a class name (text or an integer), or a list
        of them, and every row of the file one kind. One list among single labels turned the whole file into
        multi-label metrics, and a null, 1.0 or true was scored as a wrong class, with no word."""
        super().check_prediction_rows(rows, source)
        first: dict[str, str] = {}
        for number, row in enumerate(rows, start=1):
            for field in ("label", "prediction"):
                value = row[field]
                kind = "a list" if isinstance(value, list) else "one class"
                names = value if isinstance(value, list) else [value]
                wrong = next((v for v in names if not is_class_name(v)), _NONE)
                if wrong is not _NONE:
                    raise DataError(
                        f"{source}:{number}: {field} must be a class name (text, an integer or a boolean) or a list "
                        f"of them, got {wrong!r}"
                    )
                seen = first.setdefault(field, kind)
                if kind != seen:
                    raise DataError(
                        f"{source}:{number}: {field} is {kind} where the rows before hold {seen}: a file of "
                        "predictions is single-label or multi-label throughout"
                    )

    def check_eval_rows(self, rows: Dataset, settings: EvalSection, machine: bool = True) -> None:
        """Multi-label eval rows none of which carries a label: F1 is 0/0 there, reported 0 as scikit-learn does,
        so a model right on every row scores F1 0 (and fails an F1 gate): said before anything trains."""
        if "label" not in rows.column_names:
            return
        values = rows["label"][:]
        if values and all(isinstance(v, list) and not v for v in values):
            log.warning(
                "data.eval: no eval row carries a label: precision, recall and F1 are undefined there (0/0) and "
                "reported 0, as scikit-learn does; judge these rows by subset_accuracy or hamming_loss"
            )

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        if any(isinstance(r["label"], list) or isinstance(r["prediction"], list) for r in rows):
            return multi_label_metrics(
                [[label_key(x) for x in _as_list(r["label"])] for r in rows],
                [[label_key(x) for x in _as_list(r["prediction"])] for r in rows],
            )
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

        y_true = [label_key(r["label"]) for r in rows]
        y_pred = [label_key(r["prediction"]) for r in rows]
        classes = sorted(set(y_true) | set(y_pred))
        with warnings.catch_warnings():
            # Rows of one class (a stratified split's small eval set): scikit-learn warns, on the console, that its
            # confusion matrix might miss classes; the classes seen are passed, and the matrix is theirs.
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            precision, recall, f1, support = precision_recall_fscore_support(
                y_true, y_pred, labels=classes, zero_division=0
            )
            metrics = {
                "accuracy": float(accuracy_score(y_true, y_pred)),
                "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
                "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
            }
            matrix = confusion_matrix(y_true, y_pred, labels=classes).tolist()
        per_class = {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        }
        return {
            "metrics": metrics,
            "details": {"per_class": per_class, "confusion_matrix": {"labels": classes, "matrix": matrix}},
        }


class LabelCollator:
    """Padding (transformers' DataCollatorWithPadding); multi-label 0/1 rows become the floats BCE takes."""

    def __init__(self, padding: Callable[[list[dict]], dict]):
        self.padding = padding

    def __call__(self, features: list[dict]) -> dict:
        batch = self.padding(features)
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2:
            batch["labels"] = labels.float()
        return batch


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, multi_label: bool, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy (single label; `weights` per class) or binary cross-entropy (multi-label; `weights` is each
    label's pos_weight), the mean over the batch, in float32."""
    logits = logits.float()
    weights = weights.to(logits.device) if weights is not None else None
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weights)
    return F.cross_entropy(logits, labels.view(-1), weight=weights)


def imbalance(state: Mapping[str, Any]) -> float | None:
    """Training rows of the most frequent class over the rarest present one (None: not recorded)."""
    counts = [n for n in state.get("label_counts") or () if n > 0]
    return max(counts) / min(counts) if counts else None


def loss_weights(state: Mapping[str, Any], choice: str) -> list[float] | None:
    """train.class_weights from the training distribution kept in the task state; None: the unweighted loss.

    Single label: class c weighs n_max / n_c (inverse) or its square root (inverse_sqrt), so the most frequent
    class weighs 1. Multi-label: label c's pos_weight is negatives / positives (inverse) or its square root. A class
    with no training rows gets the largest weight. auto: inverse_sqrt at an imbalance of IMBALANCE_FOR_WEIGHTS.
    """
    counts, rows = state.get("label_counts"), state.get("rows")
    ratio = imbalance(state)
    if choice == "none" or not counts or not rows or ratio is None:
        return None
    if choice == "auto":
        if ratio < IMBALANCE_FOR_WEIGHTS:
            return None
        choice = "inverse_sqrt"
    power = 0.5 if choice == "inverse_sqrt" else 1.0
    smallest = min(n for n in counts if n > 0)
    if state.get("multi_label"):
        raw = [(rows - max(n, smallest)) / max(n, smallest) for n in counts]
        return [round(max(r, 1e-3) ** power, 6) for r in raw]
    largest = max(counts)
    return [round((largest / max(n, smallest)) ** power, 6) for n in counts]


def decide_thresholds(
    scores: np.ndarray, truth: np.ndarray | None, settings: EvalSection, state: Mapping[str, Any], keys: list[str]
) -> tuple[np.ndarray, str]:
    """Each label's threshold, and how it was chosen: eval.threshold when it is a number; else the thresholds
    saved with the adapter (a run's eval and predict); else tuned on these rows when they are labelled (the
    final evaluation of a run, evaluations during training); else DEFAULT_THRESHOLD."""
    count = len(keys)
    if settings.threshold != "tune":
        return np.full(count, float(settings.threshold)), f"eval.threshold {settings.threshold:g}"
    saved = state.get("thresholds")
    if saved:
        return np.array([float(saved.get(key, DEFAULT_THRESHOLD)) for key in keys]), "saved with the adapter"
    if truth is not None:
        how = f"tuned per label on {len(scores)} eval rows (best F1 within 1/positives, nearest 0.5)"
        return tune_thresholds(scores, truth), how
    log.warning("multi-label: no thresholds saved with this adapter; every label uses %s", DEFAULT_THRESHOLD)
    return np.full(count, DEFAULT_THRESHOLD), f"default {DEFAULT_THRESHOLD}"


def tune_thresholds(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per label, the threshold that maximises the label's F1 on (scores, truth), (rows, labels) arrays.

    Every cut between two neighbouring distinct scores is tried. F1 on a few eval rows is noisy, so every cut
    within 1 / (the label's positive rows) of the best F1 counts as best, and of those the one nearest
    DEFAULT_THRESHOLD wins: DEFAULT_THRESHOLD itself when it lies in the cut's gap, else the midpoint of the gap.
    (Measured on the shipped multi-label set, thresholds tuned on one half of the eval rows and applied to the
    other: exact maximisation scored macro-F1 0.925, this 0.950, a fixed 0.5 0.950.) A label with no positive
    row, or whose best F1 is 0, keeps DEFAULT_THRESHOLD.
    """
    rows, labels = scores.shape
    thresholds = np.full(labels, DEFAULT_THRESHOLD)
    for j in range(labels):
        positives = int(truth[:, j].sum())
        if positives == 0 or rows == 0:
            continue
        order = np.argsort(-scores[:, j], kind="stable")
        ranked, hits = scores[order, j], truth[order, j]
        ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # last row of each run of equal scores
        true_positives = np.cumsum(hits)[ends]
        f1 = 2 * true_positives / (ends + 1 + positives)
        if f1.max() <= 0:
            continue
        # Each cut chooses the rows scoring at least `upper` and none scoring `below` (or less); the first cut
        # chooses no row.
        upper = np.concatenate([[np.inf], ranked[ends]])
        below = np.concatenate([[ranked[0]], ranked[ends[:-1] + 1], [0.0]])
        best = np.flatnonzero(np.concatenate([[0.0], f1]) >= f1.max() - 1 / positives - 1e-12)
        upper, below = upper[best], below[best]
        if np.any((below < DEFAULT_THRESHOLD) & (upper >= DEFAULT_THRESHOLD)):
            continue
        # Scores carry SCORE_DECIMALS decimals, so a midpoint is exact at one more: rounding it keeps it in the gap.
        candidates = np.round((upper + below) / 2, SCORE_DECIMALS + 1)
        thresholds[j] = candidates[np.argmin(np.abs(candidates - DEFAULT_THRESHOLD))]
    return thresholds


def mode_problems(recipe: Recipe, multi: bool, source: str | None) -> list[str]:
    """Settings of the other mode (metrics, gates, best_metric, eval.threshold), as problems."""
    settings, problems = recipe.eval, []
    why = f"the labels are {'lists (multi-label)' if multi else 'single (one per text)'}" + (
        f" ({source})" if source else ""
    )
    wrong, instead = (
        (SINGLE_LABEL_METRICS, MULTI_LABEL_METRICS) if multi else (MULTI_LABEL_METRICS, SINGLE_LABEL_METRICS)
    )
    places = [("eval.metrics", m) for m in settings.metrics or []] + [(f"eval.gates.{m}", m) for m in settings.gates]
    if settings.best_metric:
        places.append(("eval.best_metric", settings.best_metric))
    for place, metric in places:
        if metric in wrong:
            problems.append(
                f"{place}: {metric} is not reported when {why}; use {', '.join((*instead, 'macro_f1', 'weighted_f1'))}"
            )
    if not multi and settings.threshold != "tune":
        problems.append(f"eval.threshold: applies to multi-label classification only; {why}")
    return problems


def _is_multi_label(values: Sequence, data: DataSection) -> bool:
    if data.multi_label is not None:
        return data.multi_label
    return data.label_separator is not None or any(isinstance(v, list) for v in values)


_NONE = object()


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _balance_note(state: Mapping[str, Any]) -> str:
    counts, rows = state["label_counts"], state["rows"]
    ratio = imbalance(state)
    shape = f"multi-label: {len(counts)} labels, {sum(counts) / max(rows, 1):.2f} per text; the most frequent label is"
    return (
        (shape if state.get("multi_label") else f"{len(counts)} classes; the most frequent is")
        + f" on {max(counts)} rows, the rarest on {min(counts)}"
        + (
            f" ({ratio:.1f}x; train.class_weights auto weighs the loss from {IMBALANCE_FOR_WEIGHTS:g}x)"
            if ratio
            else ""
        )
    )


def _refuse_lists_as_text(labels: list) -> None:
    """Training labels that are every one a JSON list written as text (a CSV's cells hold text: `["a", "b"]`) were
    read as single-label class names, and the first eval row holding a real list was refused as if it were wrong."""
    texts = [label for label in labels if isinstance(label, str)]
    if not texts or len(texts) < len(labels) or not all(t.strip().startswith("[") for t in texts):
        return
    try:
        if not all(isinstance(json.loads(t), list) for t in texts):
            return
    except ValueError:
        return
    raise DataError(
        f"data.train: every label is a JSON list written as text (row 1: {texts[0]!r}): a CSV cell holds text; give "
        "several labels per text with data.label_separator (e.g. billing|refund) or as lists in a JSON Lines file"
    )


def _checked_labels(values: list, split: str, first_row: int = 1, single_only: bool = False) -> list:
    for number, value in enumerate(values, start=first_row):
        if isinstance(value, list) and single_only:
            raise DataError(
                f"{split}: row {number}: label is a list ({value!r}) but the recipe is single-label "
                "(data.multi_label: false); remove data.multi_label or set it true for several labels per text"
            )
        if value is None or (isinstance(value, str) and not value.strip()) or isinstance(value, (float, list, dict)):
            raise DataError(f"{split}: row {number}: label must be a string or an integer, got {value!r}")
    return list(values)


def _label_set(value: object, separator: str | None, split: str, number: int) -> list:
    """One row's labels in multi-label mode: a list, a text split on `separator`, or one label; [] is no label."""
    if isinstance(value, str) and separator is not None:
        labels: list = [part.strip() for part in value.split(separator) if part.strip()]
    elif isinstance(value, list):
        labels = value
    elif value is None:
        raise DataError(
            f"{split}: row {number}: label is missing; a text with no labels has an empty list []"
            + (" (or an empty text with data.label_separator)" if separator is not None else "")
        )
    else:
        labels = [value]
    for label in labels:
        if (
            isinstance(label, bool)
            or not isinstance(label, (str, int))
            or (isinstance(label, str) and not label.strip())
        ):
            raise DataError(
                f"{split}: row {number}: each label must be a non-empty string or an integer, got {label!r}"
            )
    unique: dict[str, object] = {}
    for label in labels:
        unique.setdefault(label_key(label), label)
    return list(unique.values())


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
        key = label_key(value)
        if key not in index:
            raise DataError(
                f"{split}: row {number}: label {value!r} is not one of the {len(labels)} training labels "
                f"({', '.join(map(str, labels[:10]))}{', ...' if len(labels) > 10 else ''})"
            )
        ids.append(index[key])
    return ids


def _multi_hot(
    values: list, index: dict[str, int], labels: list, separator: str | None, split: str, first_row: int = 1
) -> list[list[int]]:
    rows = []
    for number, value in enumerate(values, start=first_row):
        row = [0] * len(index)
        for label in _label_set(value, separator, split, number):
            key = label_key(label)
            if key not in index:
                raise DataError(
                    f"{split}: row {number}: label {label!r} is not one of the {len(labels)} training labels "
                    f"({', '.join(map(str, labels[:10]))}{', ...' if len(labels) > 10 else ''})"
                )
            row[index[key]] = 1
        rows.append(row)
    return rows
