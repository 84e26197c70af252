"""Bi-encoders: a transformer's token vectors pooled into one embedding per text, as sentence-transformers does.

The pooling comes from the checkpoint's own sentence-transformers config (`modules.json` and its Pooling and
Normalize modules) when it has one; otherwise mean pooling for encoders (what sentence-transformers itself builds
for a plain checkpoint), and a decoder must be told (`data.retrieval.pooling`: last-token or mean), since its
causal token vectors give no safe default. Pooling and normalisation are sentence-transformers' own modules, so
an embedding here equals `SentenceTransformer.encode` of the same weights, and a trained adapter is saved with
the module files that make `SentenceTransformer(adapter_dir)` load it (peft, as sentence-transformers supports).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import ModelOutput

from finetune.errors import RecipeError
from finetune.files import write_json
from finetune.models.families import FamilySpec

if TYPE_CHECKING:
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import PretrainedConfig, PreTrainedModel

POOLING_MODES = ("mean", "cls", "lasttoken")
# The files and folders sentence-transformers writes beside a model's own weights and tokenizer.
SENTENCE_TRANSFORMER_FILES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "README.md",
)


@dataclass(frozen=True)
class EmbeddingLayout:
    """How token vectors become one embedding, and how two embeddings are compared."""

    pooling: str  # one of POOLING_MODES
    normalize: bool  # unit length after pooling (sentence-transformers' Normalize module)
    similarity: str  # sentence-transformers' similarity function name: cosine or dot
    source: str  # where the decision came from, for the plan and the model card
    # The checkpoint's own `max_seq_length` (sentence_bert_config.json), or None where it declares none: the width
    # it was trained and is served at (sentence-transformers' encode cuts there), so training cuts there too.
    max_seq_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "similarity": self.similarity,
            "max_seq_length": self.max_seq_length,
        }

    def width(self, max_length: int) -> int:
        """Tokens a text keeps: `max_length` (data.max_length), or the checkpoint's max_seq_length if smaller."""
        return min(max_length, self.max_seq_length) if self.max_seq_length else max_length


def embedding_layout(model_path: str, family: FamilySpec, setting: str, place: str) -> EmbeddingLayout:
    """The checkpoint's pooling (its sentence-transformers config), or the family's default, or `setting`.

    Raises RecipeError for a decoder whose pooling nothing decides (`place` names the recipe key)."""
    found = _sentence_transformer_config(Path(model_path))
    width = _max_seq_length(Path(model_path))
    if setting != "auto":
        normalize = found.normalize if found is not None else True
        similarity = found.similarity if found is not None else "cosine"
        return EmbeddingLayout(setting, normalize, similarity, f"{place}: {setting}", width)
    if found is not None:
        return replace(found, max_seq_length=width)
    if family.decoder_only:
        raise RecipeError(
            f"{place}: {model_path} is a decoder without a sentence-transformers pooling config, so how its token "
            "vectors become one embedding cannot be decided; set it to lasttoken (the usual for decoder "
            "embedders) or mean"
        )
    # sentence-transformers builds mean pooling for a plain encoder checkpoint; cosine compares its embeddings.
    return EmbeddingLayout("mean", True, "cosine", "mean pooling (no sentence-transformers config)", width)


