"""A session: everything resolved for one recipe (model, family, tokenizer, task state, features, model with
LoRA), built complete in one call and never changed afterwards.

recipe -> **session** -> train / evaluate / predict -> run directory
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from datasets import Dataset
from peft import PeftModel, prepare_model_for_kbit_training
from rich.console import Console
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList

from finetune.data.cache import CachedData, FeatureCache, cache_key
from finetune.data.conversations import (
    as_messages,
    conversation_problems,
    layout_fields,
    prompt_completion_conversations,
    recipe_layout,
)
from finetune.data.features import Features
from finetune.data.report import read_rows
from finetune.data.retrieval import (
    DEFAULT_EMBEDDING_MODEL,
    DenseIndex,
    Retriever,
    WeightChoice,
    attach_passages,
    check_given_negatives,
    check_positives_differ,
    choose_sparse_weight,
    knowledge_base_hash,
    load_passages,
    mine_negatives,
    relevant_passages,
)
from finetune.data.tables import Origins, apply_template, map_columns
from finetune.errors import DataError, RecipeError
from finetune.evaluation.preference import PREFERENCE_METRICS
from finetune.files import write_json
from finetune.flows.resolve import Resolved, resolve_recipe, retriever_recipe, start_adapter_dir
from finetune.models.embedding import EmbeddingLayout, embedding_layout
from finetune.models.families import FamilySpec
from finetune.models.lora import BASE_CHANGING_INITS, apply_lora, head_modules, resolve_targets
from finetune.models.references import (
    load_model,
    load_tokenizer,
    quantization_config,
)
from finetune.outputs import adapter as adapter_files
from finetune.outputs.adapter import AdapterSaver
from finetune.recipe.schema import Recipe
from finetune.tasks import Task, recipe_task
from finetune.tasks.generative import GenerationTask
from finetune.tasks.preference import PreferenceCollator, PromptCollator, pair_metrics_problems
from finetune.tasks.rerank import RerankTask
from finetune.tasks.retrieval import RetrievalTask, layout_of
from finetune.tasks.rewards import Rewarder
from finetune.tasks.text2text import PackedCollator, StopOnStrings, cut_at_stops
from finetune.training.loop import has_accelerator_device
from finetune.training.objectives import GRPO, IGNORE, OBJECTIVES, Objective, make_objective
from finetune.training.watermark_objective import LearnedWatermarkObjective
from finetune.watermark import learned

# The name of the starting adapter (model.adapter) when it is loaded beside a trained one as the reference policy.
REFERENCE_ADAPTER = "reference"


@dataclass(frozen=True)
class Session:
    """One recipe, resolved, with its data and model. `model` carries fresh LoRA (training) or a trained adapter
    (evaluation). What the recipe resolved to (task, family, model path, precision) is read from `resolved`."""

    resolved: Resolved
    tokenizer: PreTrainedTokenizerBase
    state: Mapping[str, Any]  # what the task learnt from the training rows (label order, prompt layout) + family
    model: PeftModel | PreTrainedModel
    features: Mapping[str, Features] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # module names wrapped with fresh LoRA
    overlap: Mapping[str, Any] = field(default_factory=dict)  # train <-> eval duplicates (data.on_overlap)
    cache_note: str = ""  # whether the features came from the feature cache

    @property
    def recipe(self) -> Recipe:
        return self.resolved.recipe

    @property
    def task(self) -> Task:
        return self.resolved.task

    @property
    def family(self) -> FamilySpec:
        return self.resolved.family

    @property
    def model_path(self) -> str:
        return self.resolved.model_path

    @property
    def precision(self) -> str:
        return self.resolved.precision

    @functools.cached_property
    def objective(self) -> Objective:
        """What training minimises (train.objective); one instance per session."""
        train = self.recipe.train
        if train.objective == "grpo":
            return self._grpo()
        objective = make_objective(train.objective, train.preference, self.family.encoder_decoder)
        mark = self.recipe.eval.watermark
        if mark is not None and learned.is_learned(mark) and learned.find(self.model) is not None:
            # A learned watermark trains with the task: its bits and KL beside the task's own loss.
            return LearnedWatermarkObjective(objective, mark)
        return objective

    def _grpo(self) -> GRPO:
        """GRPO with its sampler (the model's own generate, the task's stop strings) and its rewarder (the task's
        score of each completion against its training row)."""
        settings, tokenizer, task = self.recipe.train.grpo, self.tokenizer, self.task
        assert isinstance(task, GenerationTask)
        rows = self.features["train"].rows
        stops = task.answer_stops(self.recipe.eval, self.recipe.data, rows)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # A conversation's answer ends at the template's end-of-turn token too (where it is not EOS), as evaluation's.
        turn_ends = task.turn_end_ids(tokenizer, self.recipe.model.name_or_path, rows)
        ends = [token for token in dict.fromkeys([eos, *turn_ends]) if token is not None]

        @torch.no_grad()
        def sample(model, prompt_ids, prompt_mask, group: int) -> list[list[int]]:
            policy = getattr(model, "module", model)  # generate on the model itself, not a DDP wrapper
            was_training = policy.training
            policy.eval()
            width = prompt_ids.shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stops, width)]) if stops else None
            try:
                output = policy.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    do_sample=True,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    # The distribution the loss scores: no top-k cut or penalty from the checkpoint's defaults.
                    top_k=0,
                    repetition_penalty=1.0,
                    max_new_tokens=settings.max_new_tokens,
                    num_return_sequences=group,
                    pad_token_id=pad,
                    eos_token_id=ends,
                    stopping_criteria=criteria,
                    use_cache=True,
                )
            finally:
                policy.train(was_training)
            completions = []
            for ids in output[:, width:].tolist():
                end = next((i + 1 for i, token in enumerate(ids) if token in ends), len(ids))
                ids = ids[:end]
                while len(ids) > 1 and ids[-1] == pad and pad not in ends:  # a row stopped early is padded
                    ids.pop()
                completions.append(ids)
            return completions

        rewarder = Rewarder(task, settings.reward, self.recipe.eval)

        def reward(owners: list[int], completions: list[list[int]]) -> tuple[list[float], dict[str, int]]:
            texts = [cut_at_stops(t, stops) for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
            scored = [{**rows[owner], "prediction": text} for owner, text in zip(owners, texts)]
            result = rewarder(scored, [len(ids) for ids in completions])
            return result.values, result.reasons

        adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(self.model, "peft_config", {}) else None
        return GRPO(settings, sample, reward, tuple(ends), pad, adapter)

    def reports(self) -> dict:
        return {split: f.report.as_dict() for split, f in self.features.items()}

    def adapter_saver(self, initial_adapter: Path | None = None) -> AdapterSaver:
        recipe = self.recipe
        meta = {
            "task": recipe.task,
            "mode": recipe.mode,
            "family": self.family.name,
            "base_model": recipe.model.name_or_path,
            "base_model_path": self.model_path,
            "state": dict(self.state),  # label order for classification, prompt layout for generation
            "generation": recipe.eval.model_dump(
                include={"max_new_tokens", "temperature", "top_p", "num_samples", "stop"}
            ),
            # The key and a learned watermark's message stay in their own files (0600), never here.
            "watermark": recipe.eval.watermark.model_dump(exclude={"key", "message"})
            if recipe.eval.watermark
            else None,
        }
        if learned.is_learned(recipe.eval.watermark):
            return LearnedWatermarkSaver(
                self.tokenizer,
                meta,
                self.model_path,
                recipe.model.revision,
                initial_adapter,
                recipe.eval.watermark,
                unmarked=self.reference_completions,
            )
        return AdapterSaver(
            self.tokenizer, meta, self.model_path, recipe.model.revision, initial_adapter, recipe.eval.watermark
        )

    @functools.cached_property
    def reference_completions(self) -> tuple[tuple[int, ...], ...]:
        """The training rows' reference completions (the first 1,000) as token ids (where the labels are, end
        tokens left out): human text nobody marked, which a learned watermark's extractor is calibrated on at every
        save and evaluation; read once a session."""
        train = self.features.get("train")
        if train is None:
            return ()
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        texts = []
        for row in train.dataset.select(range(min(1000, len(train.dataset)))):
            ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE and i not in ends]
            if ids:
                texts.append(tuple(ids))
        return tuple(texts)

    def featurize(self, rows: Dataset, split: str, labeled: bool = True) -> Features:
        return self.task.featurize(rows, self.tokenizer, self.recipe, dict(self.state), split, labeled=labeled)


@dataclass(frozen=True)
class LearnedWatermarkSaver(AdapterSaver):
    """The adapter, and beside it a learned watermark's blocks and extractor and the run's message (0600).

    Written after the adapter is in place, the message before the weights; an adapter whose watermark files are
    missing (a kill between the two) is refused when loaded, naming them, never used unmarked or with another
    message."""

    # The training references (token ids), what the extractor is calibrated on at each save (learned.calibrate).
    unmarked: tuple[tuple[int, ...], ...] = ()

    def save(self, model: PeftModel, adapter_dir: Path, for_other_tools: bool = False) -> None:
        super().save(model, adapter_dir, for_other_tools)
        watermark = learned.find(model)
        if watermark is not None and self.watermark is not None:
            # The message first: weights without their message would be read against the key's message instead.
            learned.write_message(adapter_dir, self.watermark)
            learned.save(watermark, adapter_dir)
            if self.unmarked:
                counts = learned.calibrate(watermark, [list(t) for t in self.unmarked])
                write_json(adapter_dir / learned.CALIBRATION_FILE, counts)


# --------------------------------------------------------------------------- the steps, in order


def task_rows(
    table: Dataset,
    recipe: Recipe,
    task: Task,
    key: str,
    columns: dict[str, str] | None = None,
    required: tuple[str, ...] | None = None,
    optional: tuple[str, ...] | None = None,
    labeled: bool = True,
) -> Dataset:
    """A loaded table as the task's fields: the prompt template applied, then the column mapping; conversations
    (generation tasks) become checked `messages` rows, which need an assistant turn when `labeled`."""
    columns = recipe.data.columns if columns is None else columns
    task_required, task_optional = task.fields(recipe)
    required = task_required if required is None else required
    judged = task.reading().get("judged")  # a generation task's prompt and answer fields
    if judged is not None and recipe_layout(recipe.data) in (None, "prompt"):
        # The prompt as turns (TRL's conversational prompt-only and prompt-completion layouts), as read_split reads
        # them: the conversation to answer.
        prompt_field, answer_field = judged
        turns = prompt_completion_conversations(table, columns, prompt_field, answer_field, key, labeled=labeled)
        if turns is not None:
            return turns
    layout = task.conversation_layout(recipe, table.column_names, columns, required)
    if layout is not None:
        mapped = map_columns(table, columns, *layout_fields(layout, labeled), key=key)
        return as_messages(mapped, layout, key, labeled=labeled)
    if recipe.data.template is not None:
        table = apply_template(table, recipe.data.template, key)
    optional = task_optional if optional is None else optional
    return map_columns(table, columns, required, optional, key=key)


def load_rows(
    recipe: Recipe, task: Task, layout: EmbeddingLayout | None = None, mine: bool = False
) -> tuple[Dataset, Dataset, dict, dict[str, Origins]]:
    """(train rows, eval rows, findings for the report, where each row came from) mapped to the task's field names,
    typed, split, `data.on_overlap` applied (data.report.read_rows: what `validate` checks too); with a knowledge
    base, each question gets its retrieved passages as context, or (task retrieval, `layout`: its bi-encoder's)
    each query its relevant passages, and with `mine` its training rows their hard negatives."""
    required, optional = task.fields(recipe)
    rows, found = read_rows(recipe, required, optional, **task.reading())
    train, eval_rows = rows.train, rows.eval
    if recipe.data.knowledge_base is not None and isinstance(task, RetrievalTask):
        with placed_errors(rows.origins):
            train, eval_rows = retrieval_rows(recipe, train, eval_rows, layout, mine)
    elif recipe.data.knowledge_base is not None:
        # `finetune run` and `finetune eval RECIPE` settle an open sparse weight before their sessions; any other
        # command opening such a recipe (`finetune data`) settles it here, on the rows just read.
        recipe = settle_retrieval(recipe, train)
        retriever = build_retriever(recipe)
        extractive = task.head == "question_answering"
        with placed_errors(rows.origins):
            train = attach_passages(train, retriever, extractive=extractive, training=True, split="data.train")
            eval_rows = attach_passages(eval_rows, retriever, extractive=extractive, training=False, split="data.eval")
    return train, eval_rows, found, rows.origins


def retrieval_rows(
    recipe: Recipe, train: Dataset, eval_rows: Dataset, layout: EmbeddingLayout | None, mine: bool
) -> tuple[Dataset, Dataset]:
    """Task retrieval (and rerank): each row's relevant passages and positive; the training rows' negatives (their
    own `negative` texts first, then passages mined with the starting model: model.name_or_path as it loads,
    before any training, pooled by `layout`; for rerank, the first stage data.retrieval.model, `layout` None),
    the same number for every row."""
    base = recipe.data.knowledge_base
    assert base is not None
    passages = load_passages(base)
    train = relevant_passages(train, passages, "data.train")
    eval_rows = relevant_passages(eval_rows, passages, "data.eval")
    if mine:  # only what will train: `eval RECIPE` scores the untrained model whatever its training rows
        check_positives_differ(train, passages, recipe.data.retrieval.hard_negatives, "data.train")
        check_given_negatives(train, passages, "data.train")
    given = [_texts(value) for value in (train["negative"][:] if "negative" in train.column_names else [])]
    for number, texts in enumerate(given, start=1):
        if texts is None:
            raise DataError(f"data.train: row {number}: field 'negative' must be a text or a list of texts")
    wanted = max([recipe.data.retrieval.hard_negatives, *(len(t or []) for t in given)])
    if wanted == 0 or not mine:
        return train.add_column("negatives", [[] for _ in range(len(train))]), eval_rows
    own = given or [[] for _ in range(len(train))]
    mined: list[list[str]] = [[] for _ in range(len(train))]
    hard = [len(texts or []) for texts in own]
    if any(len(texts or []) < wanted for texts in own):
        miner = (
            recipe.model.name_or_path if layout is not None else recipe.data.retrieval.model or DEFAULT_EMBEDDING_MODEL
        )
        index = DenseIndex(passages, miner, knowledge_base_hash(base), layout)
        text_of = {p.id: p.text for p in passages}
        found, hard_found = mine_negatives(
            train["query"][:],
            train["relevant_ids"][:],
            train["positive"][:],
            index,
            passages,
            wanted,
            recipe.data.retrieval.negative_margin,
        )
        mined = [[text_of[i] for i in ids] for ids in found]
        hard = [min(wanted, len(texts or []) + n) for texts, n in zip(own, hard_found)]
    negatives = [
        ((texts or []) + [t for t in extra if t not in (texts or [])])[:wanted] for texts, extra in zip(own, mined)
    ]
    # How many of each row's negatives are its own or hard (the rest: the least similar passages); the report says.
    return train.add_column("negatives", negatives).add_column("hard_negatives", hard), eval_rows


def _texts(value: object) -> list[str] | None:
    """A row's `negative`: one text or a list of texts (None when it is neither)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


@contextmanager
def placed_errors(origins: Mapping[str, Origins]) -> Iterator[None]:
    """A task's `data.train: row N: ...` (N counting the split's rows) re-raised with the row's place in its file."""
    try:
        yield
    except DataError as exc:
        for split, where in origins.items():
            placed = where.explain(exc, split)
            if placed is not exc:
                raise placed from exc
        raise


def build_retriever(recipe: Recipe, knowledge_base: str | list[str] | None = None) -> Retriever:
    """The recipe's retriever over its knowledge base (or another one, e.g. `predict --knowledge-base`), built with
    the recipe's retrieval settings as they are: a hybrid one's open sparse weight is settled before, by
    `settle_retrieval`, never set on a built retriever. Its dense side pools as `starting_layout` says."""
    base = knowledge_base or recipe.data.knowledge_base
    if base is None:
        raise RecipeError("data.knowledge_base: this recipe answers from no knowledge base; give --knowledge-base")
    key = "--knowledge-base" if knowledge_base else "data.knowledge_base"
    passages = load_passages(base, key)
    return Retriever(passages, recipe.data.retrieval, knowledge_base_hash(base), starting_layout(recipe))


def starting_layout(recipe: Recipe) -> EmbeddingLayout | None:
    """How the dense retriever of a recipe that trains it (data.retrieval.train) pools before that training: as its
    own run will (the retriever run's model and data.retrieval.pooling, decided by `embedding_layout` as that run's
    session decides it). That run mines its hard negatives with this layout, so the sparse weight settled before it
    and the miner share one embedding of the corpus (one cache key): the corpus is embedded once with the starting
    model. None (the checkpoint's own sentence-transformers config) for a retriever that is not trained here: a
    run's recorded recipe, whose data.retrieval.model is its trained retriever, loads it so."""
    derived = retriever_recipe(recipe, Path(recipe.output.dir))
    if derived is None:
        return None
    inner = resolve_recipe(derived, "data.retrieval (the retriever's run)", splits=())
    return embedding_layout(inner.model_path, inner.family, derived.data.retrieval.pooling, "data.retrieval.pooling")


def needs_sparse_weight(recipe: Recipe) -> bool:
    settings = recipe.data.retrieval
    return (
        recipe.data.knowledge_base is not None
        and settings.method == "hybrid"
        and settings.fusion == "convex"
        and settings.sparse_weight is None
    )


def settle_retrieval(
    recipe: Recipe,
    train_rows: Dataset | None = None,
    *,
    console: Console | None = None,
    accelerator: Accelerator | None = None,
) -> Recipe:
    """The one decision of a hybrid knowledge base's open sparse weight (data.retrieval.sparse_weight null): chosen
    on the training questions with the starting retriever (`choose_sparse_weight`; before a run trains that
    retriever, which trained on these questions would rank them too well to show what BM25 adds), said on `console`
    (stderr when none is given: stdout may be a command's JSON), and returned in the recipe, from which every
    retriever is then built. RUN/recipe.yaml records it, so eval and predict of the run fuse as training did.

    Every command opening such a recipe comes here: `finetune run` before it trains the retriever, `finetune eval
    RECIPE` before its session, any other (`finetune data`) through `load_rows`, with the rows it read
    (`train_rows`; else they are read here as the session reads them). With `accelerator` (a run, perhaps of several
    processes) the main process alone reads, embeds and chooses, and the others receive its choice."""
    if not needs_sparse_weight(recipe) or recipe.data.train is None:
        return recipe
    main = accelerator is None or accelerator.is_main_process
    choice: WeightChoice | None = None
    if main:
        if train_rows is None:
            task = recipe_task(recipe)
            required, optional = task.fields(recipe)
            rows, _ = read_rows(recipe, required, optional, classify=False, conversations=task.head == "generation")
            train_rows = rows.train
        if len(train_rows):
            choice = choose_sparse_weight(build_retriever(recipe), train_rows)
    if accelerator is not None and accelerator.num_processes > 1:
        choice = broadcast_object_list([choice])[0]
    if choice is None:  # no training question to choose on: retrieval refuses the open weight, naming the key
        return recipe
    if main:
        (console or Console(stderr=True, emoji=False)).print(choice.note(), highlight=False, soft_wrap=True)
    retrieval = recipe.data.retrieval.model_copy(update={"sparse_weight": choice.weight})
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"retrieval": retrieval})})


