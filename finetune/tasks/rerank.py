"""Rerank: a cross-encoder that reorders a first-stage retriever's candidates, trained on retrieval rows.

Rows are task retrieval's (a `query` and its positive; optionally `negative` texts); the corpus is
`data.knowledge_base`, the first stage `data.retrieval.model` (a sentence-embedding model, e.g. a trained
retrieval run's adapter/). Each training query is read together with its positive and with hard negatives the
first stage ranks high (mined as task retrieval mines them, so the cross-encoder learns what the first stage
confuses): one score per (query, passage) pair from a sequence-classification head with one output, and a
softmax cross-entropy over each query's group, the positive the target (the listwise loss of sentence-transformers'
cross-encoder multiple-negatives ranking loss, without the other queries' passages). Evaluation takes the first
stage's top `data.retrieval.candidates` for every eval query, reorders them, and scores the ranking as task
retrieval does (recall@k, MRR@10, nDCG@10, MAP@100).

The score that orders the candidates is the first stage's similarity at its training scale (1 / temperature, the
multiple-negatives ranking loss's) plus the cross-encoder's output (`fused_scores`), in training as in evaluation:
the cross-encoder learns a correction to the first stage rather than a ranking of its own. Its output layer starts
at zero (`zero_output_layer`), so an untrained reranker ranks exactly as its first stage. A cross-encoder started
from a sentence-embedding checkpoint and trained on a few hundred queries ranks worse than the bi-encoder it
follows: reordering by its score alone threw that ranking away (bench: MRR@10 0.674 -> 0.497), and the correction
it learns over the first stage's own training queries does not carry to new ones (bench: 0.673 -> 0.655; its
corrections put the held-out positive above the other candidates in 53% of pairs, chance), nor does one learnt
over 600 queries the first stage never trained on (0.673 -> 0.663, 54%): from this checkpoint and a few hundred
queries the cross-encoder learns almost nothing the bi-encoder did not already know. `finetune eval RECIPE` is
the baseline to beat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ModelOutput

from finetune.data.features import Features
from finetune.data.retrieval import DEFAULT_EMBEDDING_MODEL, DenseIndex, knowledge_base_hash
from finetune.data.tables import LengthReport, checked_texts
from finetune.errors import DataError
from finetune.evaluation import retrieval as ir
from finetune.evaluation.scoring import eval_loader
from finetune.models.embedding import CrossEncoderRanker
from finetune.models.families import FamilySpec, HeadKind
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.base import width_multiple
from finetune.tasks.retrieval import RetrievalTask, corpus

if TYPE_CHECKING:
    from peft import PeftModel


class RerankTask(RetrievalTask):
    name = "rerank"
    head: HeadKind = "sequence_classification"
    head_candidates = ("classifier", "score", "pooler")
    uses_first_stage = True

    def loss_plan(self, recipe: Recipe, state: Mapping[str, Any]) -> str:
        return (
            f"listwise cross-entropy over each query's positive and {recipe.data.retrieval.hard_negatives} mined "
            f"negative(s), the positive the target; each pair scored by the first stage's similarity x "
            f"{first_stage_scale(recipe):g} plus the cross-encoder's output"
        )

    def knowledge_base_plan(self, recipe: Recipe) -> str:
        settings = recipe.data.retrieval
        return (
            f"{recipe.data.knowledge_base}: the corpus; the first stage ({settings.model}) hands over its top "
            f"{settings.candidates} per query for the cross-encoder to reorder"
        )

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.data.retrieval.hard_negatives < 1:
            problems.append(
                "data.retrieval.hard_negatives: task rerank learns to put each positive above passages the first "
                "stage ranks high; mine at least 1 per row"
            )
        return problems

    def model_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"num_labels": 1}  # one relevance score per (query, passage) pair

    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> None:
        super().prepare_model(model, tokenizer, family)
        if not trained_as_scorer(model.config):
            zero_output_layer(model, self.head_candidates)

    def scorer(
        self, model: PeftModel | PreTrainedModel, recipe: Recipe, state: Mapping[str, Any]
    ) -> CrossEncoderRanker:
        return FusedRanker(model, first_stage_scale(recipe))

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
        """Training rows: each query paired with its positive, then with each negative (`input_ids`: one group
        of pairs per row). Eval rows: the queries alone; their candidates come from the first stage."""
        width = recipe.data.max_length
        queries = checked_texts(rows["query"][:], split, "query")
        negatives = rows["negatives"][:] if "negatives" in rows.column_names else None
        grouped = labeled and negatives is not None and bool(negatives and negatives[0])
        if not grouped:
            ids = tokenizer(queries, truncation=True, max_length=width)["input_ids"]
            report = LengthReport.from_lengths(split, [len(i) for i in ids], width)
            return Features(Dataset.from_dict({"input_ids": ids}), rows, report)
        assert negatives is not None
        positives = rows["positive"][:]
        size = 1 + len(negatives[0])
        firsts = [q for q in queries for _ in range(size)]
        seconds = [text for pos, negs in zip(positives, negatives) for text in (pos, *negs)]
        pairs = tokenizer(firsts, seconds, truncation="only_second", max_length=width)
        full = tokenizer(firsts, seconds, truncation=False)["input_ids"]
        lengths = np.array([len(i) for i in full])
        report = LengthReport.from_lengths(split, lengths, width)
        report.truncated = int((lengths.reshape(-1, size) > width).any(axis=1).sum())
        if recipe.data.overflow == "error" and report.truncated:
            raise DataError(
                f"{split}: {report.truncated} rows pair their query with a passage over data.max_length={width} "
                "tokens; raise max_length or set data.overflow to truncate"
            )
        report.notes.append(f"each query read with its positive and {size - 1} negative(s) mined by the first stage")
        columns: dict[str, list] = {
            name: [pairs[name][r * size : (r + 1) * size] for r in range(len(queries))]
            for name in ("input_ids", "attention_mask", "token_type_ids")
            if name in pairs
        }
        groups = [[pos, *negs] for pos, negs in zip(positives, negatives)]
        columns["first_stage"] = first_stage(recipe).similarities(queries, groups)
        return Features(Dataset.from_dict(columns), rows, report)

    def collate(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
    ) -> Callable[[list[dict]], dict]:
        return GroupCollator(tokenizer, width_multiple(max_length))

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
        """The first stage's ranking, its top `candidates` reordered by the fused score (the first stage's scaled
        similarity plus the cross-encoder's correction: `scores`); the passages after them keep the first stage's
        order, scored below every one."""
        ranker = _ranker(model)
        settings = recipe.data.retrieval
        first = first_stage(recipe)
        passages = first.passages
        queries = features.rows["query"][:]
        depth = ir.ranked_depth(settings.top_k)
        found, similarities = first.search_scored(queries, min(depth, len(passages)))
        count = min(settings.candidates, len(passages))
        pairs = [(query, passages[i].text) for query, indices in zip(queries, found) for i in indices[:count]]
        corrections = score_pairs(ranker, tokenizer, pairs, recipe, accelerator)
        scale = first_stage_scale(recipe)
        out = []
        for number, (row, indices) in enumerate(zip(features.rows, found)):
            mine = fused_scores(
                np.asarray(similarities[number][:count], dtype=np.float64),
                np.asarray(corrections[number * count : (number + 1) * count], dtype=np.float64),
                scale,
            ).tolist()
            order = sorted(range(count), key=lambda j: (-mine[j], passages[indices[j]].id))
            ids = [passages[indices[j]].id for j in order]
            values = [float(mine[j]) for j in order]
            floor = min(values) if values else 0.0
            tail = indices[count:]
            ids += [passages[i].id for i in tail]
            values += [floor - 1.0 - position for position in range(len(tail))]
            item = {k: v for k, v in row.items() if k not in ("negatives", "hard_negatives")}
            item.update(passage_ids=ids, scores=values, top_k=settings.top_k, reranked=count)
            item.setdefault("relevant_ids", [])
            out.append(item)
        return out, None

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        return ir.ir_metrics(rows)


def trained_as_scorer(config: Any) -> bool:
    """Whether the checkpoint was saved as a sequence classifier (a cross-encoder, e.g. an MS MARCO reranker): its
    one-output head is trained and kept. A sentence-embedding or plain encoder checkpoint (architectures
    BertModel, ...) has none; transformers draws it."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or ())