def _max_seq_length(directory: Path) -> int | None:
    """The `max_seq_length` a sentence-transformers checkpoint declares (sentence_bert_config.json), or None."""
    settings = directory / "sentence_bert_config.json"
    if not settings.is_file():
        return None
    value = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _sentence_transformer_config(directory: Path) -> EmbeddingLayout | None:
    """The pooling, normalisation and similarity a sentence-transformers checkpoint declares, or None."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            pooling = _pooling_mode(json.loads((directory / module["path"] / "config.json").read_text("utf-8")))
        elif kind.endswith("Normalize"):
            normalize = True
    if pooling is None:
        return None
    similarity = "cosine"
    settings = directory / "config_sentence_transformers.json"
    if settings.is_file():
        similarity = json.loads(settings.read_text(encoding="utf-8")).get("similarity_fn_name") or "cosine"
    return EmbeddingLayout(pooling, normalize, similarity, f"the checkpoint's sentence-transformers config ({pooling})")


def _pooling_mode(config: dict[str, Any]) -> str | None:
    """A Pooling module's mode, from either config layout (sentence-transformers 2-5 flags or 6's `pooling_mode`)."""
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return mode if mode in POOLING_MODES else None
    flags = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "lasttoken"}
    chosen = [name for flag, name in flags.items() if config.get(flag)]
    return chosen[0] if len(chosen) == 1 else None


class Embedder(torch.nn.Module):
    """Token ids -> one embedding per text: the model, then sentence-transformers' Pooling (and Normalize).

    Called as sentence-transformers' losses call a model: `embedder(features)["sentence_embedding"]`."""

    def __init__(self, encoder: PeftModel | PreTrainedModel, layout: EmbeddingLayout):
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

        super().__init__()
        self.encoder = encoder
        self.layout = layout
        self.pooling = Pooling(encoder.config.hidden_size, layout.pooling)
        self.normalize = Normalize() if layout.normalize else None

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.encoder(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        pooled = self.pooling(
            {"token_embeddings": output.last_hidden_state, "attention_mask": features["attention_mask"]}
        )
        if self.normalize is not None:
            pooled = self.normalize(pooled)
        return {**features, "sentence_embedding": pooled["sentence_embedding"]}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]

    # What sentence-transformers' MatryoshkaLoss asks of a model: the embedding size before any truncation.
    def get_embedding_dimension(self) -> int:
        return int(self.pooling.get_embedding_dimension())

    _get_untruncated_embedding_dimension = get_embedding_dimension


Loss = Callable[[Iterable[dict[str, torch.Tensor]], torch.Tensor | None], torch.Tensor]


class BiEncoder(torch.nn.Module):
    """What the training loop trains for an embedding task: `model(**batch).loss`.

    A batch holds the queries (`input_ids`, `attention_mask`) and their passages (`passage_input_ids`,
    `passage_attention_mask`: each query's positive, then each of its negatives, column by column); the loss is a
    sentence-transformers loss over those columns (multiple negatives ranking: in-batch and hard negatives).
    Saving goes to the peft model inside, so the adapter is the plain peft adapter of the bare transformer.
    """

    loss_fn: Loss | None

    def __init__(self, embedder: Embedder, loss: Loss | None = None):
        super().__init__()
        self.embedder = embedder
        # Not a submodule: the loss holds the embedder too, and its parameters must be named once.
        self.__dict__["loss_fn"] = loss

    @property
    def config(self) -> PretrainedConfig:
        return self.embedder.config

    @property
    def peft_config(self) -> dict:
        return getattr(self.embedder.encoder, "peft_config", {})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        passage_input_ids: torch.Tensor | None = None,
        passage_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> ModelOutput:
        if passage_input_ids is None or passage_attention_mask is None or self.loss_fn is None:
            raise ValueError("a bi-encoder's training batch holds queries and their passages")
        queries = {"input_ids": input_ids, "attention_mask": attention_mask}
        count = input_ids.shape[0]
        columns = [
            {
                "input_ids": passage_input_ids[start : start + count],
                "attention_mask": passage_attention_mask[start : start + count],
            }
            for start in range(0, passage_input_ids.shape[0], count)
        ]
        return ModelOutput(loss=self.loss_fn([queries, *columns], None))

    # peft's interface, which the adapter saver and the checkpoints use
    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        self.embedder.encoder.save_pretrained(path, **kwargs)

    def get_base_model(self) -> PreTrainedModel:
        encoder: Any = self.embedder.encoder  # a PeftModel: the transformers model inside it
        return encoder.get_base_model()


