"""The data report: what a user should read before spending compute (`finetune data RECIPE`, data_report.json).

Rows per split, empty texts, label balance, token lengths against max_length and what overflow does,
duplicates inside the training set and overlap between train and eval (exact on normalised text, and
near-duplicates by MinHash over word shingles with datasketch), QA span checks, and for generation tasks
one training example showing which tokens count toward the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.data.conversations import conversation_texts
from finetune.data.features import Features
from finetune.data.tables import SplitRows, check_eval_labels, label_key, read_splits
from finetune.errors import DataError
from finetune.recipe.schema import Recipe

NEAR_DUPLICATE_JACCARD = 0.8  # word 3-shingle Jaccard above which two texts count as near-duplicates
NUM_PERM = 64  # candidates only: every one is confirmed with the exact Jaccard
LSH_THRESHOLD = 0.6  # LSH finds candidates generously; each is then checked with the exact Jaccard
# Near-duplicate search costs time per row; above this many rows only exact duplicates are searched.
NEAR_DUPLICATE_MAX_ROWS = 50_000
FEW_EXAMPLES = 5  # a class with fewer training examples than this is warned about
EXAMPLES_SHOWN = 3


INPUT_FIELDS = ("text", "text_pair", "prompt", "question", "query", "context")


def input_texts(rows: Dataset) -> pa.ChunkedArray:
    """The text a model reads for each row (its input fields joined by a space): what duplicates are judged on."""
    fields = [f for f in INPUT_FIELDS if f in rows.column_names]
    if not fields and "messages" in rows.column_names:  # conversations: all their turns
        return conversation_texts(rows)
    if not fields:
        return pa.chunked_array([pa.array([""] * len(rows))])
    table = rows.select_columns(fields).with_format("arrow")[:]  # respects a selection; no Python objects
    columns = [pc.cast(table.column(f), pa.string()) for f in fields]
    return columns[0] if len(columns) == 1 else pc.binary_join_element_wise(*columns, " ", null_handling="skip")


CHUNK_ROWS = 20_000  # texts are normalised and hashed this many at a time, so no step copies the whole column


def _normalise(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    # NFKC first (a composed and a decomposed é are one text; a no-break space is a space); combining marks are
    # letters' parts (Devanagari's vowel signs: without them रहा and रही, two words, were one); any Unicode space
    # separates words (RE2's \s is ASCII's alone, so a text spaced with U+00A0 escaped its duplicate).
    texts = pc.utf8_lower(pc.utf8_normalize(pc.fill_null(texts, ""), "NFKC"))
    texts = pc.replace_substring_regex(texts, pattern=r"[^\p{L}\p{M}\p{N}_\s\p{Z}]", replacement="")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, pattern=r"[\s\p{Z}]+", replacement=" "))


def normalised(texts: pa.Array | pa.ChunkedArray) -> list[str]:
    """NFKC, lower case, punctuation removed, space runs as one space (vectorised, in Arrow's regex engine)."""
    return [
        text
        for start in range(0, len(texts), CHUNK_ROWS)
        for text in _normalise(texts.slice(start, CHUNK_ROWS)).to_pylist()
    ]


def text_hashes(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each normalised text, computed a chunk at a time."""
    from pandas.util import hash_array

    parts = [
        hash_array(_normalise(texts.slice(start, CHUNK_ROWS)).to_numpy(zero_copy_only=False))
        for start in range(0, len(texts), CHUNK_ROWS)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def exact_duplicates(
    first: pa.ChunkedArray, second: pa.ChunkedArray | None = None, first_hashes: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """(i, j) pairs of equal normalised texts: each row of `second` (or a later row of `first`) with the first row of
    `first` it repeats. Rows are matched by hash, and each match is confirmed on the texts (no hash collision counts)."""
    within = second is None
    first_hashes = text_hashes(first) if first_hashes is None else first_hashes
    second_hashes = first_hashes if within else text_hashes(second)
    distinct, first_row = np.unique(first_hashes, return_index=True)
    position = np.searchsorted(distinct, second_hashes).clip(max=max(len(distinct) - 1, 0))
    found = (distinct[position] == second_hashes) if len(distinct) else np.zeros(len(second_hashes), bool)
    matches = np.where(found, first_row[position], -1)
    rows = np.flatnonzero((matches >= 0) & (matches < np.arange(len(second_hashes)) if within else matches >= 0))
    pairs = [(int(matches[j]), int(j)) for j in rows]
    if not pairs:
        return []
    second = first if second is None else second  # None exactly when `within`
    left = normalised(first.take([i for i, _ in pairs]))
    right = normalised(second.take([j for _, j in pairs]))
    return [pair for pair, a, b in zip(pairs, left, right) if a == b]


@dataclass
class Overlap:
    exact: list[tuple[int, int]] = field(default_factory=list)  # (index in first, index in second)
    near: list[tuple[int, int]] = field(default_factory=list)
    near_searched: bool = True

    def rows_of_second(self) -> set[int]:
        return {j for _, j in self.exact} | {j for _, j in self.near}

    def rows_of_first(self) -> set[int]:
        return {i for i, _ in self.exact} | {i for i, _ in self.near}


def _shingles(normalised_text: str) -> list[bytes]:
    words = normalised_text.split()
    if len(words) < 3:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)]


class TextIndex:
    """The training texts, indexed once for both questions: duplicates inside them, and eval rows that repeat them.

    Exact duplicates by a hash of the normalised text; near-duplicates (small enough data only) by MinHash over
    word 3-shingles in a datasketch LSH index, each candidate then checked with the exact Jaccard similarity.
    """

    def __init__(self, texts: pa.ChunkedArray):
        self.texts = texts
        self.hashes = text_hashes(texts)
        self.near_searched = len(texts) <= NEAR_DUPLICATE_MAX_ROWS
        if self.near_searched:
            from datasketch import MinHashLSH

            self.shingles = [set(_shingles(t)) for t in normalised(texts)]
            self.signatures = _signatures(self.shingles)
            self.lsh = MinHashLSH(threshold=LSH_THRESHOLD, num_perm=NUM_PERM)
            with self.lsh.insertion_session() as session:
                for i, signature in enumerate(self.signatures):
                    session.insert(i, signature, check_duplication=False)

    def duplicates(self) -> Overlap:
        """Later training rows that repeat an earlier one."""
        overlap = Overlap(
            exact=exact_duplicates(self.texts, first_hashes=self.hashes), near_searched=self.near_searched
        )
        if self.near_searched:
            self._near(overlap, self.shingles, self.signatures, within=True)
        return overlap

    def overlap(self, texts: pa.ChunkedArray) -> Overlap:
        """Rows of `texts` that repeat a training row."""
        overlap = Overlap(
            exact=exact_duplicates(self.texts, texts, self.hashes),
            near_searched=self.near_searched and len(texts) <= NEAR_DUPLICATE_MAX_ROWS,
        )
        if overlap.near_searched:
            shingles = [set(_shingles(t)) for t in normalised(texts)]
            self._near(overlap, shingles, _signatures(shingles), within=False)
        return overlap

    def _near(self, overlap: Overlap, shingles: list[set], signatures: list[Any], within: bool) -> None:
        exact = {j for _, j in overlap.exact}
        for j, signature in enumerate(signatures):
            if j in exact:
                continue
            candidates = [i for i in self.lsh.query(signature) if not within or i < j]
            close = [i for i in candidates if _jaccard(self.shingles[i], shingles[j]) >= NEAR_DUPLICATE_JACCARD]
            if close:
                overlap.near.append((min(close), j))


def _signatures(shingles: list[set]) -> list[Any]:
    from datasketch import MinHash

    return MinHash.bulk(shingles, num_perm=NUM_PERM, seed=1)


def find_overlap(first: pa.ChunkedArray, second: pa.ChunkedArray | None = None) -> Overlap:
    """Exact and near duplicates between two arrays of texts, or inside one (second=None)."""
    index = TextIndex(first)
    return index.duplicates() if second is None else index.overlap(second)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _examples(pairs: list[tuple[int, int]], first: pa.ChunkedArray, second: pa.ChunkedArray) -> list[dict]:
    return [{"first": first[i].as_py()[:200], "second": second[j].as_py()[:200]} for i, j in pairs[:EXAMPLES_SHOWN]]


def overlap_section(overlap: Overlap, first: pa.ChunkedArray, second: pa.ChunkedArray) -> dict:
    return {
        "exact": len(overlap.exact),
        "near": len(overlap.near) if overlap.near_searched else None,
        "near_searched": overlap.near_searched,
        "examples": _examples(overlap.exact + overlap.near, first, second),
    }


def check_overlap(train: Dataset, eval_rows: Dataset, policy: str) -> tuple[Dataset, dict]:
    """Duplicates inside data.train and between train and eval, each text normalised once; then data.on_overlap:
    warn (report only), drop (remove the overlapping training rows), error (exit 3)."""
    found, keep = overlap_rows(train, eval_rows, policy)
    return (train if keep is None else train.select(keep)), found


def overlap_rows(train: Dataset, eval_rows: Dataset, policy: str) -> tuple[dict, list[int] | None]:
    """check_overlap's findings, and the training rows data.on_overlap: drop keeps (None: all of them)."""
    train_texts, eval_texts = input_texts(train), input_texts(eval_rows)
    index = TextIndex(train_texts)
    overlap = index.overlap(eval_texts)
    section = overlap_section(overlap, train_texts, eval_texts)
    found = {"train_eval": section, "train_duplicates": overlap_section(index.duplicates(), train_texts, train_texts)}
    count = len(overlap.rows_of_second())
    if count and policy == "error":
        shown = "; ".join(f"{e['second'][:60]!r}" for e in section["examples"])
        raise DataError(
            f"data.eval: {count} eval row(s) also appear in data.train ({section['exact']} exact, "
            f"{section['near'] or 0} near-duplicates), e.g. {shown}; data.on_overlap: error"
        )
    if count and policy == "drop":
        keep = sorted(set(range(len(train))) - overlap.rows_of_first())
        section["dropped_train_rows"] = len(train) - len(keep)
        if not keep:
            raise DataError(
                f"data.on_overlap: drop removed every one of the {len(train)} training rows (each repeats an eval "
                "row); the eval rows are a copy of the training data"
            )
        return found, keep
    return found, None


def read_rows(
    recipe: Recipe,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    classify: bool,
    conversations: bool = False,
    judged: tuple[str, str] | None = None,
) -> tuple[SplitRows, dict]:
    """Every row check that needs no tokenizer, in the order a run makes them (what `validate` and a run share):
    the files read and typed, the eval split drawn, data.on_overlap applied, then (single-label classification)
    eval labels that no training row has. Returns the rows and the findings (overlap, the split) for the report."""
    rows = read_splits(recipe, required, optional, classify, conversations, judged)
    found, keep = overlap_rows(rows.train, rows.eval, recipe.data.on_overlap)
    if keep is not None:
        rows.select("data.train", keep)
    if classify:
        check_eval_labels(rows, recipe.data)
    if rows.eval_split is not None:
        found["eval_split"] = rows.eval_split
    return rows, found


def label_balance(rows: Dataset, separator: str | None = None) -> dict:
    """Rows per class (several labels per text: rows carrying each), and every class with fewer than FEW_EXAMPLES."""
    counts: dict[str, int] = {}
    for value in rows["label"][:]:
        if isinstance(value, str) and separator is not None:
            value = [part.strip() for part in value.split(separator) if part.strip()]
        for label in value if isinstance(value, list) else [value]:
            counts[label_key(label)] = counts.get(label_key(label), 0) + 1
    rare = sorted(k for k, n in counts.items() if n < FEW_EXAMPLES)
    return {"counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "rare_classes": rare}


def empty_texts(rows: Dataset) -> dict[str, int]:
    out = {}
    names = [
        n
        for n in ("text", "text_pair", "prompt", "completion", "question", "context", "answer")
        if n in rows.column_names
    ]
    table = rows.select_columns(names).with_format("arrow")[:]
    for name in names:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            out[name] = sum(
                pc.sum(pc.equal(pc.utf8_trim_whitespace(column.slice(start, CHUNK_ROWS)), "")).as_py() or 0
                for start in range(0, len(column), CHUNK_ROWS)
            )
    return {k: v for k, v in out.items() if v}


def loss_mask_example(features: Features, tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """One training example with the tokens that count toward the loss marked ⟦like this⟧."""
    dataset = features.dataset
    if "labels" not in dataset.column_names or len(dataset) == 0:
        return None
    row = dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    if not isinstance(labels, list):  # a class label, not a token sequence
        return None
    if len(labels) != len(ids):  # an encoder-decoder: the labels are the decoder's own sequence
        return {
            "encoder_input": tokenizer.decode(ids),
            "trained_target": tokenizer.decode([t for t in labels if t >= 0]),
        }
    pieces: list[str] = []
    trained = False
    for token, label in zip(ids, labels):
        now = label != -100
        if now != trained:
            pieces.append("⟦" if now else "⟧")
            trained = now
        piece = tokenizer.decode([token])
        assert isinstance(piece, str)  # one sequence decodes to one text
        pieces.append(piece)
    if trained:
        pieces.append("⟧")
    return {"rendered": "".join(pieces), "trained_tokens": sum(1 for l in labels if l != -100), "tokens": len(ids)}


def build_report(
    recipe: Recipe,
    train: Dataset,
    eval_rows: Dataset,
    features: Mapping[str, Features],
    tokenizer: PreTrainedTokenizerBase,
    overlap: Mapping[str, Any],
) -> dict:
    report = {
        "task": recipe.task,
        "splits": {split: features[split].report.as_dict() for split in features},
        "empty_texts": {"train": empty_texts(train), "eval": empty_texts(eval_rows)},
        "train_duplicates": overlap["train_duplicates"],
        "train_eval_overlap": overlap["train_eval"],
        "on_overlap": recipe.data.on_overlap,
    }
    if overlap.get("eval_split"):
        report["eval_split"] = overlap["eval_split"]
    if recipe.task == "classification" and "label" in train.column_names:  # (a KTO thumb is a label too)
        separator = getattr(recipe.data, "label_separator", None)
        balance: dict[str, Any] = {
            "train": label_balance(train, separator),
            "eval": label_balance(eval_rows, separator),
        }
        balance["only_in_eval"] = sorted(set(balance["eval"]["counts"]) - set(balance["train"]["counts"]))
        report["label_balance"] = balance
    # A generation task's trained tokens; a classification label is not a token.
    example = loss_mask_example(features["train"], tokenizer) if recipe.task != "classification" else None
    if example is not None:
        report["loss_mask_example"] = example
    return report


def warnings(report: dict) -> list[str]:
    """The report's findings worth a line in the plan."""
    out = []
    overlap = report["train_eval_overlap"]
    if overlap["exact"] or overlap.get("near"):
        out.append(
            f"{overlap['exact']} eval row(s) duplicate training rows exactly, {overlap.get('near') or 0} nearly "
            f"(data.on_overlap: {report['on_overlap']})"
        )
    duplicates = report["train_duplicates"]
    if duplicates["exact"] or duplicates.get("near"):
        out.append(f"{duplicates['exact']} exact and {duplicates.get('near') or 0} near duplicate(s) inside data.train")
    balance = report.get("label_balance", {})
    rare = balance.get("train", {}).get("rare_classes")
    if rare:
        counts = balance["train"]["counts"]
        out.append(
            f"{len(rare)} class(es) with fewer than {FEW_EXAMPLES} training rows: "
            + ", ".join(f"{label} ({counts[label]})" for label in rare)
        )
    said = {*(rare or []), *(balance.get("only_in_eval") or [])}
    rare_eval = [label for label in balance.get("eval", {}).get("rare_classes") or [] if label not in said]
    if rare_eval:  # the report lists them: "no rare classes found" above them was untrue
        counts = balance["eval"]["counts"]
        out.append(
            f"{len(rare_eval)} class(es) with fewer than {FEW_EXAMPLES} eval rows (their per-class scores rest on "
            "few rows): " + ", ".join(f"{label} ({counts[label]})" for label in rare_eval)
        )
    only_in_eval = balance.get("only_in_eval")
    if only_in_eval:
        counts = balance["eval"]["counts"]
        out.append(
            f"{len(only_in_eval)} class(es) only in eval, with no training row (the model never learns them; they "
            "count as errors): " + ", ".join(f"{label} ({counts[label]} eval rows)" for label in only_in_eval)
        )
    spellings: dict[str, set[str]] = {}
    for side in ("train", "eval"):
        for label in balance.get(side, {}).get("counts") or {}:
            spellings.setdefault(str(label).casefold(), set()).add(str(label))
    alike = [sorted(names) for names in spellings.values() if len(names) > 1]
    if alike:  # one class written two ways, or two classes? Only the user knows: said, not merged
        out.append(
            "classes that differ only in case are separate classes: "
            + "; ".join(" / ".join(map(repr, names)) for names in sorted(alike))
            + " (write them alike if each group is one class)"
        )
    split = report.get("eval_split")
    if split and report["task"] == "classification" and split.get("method") != "stratified":
        out.append(f"data.eval_split: {split['note']}")
    for split, counts in report["empty_texts"].items():
        for name, n in counts.items():
            out.append(f"{n} {split} row(s) with an empty {name}")
    return out


# --------------------------------------------------------------------------- `finetune data --tokens FILE`


def token_lines(features: Features, file_rows: Dataset) -> list[dict]:
    """Every training row's `input_ids` and `labels` (-100 where no loss falls) as training reads them, before
    packing, in the order of the training file(s): each with `row`, its number there (from 1), found by its
    content among `file_rows` (the file's rows as the task reads them). Rows training leaves out (held out by
    data.eval_split, dropped by data.overflow or data.on_overlap) have no line."""
    import json

    dataset = features.dataset
    columns = [c for c in file_rows.column_names if c in features.rows.column_names]
    numbers: list[int | None] = [None] * len(dataset)
    if len(dataset) == len(features.rows) and columns:  # one feature row per data row (not QA windows)

        def key(row: dict) -> str:
            return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)

        positions: dict[str, list[int]] = {}
        for number, row in enumerate(file_rows.select_columns(columns), start=1):
            positions.setdefault(key(row), []).append(number)
        for numbered in positions.values():
            numbered.reverse()  # popped from the end: duplicates take their numbers in file order
        for index, row in enumerate(features.rows.select_columns(columns)):
            found = positions.get(key(row))
            numbers[index] = found.pop() if found else None
    order = sorted(range(len(dataset)), key=lambda i: (numbers[i] is None, numbers[i] or 0, i))
    labels = dataset["labels"][:] if "labels" in dataset.column_names else [None] * len(dataset)
    inputs = dataset["input_ids"][:]
    return [{"row": numbers[i], "input_ids": inputs[i], "labels": labels[i]} for i in order]