def zero_output_layer(model: torch.nn.Module, heads: tuple[str, ...]) -> None:
    """The head's last projection (to the one score) set to zero, so an untrained reranker's fused score is its
    first stage's own and its ranking the first stage's exactly (`finetune eval RECIPE` is then the first stage's
    baseline): training starts from what the first stage knows. The checkpoint has no trained one-output layer
    (a sentence-embedding or plain encoder checkpoint), so transformers draws one at random, which would add noise
    to every pair (about 0.01 between a query's candidates on all-MiniLM-L6-v2). A trained adapter's head is loaded
    over this afterwards (peft's modules_to_save)."""
    for name, module in model.named_modules():
        if name.split(".")[0] in heads and isinstance(module, torch.nn.Linear) and module.out_features == 1:
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


Scores = TypeVar("Scores", torch.Tensor, np.ndarray)


def fused_scores(similarity: Scores, correction: Scores, scale: float) -> Scores:
    """The score that orders a query's candidates, in training and evaluation alike: the first stage's similarity at
    its training scale (its ranking loss's logits) plus the cross-encoder's output. (Tried and taken back: the
    output added to the similarity before the scale, i.e. 20x larger steps for the correction; on the docstring
    bench it moved more candidates the wrong way, MRR@10 0.673 -> 0.633 against 0.655 here: the corrections the
    cross-encoder learns there are noise, and a larger step only amplifies them.)"""
    return similarity * scale + correction