def attention_kwargs(precision: str) -> dict[str, str]:
    """Eager attention where a CPU trains in bf16, transformers' default (SDPA) elsewhere.

    PyTorch's CPU flash-attention backward in bf16 took 43% of a MiniLM training step on this CPU (profiled);
    with eager attention the step is 1.5x faster (526 -> 352 ms at 16 x 128 tokens; in fp32 the two are equal,
    591 vs 599 ms). Measured in bench/README.md.
    """
    if not has_accelerator_device() and precision == "bf16":
        return {"attn_implementation": "eager"}
    return {}


def dropout_kwargs(dropout: float | None, config: PretrainedConfig) -> dict[str, float]:
    """`model.dropout`: every dropout probability in the base model's config set to one value (null: keep them).

    The names differ by architecture (BERT's hidden_dropout_prob, GPT-2's attn_pdrop, BART's attention_dropout),
    so they are read from the config; from_pretrained applies them before building the modules.
    """
    if dropout is None:
        return {}
    return {
        name: dropout
        for name, value in config.to_dict().items()
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name)
    }


def load_task_model(
    resolved: Resolved,
    tokenizer: PreTrainedTokenizerBase,
    state: Mapping[str, Any],
    *,
    adapter_dir: Path | None = None,
    with_lora: bool = True,
) -> tuple[PeftModel | PreTrainedModel, tuple[str, ...]]:
    """The task's model; with fresh LoRA (and the targets it wraps), or with a trained adapter from `adapter_dir`."""
    recipe, task, family = resolved.recipe, resolved.task, resolved.family
    set_seed(recipe.train.seed)  # the new head's initial weights
    # The config read when the recipe was resolved, with the task's settings (labels) and model.dropout: what
    # from_pretrained would have made of its keyword arguments, without reading config.json again.
    config = copy.deepcopy(resolved.model_config)
    dropouts = dropout_kwargs(recipe.model.dropout, config) if with_lora and adapter_dir is None else {}
    config.update({**task.model_kwargs(dict(state)), **dropouts})
    model = load_model(
        task.auto_class(family),
        resolved.model_path,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        config=config,
        new_heads=task.head_candidates,
        announce=adapter_dir is None,
        **attention_kwargs(resolved.precision),
        quantization_config=quantization_config(recipe.distributed.quantization),
    )
    task.prepare_model(model, tokenizer, family)
    task.set_loss(model, recipe, state)
    distributed = recipe.distributed
    if distributed.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=distributed.gradient_checkpointing)
    elif distributed.gradient_checkpointing and with_lora:
        # Non-reentrant checkpointing needs no input gradients, so it works with every weight frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = None if recipe.model.adapter is None else start_adapter_dir(recipe.model.adapter)
    if adapter_dir is not None:
        trained = PeftModel.from_pretrained(model, str(adapter_dir))
        if start is not None and OBJECTIVES[recipe.train.objective].needs_reference:
            # The reference policy of a run that started from an earlier adapter: that adapter, frozen beside it.
            trained.load_adapter(str(start), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return _task_module(task, trained, recipe, state), ()
    if not with_lora:
        return _task_module(task, model, recipe, state), ()
    if start is not None:  # continue from an earlier run's adapter: its weights and its LoRA settings
        peft_model = PeftModel.from_pretrained(model, str(start), is_trainable=True)
        if recipe.train.objective == "grpo" and recipe.train.grpo.beta != 0:
            # GRPO's reference is scored on fresh samples each step: the starting adapter stays loaded, frozen.
            peft_model.load_adapter(str(start), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            peft_model.set_adapter("default")
        named = getattr(peft_model.peft_config["default"], "target_modules", None) or ()
        return _task_module(task, peft_model, recipe, state), (named,) if isinstance(named, str) else tuple(
            sorted(named)
        )
    try:
        targets = resolve_targets(model, recipe.lora.targets, family)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    heads = head_modules(model, task.head_candidates)
    fresh = apply_lora(model, recipe.lora, targets, heads, task.peft_task(family))
    return _task_module(task, fresh, recipe, state), tuple(targets)


def _task_module(
    task: Task, model: PeftModel | PreTrainedModel, recipe: Recipe, state: Mapping[str, Any]
) -> PeftModel | PreTrainedModel:
    """The module the loop trains and the task predicts with: the model itself, or (task retrieval) the
    bi-encoder around it, whose forward is the ranking loss."""
    if isinstance(task, RerankTask):
        return task.scorer(model, recipe, state)  # type: ignore[return-value]
    if isinstance(task, RetrievalTask):
        return task.bi_encoder(model, recipe, state)  # type: ignore[return-value]
    return model


@dataclass(frozen=True)
class SessionData:
    """Everything about the data, without the model: what `finetune data` reports and a session trains on."""

    resolved: Resolved
    tokenizer: PreTrainedTokenizerBase
    state: Mapping[str, Any]
    features: Mapping[str, Features]
    overlap: Mapping[str, Any]  # train <-> eval duplicates (data.on_overlap), empty when no split was read
    cache_note: str = ""  # whether the features came from the feature cache

    @property
    def task(self) -> Task:
        return self.resolved.task


def open_data(
    resolved: Resolved,
    *,
    splits: tuple[str, ...] = ("train", "eval"),
    adapter_dir: Path | None = None,
    machine: bool = True,
) -> SessionData:
    """Load the tokenizer, read and tokenise the requested splits (or reuse them from the feature cache).
    No weights load. What scoring the eval rows needs is checked first (`Task.check_eval_rows`: codegen's opt-ins
    to run their tests); `machine` False where nothing is scored here (`finetune data`, `export --verify`): the
    recipe's side alone, as `validate` checks it, not this machine's (an environment variable, a sandbox)."""
    recipe, task, family, path = resolved.recipe, resolved.task, resolved.family, resolved.model_path
    tokenizer = load_tokenizer(
        path,
        family,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        config=resolved.model_config,
    )
    adapter_state = adapter_files.read_adapter_meta(adapter_dir)["state"] if adapter_dir is not None else None
    built, note = CachedData({}, {}, {}), ""
    if splits:
        cache = FeatureCache(cache_key(recipe, tokenizer, family.name, splits, adapter_state))
        built = cache.load() or _read_and_featurize(resolved, tokenizer, splits, adapter_state, cache)
        note = cache.note
        # The rules on what conversations cannot be combined with, which reading the rows applies, on a cache hit
        # too: the key leaves out settings that shape no feature (eval.watermark).
        if any("messages" in features.rows.column_names for features in built.features.values()):
            problems = conversation_problems(recipe, conversations=True)
            if problems:
                raise RecipeError("; ".join(problems))
        if "eval" in splits:  # on the evaluated rows, also when they come from the cache
            task.check_eval_rows(built.features["eval"].rows, recipe.eval, machine)
    else:
        built.state = dict(adapter_state) if adapter_state is not None else {}
    # The family travels in the task state: featurize and predict choose the decoder or encoder-decoder layout by it.
    state = MappingProxyType({**built.state, "family": family.name})
    task.check_state(recipe, state)
    resolved = replace(resolved, recipe=task.as_trained(recipe, state))
    return SessionData(
        resolved, tokenizer, state, MappingProxyType(built.features), MappingProxyType(built.overlap), note
    )


def _read_and_featurize(
    resolved: Resolved,
    tokenizer: PreTrainedTokenizerBase,
    splits: tuple[str, ...],
    adapter_state: dict | None,
    cache: FeatureCache,
) -> CachedData:
    recipe, task, family = resolved.recipe, resolved.task, resolved.family
    layout = None
    if isinstance(task, RerankTask):  # its negatives come from the first stage, as its own config pools it
        layout = None
    elif isinstance(task, RetrievalTask):  # the bi-encoder's pooling: the trained adapter's, else decided here
        layout = (
            layout_of(adapter_state)
            if adapter_state is not None
            else embedding_layout(resolved.model_path, family, recipe.data.retrieval.pooling, "data.retrieval.pooling")
        )
    train_rows, eval_rows, overlap, origins = load_rows(recipe, task, layout, mine="train" in splits)
    with placed_errors(origins):
        if "eval" in splits:
            task.check_scorable(eval_rows, "data.eval")
            unreported = pair_metrics_problems(recipe, eval_rows)
            if unreported:
                raise RecipeError("; ".join(unreported))
        state = dict(adapter_state) if adapter_state is not None else task.fit_state(train_rows, recipe, tokenizer)
    if layout is not None:
        state["embedding"] = layout.as_dict()
    recipe = task.as_trained(recipe, state)
    workdir = cache.workdir()
    try:
        # The rows go to disk first and are read back memory-mapped: the parsed copies are freed before tokenising,
        # and worker processes read the rows from the file instead of receiving pickled copies.
        rows = {
            split: split_rows.flatten_indices(
                cache_file_name=str(workdir / f"{split}-rows.arrow"), keep_in_memory=False
            )
            for split, split_rows in (("train", train_rows), ("eval", eval_rows))
            if split in splits
        }
        del train_rows, eval_rows
        pa.default_memory_pool().release_unused()
        with placed_errors(origins):
            features = {
                split: task.featurize(
                    rows[split], tokenizer, recipe, {**state, "family": family.name}, f"data.{split}", workdir=workdir
                )
                for split in splits
            }
        if "train" in features and "eval" in features:
            features["eval"].report.notes.extend(_asked_unlike_training(task, resolved.recipe, recipe, features))
        return cache.publish(workdir, CachedData(features, state, overlap))
    except BaseException:  # a bad row, a full disk, Ctrl-C: nothing half-built stays in the cache
        cache.discard(workdir)
        raise


def _asked_unlike_training(task: Task, written: Recipe, recipe: Recipe, features: Mapping[str, Features]) -> list[str]:
    """A note where the eval prompts are asked otherwise than the recipe as written says (`recipe`: as
    `Task.as_trained` made it), or otherwise than the training ones: conversations through the chat template, text
    prompts without it (data.format auto decides each file's layout by its columns)."""
    if not isinstance(task, GenerationTask):
        return []
    train, held = (task.asked_in_chat(recipe.data, features[split].rows) for split in ("train", "eval"))
    if train and held and not task.asked_in_chat(written.data, features["eval"].rows):
        return [
            "data.eval: its text prompts are asked as user turns through the chat template, as data.train's "
            "conversations were (the model learnt to answer after it)"
        ]
    if train == held:
        return []
    return [
        "data.eval: its conversations are asked through the chat template, while data.train's text prompts were not: "
        "the scores are of prompts unlike training's (write both alike)"
    ]


def open_session(
    resolved: Resolved,
    *,
    splits: tuple[str, ...] = ("train", "eval"),
    adapter_dir: Path | None = None,
    with_lora: bool = True,
) -> Session:
    """Read and tokenise the requested splits, load the model. One call, a complete session.

    With `adapter_dir`, the task state (label order, prompt layout) and the weights come from a trained adapter.
    """
    data = open_data(resolved, splits=splits, adapter_dir=adapter_dir)
    model, targets = load_task_model(resolved, data.tokenizer, data.state, adapter_dir=adapter_dir, with_lora=with_lora)
    attach_learned_watermark(resolved.recipe, model, adapter_dir, training=with_lora and adapter_dir is None)
    # data.resolved: the recipe as the rows and the task state decided it (Task.as_trained)
    return Session(
        data.resolved, data.tokenizer, data.state, model, data.features, targets, data.overlap, data.cache_note
    )


def attach_learned_watermark(
    recipe: Recipe, model: PeftModel | PreTrainedModel, adapter_dir: Path | None, training: bool
) -> None:
    """eval.watermark.method learned: fresh blocks and extractor to train (after the LoRA, from the run's seed), or
    the trained ones from the adapter, marking every generation with the run's message (the recipe's or the
    command line's, else the adapter's). `eval.watermark=null` loads none: the same adapter, unmarked."""
    mark = recipe.eval.watermark
    if mark is None or not learned.is_learned(mark):
        return
    if training:
        learned.fresh(model, mark, learned.run_message(mark))
    elif adapter_dir is not None:
        learned.load(model, adapter_dir, mark, learned.run_message(mark, adapter_dir))
    else:
        raise RecipeError(
            "eval.watermark.method: a learned watermark is trained with a run; evaluate the run directory, or "
            "remove eval.watermark to evaluate the base model"
        )


def training_collator(session: Session):
    """The task's padding collator, or one-row packing (train.packing; validation allows it only where it applies)."""
    if session.recipe.train.learns_from_judgements:
        return PreferenceCollator(session.tokenizer)
    if session.recipe.train.objective == "grpo":
        return PromptCollator(session.tokenizer)
    if session.recipe.train.packing:
        return PackedCollator()
    return session.task.collate(session.tokenizer, session.recipe.data.max_length)


# Generation is slow: evaluations during training score this many rows unless eval.during_max_samples says otherwise.
GENERATION_DURING_ROWS = 64


def during_rows(session: Session) -> int | None:
    """How many eval rows an evaluation during training scores (None: all)."""
    settings = session.recipe.eval
    if settings.during_max_samples is not None:
        return settings.during_max_samples
    if not generates_during(session):
        return None
    return GENERATION_DURING_ROWS if isinstance(session.task, GenerationTask) else None


def generates_during(session: Session) -> bool:
    """Whether evaluations during training generate. A preference objective whose best metric is a judgement
    (preference_accuracy, eval_loss, ...) judges every eval row and generates nothing: generation is what makes
    evaluation slow."""
    if not session.recipe.train.learns_from_judgements:
        return True
    metric = session.resolved.best_metric
    return not (metric in PREFERENCE_METRICS or metric == "eval_loss")


def changes_base_weights(recipe: Recipe) -> bool:
    """PiSSA/OLoRA move the base's principal part into the adapter; the saved adapter must be converted back."""
    return recipe.lora.init in BASE_CHANGING_INITS