class CrossEncoderRanker(torch.nn.Module):
    """What the loop trains for a reranker: `model(**batch).loss`, a softmax cross-entropy over each query's group
    of (query, passage) scores, the positive first (the listwise loss of sentence-transformers' cross-encoder
    multiple-negatives ranking loss, within each group). Saving goes to the peft model inside."""

    def __init__(self, scorer: PeftModel | PreTrainedModel):
        super().__init__()
        self.scorer = scorer

    @property
    def config(self) -> PretrainedConfig:
        return self.scorer.config

    @property
    def peft_config(self) -> dict:
        return getattr(self.scorer, "peft_config", {})

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.scorer(**inputs).logits.squeeze(-1)

    def forward(self, labels: torch.Tensor, **batch: torch.Tensor) -> ModelOutput:
        groups = labels.shape[0]
        logits = self.scores(batch).view(groups, -1)
        return ModelOutput(loss=torch.nn.functional.cross_entropy(logits.float(), labels))

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        self.scorer.save_pretrained(path, **kwargs)

    def get_base_model(self) -> PreTrainedModel:
        scorer: Any = self.scorer
        return scorer.get_base_model()


def write_sentence_transformer_files(
    encoder: PeftModel | PreTrainedModel, base_path: str, layout: EmbeddingLayout, max_length: int, target: Path
) -> None:
    """sentence-transformers' module files (modules.json, Pooling, Normalize, its config and model card) beside an
    adapter in `target`, so `SentenceTransformer(target)` loads the adapter on its base. sentence-transformers
    writes them itself (around the trained model), in a scratch directory; only its own files are copied.

    The width texts were cut at in training (`layout.width`) goes into sentence_bert_config.json as
    `max_seq_length`, the key every sentence-transformers version reads at load: version 6 itself keeps the width
    in the tokenizer's files, and the adapter's tokenizer files are the run's own (its tokenizer's model_max_length,
    e.g. 512), so without the key the library would encode wider than the retriever was trained and evaluated."""
    width = layout.width(max_length)
    model = sentence_transformer(base_path, layout, width, encoder=encoder)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".st-") as scratch:
        model.save(scratch)
        for name in SENTENCE_TRANSFORMER_FILES:
            if (Path(scratch) / name).is_file():
                shutil.copyfile(Path(scratch) / name, target / name)
        settings = json.loads((Path(scratch) / "sentence_bert_config.json").read_text(encoding="utf-8"))
        write_json(target / "sentence_bert_config.json", {**settings, "max_seq_length": width})
        for module in json.loads((Path(scratch) / "modules.json").read_text(encoding="utf-8")):
            if module["path"]:  # Pooling, Normalize: their own folders
                shutil.rmtree(target / module["path"], ignore_errors=True)
                shutil.copytree(Path(scratch) / module["path"], target / module["path"])


def sentence_transformer(
    model_path: str,
    layout: EmbeddingLayout | None,
    max_length: int | None = None,
    *,
    encoder: PeftModel | PreTrainedModel | None = None,
    device: str = "cpu",
) -> SentenceTransformer:
    """A SentenceTransformer of the checkpoint: as its own config builds it (`layout` None), or with `layout`
    around it (around `encoder`, a loaded and possibly trained model of that checkpoint, when given)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if layout is None:
        return SentenceTransformer(model_path, device=device)
    transformer = Transformer(model_path, max_seq_length=max_length)
    if encoder is not None:
        transformer.model = encoder
    tokenizer = transformer.tokenizer
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders: padded positions are masked out, as in training
    modules: list[torch.nn.Module] = [transformer, Pooling(transformer.get_embedding_dimension(), layout.pooling)]
    if layout.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device=device, similarity_fn_name=layout.similarity)  # type: ignore[arg-type]


def is_embedding_checkpoint(model_path: str) -> bool:
    return (Path(model_path) / "modules.json").is_file()