def first_stage_scale(recipe: Recipe) -> float:
    """What the first stage's similarity is multiplied by in the fused score: the scale its ranking loss trained
    it at (1 / data.retrieval.temperature), so the cross-encoder's output adds to logits of that loss's size."""
    return 1.0 / recipe.data.retrieval.temperature


def first_stage(recipe: Recipe) -> DenseIndex:
    """The first-stage retriever (data.retrieval.model) over the corpus; its passage embeddings come from the
    cache the hard-negative mining filled."""
    assert recipe.data.knowledge_base is not None  # check_recipe requires it
    return DenseIndex(
        corpus(recipe),
        recipe.data.retrieval.model or DEFAULT_EMBEDDING_MODEL,
        knowledge_base_hash(recipe.data.knowledge_base),
    )


class FusedRanker(CrossEncoderRanker):
    """The cross-encoder's output added to the first stage's scaled similarity of each pair (`first_stage`, one
    row per group), then the listwise cross-entropy of CrossEncoderRanker over each group."""

    def __init__(self, scorer: PeftModel | PreTrainedModel, scale: float):
        super().__init__(scorer)
        self.scale = scale

    def forward(
        self, labels: torch.Tensor, first_stage: torch.Tensor | None = None, **batch: torch.Tensor
    ) -> ModelOutput:
        groups = labels.shape[0]
        corrections = self.scores(batch).view(groups, -1).float()
        if first_stage is None:
            first_stage = torch.zeros_like(corrections)
        logits = fused_scores(first_stage.view(groups, -1).float(), corrections, self.scale)
        return ModelOutput(loss=torch.nn.functional.cross_entropy(logits, labels))


def score_pairs(
    ranker: CrossEncoderRanker,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    recipe: Recipe,
    accelerator: Accelerator,
) -> list[float]:
    """The cross-encoder's score of each (query, passage) pair, in order, sharded over processes."""
    if not pairs:
        return []
    encoded = tokenizer(
        [q for q, _ in pairs], [p for _, p in pairs], truncation="only_second", max_length=recipe.data.max_length
    )
    keep = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in encoded]
    dataset = Dataset.from_dict({n: encoded[n] for n in keep})
    collate = GroupCollator(tokenizer, None)
    was_training = ranker.training
    ranker.eval()
    out: list[float] = []
    try:
        for batch in eval_loader(dataset, collate, recipe.eval_batch_size, accelerator):
            with accelerator.autocast():
                logits = ranker.scores(batch).float()
            out += accelerator.gather_for_metrics(logits).cpu().tolist()
    finally:
        ranker.train(was_training)
    return out


def _ranker(model: Any) -> CrossEncoderRanker:
    model = getattr(model, "module", model)
    if not isinstance(model, CrossEncoderRanker):
        raise TypeError(f"task rerank predicts with a cross-encoder, not {type(model).__name__}")
    return model


class GroupCollator:
    """Pairs padded as one batch: a training row's group (positive first), or single pairs for scoring;
    `labels` (zeros, one per group) says how many groups the batch holds."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, multiple: int | None):
        self.tokenizer, self.multiple = tokenizer, multiple
        tokenizer.padding_side = "right"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        grouped = isinstance(features[0]["input_ids"][0], list)
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features[0]]
        if grouped:
            flat = [{n: f[n][j] for n in names} for f in features for j in range(len(f["input_ids"]))]
        else:
            flat = [{n: f[n] for n in names} for f in features]
        batch = dict(self.tokenizer.pad(flat, pad_to_multiple_of=self.multiple, return_tensors="pt"))
        if grouped:
            batch["labels"] = torch.zeros(len(features), dtype=torch.long)
            if "first_stage" in features[0]:
                batch["first_stage"] = torch.tensor([f["first_stage"] for f in features], dtype=torch.float32)
        return batch
