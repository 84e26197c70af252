"""Retrieval: a bi-encoder fine-tuned for search over a corpus (`data.knowledge_base`).

Rows hold a `query` and its positive passage (`positive` text, `positive_id`, or an `answer` the passage
holds), optionally `negative` texts; hard negatives are mined from the corpus with the starting model
(data/retrieval.py). Training is sentence-transformers' multiple-negatives ranking loss (InfoNCE over the batch's
positives and negatives at `data.retrieval.temperature`; MatryoshkaLoss around it for `matryoshka_dims`) on
embeddings pooled by sentence-transformers' own Pooling module (models/embedding.py), run by finetune's one
training loop like every task. Evaluation embeds the whole corpus, ranks it for each query, and scores the
ranking as IR does (evaluation/retrieval.py: recall@k, MRR@10, nDCG@10, MAP@100, equal to
sentence-transformers' InformationRetrievalEvaluator).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.features import Features
from finetune.data.retrieval import Passage, checked_queries, load_passages
from finetune.data.tables import LengthReport
from finetune.errors import DataError
from finetune.evaluation import retrieval as ir
from finetune.evaluation.scoring import eval_loader
from finetune.models.embedding import BiEncoder, Embedder, EmbeddingLayout
from finetune.models.families import HeadKind
from finetune.recipe.schema import EvalSection, Recipe, RetrievalSection
from finetune.tasks.base import Task, width_multiple

if TYPE_CHECKING:
    from peft import PeftModel

# Passages embedded per forward pass when the corpus is encoded for evaluation.
CORPUS_BATCH = 64


class RetrievalTask(Task):
    name = "retrieval"
    head: HeadKind = "embedding"
    not_mergeable = (
        "a retrieval run's adapter/ is already a sentence-transformers model (SentenceTransformer('RUN/adapter') "
        "loads it, pooling included), and a reranker's scores are a correction to its first stage; merge and export "
        "make transformers and GGUF checkpoints of classification, QA and generation runs"
    )
    required_fields = ("query",)
    optional_fields = ("positive", "positive_id", "answer", "negative", "id")
    reference_fields = ("positive", "positive_id", "answer")
    metric_names = ir.metric_names(RetrievalSection().top_k)
    # Whether data.retrieval.model names a first-stage retriever (rerank) rather than nothing (the model trained
    # is model.name_or_path itself).
    uses_first_stage = False

    # ------------------------------------------------------------ recipe
    def loss_plan(self, recipe: Recipe, state: Mapping[str, Any]) -> str:
        settings = recipe.data.retrieval
        negatives = f" + {settings.hard_negatives} mined hard negative(s) per query" if settings.hard_negatives else ""
        sizes = settings.matryoshka_dims
        return (
            f"multiple-negatives ranking (InfoNCE over in-batch negatives{negatives}), temperature "
            f"{settings.temperature:g}" + (f"; Matryoshka sizes {', '.join(map(str, sizes))}" if sizes else "")
        )

    def knowledge_base_plan(self, recipe: Recipe) -> str:
        return f"{recipe.data.knowledge_base}: the corpus searched (each query ranks every passage)"

    def knows_metric(self, metric: str) -> bool:
        return (
            metric in ir.FIXED_METRICS or re.fullmatch(r"recall@[1-9]\d*", metric) is not None or metric == "eval_loss"
        )

    def main_metric(self, settings: EvalSection) -> str:
        return ir.metric_names(1)[0]  # nDCG@10, as BEIR and MTEB rank retrievers

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        data, settings = recipe.data, recipe.data.retrieval
        if data.knowledge_base is None:
            problems.append(f"data.knowledge_base: task {self.name} searches a corpus; give the passages file(s)")
        if settings.method != "dense":
            problems.append(
                f"data.retrieval.method: task {self.name} works with dense retrieval; {settings.method} is for "
                "knowledge-base qa (use dense)"
            )
        if settings.model is not None and not self.uses_first_stage:
            problems.append(
                "data.retrieval.model: task retrieval trains model.name_or_path itself; remove data.retrieval.model"
            )
        if settings.train is not None:
            problems.append(f"data.retrieval.train: a knowledge-base qa setting; task {self.name} always trains")
        wanted = f"recall@{settings.top_k}"
        for place, metric in (
            [("eval.metrics", m) for m in recipe.eval.metrics or []]
            + [(f"eval.gates.{m}", m) for m in recipe.eval.gates]
            + ([("eval.best_metric", recipe.eval.best_metric)] if recipe.eval.best_metric else [])
        ):
            if metric.startswith("recall@") and metric != wanted and self.knows_metric(metric):
                problems.append(
                    f"{place}: {metric} is not reported: recall is measured at data.retrieval.top_k "
                    f"({settings.top_k}): {wanted}"
                )
        return problems

    def unknown_metric(self, place: str, metric: str) -> str:
        from finetune.errors import did_you_mean

        names = ir.metric_names(5)
        return (
            f"{place}: unknown metric {metric!r} for task {self.name}{did_you_mean(metric, names)} "
            f"(metrics: {', '.join(ir.FIXED_METRICS)}, recall@k at data.retrieval.top_k, eval_loss)"
        )

    # ------------------------------------------------------------ model
    def bi_encoder(self, encoder: PeftModel | PreTrainedModel, recipe: Recipe, state: Mapping[str, Any]) -> BiEncoder:
        """The trained model: the encoder, pooled as the state's layout says, with the recipe's loss."""
        layout = layout_of(state)
        embedder = Embedder(encoder, layout)
        return BiEncoder(embedder, ranking_loss(embedder, recipe.data.retrieval))

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
        """Queries (`input_ids`), and where the rows have them their positives (`positive_input_ids`) and
        negatives (`negative_input_ids`, the same number per row); every text cut at `text_width` (data.max_length,
        or the checkpoint's own max_seq_length if smaller), counted by data.overflow (drop: rows with an over-long
        text go)."""
        width = text_width(recipe, state)
        queries = checked_queries(rows["query"][:], split)
        texts: dict[str, list] = {}
        if labeled and "positive" in rows.column_names and all(p is not None for p in rows["positive"][:]):
            # First: length-grouped batches group rows by their first column, and passages are most of the tokens.
            texts["positive_input_ids"] = rows["positive"][:]
        texts["input_ids"] = queries
        negatives = rows["negatives"][:] if "negatives" in rows.column_names else None
        columns: dict[str, list] = {}
        longest = np.zeros(len(queries), dtype=np.int64)
        all_lengths: list[int] = []
        for name, values in texts.items():
            ids = tokenizer(values, add_special_tokens=True, truncation=False)["input_ids"]
            lengths = np.array([len(i) for i in ids], dtype=np.int64)
            longest = np.maximum(longest, lengths)
            all_lengths += lengths.tolist()
            columns[name] = [_cut(i, width, tokenizer) for i in ids]
        if negatives is not None and negatives and negatives[0]:
            flat = [text for row in negatives for text in row]
            ids = tokenizer(flat, add_special_tokens=True, truncation=False)["input_ids"]
            per_row = len(negatives[0])
            grid = np.array([len(i) for i in ids]).reshape(len(negatives), per_row)
            longest = np.maximum(longest, grid.max(axis=1))
            all_lengths += grid.ravel().tolist()
            cut = [_cut(i, width, tokenizer) for i in ids]
            columns["negative_input_ids"] = [cut[r * per_row : (r + 1) * per_row] for r in range(len(negatives))]
        report = LengthReport.from_lengths(split, all_lengths, width)
        if width < recipe.data.max_length:
            report.notes.append(
                f"texts cut at {width} tokens, the checkpoint's own max_seq_length (what it was trained and is served "
                f"at), below data.max_length={recipe.data.max_length}"
            )
        too_long = np.flatnonzero(longest > width)
        if too_long.size and recipe.data.overflow == "error":
            shown = ", ".join(str(i + 1) for i in too_long[:5])
            fix = (
                "raise max_length"
                if width == recipe.data.max_length
                else "the checkpoint's max_seq_length caps it (sentence_bert_config.json)"
            )
            raise DataError(
                f"{split}: {too_long.size} rows hold a text over {width} tokens (rows {shown}"
                f"{', ...' if too_long.size > 5 else ''}); {fix}, or set data.overflow to truncate or drop"
            )
        keep = np.arange(len(queries))
        if too_long.size and recipe.data.overflow == "drop":
            keep = np.flatnonzero(longest <= width)
            report.dropped = int(too_long.size)
            if not keep.size:
                raise DataError(f"{split}: every row was dropped by data.overflow=drop (max_length={width})")
        else:
            report.truncated = int(too_long.size)  # rows with a text cut (query, positive or a negative)
        report.rows = len(queries)
        if "negative_input_ids" in columns:
            per_row = len(columns["negative_input_ids"][0])
            short = sum(n < per_row for n in rows["hard_negatives"][:]) if "hard_negatives" in rows.column_names else 0
            report.notes.append(
                f"{per_row} negative(s) per row beside the in-batch ones"
                + (
                    f"; {short} row(s) had fewer hard negatives below data.retrieval.negative_margin (the starting "
                    "model ranks their positive low), filled with the passages least like the query"
                    if short
                    else ""
                )
            )
        report.notes.append(f"corpus passages longer than {width} tokens are cut to it when the corpus is embedded")
        if split == "data.train" and "positive_input_ids" in texts:
            report.notes += _shared_positives(texts["positive_input_ids"], recipe.train.batch_size)
        dataset = Dataset.from_dict(columns)
        if keep.size < len(queries):
            dataset, rows = dataset.select(keep), rows.select(keep)
        return Features(dataset, rows, report)

    def collate(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
    ) -> Callable[[list[dict]], dict]:
        return PairCollator(tokenizer, width_multiple(max_length))

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
        """Each query's ranked passages over the whole corpus (ids and scores, best first), its relevant passages
        and the k of recall@k; the eval loss (the training loss, in-batch negatives) where rows have positives."""
        bi_encoder = _bi_encoder(model)
        embedder = bi_encoder.embedder
        was_training = embedder.training
        embedder.eval()
        try:
            passages = corpus(recipe)
            width = text_width(recipe, state)
            corpus_vectors = encode(embedder, tokenizer, [p.text for p in passages], width, recipe, accelerator)
            query_ids = Dataset.from_dict({"input_ids": features.dataset["input_ids"]})
            query_vectors = encode_ids(embedder, tokenizer, query_ids, recipe, accelerator)
            loss = _eval_loss(bi_encoder, tokenizer, features, recipe, accelerator)
        finally:
            embedder.train(was_training)
        similarity = similarity_function(layout_of(state))
        depth = ir.ranked_depth(recipe.data.retrieval.top_k)
        ranked, scores = rank_passages(similarity, query_vectors, corpus_vectors, passages, depth)
        out = []
        for row, ids, values in zip(features.rows, ranked, scores):
            item = {k: v for k, v in row.items() if k not in ("negatives", "hard_negatives")}
            item.update(passage_ids=ids, scores=values, top_k=recipe.data.retrieval.top_k)
            item.setdefault("relevant_ids", [])
            out.append(item)
        return out, loss

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        return ir.ir_metrics(rows)

    def prediction_fields(self) -> tuple[str, ...]:
        return ("passage_ids", "scores", "relevant_ids", "top_k")

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        """The fields first, then their types: a malformed ranking is refused, never re-scored (rerank too)."""
        super().check_prediction_rows(rows, source)
        ir.check_ranked_rows(rows, source)


# --------------------------------------------------------------------------- pieces


def _shared_positives(positives: list[str], batch_size: int) -> list[str]:
    """Training rows sharing a positive passage: two of them in one batch would count each other's positive, their
    own, as a negative; the batches keep them apart (training/loop.keep_apart) where there are batches enough
    (data.retrieval.check_positives_differ refuses the case where all rows share one)."""
    counts = Counter(positives)
    shared = sum(n for n in counts.values() if n > 1)
    if not shared:
        return []
    most, batches = max(counts.values()), math.ceil(len(positives) / batch_size)
    return [
        f"{shared} rows share their positive with another row ({len(counts)} distinct positives): the batches keep "
        "them apart (two in one batch would each count the other's positive, their own, as a negative)"
        + (
            f" (but one passage is the positive of {most} rows, more than the {batches} batches)"
            if most > batches
            else ""
        )
    ]


def layout_of(state: Mapping[str, Any]) -> EmbeddingLayout:
    saved = state["embedding"]
    return EmbeddingLayout(
        saved["pooling"], saved["normalize"], saved["similarity"], "the task state", saved.get("max_seq_length")
    )


def text_width(recipe: Recipe, state: Mapping[str, Any]) -> int:
    """Tokens a query or passage keeps, in training and evaluation alike: data.max_length, or the checkpoint's own
    max_seq_length where it is smaller. A sentence-transformers checkpoint was trained at up to that width and its
    library encodes at it (all-MiniLM-L6-v2: 256), so the knowledge base is searched at it; training on longer
    passages would cost attention quadratic in their length for tokens retrieval never sees."""
    return layout_of(state).width(recipe.data.max_length)


def ranking_loss(embedder: Embedder, settings: RetrievalSection) -> torch.nn.Module:
    """sentence-transformers' MultipleNegativesRankingLoss (InfoNCE: each query against every passage of the
    batch, its own positive the target) at scale 1 / temperature; MatryoshkaLoss around it for truncated sizes."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    loss: torch.nn.Module = MultipleNegativesRankingLoss(embedder, scale=1.0 / settings.temperature)  # type: ignore[arg-type]
    if settings.matryoshka_dims:
        loss = MatryoshkaLoss(embedder, loss, matryoshka_dims=settings.matryoshka_dims)  # type: ignore[arg-type]
    return loss


