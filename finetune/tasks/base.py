"""The Task interface: everything the training loop and evaluation need to know about a task.

The loop never asks which task it runs; it calls these hooks:

    check_recipe   the task's recipe rules (fields, metrics); finetune.flows.resolve adds the rest
    fit_state      what the task learns from the training rows (e.g. the label set); saved with the adapter
    auto_class     the transformers Auto class for a family (from `head`), with model_kwargs from the state
    featurize      rows -> model features (+ a length report), under data.max_length / data.overflow
    collate        a batch of features -> padded tensors (padded to the batch's longest row)
    predict        the eval rows -> prediction rows (reference fields + `prediction`) and eval loss
    compute_metrics  prediction rows -> metrics: a pure function, so saved predictions can be re-scored
    check_eval_rows  refuse early what evaluation could not do (e.g. run code without the opt-ins)
    check_state    rules that need what the data decided (multi-label classification's metrics)
    set_loss       the task's own training loss, where it is not the model's (class weights)
    adapter_files  what the final evaluation decides and the adapter keeps (multi-label thresholds)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.features import Features
from finetune.data.retrieval import DEFAULT_EMBEDDING_MODEL
from finetune.errors import DataError, did_you_mean
from finetune.evaluation.scoring import ADDED_METRICS
from finetune.models.families import FamilySpec, HeadKind
from finetune.recipe.schema import EvalSection, Recipe

if TYPE_CHECKING:
    from peft import PeftModel


# Padded batch widths come in multiples of this (never past max_length): length-grouped batches then come in a
# bounded number of shapes, not one per length. It was 32, when oneDNN's primitive cache grew with every new shape
# (peak RSS 2.2 -> 1.35 GB over 60 MiniLM classification steps); since that cache is capped (cli.main), 8 wastes
# less on padding: the shipped MiniLM recipe's rows average 22 tokens, padded to 32 a third of each step's matmul
# work was padding. Measured (docs/performance.md): training 15-20% faster, peak RSS +140 MB, the same accuracy.
BATCH_WIDTH_MULTIPLE = 8


def width_multiple(max_length: int | None) -> int | None:
    """What a collator pads widths to a multiple of: BATCH_WIDTH_MULTIPLE where max_length is one of its
    multiples (so rounding up never passes it), else nothing."""
    return BATCH_WIDTH_MULTIPLE if max_length is not None and max_length % BATCH_WIDTH_MULTIPLE == 0 else None


def named_metrics(settings: EvalSection) -> list[tuple[str, str]]:
    """(place, metric) of every metric the recipe's evaluation names: eval.metrics, eval.gates, eval.best_metric."""
    named = [("eval.metrics", m) for m in settings.metrics or []] + [(f"eval.gates.{m}", m) for m in settings.gates]
    return named + ([("eval.best_metric", settings.best_metric)] if settings.best_metric is not None else [])


class Task:
    name: str = ""
    # Which kind of model the task trains; the family spec turns it into an Auto class and a peft task type.
    head: HeadKind = "sequence_classification"
    # Whether merge and export make a checkpoint of this task's model (its adapter folded into the base weights).
    # None: they do; else why not, and what to use instead.
    not_mergeable: str | None = None
    required_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    # Required fields that hold the answer: not needed by `finetune predict`.
    reference_fields: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    # Task heads trained in full and saved with the adapter.
    head_candidates: tuple[str, ...] = ()
    # Generation tasks build their prompt from `data.template` when a recipe gives one.
    uses_template: bool = False

    # ------------------------------------------------------------ recipe
    def check_recipe(self, recipe: Recipe) -> list[str]:
        """The task's own rules: its fields, metrics and gates. finetune.flows.resolve gathers these with the rest."""
        problems = []
        fields = (*self.fields(recipe)[0], *self.fields(recipe)[1])
        for name in recipe.data.columns:
            if name not in fields:
                problems.append(
                    f"data.columns.{name}: not a field of task {self.name}{did_you_mean(name, fields)} "
                    f"(fields: {', '.join(fields)})"
                )
        for place, metric in named_metrics(recipe.eval):
            if not self.knows_metric(metric) and place != "eval.best_metric":  # resolve names an unknown best_metric
                problems.append(self.unknown_metric(place, metric))
        return problems

    def unavailable_metrics(
        self, recipe: Recipe, asked: Sequence[str] = (), state: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """Metrics the task knows that this recipe's evaluation never reports (metric -> why): a gate on one
        would fail as "missing" after training, and eval.metrics naming one would report nothing. `asked`: metrics
        named outside the recipe (command-line gates), beside those it names; `state`: what the training data
        decided, where a trained adapter records it."""
        mark = recipe.eval.watermark
        out = {}
        if mark is None:
            out["watermark_detected"] = "is reported only with eval.watermark"
        if mark is None or mark.method != "learned":
            out["watermark_bit_accuracy"] = "is reported only with eval.watermark.method: learned"
        if self.name != "qa" or recipe.data.knowledge_base is None:
            out["retrieval_recall@k"] = "is reported only by knowledge-base qa (data.knowledge_base)"
        listed = recipe.eval.metrics
        if listed:  # the task's metrics are reported as eval.metrics lists them (features' own always)
            for metric in [m for _, m in named_metrics(recipe.eval)] + list(asked):
                if metric not in listed and metric not in ADDED_METRICS:
                    out.setdefault(metric, f"is not reported: eval.metrics ({', '.join(listed)}) leaves it out")
        return out

    def main_metric(self, settings: EvalSection) -> str:
        """The metric that decides "better" by default (eval.best_metric): the task's first."""
        return self.metric_names[0]

    def check_state(self, recipe: Recipe, state: Mapping[str, Any]) -> None:
        """Rules that need what the data decided (e.g. multi-label classification); called before weights load."""

    def as_trained(self, recipe: Recipe, state: Mapping[str, Any]) -> Recipe:
        """The recipe as the training rows decided it (`state`): what every split is read and answered with."""
        return recipe

    def fields(self, recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) fields of a row under this recipe."""
        return self.required_fields, self.optional_fields

    def reading(self) -> dict[str, Any]:
        """How the row readers (tables.read_split, report.read_rows) read this task's files: classification's labels
        are checked as labels; a generation task's file may hold conversations, and (`judged`: its prompt and
        answer fields) pairs or thumbs written as conversations."""
        return {"classify": self.name == "classification", "conversations": self.head == "generation"}

    def conversation_layout(
        self, recipe: Recipe, column_names: Sequence[str], columns: Mapping[str, str], required: Sequence[str]
    ) -> str | None:
        """Generation tasks: the conversation layout of a table's rows (messages, alpaca, sharegpt), which become a
        `messages` column; None: the rows hold the task's own fields (`required` through `columns`)."""
        return None

    def knows_metric(self, metric: str) -> bool:
        return metric in self.metric_names or metric in (
            "eval_loss",
            "watermark_detected",
            "watermark_bit_accuracy",
            "retrieval_recall@k",
        )

    def unknown_metric(self, place: str, metric: str) -> str:
        return (
            f"{place}: unknown metric {metric!r} for task {self.name}{did_you_mean(metric, self.metric_names)} "
            f"(metrics: {', '.join(self.metric_names)}, eval_loss)"
        )

    def refusal(self, family: FamilySpec) -> str | None:
        """Why this task cannot run on the family, or None when it can."""
        if family.supports(self.head):
            return None
        return f"task {self.name} is not supported on the {family.name} family: {family.refusals[self.head]}"

    # ------------------------------------------------------------ model
    def fit_state(self, train_rows: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {}

    def auto_class(self, family: FamilySpec) -> type[Any]:
        return family.auto_class(self.head)

    def model_kwargs(self, state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def peft_task(self, family: FamilySpec) -> str | None:
        """peft's task type (SEQ_CLS, CAUSAL_LM, ...), which lets AutoPeftModelFor... reload the adapter."""
        return family.peft_task_type(self.head)

    def loss_plan(self, recipe: Recipe, state: Mapping[str, Any]) -> str:
        """What supervised training optimises, in the plan's words (generation tasks: the completions' tokens)."""
        return "cross-entropy on the reference completions' tokens"

    def knowledge_base_plan(self, recipe: Recipe) -> str:
        """What `data.knowledge_base` is to this task, in the plan's words (qa: where answers come from)."""
        retrieval = recipe.data.retrieval
        model = f", embeddings {retrieval.model or DEFAULT_EMBEDDING_MODEL}" if retrieval.method != "bm25" else ""
        return (
            f"{recipe.data.knowledge_base}: {retrieval.method} retrieval, top {retrieval.top_k}{model}; "
            "training adds the gold passage where retrieval missed it"
        )

    def set_loss(self, model: PreTrainedModel, recipe: Recipe, state: Mapping[str, Any]) -> None:
        """Where the task's training loss differs from the model's own (classification's class weights)."""

    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> None:
        """Last touches after loading (the tokenizer's pad id into the config, etc.)."""
        align_pad_id(model, tokenizer, family)

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
        """`workdir`: where large outputs may be written as Arrow files (the feature cache's entry), else memory."""
        raise NotImplementedError

    def collate(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
    ) -> Callable[[list[dict]], dict]:
        """Batches of features; `max_length` (data.max_length) bounds any extra padding a collator adds."""
        raise NotImplementedError

    # ------------------------------------------------------------ evaluation
    def predict(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        features: Features,
        accelerator: Accelerator,
        recipe: Recipe,
        state: dict[str, Any],
    ) -> tuple[list[dict], float | None]:
        raise NotImplementedError

    def compute_metrics(self, rows: list[dict], settings: EvalSection | None = None) -> dict[str, Any]:
        """Metrics from prediction rows: {"metrics": {name: fraction}, "details": {...}}.

        `settings` is the recipe's eval section (code execution limits, pass@k), or None for defaults.
        """
        raise NotImplementedError

    def adapter_files(self, rows: list[dict], recipe: Recipe, state: Mapping[str, Any]) -> dict[str, Any]:
        """What the final evaluation's prediction rows decide and the adapter keeps (multi-label classification:
        its thresholds): {name: JSON document}, saved as adapter/<name>.json and read back into the task state."""
        return {}

    def check_eval_rows(self, rows: Dataset, settings: EvalSection, machine: bool = True) -> None:
        """Called before any model loads, so a run is refused before it trains rather than after. `machine` False
        (`validate`): what the recipe says, not what this machine allows (an environment variable, a sandbox)."""

    def check_scorable(self, rows: Dataset, split: str) -> None:
        """A DataError (`SPLIT: row N: ...`, placed at its line by the caller) for an eval row the task's metrics
        could not score; checked where the rows are read (run, eval, validate), before they are cached."""

    def check_prediction_rows(self, rows: list[dict], source: str) -> None:
        """Prediction files re-scored with `eval --predictions` must carry the task's reference fields."""
        needed = self.prediction_fields()
        for number, row in enumerate(rows, start=1):
            missing = [f for f in needed if f not in row]
            if missing:
                raise DataError(f"{source}:{number}: missing field(s) {', '.join(missing)} for task {self.name}")

    def prediction_fields(self) -> tuple[str, ...]:
        return ("prediction",)


def align_pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> None:
    """A config without a pad id takes the tokenizer's; a decoder's config takes it always: its sequence-
    classification head reads each row at its last token that is not `config.pad_token_id`, so a checkpoint whose
    config says pad 3 while its tokenizer pads with EOS read every shorter row at a padding position (a prediction
    that changed with the other rows of its batch). An encoder's is left: RoBERTa-style models count positions from
    the config's pad id as built, and a saved config with another would count them otherwise on reload."""
    if tokenizer.pad_token_id is not None and (family.decoder_only or model.config.pad_token_id is None):
        model.config.pad_token_id = tokenizer.pad_token_id