def similarity_function(layout: EmbeddingLayout) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The layout's similarity as sentence-transformers computes it (what its evaluator ranks by)."""
    from sentence_transformers.util import SimilarityFunction

    return SimilarityFunction.to_similarity_fn(layout.similarity)


def corpus(recipe: Recipe) -> list[Passage]:
    assert recipe.data.knowledge_base is not None  # check_recipe requires it
    return load_passages(recipe.data.knowledge_base)


# Scores held at once while ranking: queries are scored against the corpus in blocks of about this many floats
# (256 MiB), so a million-passage corpus ranks in bounded memory.
SCORE_BLOCK = 1 << 26


def rank_passages(
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    corpus_vectors: torch.Tensor,
    passages: list[Passage],
    depth: int,
) -> tuple[list[list[str]], list[list[float]]]:
    """Each query's `depth` best passages and scores, the queries scored in blocks."""
    ids = [p.id for p in passages]
    block = max(1, SCORE_BLOCK // max(1, len(passages)))
    ranked: list[list[str]] = []
    scores: list[list[float]] = []
    for start in range(0, len(queries), block):
        part = similarity(queries[start : start + block], corpus_vectors).float().cpu().numpy()
        found, values = ir.rank(part, ids, depth)
        ranked += found
        scores += values
    return ranked, scores


def encode(
    embedder: Embedder,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    width: int,
    recipe: Recipe,
    accelerator: Accelerator,
) -> torch.Tensor:
    """Embeddings of `texts` (one row each, in order), cut at `width` tokens (`text_width`)."""
    ids = tokenizer(texts, truncation=True, max_length=width)["input_ids"]
    return encode_ids(embedder, tokenizer, Dataset.from_dict({"input_ids": ids}), recipe, accelerator)


def encode_ids(
    embedder: Embedder, tokenizer: PreTrainedTokenizerBase, ids: Dataset, recipe: Recipe, accelerator: Accelerator
) -> torch.Tensor:
    """Embeddings of tokenised texts, in their order, sharded over processes and gathered back. The texts are
    embedded longest first (as sentence-transformers' encode sorts them), so each batch pads little."""
    order = np.argsort(-np.array([len(i) for i in ids["input_ids"]]), kind="stable")
    collate = PairCollator(tokenizer, None)
    parts = []
    for batch in eval_loader(ids.select(order), collate, max(recipe.eval_batch_size, CORPUS_BATCH), accelerator):
        with accelerator.autocast():
            vectors = embedder.embed(batch["input_ids"], batch["attention_mask"]).float()
        parts.append(accelerator.gather_for_metrics(vectors).cpu())
    vectors = torch.cat(parts)
    restored = torch.empty_like(vectors)
    restored[torch.as_tensor(order)] = vectors
    return restored


def _eval_loss(
    bi_encoder: BiEncoder,
    tokenizer: PreTrainedTokenizerBase,
    features: Features,
    recipe: Recipe,
    accelerator: Accelerator,
) -> float | None:
    if "positive_input_ids" not in features.dataset.column_names or bi_encoder.loss_fn is None:
        return None
    total, count = 0.0, 0
    collate = PairCollator(tokenizer, None)
    for batch in eval_loader(features.dataset, collate, recipe.eval_batch_size, accelerator):
        with accelerator.autocast():
            loss = bi_encoder(**batch).loss.float()
        size = len(batch["input_ids"])
        reduced = accelerator.reduce(torch.stack([loss * size, torch.tensor(float(size), device=loss.device)]), "sum")
        total, count = total + float(reduced[0]), count + int(reduced[1])
    return total / count if count else None


def _bi_encoder(model: Any) -> BiEncoder:
    model = getattr(model, "module", model)  # a DDP wrapper's model
    if not isinstance(model, BiEncoder):
        raise TypeError(f"task retrieval predicts with a bi-encoder, not {type(model).__name__}")
    return model


def _cut(ids: list[int], width: int, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids cut to `width`, keeping the closing special token where the tokenizer adds one (as truncation)."""
    if len(ids) <= width:
        return ids
    last = ids[-1]
    if last in (tokenizer.sep_token_id, tokenizer.eos_token_id) and last is not None:
        return ids[: width - 1] + [last]
    return ids[:width]


class PairCollator:
    """Queries padded as one batch, their passages (each positive, then each negative column) as another."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, multiple: int | None):
        self.tokenizer, self.multiple = tokenizer, multiple
        tokenizer.padding_side = "right"

    def _pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": sequences}, pad_to_multiple_of=self.multiple, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features])
        if "positive_input_ids" in features[0]:
            passages = [f["positive_input_ids"] for f in features]
            columns = len(features[0].get("negative_input_ids") or [])
            for column in range(columns):
                passages += [f["negative_input_ids"][column] for f in features]
            padded = self._pad(passages)
            batch["passage_input_ids"], batch["passage_attention_mask"] = padded["input_ids"], padded["attention_mask"]
        return batch
