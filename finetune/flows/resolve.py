"""Every rule a recipe must meet, in one place.

`finetune validate` and `finetune run` (before any weights load) both call
`check_recipe`, so validate refuses exactly what run refuses. Rules come in two
layers, both gathered here and reported together:

- the recipe alone (`recipe_rules`): the schema (finetune.recipe.schema), the task's
  fields and metrics, task x forced family, packing, templates, eval sources;
- the recipe against this machine (`environment_rules`): the model reference
  and its config (family, position limit), data files, optional packages and
  devices (trackers, QLoRA, sharded strategies).

A problem about data files alone is a data error (exit 3); any other is a recipe
error (exit 2).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import logging
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from transformers import PretrainedConfig

from finetune.data.conversations import conversation_fields, encoder_decoder_problem
from finetune.data.report import read_rows
from finetune.data.retrieval import (
    DEFAULT_EMBEDDING_MODEL,
    check_answers_held,
    check_given_negatives,
    check_positives_differ,
    check_questions,
    load_passages,
    relevant_passages,
)
from finetune.data.tables import (
    FILE_SUFFIXES,
    HUB_DATASET,
    file_hashes,
    label_key,
    local_data_path,
    missing_file,
    read_split,
    template_problems,
)
from finetune.errors import DataError, FinetuneError, RecipeError, brief, did_you_mean
from finetune.evaluation.compare import NOT_A_QUALITY
from finetune.evaluation.intervals import NO_INTERVAL, UNBOUNDED_METRICS
from finetune.evaluation.scoring import guards_nothing
from finetune.files import read_json_input, sha256_file
from finetune.models.embedding import embedding_layout, is_embedding_checkpoint
from finetune.models.families import (
    FAMILIES,
    PACKING_MODEL_TYPES,
    PADDING_OFFSET_POSITIONS,
    FamilySpec,
    family_of_config,
    head_problem,
)
from finetune.models.lora import resolve_targets
from finetune.models.references import (
    config_without_weights,
    detect_family,
    load_config,
    load_tokenizer,
    package_path,
    resolve_reference,
)
from finetune.outputs import rundir
from finetune.outputs.adapter import WEIGHTS_FILE
from finetune.outputs.lock import RunLock
from finetune.outputs.manifest import read_manifest
from finetune.outputs.rundir import ADAPTER_META, RunDir
from finetune.recipe.gates import Gate, parse_gate
from finetune.recipe.schema import (
    MIN_LENGTH,
    EvalSection,
    PreferenceSection,
    Recipe,
    RetrievalSection,
    SweepRange,
    SweepSection,
    apply_overrides,
    distinct_overrides,
    read_recipe_file,
    recipe_problems_error,
    same_setting,
    training_only,
    training_only_overrides,
    within,
)
from finetune.recipe.schema import build_recipe as parse_recipe
from finetune.secrets import register_secret
from finetune.tasks import TASKS, Task, recipe_task, sandbox
from finetune.tasks.base import named_metrics
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.conversations import ConversationEncoder, check_evaluation_conversation
from finetune.tasks.generative import GenerationTask
from finetune.tasks.preference import check_rollout_rows, judged_rows, kto_rows, pair_metrics_problems
from finetune.tasks.qa import ExtractiveQATask, checked_answers
from finetune.tasks.retrieval import RetrievalTask
from finetune.tasks.rewards import FUNCTION_RUNS, load_reward_function
from finetune.tasks.text2text import no_chat_template
from finetune.training.loop import resolve_precision
from finetune.training.trackers import missing_trackers
from finetune.watermark import learned
from finetune.watermark import marking as watermark

log = logging.getLogger("finetune")

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class Problem:
    text: str
    data: bool = False  # a missing or unreadable data file (exit 3) rather than a recipe mistake (exit 2)


@dataclass(frozen=True)
class CheckedRecipe:
    """What validation learnt on the way: the family where it could be read without weights."""

    recipe: Recipe
    family: FamilySpec | None
    family_note: str

    def summary(self) -> str:
        return f"{self.recipe.task} on {self.recipe.model.name_or_path} ({self.family_note})"


# The data splits a training run reads; evaluation reads ("eval",), predict and export none.
SPLITS = ("train", "eval")

# --------------------------------------------------------------------------- the recipe alone


def recipe_rules(recipe: Recipe, recorded: bool = False) -> list[str]:
    """Rules that need nothing but the recipe. `recorded`: not a recipe a user is about to train as written (a
    finished run's recipe.yaml, read by eval, predict, merge or export; a sweep's trial): `advisory_rules` are
    left out (a run finished before a rule existed stays usable; a trial's value decides what else is read, which
    the sweep's recipe was judged with). A recipe with a sweep section leaves them out for the same reason."""
    task = recipe_task(recipe)
    problems = list(task.check_recipe(recipe))
    if recipe.mode is not None and recipe.task != "qa":
        problems.append(f"mode: only task qa has modes (extractive, generative); remove it for task {recipe.task}")
    if recipe.model.family != "auto":
        problems += family_rules(task, FAMILIES[recipe.model.family], recipe, place="model.family")
    if recipe.lora.init in ("pissa", "olora") and recipe.lora.use_dora:
        problems.append(
            f"lora.init: {recipe.lora.init} with lora.use_dora cannot be saved as an adapter for the "
            "unchanged base; use one or the other"
        )
    return (
        problems
        + _data_rules(recipe, task)
        + _generation_rules(recipe, task)
        + _evaluation_rules(recipe, task)
        + _objective_rules(recipe, task)
        + ([] if recorded or recipe.sweep is not None else advisory_rules(recipe, task))
        + (_sweep_objective_problems(recipe, task) if recipe.sweep is not None and not recorded else [])
    )


def advisory_rules(recipe: Recipe, task: Task) -> list[str]:
    """Settings nothing in the recipe reads, and metrics its evaluation never reports: refused, never ignored."""
    return _unread_settings(recipe, task) + _unread_objective_settings(recipe) + _unavailable_metrics(recipe, task)


def best_metric_of(recipe: Recipe, task: Task) -> str:
    """The metric that decides "better" (eval.best_metric): the recipe's, else the objective's or the task's."""
    if recipe.eval.best_metric:
        return recipe.eval.best_metric
    if recipe.train.learns_from_judgements:
        return "preference_accuracy"
    return task.main_metric(recipe.eval)


def _unavailable_metrics(recipe: Recipe, task: Task) -> list[str]:
    """Metrics the recipe names, or judges by without naming them (best_metric's default under eval.every or early
    stopping, a sweep's objective), that its evaluation never reports: a gate would fail as "missing" after
    training, and a metric judged by but filtered out of eval.metrics made every evaluation "no better" (early
    stopping ended the run, silently) or every trial unscored."""
    unavailable = task.unavailable_metrics(recipe)
    problems = [
        f"{place}: {metric} {unavailable[metric]}"
        for place, metric in named_metrics(recipe.eval)
        if task.knows_metric(metric) and metric in unavailable
    ]
    judged = []
    if recipe.eval.best_metric is None and (recipe.eval.every is not None or recipe.train.early_stopping is not None):
        place = "eval.best_metric (its default, which evaluations during training are judged by)"
        judged.append((place, best_metric_of(recipe, task)))
    return problems + _filtered_out(recipe, task, judged)


def _sweep_objective_problems(recipe: Recipe, task: Task) -> list[str]:
    """A sweep's objective metric must be one its trials report (every trial was unscored otherwise). Checked on
    the sweep's recipe, whose other advisory rules are left to its trials."""
    assert recipe.sweep is not None
    names = recipe.sweep.objective
    return _filtered_out(recipe, task, [("sweep.objective", names[0] if names else best_metric_of(recipe, task))])


def _filtered_out(recipe: Recipe, task: Task, judged: list[tuple[str, str]]) -> list[str]:
    """Metrics judged by (place, metric) that the evaluation never reports, as `Task.unavailable_metrics` decides
    for metrics asked by name (eval.metrics leaving one out, say)."""
    unavailable = task.unavailable_metrics(recipe, [metric for _, metric in judged])
    return [
        f"{place}: {metric} {unavailable[metric]}"
        for place, metric in judged
        if task.knows_metric(metric) and metric in unavailable
    ]


def _unread_settings(recipe: Recipe, task: Task) -> list[str]:
    """Settings only some recipes read, changed from their defaults in a recipe that does not: refused, never
    ignored (`eval.temperature` on classification, `data.retrieval` without a knowledge base). Compared with the
    defaults, because a run's recipe.yaml writes every setting out."""
    generates = isinstance(task, GenerationTask)
    function = recipe.train.objective == "grpo" and bool(recipe.train.grpo.reward.function)
    runs_code = task.name == "codegen" or function
    retrieves = recipe.data.knowledge_base is not None or isinstance(task, RetrievalTask)
    readers: dict[str, tuple[str, bool]] = {
        **dict.fromkeys(
            ("eval.max_new_tokens", "eval.temperature", "eval.top_p", "eval.num_samples", "eval.stop"),
            ("the generation tasks (copywriting, codegen, qa mode generative)", generates),
        ),
        "eval.pass_k": ("task codegen", task.name == "codegen"),
        **dict.fromkeys(
            ("eval.execute_code", "eval.sandbox", "eval.timeout_s", "eval.memory_mb"),
            ("task codegen and a GRPO reward function (train.grpo.reward.function)", runs_code),
        ),
        **dict.fromkeys(
            ("eval.n_best", "eval.max_answer_length", "data.doc_stride"),
            ("task qa mode extractive", isinstance(task, ExtractiveQATask)),
        ),
        "eval.during_max_samples": ("evaluations during training (eval.every)", recipe.eval.every is not None),
        "data.retrieval": ("a knowledge base (data.knowledge_base) or task retrieval or rerank", retrieves),
    }
    if retrieves:  # then each of its settings by what reads it
        readers.update(_retrieval_readers(recipe, task))
    problems = []
    for key, (who, read) in readers.items():
        section, name = key.rsplit(".", 1)
        if not read and attrgetter(section)(recipe).changed(name):
            problems.append(f"{key}: read only by {who}, not by this recipe (remove it)")
    return problems


def _retrieval_readers(recipe: Recipe, task: Task) -> dict[str, tuple[str, bool]]:
    """Who reads each data.retrieval setting: a knowledge base's reader, its retriever's training, task retrieval
    or rerank."""
    kb = task.name == "qa" and recipe.data.knowledge_base is not None
    method = recipe.data.retrieval.method
    trained = trains_retriever(recipe)  # a knowledge base's retriever, trained by this recipe first
    bi_encoder = isinstance(task, RetrievalTask) or trained
    return {
        f"data.retrieval.{key}": value
        for key, value in {
            "method": ("knowledge-base qa", kb),
            "answer_from": ("knowledge-base qa", kb),
            "fusion": ("knowledge-base qa with method hybrid", kb and method == "hybrid"),
            "top_k": ("knowledge-base qa and task retrieval or rerank", kb or isinstance(task, RetrievalTask)),
            "model": ("a dense or hybrid knowledge base, or task rerank (its first stage)", (kb and method != "bm25")
                      or task.name == "rerank"),
            "candidates": ("task rerank", task.name == "rerank"),
            "pooling": ("a dense model's embeddings", (kb and method != "bm25") or isinstance(task, RetrievalTask)),
            **dict.fromkeys(
                RETRIEVER_TRAINING[:4],
                ("the training of a retriever (task retrieval or rerank, or a knowledge base's)", bi_encoder),
            ),
            **dict.fromkeys(
                RETRIEVER_TRAINING[4:],
                ("a knowledge base's retriever training (task retrieval takes train.*)", trained),
            ),
        }.items()
    }  # fmt: skip


def _room_fix(key: str, new_tokens: int, max_length: int, limit: int) -> str:
    """The settings that fit a prompt and its new tokens into `limit` positions: fewer new tokens where the prompt
    leaves room for one at least, a shorter prompt where the new tokens leave room for one."""
    fixes = [f"{key} <= {limit - max_length}"] if limit - max_length >= 1 else []
    if limit - new_tokens >= MIN_LENGTH:
        fixes.append(f"data.max_length <= {limit - new_tokens}")
    return " or ".join(fixes) or f"{key} and data.max_length that add up to at most {limit}"


def runs_code(recipe: Recipe) -> str | None:
    """What in a run of this recipe executes code in the sandbox (said in the refusal when an opt-in is missing),
    or None. `run` checks both opt-ins before it writes anything; `validate` checks the recipe's own one alone (the
    environment variable belongs to the machine that runs it)."""
    if recipe.train.objective == "grpo" and recipe.train.grpo.reward.function:
        return FUNCTION_RUNS
    if recipe.task == "codegen" and recipe.train.objective == "grpo":  # its rewards run each sample's tests
        return "codegen: scoring runs generated code"
    return None  # codegen's evaluation runs code only where its rows hold tests: checked as they are read


def _reward_function_problems(recipe: Recipe) -> list[str]:
    """train.grpo.reward.function: found and defined (read, never imported), and allowed to run (it runs in the
    code sandbox, so the recipe's opt-in is needed as for generated code)."""
    problems = []
    try:
        load_reward_function(recipe.train.grpo.reward.function or "")
    except RecipeError as exc:
        problems.append(str(exc))
    if not recipe.eval.execute_code:
        problems.append(
            "train.grpo.reward.function: your reward function runs in the code sandbox, which needs "
            "eval.execute_code: true (and FINETUNE_ALLOW_CODE_EXECUTION=1 in the environment)"
        )
    return problems


def _objective_rules(recipe: Recipe, task: Task) -> list[str]:
    """train.objective: preference objectives train generation tasks on pairs or thumbs; model.adapter exists."""
    objective, problems = recipe.train.objective, []
    if objective != "sft":
        if task.head != "generation":
            problems.append(
                f"train.objective: {objective} trains a generation task (copywriting, codegen, qa mode generative) "
                f"on judged or scored answers; task {task.name}{f' mode {recipe.mode}' if recipe.mode else ''} "
                "has no completions to judge (use sft)"
            )
        if recipe.train.packing:
            problems.append(f"train.packing: packing applies to sft only; remove it for train.objective {objective}")
        if objective == "kto" and recipe.train.batch_size < 2:
            problems.append("train.batch_size: kto needs at least 2 rows per batch (its KL baseline is a batch mean)")
        if objective == "grpo" and recipe.distributed.strategy in ("fsdp", "deepspeed"):
            problems.append(
                f"distributed.strategy: grpo generates with the whole model on each process; {recipe.distributed.strategy} "
                "shards it (use ddp)"
            )
        if objective == "grpo" and recipe.train.grpo.reward.function:
            problems += _reward_function_problems(recipe)
        if objective == "grpo" and task.name == "codegen" and not recipe.eval.execute_code:
            problems.append(
                "train.objective: grpo on codegen rewards the share of a problem's tests its samples pass, which "
                "runs generated code: set eval.execute_code: true (the sandbox and its limits apply)"
            )
    if recipe.model.adapter is not None:
        try:
            problems += _start_adapter_problems(recipe, start_adapter_dir(recipe.model.adapter))
        except RecipeError as exc:
            problems.append(str(exc))
    return problems


# GRPO's optional reward terms: each weight and the setting that makes its term.
_REWARD_TERMS = (("length_weight", "length_target"), ("pattern_weight", "pattern"), ("function_weight", "function"))


def _unread_objective_settings(recipe: Recipe) -> list[str]:
    """Settings of another objective than the recipe's, changed from their defaults: refused, never ignored (a
    recipe turned to sft by `train.objective=sft` keeps its grpo section). Compared with the defaults, not with
    what was written, because a run's recipe.yaml writes every section out."""
    train = recipe.train
    objective, problems = train.objective, []
    changed = sorted(train.grpo.changed())
    if objective != "grpo" and changed:
        problems.append(
            f"train.grpo: {', '.join(changed)} set, but only train.objective grpo reads train.grpo and this recipe's "
            f"is {objective} (remove the section, or set train.objective: grpo)"
        )
    for name, readers in PreferenceSection.OBJECTIVE_KEYS.items():
        if objective not in readers and train.preference.changed(name):
            problems.append(
                f"train.preference.{name}: only train.objective {' / '.join(readers)} reads it; this recipe's is "
                f"{objective} (remove it)"
            )
    if train.optimizer != "loraplus" and train.changed("loraplus_lr_ratio"):
        problems.append(
            "train.loraplus_lr_ratio: read only by train.optimizer: loraplus (set train.optimizer: loraplus, or "
            "remove the ratio)"
        )
    reward = train.grpo.reward
    if objective == "grpo":
        for weight, term in _REWARD_TERMS:
            if getattr(reward, term) is None and reward.changed(weight):
                problems.append(f"train.grpo.reward.{weight}: weighs no term without train.grpo.reward.{term}")
        terms = [reward.task, *(getattr(reward, w) for w, t in _REWARD_TERMS if getattr(reward, t) is not None)]
        if not any(terms):
            problems.append(
                "train.grpo.reward: every term weighs 0, so every reward would be 0 and nothing could be learned"
            )
    if objective == "dpo" and train.preference.loss != "robust" and train.preference.label_smoothing:
        problems.append(
            f"train.preference.label_smoothing: only DPO's robust loss reads it (the {train.preference.loss} loss, "
            "as TRL's, does not); set train.preference.loss: robust, or remove it"
        )
    return problems


def _start_adapter_problems(recipe: Recipe, directory: Path) -> list[str]:
    """A starting adapter must be one finetune trained for this task on this base model."""

    problems = []
    if recipe.lora.init != "default":
        problems.append(
            f"lora.init: {recipe.lora.init} initialises fresh LoRA; with model.adapter training continues from that "
            "adapter (remove lora.init)"
        )
    return problems + adapter_problems(recipe, directory, "model.adapter")


def adapter_problems(recipe: Recipe, directory: Path, key: str) -> list[str]:
    """An adapter used with a recipe (`model.adapter`, `eval --checkpoint`) must be one finetune trained for the
    recipe's task on its base model: another's loads into the wrong layers or scores with the wrong head."""
    meta_path = directory / ADAPTER_META
    if not meta_path.is_file():
        return [f"{key}: {directory} was not trained by finetune ({ADAPTER_META} missing)"]
    meta = read_json_input(meta_path)  # a damaged one is exit 3, named, as read_adapter_meta says
    problems = []
    if meta.get("task") != recipe.task:
        problems.append(f"{key}: {directory} was trained for task {meta.get('task')}, not {recipe.task}")
    if meta.get("base_model") not in (None, recipe.model.name_or_path) and not _same_architecture(directory, recipe):
        problems.append(
            f"{key}: {directory} was trained on {meta.get('base_model')}, not on model.name_or_path "
            f"{recipe.model.name_or_path}"
        )
    return problems


# What makes an adapter load into a base model as trained: the architecture and its sizes.
_ARCHITECTURE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    "d_model", "encoder_layers", "decoder_layers", "n_embd", "n_layer", "n_head",
)  # fmt: skip


def _same_architecture(directory: Path, recipe: Recipe) -> bool:
    """Whether the recipe's model is the one the adapter was trained on under another reference (a base model moved
    or copied elsewhere): its config's architecture and sizes equal those the adapter recorded in base/config.json.
    Without that record (the base was a hub model not on disk when it trained), the reference must match."""
    recorded = directory / "base" / "config.json"
    if not recorded.is_file():
        return False
    try:
        trained_on = read_json_input(recorded)
        found = config_without_weights(recipe.model.name_or_path, recipe.model.revision)
    except (OSError, ValueError, FinetuneError):  # an unreadable record or model: the references must match
        return False
    config = found.to_dict() if found is not None else None
    same = config is not None and all(trained_on.get(k) == config.get(k) for k in _ARCHITECTURE_KEYS)
    if same:  # said: a same-sized model that is not the one trained on would load as well
        log.warning(
            "%s was trained on another reference of the base model; %s, of the same architecture and sizes, is used",
            directory,
            recipe.model.name_or_path,
        )
    return same


def start_adapter_dir(reference: str) -> Path:
    """`model.adapter`: a run directory (its adapter/) or an adapter directory, holding a peft adapter."""
    path = Path(reference).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    if (path / "adapter_config.json").is_file():
        return path
    what = "not found" if not path.exists() else "no peft adapter here (adapter_config.json missing)"
    raise RecipeError(f"model.adapter: {reference}: {what}; name a finished run or its adapter/ directory")


def start_adapter_hash(reference: str) -> str | None:
    """sha256 of the weights of the adapter `model.adapter` names (None where it has none yet)."""
    weights = start_adapter_dir(reference) / WEIGHTS_FILE
    return sha256_file(weights) if weights.is_file() else None


def _data_rules(recipe: Recipe, task: Task) -> list[str]:
    data, problems = recipe.data, []
    if data.eval is None and data.eval_split is None:
        problems.append("data: give an eval file (data.eval) or a held-out fraction (data.eval_split)")
    if data.eval is not None and data.eval_split is not None:
        problems.append("data: data.eval and data.eval_split are exclusive; give one (data.eval=null to split)")
    for key, files, what in (
        ("data.train", data.train, "training files"),
        ("data.eval", data.eval, "eval files (null: none, with data.eval_split)"),
        ("data.knowledge_base", data.knowledge_base, "knowledge-base files"),
    ):
        if isinstance(files, list) and not files:
            problems.append(f"{key}: the list of {what} is empty")
    mapped = list(data.columns.values())
    for column in sorted({c for c in mapped if mapped.count(c) > 1}):
        fields = [f for f, c in data.columns.items() if c == column]
        problems.append(
            f"data.columns: {', '.join(fields)} all map to column {column!r}; each field needs its own column"
        )
    if data.labels is not None:
        keys = [label_key(label) for label in data.labels]  # as classes compare: "café" twice, spelt two ways
        for repeated in sorted({k for k in keys if keys.count(k) > 1}):
            spellings = [label for label in data.labels if label_key(label) == repeated]
            problems.append(
                f"data.labels: {repeated!r} listed more than once"
                + (f" (as {', '.join(map(repr, spellings))})" if len(set(map(str, spellings))) > 1 else "")
            )
        if recipe.task != "classification":
            problems.append(f"data.labels: only classification has labels; remove it for task {recipe.task}")
    if recipe.task != "classification":  # classification's settings, at other than their defaults
        changed = [
            *(f"data.{n}" for n in data.changed("multi_label", "label_separator")),
            *(f"train.{n}" for n in recipe.train.changed("class_weights")),
            *(f"eval.{n}" for n in recipe.eval.changed("threshold")),
        ]
        for place in changed:
            problems.append(f"{place}: a classification setting; remove it for task {recipe.task}")
    if data.template is not None:
        problems += template_problems(data.template)
    stratify = data.stratify
    if stratify is not None and data.eval is not None:
        problems.append("data.stratify: decides how data.eval_split is drawn; with an eval file (data.eval) remove it")
    if stratify and recipe.task != "classification":
        problems.append(f"data.stratify: only classification is stratified (by label); remove it for {recipe.task}")
    if data.knowledge_base is not None and recipe.task not in ("qa", "retrieval", "rerank"):
        problems.append(
            "data.knowledge_base: only task qa answers from a knowledge base (and tasks retrieval and rerank search "
            f"one); remove it for {recipe.task}"
        )
    settings = data.retrieval
    if settings.sparse_weight is not None and (settings.method != "hybrid" or settings.fusion != "convex"):
        problems.append(
            f"data.retrieval.sparse_weight: BM25's share of a convex fusion; method is {settings.method}"
            + (f" and fusion {settings.fusion}" if settings.method == "hybrid" else "")
            + " (use method hybrid with fusion convex, or remove it)"
        )
    if settings.answer_from != "first" and not (
        recipe.task == "qa" and recipe.mode != "generative" and data.knowledge_base is not None
    ):
        problems.append(
            "data.retrieval.answer_from: where an extractive reader's span may lie among retrieved passages; it "
            "applies to task qa, mode extractive, with data.knowledge_base (remove it)"
        )
    if recipe.task == "qa":
        problems += _retriever_training_rules(recipe)
    return problems


# The second objectives a sweep may minimise beside its metric (sweep.objective).
COSTS = ("train_seconds", "trainable_params")
# Settings a trial may not vary: where it writes is the sweep's decision, and a trial has no sweep of its own.
FIXED_SECTIONS = ("output", "sweep")


def yaml_text(value: Any) -> str:
    """`value` as YAML text that `apply_overrides` reads back as the same value: a float keeps its dot (`1.0e-05`;
    YAML reads `1e-05` as a string), a string that YAML would read as something else is quoted."""
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 20).strip()[1:-1]


def _members(annotation: Any) -> list[Any]:
    """The types a field's annotation accepts, with unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _field_annotation(key: str) -> Any:
    """The annotation of the recipe setting at a dotted key (None when there is no such setting)."""
    model: type[BaseModel] | None = Recipe
    annotation = None
    for part in key.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        model = next((m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return annotation


def whole_numbers(key: str) -> bool:
    """Whether the schema takes only whole numbers at `key` (lora.r, train.batch_size): its range is sampled as
    integers. A float setting (train.epochs, train.lr) is sampled continuously unless its range has a step."""
    members = [m for m in _members(_field_annotation(key)) if get_origin(m) is not Literal]
    return int in members and float not in members


def sweep_rules(recipe: Recipe, task: Task) -> list[str]:
    """Problems of the recipe's sweep section, each at its place: the objective; each swept key and every
    value it can take (its choices, a range's ends) tried in the recipe through the schema and the recipe rules,
    so that no trial is refused hours into a sweep."""
    settings = recipe.sweep
    if settings is None:
        return []
    problems = _objective_problems(settings, task)
    if not settings.params:
        problems.append(
            "sweep.params: name at least one setting to vary, e.g. train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}"
        )
    processes = recipe.distributed.num_processes
    if isinstance(processes, int) and processes > 1:
        problems.append(
            f"distributed.num_processes: {processes}: a sweep runs each trial in this one process; use 1 (or auto)"
        )
    nodes = recipe.distributed.nnodes
    if isinstance(nodes, int) and nodes > 1:
        problems.append(f"distributed.nnodes: {nodes}: a sweep runs each trial on this one machine; use 1 (or auto)")
    base = recipe.model_dump(mode="json", exclude={"sweep"})
    for key, spec in settings.params.items():
        place = f"sweep.params.{key}"
        if key.split(".")[0] in FIXED_SECTIONS:
            problems.append(f"{place}: a trial writes to the sweep's output.dir/trials/N and has no sweep of its own")
            continue
        if key in ("task", "mode"):  # another task reads other columns and reports other metrics
            problems.append(
                f"{place}: a sweep compares settings of one task on its data and metric; sweep each task in a "
                "sweep of its own"
            )
            continue
        if isinstance(spec, SweepRange):
            found = _range_problems(key, spec, settings.sampler, place)
            problems += found
            if found:
                continue
        found = list(dict.fromkeys(p for value in _candidates(key, spec) for p in _value_problems(base, key, value)))
        problems += [f"{place}: {problem}" for problem in found]
        if not found:
            others = {k: _candidates(k, v) for k, v in settings.params.items() if k != key}
            problems += [f"{place}: {p}" for p in _unread_swept_key(base, key, _candidates(key, spec), others)]
    return problems


def _unread_swept_key(base: dict, key: str, values: list[Any], others: dict[str, list[Any]]) -> list[str]:
    """The rule on settings nothing reads (`advisory_rules`), for a swept key: unread under every value it can take,
    whatever the other swept keys take (train.preference.beta swept in an sft recipe: every trial trains the same
    model; beside a swept train.objective it is read by the dpo trials). A sweep's recipe leaves the rule out for
    its other settings, since swept values decide which of them are read."""
    parts = key.split(".")
    prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    default = _default_of(base, key)
    combinations = list(itertools.islice(itertools.product(*others.values()), SWEEP_READ_CHECKS + 1))
    if len(combinations) > SWEEP_READ_CHECKS:  # too many to try: left to the trials, as before
        return []
    said: list[str] = []
    for value in values:
        if value == default:  # unread or not, a default is never flagged: it says nothing either way
            continue
        for combination in combinations:
            settings = [f"{k}={yaml_text(v)}" for k, v in zip(others, combination)] + [f"{key}={yaml_text(value)}"]
            try:
                trial = build_recipe(apply_overrides(copy.deepcopy(base), settings), "sweep", recorded=True)
            except RecipeError:  # a combination no trial runs (each value's own problems are said above)
                continue
            # The rules on settings nothing reads, about the key or a section holding it ("data.retrieval: read
            # only by a knowledge base"; not the metrics rules: a best_metric never reported is read, not unread).
            about = [
                p
                for p in _unread_settings(trial, recipe_task(trial)) + _unread_objective_settings(trial)
                if any(p.startswith(f"{prefix}:") for prefix in prefixes)
            ]
            if not about:
                return []
            said = said or about
    return [f"no trial reads it: {said[0]}"] if said else []


# At most this many combinations of the other swept keys' values are tried to see whether a swept key is read.
SWEEP_READ_CHECKS = 64


def _default_of(base: dict, key: str) -> Any:
    """The value `key` (section.name...) takes in the recipe `base` when it is not written."""
    trimmed = copy.deepcopy(base)
    *parents, leaf = key.split(".")
    holder: Any = trimmed
    for part in parents:
        holder = holder.get(part) if isinstance(holder, dict) else None
    if isinstance(holder, dict):
        holder.pop(leaf, None)
    value: Any = build_recipe(trimmed, "sweep", recorded=True)
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def _candidates(key: str, spec: SweepRange | list) -> list[Any]:
    """The values of a swept key that stand for all it can take: its choices, or a range's ends."""
    if isinstance(spec, SweepRange):
        return [int(spec.low), int(spec.high)] if whole_numbers(key) else [spec.low, spec.high]
    return list(spec)


def _candidate_environment_rules(recipe: Recipe, found: list[Problem], splits: tuple[str, ...]) -> list[Problem]:
    """Each swept value tried in the recipe against this machine and the model (`environment_rules`: positions,
    hidden size, family, files), as a plain recipe with that value is, so that `validate` and the sweep's start
    refuse a value no trial could run. `found`: the recipe's own problems here, not repeated for each value."""
    settings = recipe.sweep
    if settings is None:
        return []
    base = recipe.model_dump(mode="json", exclude={"sweep"})
    seen = {problem.text for problem in found}
    problems: list[Problem] = []
    for key, spec in settings.params.items():
        for value in _candidates(key, spec):
            trial = build_recipe(
                apply_overrides(copy.deepcopy(base), [f"{key}={yaml_text(value)}"]), "sweep", recorded=True
            )
            config, config_problem = read_model_config(trial)
            for problem in environment_rules(trial, config, config_problem, splits)[0]:
                own = problem.text.startswith(f"{key}: ")  # the key's own rule names the value already
                text = (
                    f"sweep.params.{problem.text}" if own else f"sweep.params.{key}: {yaml_text(value)}: {problem.text}"
                )
                if problem.text not in seen and text not in {p.text for p in problems}:
                    problems.append(Problem(text, problem.data))
    return problems


def _objective_problems(settings: SweepSection, task: Task) -> list[str]:
    names = settings.objective
    problems = []
    if names:
        metric = names[0]
        if metric in COSTS:
            problems.append(
                f"sweep.objective: {metric} is a cost; the first objective is the metric to improve, the cost second "
                f"(e.g. [{task.metric_names[0]}, {metric}])"
            )
        elif not task.knows_metric(metric):
            problems.append(task.unknown_metric("sweep.objective", metric))
        elif metric in NOT_A_QUALITY:
            problems.append(f"sweep.objective: {metric} describes the outputs; it is neither better nor worse")
    if len(names) > 1 and names[1] not in COSTS:
        problems.append(
            f"sweep.objective: {names[1]!r} is not a cost{did_you_mean(names[1], COSTS)}; the second objective is "
            f"one of {', '.join(COSTS)}"
        )
    return problems


def _range_problems(key: str, spec: SweepRange, sampler: str, place: str) -> list[str]:
    problems = []
    if spec.log and spec.step is not None:
        problems.append(f"{place}: log and step cannot be combined (Optuna samples on a log scale or in steps)")
    if whole_numbers(key) and any(v is not None and v != int(v) for v in (spec.low, spec.high, spec.step)):
        problems.append(f"{place}: {key} takes whole numbers; give whole low, high and step")
    if sampler == "grid" and spec.step is None and not whole_numbers(key):
        problems.append(f"{place}: sampler grid tries every value; give this range a step, or a list of choices")
    return problems


def _value_problems(base: dict, key: str, value: Any) -> list[str]:
    """What the recipe's own rules say about `key` set to `value` (nothing when it is accepted)."""
    try:
        build_recipe(apply_overrides(copy.deepcopy(base), [f"{key}={yaml_text(value)}"]), "sweep", recorded=True)
    except RecipeError as exc:
        details = [problem.removeprefix(key + ": ") for problem in exc.problems or [str(exc)]]
        # A key the recipe does not have is wrong whatever its value; any other problem is the value's.
        return [d if d.startswith("unknown key") else f"{yaml_text(value)}: {d}" for d in details]
    return []


def _retriever_training_rules(recipe: Recipe) -> list[str]:
    """data.retrieval.train: a dense retriever to train, over a knowledge base; the retriever's own recipe (task
    retrieval, derived from this one) meets its rules too, so validate refuses what its run would."""
    data, settings = recipe.data, recipe.data.retrieval
    if settings.train and data.knowledge_base is None:
        return ["data.retrieval.train: fine-tunes the retriever of a knowledge base; give data.knowledge_base"]
    if settings.train and settings.method == "bm25":
        return ["data.retrieval.train: bm25 has no weights to train; use method dense or hybrid, or remove train"]
    derived = retriever_recipe(recipe, Path("RUN"))
    if derived is None:
        return []
    return [f"data.retrieval (the retriever's own run): {p}" for p in recipe_task(derived).check_recipe(derived)]


def trains_retriever(recipe: Recipe) -> bool:
    """Whether a knowledge-base qa run fine-tunes its retriever first (data.retrieval.train; null: dense and hybrid)."""
    settings = recipe.data.retrieval
    if recipe.task != "qa" or recipe.data.knowledge_base is None:
        return False
    return settings.train if settings.train is not None else settings.method in ("dense", "hybrid")


# The data.retrieval settings only a retriever's training reads.
RETRIEVER_TRAINING = (
    "temperature",
    "hard_negatives",
    "negative_margin",
    "matryoshka_dims",
    "epochs",
    "lr",
    "batch_size",
)

# Where a knowledge-base qa run keeps its retriever's own run (a `task: retrieval` run directory).
RETRIEVER_RUN = "retriever"


def retriever_recipe(recipe: Recipe, run_dir: Path) -> Recipe | None:
    """The `task: retrieval` recipe that fine-tunes a knowledge-base qa run's retriever, into RUN/retriever, or None
    when the run does not train its retriever.

    Its rows are the qa rows: each question a query, its gold passage the one holding its answer (the same test
    retrieval_recall@k applies); the model is data.retrieval.model; epochs, lr and batch size come from
    data.retrieval, every other setting (seed, precision, LoRA, data split) from this recipe.
    """
    if not trains_retriever(recipe):
        return None
    data, settings = recipe.data, recipe.data.retrieval
    columns = {"query": data.columns.get("question", "question"), "answer": data.columns.get("answer", "answer")}
    if "id" in data.columns:
        columns["id"] = data.columns["id"]
    retrieval = settings.model_copy(
        # Only the reader's knobs are reset: the retriever's own run is dense and has no reader.
        update={
            "train": None,
            "model": None,
            "method": "dense",
            "fusion": "convex",
            "sparse_weight": None,
            "answer_from": "first",
            # Its training's own settings (train.* below): left here, its recipe would name settings it ignores.
            **RetrievalSection.defaults("epochs", "lr", "batch_size"),
        }
    )
    derived_data = data.model_copy(update={"columns": columns, "retrieval": retrieval, "doc_stride": None})
    train = recipe.train.model_copy(
        update={
            "epochs": settings.epochs,
            "max_steps": None,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
            "early_stopping": None,
        }
    )
    return recipe.model_copy(
        update={
            "task": "retrieval",
            "mode": None,
            "model": recipe.model.model_copy(
                update={"name_or_path": settings.model or DEFAULT_EMBEDDING_MODEL, "family": "auto", "adapter": None}
            ),
            "data": derived_data,
            "train": train,
            "eval": EvalSection(),
            "output": recipe.output.model_copy(update={"dir": str(run_dir / RETRIEVER_RUN)}),
        }
    )


# Sampling below this temperature is greedy decoding in all but name, and far below it the scaled logits overflow.
MIN_TEMPERATURE = 0.01


def _generation_rules(recipe: Recipe, task: Task) -> list[str]:
    """Settings that only text-generating tasks can follow."""
    data, problems = recipe.data, []
    generates = isinstance(task, GenerationTask)
    mark = recipe.eval.watermark
    if mark is not None:
        if not generates:
            problems.append(f"eval.watermark: task {task.name} generates no text to watermark")
        for name in sorted(set(mark.other_method_keys()) & mark.model_fields_set):
            owner = next(method for method, keys in mark.METHOD_KEYS.items() if name in keys)
            problems.append(f"eval.watermark.{name}: a {owner} setting; method {mark.method} does not use it")
        if mark.method == "synthid" and recipe.eval.temperature == 0:
            problems.append(
                "eval.watermark.method: synthid marks text through sampling; set eval.temperature above 0 "
                "(e.g. 0.7), or use kirchenbauer, which also marks greedy decoding"
            )
        if not isinstance(mark.key, int):
            problems.append(
                "eval.watermark.key: give the key (an integer); a run directory keeps it in adapter/watermark.key"
            )
        problems += learned.recipe_problems(recipe)
    temperature = recipe.eval.temperature
    if 0 < temperature < MIN_TEMPERATURE:
        problems.append(
            f"eval.temperature: {temperature:g} is too small to sample with (greedy decoding in all but name, and "
            f"far below it the scaled logits overflow); use 0 for greedy decoding, or at least {MIN_TEMPERATURE:g}"
        )
    if data.template is not None and not generates:
        problems.append(f"data.template: task {task.name} does not build prompts; remove the template")
    if data.template is not None and "prompt" in data.columns:
        problems.append("data.template: the template builds the prompt; remove data.columns.prompt")
    if data.chat_template and not generates:
        problems.append(f"data.chat_template: task {task.name} does not generate text")
    if data.format not in ("auto", "prompt") and not generates:
        problems.append(f"data.format: {data.format} rows are conversations; task {task.name} does not generate text")
    if data.assistant_turns != "all" and not generates:
        problems.append(f"data.assistant_turns: task {task.name} has no conversations; remove it")
    if recipe.train.packing and not generates:
        problems.append(
            f"train.packing: only for GPT-family models on generation tasks (copywriting, codegen, generative qa); "
            f"this is {recipe.task}"
        )
    return problems


def _evaluation_rules(recipe: Recipe, task: Task) -> list[str]:
    settings, problems = recipe.eval, []
    if settings.best_metric is not None and not task.knows_metric(settings.best_metric):
        problems.append(task.unknown_metric("eval.best_metric", settings.best_metric))
    if settings.every is None:
        if settings.keep == "best":
            problems.append("eval.keep: best needs evaluations during training; set eval.every (N steps or epoch)")
        if recipe.train.early_stopping is not None:
            problems.append(
                "train.early_stopping: needs evaluations during training; set eval.every (N steps or epoch)"
            )
    elif isinstance(settings.every, int) and settings.every < 1:
        problems.append(f"eval.every: {settings.every} is not a number of steps (use N >= 1 or epoch)")
    for metric, condition in settings.gates.items():
        problems += gate_problems(parse_gate(f"{metric}{condition}"), f"eval.gates.{metric}")
    return problems


def gate_problems(gate: Gate, place: str, unavailable: dict[str, str] | None = None) -> list[str]:
    """One gate's refusals, a recipe's (eval.gates) and a command line's (--gate) alike: a bound a fraction can
    never meet, an interval asked of a metric that has none, a metric this evaluation cannot produce
    (`unavailable`: metric -> why). Whether the task reports the metric is the task's to say (`knows_metric`)."""
    metric, condition = gate.metric, str(gate).removeprefix(gate.metric)
    problems = [f"{place}: {metric} {unavailable[metric]}"] if unavailable and metric in unavailable else []
    if metric not in UNBOUNDED_METRICS and not gate.can_pass_within(0.0, 1.0):
        problems.append(f"{place}: {condition} can never pass: {metric} is a fraction in [0, 1]")
    if gate.level is not None and metric in NO_INTERVAL:
        problems.append(
            f"{place}: {condition} judges an interval and {metric} has none ({NO_INTERVAL[metric]}); gate its value"
        )
    return problems


def family_rules(task: Task, family: FamilySpec, recipe: Recipe, place: str) -> list[str]:
    """Task x family: refusals, and packing only where the family packs."""
    problems = []
    refusal = task.refusal(family)
    if refusal:
        problems.append(f"{place}: {refusal}")
    if recipe.train.packing and not family.packs and isinstance(task, GenerationTask):
        problems.append(f"train.packing: only for GPT-family models; this is a {family.name}-family model")
    if isinstance(task, GenerationTask) and family.encoder_decoder and conversation_fields(recipe.data) is not None:
        problems.append(encoder_decoder_problem(family.name, place))
    problems += learned.family_problems(recipe.eval.watermark, family, place)
    if recipe.train.objective == "grpo" and family.encoder_decoder:
        problems.append(
            f"train.objective: grpo samples and scores continuations of GPT-style models; this is a "
            f"{family.name}-family model (use sft, dpo, orpo or kto)"
        )
    return problems


# --------------------------------------------------------------------------- the recipe on this machine


def environment_rules(
    recipe: Recipe,
    config: PretrainedConfig | None,
    config_problem: str | None,
    splits: tuple[str, ...] = SPLITS,
) -> tuple[list[Problem], FamilySpec | None, str]:
    """Rules that look at files, packages and devices (never at weights). Also returns the family found.

    `config` is the checkpoint's config as `read_model_config` found it (None: not readable without downloading,
    or `config_problem` says why not).
    """
    problems = [Problem(p) for p in _package_and_device_rules(recipe)]
    family, note = None, "family not checked"
    if config_problem is not None:
        problems.append(Problem(config_problem))
    if config is None and not problems:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            problems.append(
                Problem(
                    f"model.name_or_path: {recipe.model.name_or_path!r} is not a local checkpoint and "
                    "not in the hub cache, and HF_HUB_OFFLINE forbids downloading it"
                )
            )
        note = "family not checked (hub checkpoint not in the local cache; set model.family to check it)"
    if config is not None:
        detected = family_of_config(config)
        forced = recipe.model.family
        if forced == "auto" and detected is None:
            problems.append(
                Problem(
                    f"model: cannot tell the family of model_type {getattr(config, 'model_type', '?')!r}; "
                    "set model.family to bert, bart or gpt"
                )
            )
        elif forced != "auto" and detected is not None and detected != forced:
            problems.append(
                Problem(
                    f"model.family: {forced} is forced, but {recipe.model.name_or_path} is a {detected}-family checkpoint "
                    f"(model_type {getattr(config, 'model_type', '?')!r}); remove model.family or set it to {detected}"
                )
            )
        else:
            name = detected if forced == "auto" else forced
            assert name is not None  # an undetectable auto family was refused just above
            family = FAMILIES[name]
            note = f"{family.name} family"
            if forced == "auto" and recipe.task in TASKS:  # a forced family was checked with the recipe alone
                problems += [Problem(p) for p in family_rules(recipe_task(recipe), family, recipe, place="model")]
            problems += [
                Problem(p) for p in _head_rules(recipe, config, family) + _packing_rules(recipe, config, family)
            ]
            problems += [Problem(p) for p in _position_rules(recipe, config, family) + _size_rules(recipe, config)]
            problems += [Problem(p) for p in _embedding_rules(recipe, family, config)]
            if not problems:
                problems += [Problem(p) for p in _target_rules(recipe, config, family)]
    problems += [Problem(p) for p in _retrieval_model_rules(recipe) + _chat_template_rules(recipe)]
    problems += [Problem(p, data=True) for p in _data_file_rules(recipe, splits)]
    return problems, family, note


# Where a tokenizer keeps its chat template beside tokenizer_config.json (transformers reads these first).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def _chat_template_rules(recipe: Recipe) -> list[str]:
    """Prompts through the chat template (data.chat_template) or conversations named by data.format (messages,
    alpaca, sharegpt) need a tokenizer with one: read from a local checkpoint's files, where the tokenizer finds it
    (run refuses the same with the same words once the tokenizer loads; a hub or packaged checkpoint, and
    conversations `auto` finds in the file's columns, are checked there)."""
    # The key run's refusal names: prompt rendering's (text2text.prompt_texts), else conversations' (the model's).
    conversations = recipe.data.format not in ("auto", "prompt")
    key = "data.chat_template" if recipe.data.chat_template else "model" if conversations else None
    path = Path(recipe.model.name_or_path).expanduser()
    config = path / "tokenizer_config.json"
    if key is None or not config.is_file() or any((path / name).exists() for name in CHAT_TEMPLATE_FILES):
        return []
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):  # the tokenizer's own loading names a broken file
        return []
    return [] if found else [no_chat_template(recipe.model.name_or_path, key)]


def _retrieval_model_rules(recipe: Recipe) -> list[str]:
    """data.retrieval.model (a knowledge base's embedding model, or a reranker's first stage) must be there before
    the run starts: a package, a directory (a retrieval run's adapter/ once that run has finished), or a hub id
    that may be downloaded; otherwise only `run` would find out, after validate passed."""
    reference = recipe.data.retrieval.model
    if reference is None or recipe.data.knowledge_base is None:
        return []
    key = "data.retrieval.model"
    if reference.startswith("pkg:"):
        try:
            found = package_path(reference, key)
        except RecipeError as exc:
            return [str(exc)]
        return [] if found.exists() else [f"{key}: {reference} is not in its package ({found} does not exist)"]
    path = Path(reference).expanduser()
    if path.is_dir():
        return _embedding_directory_problems(path, key)
    # A path, not a hub id: it starts like one, has more than one slash, or its parent is a directory here.
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1 or path.parent.is_dir() and "/" in reference:
        return [f"{key}: no such directory: {reference} (a retrieval run's adapter/ exists once that run has finished)"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        cached = config_without_weights(reference, None) is not None
    except FinetuneError:
        cached = False
    if offline and not cached:
        return [
            f"{key}: {reference!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE forbids downloading it"
        ]
    return []


def _embedding_directory_problems(path: Path, key: str) -> list[str]:
    """A directory given as an embedding model must be one sentence-transformers loads as it is: its own layout
    (modules.json), or a checkpoint whose pooling it decides (an encoder's mean; a decoder's needs its own
    layout). A finetune run directory names its adapter/ (both failed as internal errors after validate passed)."""
    if is_embedding_checkpoint(str(path)):
        return []
    if RunDir(path).holds_run():
        hint = f"; its trained retriever is {path / 'adapter'}" if (path / "adapter" / "modules.json").is_file() else ""
        return [f"{key}: {path} is a finetune run directory, not an embedding model{hint}"]
    if not (path / "config.json").is_file():
        return [f"{key}: {path} holds no model (neither modules.json nor config.json)"]
    try:
        config = load_config(str(path), local_only=True)
    except FinetuneError as exc:
        return [f"{key}: {exc}"]
    family = family_of_config(config)
    if family is not None and FAMILIES[family].architecture != "encoder":
        return [
            f"{key}: {path} is a {FAMILIES[family].architecture} checkpoint without a sentence-transformers layout "
            "(modules.json): its pooling cannot be decided; use an encoder, or a retrieval run's adapter/ trained from "
            "this checkpoint (which records its pooling)"
        ]
    return []


def _embedding_rules(recipe: Recipe, family: FamilySpec, config: PretrainedConfig) -> list[str]:
    """A bi-encoder's pooling must be decidable (a decoder without a sentence-transformers config is told), and
    Matryoshka sizes fit in its embedding."""
    if recipe.task not in TASKS or recipe_task(recipe).head != "embedding":
        return []
    problems = []
    reference = recipe.model.name_or_path
    directory = str(_on_disk(reference))
    try:
        embedding_layout(directory, family, recipe.data.retrieval.pooling, "data.retrieval.pooling")
    except RecipeError as exc:
        problems.append(str(exc))
    hidden = getattr(config, "hidden_size", None)
    dims = recipe.data.retrieval.matryoshka_dims or []
    if isinstance(hidden, int) and any(d > hidden for d in dims):
        problems.append(
            f"data.retrieval.matryoshka_dims: {max(dims)} is above the embedding size of {reference} ({hidden})"
        )
    return problems


def _package_and_device_rules(recipe: Recipe) -> list[str]:
    import torch

    problems = [f"train.report_to: {message}" for message in missing_trackers(recipe.train.report_to)]
    distributed = recipe.distributed
    cuda = torch.cuda.is_available()
    if distributed.quantization == "4bit":
        if not cuda:
            problems.append(
                "distributed.quantization: 4bit (QLoRA) needs a CUDA GPU; this machine has none. "
                "Use quantization: none (LoRA on the full-precision base) here."
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                "distributed.quantization: 4bit (QLoRA) needs the bitsandbytes package (pip install bitsandbytes)"
            )
    problems += strategy_problems(distributed.strategy)
    if distributed.strategy == "fsdp" and not cuda and learned.is_learned(recipe.eval.watermark):
        problems.append(
            "distributed.strategy: fsdp on CPU trains a sharded copy of the model, and a learned watermark's blocks "
            "are hooked onto the original's layers (eval.watermark.method: learned); use ddp"
        )
    if distributed.strategy == "deepspeed" and cuda and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "distributed.strategy: deepspeed needs the deepspeed package (pip install 'finetune[deepspeed]')"
        )
    if isinstance(distributed.num_processes, int):
        problems += too_many_processes(distributed.num_processes, "distributed.num_processes")
    return problems


def strategy_problems(strategy: str) -> list[str]:
    """`distributed.strategy` on this machine (the recipe's, or what `finetune.launch` is asked to start).

    DeepSpeed runs on GPUs only. FSDP runs on GPUs through accelerate, and on CPU processes (gloo) through torch's
    own FSDP2 (`training/sharding.py`, `CpuShards`), since accelerate (1.x) enables FSDP for GPU process groups only."""
    import torch

    if strategy == "deepspeed" and not torch.cuda.is_available():
        return ["distributed.strategy: deepspeed (ZeRO) runs on GPUs; without one use ddp or fsdp (gloo on CPU)"]
    return []


def machine_processes() -> tuple[int, str]:
    """How many processes this machine runs side by side: one per GPU, or one per usable CPU core without GPUs."""
    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return gpus, f"{gpus} GPU{'s' if gpus != 1 else ''}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, f"{cores} usable CPU core{'s' if cores != 1 else ''}"


def too_many_processes(wanted: int, place: str) -> list[str]:
    """A process count beyond this machine (`distributed.num_processes`, `--num-processes`), as a problem."""
    limit, what = machine_processes()
    if wanted <= max(limit, 1):
        return []
    return [
        f"{place}: {wanted} processes, but this machine has {what}; use at most {max(limit, 1)} (one process per "
        "GPU, or per CPU core without GPUs)"
    ]


def _head_rules(recipe: Recipe, config: PretrainedConfig, family: FamilySpec) -> list[str]:
    """The task's head for the checkpoint's architecture, as loading it would find (validate passed a Pegasus
    classifier and a Gemma extractive reader that run then refused)."""
    if recipe.task not in TASKS:
        return []
    problem = head_problem(config, family, recipe_task(recipe).head)
    return [f"model: {recipe.model.name_or_path} cannot be loaded for task {recipe.task}: {problem}"] if problem else []


def _packing_rules(recipe: Recipe, config: PretrainedConfig, family: FamilySpec) -> list[str]:
    """Packing on a decoder whose attention keeps packed examples apart (the family's rule covers the others)."""
    model_type = getattr(config, "model_type", None)
    if not recipe.train.packing or not family.packs or model_type in PACKING_MODEL_TYPES:
        return []
    return [
        f"train.packing: {model_type!r} models are not known to keep packed examples apart (their attention would "
        f"cross from one example into the next); packing is checked for {', '.join(sorted(PACKING_MODEL_TYPES))}. "
        "Remove train.packing"
    ]


def _position_rules(recipe: Recipe, config, family: FamilySpec | None = None) -> list[str]:
    """data.max_length above the model's position embeddings would crash at the first step; so would generation
    that runs past them: a decoder continues its prompt (up to data.max_length tokens) by eval.max_new_tokens, an
    encoder-decoder's decoder holds the new tokens alone."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return []
    model_type = getattr(config, "model_type", "")
    if model_type in PADDING_OFFSET_POSITIONS:
        limit -= (1 if model_type == "mpnet" else getattr(config, "pad_token_id", None) or 0) + 1
    name, max_length, new_tokens = recipe.model.name_or_path, recipe.data.max_length, recipe.eval.max_new_tokens
    if max_length > limit:
        return [
            f"data.max_length: {max_length} is above what {name} allows ({limit} positions); "
            f"use data.max_length <= {limit}"
        ]
    if family is None or recipe.task not in TASKS or not isinstance(recipe_task(recipe), GenerationTask):
        return []
    if (
        recipe.train.objective == "grpo"
        and family.decoder_only
        and max_length + recipe.train.grpo.max_new_tokens > limit
    ):
        sampled = recipe.train.grpo.max_new_tokens
        return [
            f"train.grpo.max_new_tokens: {sampled} sampled tokens after a prompt of up to "
            f"data.max_length={max_length} tokens run past the {limit} positions of {name}; use "
            + _room_fix("train.grpo.max_new_tokens", sampled, max_length, limit)
        ]
    if family.decoder_only and max_length + new_tokens > limit:
        return [
            f"eval.max_new_tokens: {new_tokens} new tokens after a prompt of up to data.max_length={max_length} "
            f"tokens run past the {limit} positions of {name}; use "
            + _room_fix("eval.max_new_tokens", new_tokens, max_length, limit)
        ]
    if family.encoder_decoder and new_tokens + 1 > limit:  # the decoder's start token comes first
        return [
            f"eval.max_new_tokens: {new_tokens} is more than the decoder of {name} can hold ({limit} positions, "
            f"its start token included); use eval.max_new_tokens <= {limit - 1}"
        ]
    return []


def _target_rules(recipe: Recipe, config: PretrainedConfig, family: FamilySpec) -> list[str]:
    """lora.targets against the model's own layers, as the session resolves them (models/lora.resolve_targets), on
    the model built from its config on the meta device: its module tree, no weights. A run starting from an adapter
    takes that adapter's targets."""
    if recipe.model.adapter is not None:
        return []
    import torch

    try:
        with torch.device("meta"):
            model = family.auto_class(recipe_task(recipe).head).from_config(copy.deepcopy(config))
    except Exception:  # a model that cannot be built this way: the run itself will say what is wrong
        return []
    try:
        resolve_targets(model, recipe.lora.targets, family)
    except ValueError as exc:
        return [str(exc)]
    return []


def _size_rules(recipe: Recipe, config) -> list[str]:
    """A LoRA rank above the model's hidden size: each adapter would be larger than the weight it adapts, and
    no more expressive than a rank equal to it; a learned watermark on more decoder layers than the model has."""
    problems = []
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and recipe.lora.r > hidden:
        problems.append(
            f"lora.r: {recipe.lora.r} is above the hidden size of {recipe.model.name_or_path} ({hidden}); a rank "
            f"above it adds parameters but no capacity; use lora.r <= {hidden} (commonly 8 to 64)"
        )
    # A learned watermark's embedder sits on the top decoder layers: asking for more than there are would be cut
    # silently to all of them (and recorded as asked).
    mark = recipe.eval.watermark
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if mark is not None and learned.is_learned(mark) and isinstance(layers, int) and mark.embedder_layers > layers:
        problems.append(
            f"eval.watermark.embedder_layers: {mark.embedder_layers} is more than the {layers} decoder layers of "
            f"{recipe.model.name_or_path}; use eval.watermark.embedder_layers <= {layers}"
        )
    return problems


def _data_keys(recipe: Recipe, splits: tuple[str, ...]) -> list[tuple[str, str | list[str] | None]]:
    """The data files a command reads for `splits`: evaluation rows split off data.train need data.train."""
    keys = {f"data.{s}" for s in splits}
    if "data.eval" in keys and recipe.data.eval is None:
        keys.add("data.train")
    return [(k, spec) for k, spec in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)) if k in keys]


def _data_file_rules(recipe: Recipe, splits: tuple[str, ...]) -> list[str]:
    return _missing_files([*_data_keys(recipe, splits), ("data.knowledge_base", recipe.data.knowledge_base)])


def _missing_files(specs: list[tuple[str, object]]) -> list[str]:
    """`KEY: file not found: ITEM` for each data file named that is not there (a hub dataset is not a file; a
    knowledge base always is)."""
    problems = []
    for key, spec in specs:
        items = [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else []
        for item in (i for i in items if isinstance(i, str)):
            try:
                path = local_data_path(item, key)
            except FinetuneError as exc:
                problems.append(str(exc))
                continue
            if (key == "data.knowledge_base" or _looks_like_file(item) or path.is_dir()) and not path.is_file():
                problems.append(f"{key}: {missing_file(path, item)}")
    return problems


def _looks_like_file(spec: str) -> bool:
    return spec.startswith(("pkg:", "/", "./", "../", "~")) or Path(spec).suffix.lower() in FILE_SUFFIXES


# --------------------------------------------------------------------------- entry points


def read_model_config(recipe: Recipe) -> tuple[PretrainedConfig | None, str | None]:
    """The checkpoint's config where it can be read without weights or downloads: (config, None), (None, None) for a
    hub checkpoint not in the local cache, or (None, why) when the reference is wrong. The one read of config.json."""
    try:
        return config_without_weights(recipe.model.name_or_path, recipe.model.revision), None
    except FinetuneError as exc:
        return None, str(exc)


def _check(
    recipe: Recipe, source: str, splits: tuple[str, ...], recorded: bool = False
) -> tuple[PretrainedConfig | None, FamilySpec | None, str]:
    """Every rule, with the model's config read once (no weights, no downloads); raises every problem at once.
    Returns the config, the family where it could be told, and how it was told. `recorded`: see recipe_rules."""
    mark = recipe.eval.watermark
    if mark is not None and isinstance(mark.key, int):
        register_secret(str(mark.key))  # never in the manifest's command line, logs or messages
    if mark is not None and isinstance(mark.message, str) and set(mark.message) <= {"0", "1"}:
        register_secret(mark.message)  # a learned watermark's message, kept as the key is
    config, config_problem = read_model_config(recipe)
    problems = [Problem(p) for p in recipe_rules(recipe, recorded)]
    if not problems:  # each swept value is tried in the recipe, whose own problems would repeat for each
        problems = [Problem(p) for p in sweep_rules(recipe, recipe_task(recipe))]
    environment, family, note = environment_rules(recipe, config, config_problem, splits)
    if not problems:  # every swept value passed the recipe-alone rules above, so each builds a trial recipe
        environment += _candidate_environment_rules(recipe, environment, splits)
    found = problems + environment + _retriever_environment_rules(recipe)
    if "train" not in splits:  # a command that trains nothing: the rules on what only training reads do not apply
        found = [p for p in found if not training_only(p.text.partition(":")[0].strip())]
    try:
        _raise(source, found)
    except RecipeError as exc:
        raise _rows_beside(exc, recipe, source, splits) from None
    return config, family, note


def _retriever_environment_rules(recipe: Recipe) -> list[Problem]:
    """The retriever's own run (data.retrieval.train) against this machine: its model, family and pooling, so
    validate refuses what that run would (its data files are this recipe's, checked already)."""
    derived = retriever_recipe(recipe, Path("RUN"))
    if derived is None or recipe_rules(derived):  # recipe-alone problems were reported with the recipe's own
        return []
    config, problem = read_model_config(derived)
    found, _, _ = environment_rules(derived, config, problem, ())
    return [Problem(f"data.retrieval (the retriever's run): {p.text}", p.data) for p in found]


def _raise(source: str, problems: list[Problem]) -> None:
    """Every problem at once: RecipeError (exit 2), or DataError (exit 3) when only data files are wrong."""
    if problems:
        error = recipe_problems_error(source, [p.text for p in problems])
        if all(p.data for p in problems):
            raise DataError(str(error))
        raise error


def check_recipe(recipe: Recipe, source: str = "recipe") -> CheckedRecipe:
    """Every rule, every problem at once, without weights or downloads (`finetune validate`).

    Raises RecipeError (exit 2), or DataError (exit 3) for data files alone.
    """
    _, family, note = _check(recipe, source, SPLITS)
    check_rows(recipe, source, family)
    return CheckedRecipe(recipe, family, note)


def check_rows(recipe: Recipe, source: str = "recipe", family: FamilySpec | None = None) -> None:
    """Read and check the data rows a run reads, as the run does (data.report.read_rows): malformed lines, missing
    columns, values of the wrong type, the template filled, the eval split, data.on_overlap: error, eval labels no
    training row has, preference pairs and thumbs (preference.judged_rows), evaluation conversations that end
    after their scored turn, conversations through the chat template of a local checkpoint; the same error and exit
    code as `run`, the recipe named; extractive QA's answers located in their contexts. What else needs the
    tokenizer (token lengths under data.overflow: error, QA answer spans in tokens) and retrieval itself (the knowledge base's passages and each
    retrieval row's positive are read here) is checked by `run --dry-run` and `finetune data`."""
    task = recipe_task(recipe)
    required, optional = task.fields(recipe)
    try:
        rows, _ = read_rows(recipe, required, optional, **task.reading())
        if family is not None and family.encoder_decoder and "messages" in rows.train.column_names:
            raise RecipeError(encoder_decoder_problem(family.name))  # the file's columns made them conversations

        def each_split(check: Callable[[Dataset, str], object]) -> None:
            """`check` on the training and the evaluation rows, its refusal placed at the row's file and line."""
            for split, table in (("data.train", rows.train), ("data.eval", rows.eval)):
                try:
                    check(table, split)
                except DataError as exc:
                    raise rows.origins[split].explain(exc, split) from exc

        if isinstance(task, ClassificationTask):  # the labels as featurize encodes them: its state, then each row
            state: dict = {}

            def labels(table: Dataset, split: str) -> None:
                if split == "data.train":
                    state.update(task.fit_state(table, recipe))
                task.label_codes(table["label"][:], state, recipe, split)

            each_split(labels)
            task.check_state(recipe, state)  # the settings of one label mode, against the mode the rows decided
        if isinstance(task, GenerationTask) and recipe.train.learns_from_judgements:

            def judged(table: Dataset, split: str) -> None:
                """The pairs' and thumbs' own checks, as the task's featurize makes them (also of pairs written
                as conversations, and of plain conversations, which hold none)."""
                objective, prompt, answer = recipe.train.objective, task.prompt_field, task.answer_field
                judged_rows(kto_rows(table, objective, split, prompt, answer), objective, split, prompt, answer)

            each_split(judged)
        if isinstance(task, GenerationTask) and recipe.train.objective == "grpo":

            def rollout(table: Dataset, split: str) -> None:
                """What the reward reads from each training row, as the task's featurize checks it: its fields, or
                a conversation's final assistant turn (conversations.rollout_conversations)."""
                if split != "data.train":
                    return
                if "messages" not in table.column_names:
                    check_rollout_rows(table, split, task.reward_fields)
                    return
                for number, messages in enumerate(table["messages"], start=1):
                    check_evaluation_conversation(messages, f"{split}: row {number}")

            each_split(rollout)
        supervised = not recipe.train.learns_from_judgements and recipe.train.objective != "grpo"
        if isinstance(task, GenerationTask) and supervised:

            def answers(table: Dataset, split: str) -> None:
                """Text rows' answers as supervised training reads them (a field optional for evaluation rows,
                codegen's completion, is one every training row needs)."""
                if "messages" not in table.column_names:
                    task.answers_of(table, split)

            each_split(answers)
        if isinstance(task, ExtractiveQATask) and recipe.data.knowledge_base is None:

            def spans(table: Dataset, split: str) -> None:
                """Each row's answers located in its context, as featurize locates them (no tokenizer needed)."""
                checked_answers(table["answers"][:], table["context"][:], split)

            each_split(spans)
        if recipe.data.knowledge_base is not None:  # its passages as every run reads them: ids, texts, not empty
            passages = load_passages(recipe.data.knowledge_base)
            if isinstance(task, RetrievalTask):  # every row's positive is a passage of it, as the run checks

                def positives(table: Dataset, split: str) -> None:
                    found = relevant_passages(table, passages, split)
                    if split == "data.train":
                        check_positives_differ(found, passages, recipe.data.retrieval.hard_negatives, split)
                        check_given_negatives(found, passages, split)

                each_split(positives)
            if task.name == "qa":  # what attach_passages checks before it retrieves, and of training rows after

                def questions(table: Dataset, split: str) -> None:
                    check_questions(table, split)
                    if split == "data.train":
                        check_answers_held(table, passages, split)

                each_split(questions)
        try:  # every eval row one the task's metrics can score, as the run checks
            task.check_scorable(rows.eval, "data.eval")
        except DataError as exc:
            raise rows.origins["data.eval"].explain(exc, "data.eval") from exc
        task.check_eval_rows(rows.eval, recipe.eval, machine=False)  # codegen's tests: the recipe's opt-in
        unreported = pair_metrics_problems(recipe, rows.eval)
        if unreported:
            raise recipe_problems_error(source, unreported)
        pairs_as_turns = recipe.train.learns_from_judgements  # conversations of pairs: the prompt's turns alone
        if isinstance(task, GenerationTask) and "messages" in rows.eval.column_names and not pairs_as_turns:
            try:  # an evaluation conversation must end with the assistant turn it is scored on, as featurize checks
                for number, messages in enumerate(rows.eval["messages"], start=1):
                    check_evaluation_conversation(messages, f"data.eval: row {number}")
            except DataError as exc:
                raise rows.origins["data.eval"].explain(exc, "data.eval") from exc
        encoder = _conversation_encoder(recipe, family, rows)
        if encoder is not None:  # each conversation through the chat template, as featurize renders it

            def rendered(table: Dataset, split: str) -> None:
                """The first conversation of each sequence of roles (the order templates refuse), as featurize
                encodes it: every row of a large file would take validate minutes, in one process."""
                if "messages" not in table.column_names:
                    return
                seen: set[tuple] = set()
                for number, messages in enumerate(table["messages"], start=1):
                    if pairs_as_turns:  # a pair's prompt, as featurize renders it: followed by an answer
                        messages = [*messages, {"role": "assistant", "content": "answer"}]
                    roles = tuple(turn.get("role") for turn in messages)
                    if roles not in seen:
                        seen.add(roles)
                        encoder.encode([messages], split, number, labeled=True)

            each_split(rendered)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {Exception.__str__(exc)}", exc.problems) from exc  # its problems listed once
    except DataError as exc:
        found = [str(exc), *_eval_file_problems(recipe, str(exc), required, optional, task)]
        if len(found) == 1:
            raise DataError(f"{source}: {found[0]}") from exc
        raise DataError(f"{source}: {len(found)} problems", found) from exc
    derived = retriever_recipe(recipe, Path("RUN"))
    if derived is not None:  # the retriever's own run reads these rows as task retrieval rows, with its own checks
        check_rows(derived, f"{source} (data.retrieval: the retriever's run)")


def _on_disk(reference: str) -> Path:
    """model.name_or_path as a path (a package's file found in its package), converting nothing: a hub id or a GGUF
    file is a path that holds no checkpoint directory."""
    return (
        package_path(reference, "model.name_or_path") if reference.startswith("pkg:") else Path(reference).expanduser()
    )


def _conversation_encoder(recipe: Recipe, family: FamilySpec | None, rows: Any) -> ConversationEncoder | None:
    """The encoder featurize renders conversations with, where the rows hold conversations and the model is a local
    checkpoint directory (its tokenizer loads without a download or a GGUF conversion): a template that raises on a
    conversation (roles out of order, as Llama 2's and Mistral's do) is refused by validate as by run. None
    otherwise (`run --dry-run` renders them)."""
    if family is None or not any("messages" in t.column_names for t in (rows.train, rows.eval)):
        return None
    reference = recipe.model.name_or_path
    path = _on_disk(reference)
    if not (path / "tokenizer_config.json").is_file():
        return None
    tokenizer = load_tokenizer(str(path), family, trust_remote_code=recipe.model.trust_remote_code)
    return ConversationEncoder(tokenizer, recipe.data.assistant_turns, reference)


def _eval_file_problems(
    recipe: Recipe, first: str, required: Sequence[str], optional: Sequence[str], task: Task
) -> list[str]:
    """The eval files' own problem, read alone, where it is not the `first` one found: validate names every problem
    at once (a bad row in data.train hid one in data.eval until the first was fixed)."""
    if recipe.data.eval is None:
        return []
    try:
        read_split(
            recipe.data.eval,
            "data.eval",
            recipe,
            required,
            optional,
            **task.reading(),
        )
    except DataError as exc:
        return [] if str(exc) == first else [str(exc)]
    return []


@dataclass(frozen=True)
class Resolved:
    """A recipe that met every rule on this machine, with everything decided about it, once.

    Every flow starts from one of these (`resolve` or `resolve_recipe`); nothing after it re-reads the recipe or the
    model's config, or decides the task, the family or the precision again.
    """

    recipe: Recipe
    source: str  # the recipe file (or run directory) it came from, as messages name it
    task: Task
    family: FamilySpec
    model_path: str  # what from_pretrained reads (a GGUF reference becomes a converted directory)
    model_config: PretrainedConfig  # read once; copied, never changed, where a model is built from it
    precision: str  # accelerate's mixed_precision: no, fp16 or bf16

    @property
    def best_metric(self) -> str:
        """The metric that decides "better" (eval.best_metric): the recipe's, else the objective's or the task's."""
        return best_metric_of(self.recipe, self.task)

    def summary(self) -> str:
        return f"{self.recipe.task} on {self.recipe.model.name_or_path} ({self.family.name} family)"

    def input_paths(self) -> tuple[Path, ...]:
        """What this recipe reads from disk (its file, data files, knowledge base, a local base model): never a
        command's output."""
        data = self.recipe.data
        specs = [("data.train", data.train), ("data.eval", data.eval), ("data.knowledge_base", data.knowledge_base)]
        paths = [Path(self.source)]
        for key, spec in specs:
            for item in [] if spec is None else [spec] if isinstance(spec, str) else spec:
                path = local_data_path(item, key)
                if path.exists():
                    paths.append(path)
        if Path(self.model_path).exists():
            paths.append(Path(self.model_path))
        if self.recipe.model.adapter is not None:
            paths.append(start_adapter_dir(self.recipe.model.adapter))
        return tuple(paths)


def resolve_recipe(
    recipe: Recipe, source: str = "recipe", splits: tuple[str, ...] = SPLITS, recorded: bool = False
) -> Resolved:
    """Every rule, then the model reference, its config and family, and the precision: a Resolved, or every problem.

    Unlike `check_recipe`, a hub checkpoint missing from the local cache is fetched (its config, here; weights later).
    Only the data files of `splits` are checked: a command reads and checks only what it uses.
    """
    config, family, _ = _check(recipe, source, splits, recorded)
    model, task = recipe.model, recipe_task(recipe)
    path = resolve_reference(model.name_or_path)
    if config is None:  # a hub checkpoint not cached yet (validation could not check it without downloading)
        config = load_config(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    if family is None:
        family = detect_family(config, model.family)
        _raise(source, [Problem(p) for p in family_rules(task, family, recipe, place="model")])
    return Resolved(recipe, source, task, family, path, config, resolve_precision(recipe.train.precision))


def _registry_problems(raw: dict) -> list[str]:
    """The task and family names, checked against their registries (the schema takes any name)."""
    problems = []
    task = raw.get("task")
    if isinstance(task, str) and task not in TASKS:
        problems.append(f"task: {task!r} is not a task{did_you_mean(task, TASKS)} (tasks: {', '.join(TASKS)})")
    model = raw.get("model")
    family = model.get("family", "auto") if isinstance(model, dict) else "auto"
    if isinstance(family, str) and family != "auto" and family not in FAMILIES:
        problems.append(
            f"model.family: {family!r} is not a family{did_you_mean(family, FAMILIES)} (auto, {', '.join(FAMILIES)})"
        )
    return problems


def _parse(raw: dict, source: str, splits: tuple[str, ...] = (), recorded: bool = False) -> Recipe:
    """The schema, with the registries' names checked in the same pass: every problem at once. `splits`: the data
    a command reads, whose files are named missing beside the schema's problems (a mistake elsewhere hid them)."""
    names = _registry_problems(raw)
    try:
        recipe = parse_recipe(raw, source)
    except RecipeError as exc:
        # The data files named, checked from the raw recipe: a schema mistake elsewhere hid a missing file.
        data = raw.get("data")
        keys = [*splits, "knowledge_base"] if splits else []
        named = [(f"data.{k}", data.get(k)) for k in keys] if isinstance(data, dict) else []
        missing = [p for p in _missing_files(named) if p not in exc.problems]
        pruned, removed = _pruned(raw, exc.problems)
        beside = [p for p in dict.fromkeys(_rules_without(pruned, removed, recorded, splits)) if p not in missing]
        refused = recipe_problems_error(source, names + exc.problems + missing + beside)
        raise _rows_beside(refused, None if missing else pruned, source, splits, _ROWS_READ_BY) from None
    if names:
        raise recipe_problems_error(source, names)
    return recipe


def _pruned(raw: dict, problems: list[str]) -> tuple[Recipe | None, list[str]]:
    """A recipe the schema refused, with its refused keys taken out (each then at its default), and those keys; None
    where the rest is no recipe either (a required key refused)."""
    pruned, removed = copy.deepcopy(raw), []
    for problem in problems:
        place = problem.split(":", 1)[0]
        *sections, last = place.split(".")
        node: Any = pruned
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            del node[last]
            removed.append(place)
    try:
        return parse_recipe(pruned, "recipe"), removed
    except FinetuneError:
        return None, removed


# The settings check_rows reads the rows by: one the schema refused (taken out, so at its default) would judge them
# wrongly (a misspelt train.objective read DPO pairs as SFT rows, "column 'completion' not found"). A rule's refusal
# keeps its value: only the settings that say what the rows are (task, mode, data) keep the rows out then.
_ROWS_ARE = ("task", "mode", "data")
_ROWS_READ_BY = (*_ROWS_ARE, "model", "train.objective", "train.seed", "train.preference", "train.grpo", "eval")


def _rows_beside(
    refused: RecipeError,
    recipe: Recipe | None,
    source: str,
    splits: tuple[str, ...],
    read_by: tuple[str, ...] = _ROWS_ARE,
) -> RecipeError:
    """Every problem at once across the recipe and its rows, for validate and run alike: a wrong setting elsewhere
    (train.lr) hid a malformed row, which the next try then found. The rows are read as a run reads them (by a
    command that reads both splits), unless a refused setting is one their reading depends on (`read_by`; a missing
    file), which would judge them by its default."""
    places = [p.split(":", 1)[0].strip() for p in refused.problems]
    depends = any(p == key or p.startswith(f"{key}.") for p in places for key in read_by)
    if recipe is None or "train" not in splits or not refused.problems or depends:
        return refused
    try:
        check_rows(recipe, source)
    except FinetuneError as exc:
        # The rows' own problems, each once, without the header that named the recipe again.
        rows = exc.problems or [str(exc).removeprefix(f"{source}: ")]
        return recipe_problems_error(source, [*refused.problems, *(p for p in rows if p not in refused.problems)])
    return refused


def _rules_without(
    recipe: Recipe | None, removed: list[str], recorded: bool = False, splits: tuple[str, ...] = ()
) -> list[str]:
    """The rules' problems with the rest of a recipe the schema refused (`_pruned`: its refused keys, `removed`, taken
    out, each then at its default), so one wrong value does not hide the others' problems; for a command that reads
    files (`splits`), the environment's rules too (data.max_length above the model's positions was found only once
    a misspelt train.seed was fixed)."""
    try:
        found = [] if recipe is None else recipe_rules(recipe, recorded)
        if recipe is not None and splits:
            config, config_problem = read_model_config(recipe)
            found += [p.text for p in environment_rules(recipe, config, config_problem, splits)[0]]
            if "train" not in splits:  # as _check: a command that trains nothing is not judged by training's rules
                found = [p for p in found if not training_only(p.partition(":")[0].strip())]
    except FinetuneError:
        return []
    # A rule naming a setting taken out would judge its default (data.eval_split refused: "give an eval file").
    return [p for p in found if not any(place in p for place in removed)]


def build_recipe(raw: dict, source: str = "recipe", recorded: bool = False) -> Recipe:
    """The schema and the rules that need nothing but the recipe (no files, no packages); `recorded`: see
    recipe_rules."""
    recipe = _parse(raw, source, recorded=recorded)
    problems = recipe_rules(recipe, recorded)
    if problems:
        raise recipe_problems_error(source, problems)
    return recipe


def read_recipe(path: str | Path, overrides: list[str] | None = None, recorded: list[str] | None = None) -> dict:
    """A recipe file's raw settings with `section.key=value` overrides applied: what run, sweep and validate read.
    `recorded`: settings a run directory keeps beside its recipe.yaml, applied first, so a user's override wins."""
    if Path(path).expanduser().is_dir():
        raise RecipeError(f"{path}: a directory, not a recipe file (give the recipe's YAML file)")
    raw = apply_overrides(read_recipe_file(path), list(recorded or []))
    return apply_overrides(raw, distinct_overrides(list(overrides or [])))


@contextlib.contextmanager
def overrides_named(overrides: list[str] | None):
    """A recipe's problems are headed by its file's name; one with a setting the command line set says so (the
    file does not hold the value refused)."""
    keys = [o.partition("=")[0].strip() for o in overrides or []]
    try:
        yield
    except RecipeError as exc:
        if not keys or not exc.problems:
            raise

        def named(problem: str) -> str:
            # The override's key, or a key inside it (`lora={r: abc}`); not a section holding it, whose problem may
            # be the file's own (`data: data.eval and data.eval_split are exclusive` beside `data.max_length=64`).
            key = problem.partition(":")[0].strip()
            given = any(within(key, k) for k in keys)
            return f"{problem} (set on the command line)" if given else problem

        raise RecipeError(Exception.__str__(exc), [named(p) for p in exc.problems]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, and check the recipe-alone rules."""
    with overrides_named(overrides):
        return build_recipe(read_recipe(path, overrides), source=str(path))


def resolve(
    path: str | Path,
    overrides: list[str] | None = None,
    splits: tuple[str, ...] = SPLITS,
    recorded: list[str] | None = None,
) -> Resolved:
    """What every command does first: the recipe file read once, every rule, the model resolved; every problem at
    once (RecipeError, exit 2; DataError, exit 3, when only data files are wrong). `recorded` (a run directory's
    settings beside its recipe.yaml; given, even empty, for a run's recipe) also marks the recipe as a finished
    run's (recipe_rules)."""
    with overrides_named(overrides):
        from_run = recorded is not None
        recipe = _parse(read_recipe(path, overrides, recorded), str(path), splits, from_run)
        if from_run and overrides:  # what is asked now is judged as any recipe is; only what was recorded is spared
            asked = [o.partition("=")[0].strip() for o in overrides]
            problems = [
                p
                for p in advisory_rules(recipe, recipe_task(recipe))
                if any(same_setting(p.split(":", 1)[0], key) for key in asked)
            ]
            if problems:
                raise recipe_problems_error(str(path), problems)
        return resolve_recipe(recipe, str(path), splits, recorded=from_run)


def resolve_source(
    source: str | Path, overrides: list[str] | None = None, splits: tuple[str, ...] = ("eval",)
) -> tuple[Resolved, RunDir | None]:
    """A recipe file, or a run directory's own recipe (with its watermark key), resolved for a command that reads
    the data of `splits`; with the run directory when there is one. Evaluation trains nothing: an
    override of a setting only training reads is refused, not ignored."""
    ignored = training_only_overrides(list(overrides or []))
    if ignored:
        them = "it" if len(ignored) == 1 else "them"
        raise RecipeError(
            f"{', '.join(brief(o) for o in ignored)}: only training reads {them}, so evaluating would ignore {them}"
            f"; drop {them} (or train a run with {them})"
            + (
                "; eval writes where --output says"
                if any(within(o.split("=")[0], "output.dir") for o in ignored)
                else ""
            )
        )
    path = Path(source).expanduser()
    if path.is_dir():
        run = RunDir(path)
        if not run.recipe.is_file():
            raise RecipeError(f"{source}: not a run directory (no recipe.yaml)")
        written = read_recipe_file(run.recipe)  # the run's recipe as recorded, read once for the checks below
        recorded = [
            *_watermark_key_override(run),
            *_earlier_retrieval_defaults(written),
            *_data_where_it_ran(run, written),
        ]
        resolved = resolve(run.recipe, overrides, splits, recorded)
        if "eval" in splits:  # only a command that scores the eval rows draws them (not predict, export, detect)
            _refuse_redrawn_split(run, resolved.recipe, written)
        meta = run.adapter / ADAPTER_META
        if meta.is_file() and (problems := adapter_problems(resolved.recipe, run.adapter, "the run's adapter")):
            # Its recipe edited or overridden to another model or task: the adapter would load into the wrong
            # layers (an internal error from peft) or, on a model of the same shapes, predict wrongly, silently.
            raise RecipeError("; ".join(problems))
        return resolved, run
    return resolve(path, overrides, splits), None


def _refuse_redrawn_split(run: RunDir, recipe: Recipe, recorded: dict) -> None:
    """`eval RUN` settings that would draw the rows scored from the run's training file otherwise than the run
    drew its held-out rows: some or all of them would be rows it trained on (`eval RUN train.seed=7` scored 9 of
    12 training rows as held-out ones, exit 0). Decided on the values in force, not on which keys were given: an
    eval file draws nothing; the run's own values draw its own split."""
    if recipe.data.eval is not None:
        return
    data, train = recorded.get("data") or {}, recorded.get("train") or {}
    if not isinstance(data, dict) or not isinstance(train, dict):
        return
    if data.get("eval") is not None:
        raise RecipeError(
            "data.eval_split: the run trained on every row of data.train (it was scored on data.eval); a split drawn "
            "from it now would score only rows it trained on; give an eval file (data.eval=FILE)"
        )
    now = {
        "data.eval_split": recipe.data.eval_split,
        "data.stratify": recipe.data.stratify,
        "train.seed": recipe.train.seed,
        "data.columns.label": recipe.data.columns.get("label"),
    }
    then = {
        "data.eval_split": data.get("eval_split"),
        "data.stratify": data.get("stratify"),
        "train.seed": train.get("seed"),
        "data.columns.label": (data.get("columns") or {}).get("label"),
    }
    present = {
        "data.eval_split": "eval_split" in data,
        "data.stratify": "stratify" in data,
        "train.seed": "seed" in train,
    }
    # (a setting a run's recipe.yaml does not record, made before it existed, is taken as unchanged)
    changed = [key for key in now if present.get(key, True) and now[key] != then[key]]
    if not _same_training_files(run, recipe, data.get("train")):
        changed.insert(0, "data.train")
    if changed:
        them = "it" if len(changed) == 1 else "them"
        raise RecipeError(
            f"{', '.join(changed)}: the run held out its eval rows from data.train by these settings; changing {them} "
            f"would score other rows, some of which it trained on; keep the run's, or score an eval file with "
            "data.eval=FILE data.eval_split=null"
        )


def _same_training_files(run: RunDir, recipe: Recipe, then: object) -> bool:
    """Whether the training files read now are, in order, the ones the run drew its split from: the bytes its
    manifest recorded for each file it named (`then`), whatever path names them now (a relative path read from
    another working directory is another file). A hub dataset is the same only by the same name. A run whose
    manifest recorded no hashes is taken at its word."""
    names = [then] if isinstance(then, str) else then if isinstance(then, list) else []
    now = recipe.data.train
    now_names = [now] if isinstance(now, str) else list(now or [])
    if (manifest := read_manifest(run.manifest)) is None:
        return True
    recorded = manifest.get("data_files")
    recorded = recorded if isinstance(recorded, dict) else {}
    before = [recorded.get(name) for name in names]
    if not names or None in before:
        return now_names == names
    if len(now_names) != len(names):
        return False
    for name, old, digest in zip(now_names, names, before):
        current = file_hashes(name).get(name)
        if current == HUB_DATASET and digest != HUB_DATASET:  # no such file here: reading it says so, by name
            continue
        if current != digest or (digest == HUB_DATASET and name != old):
            return False
    return True


def _earlier_retrieval_defaults(recorded: dict) -> list[str]:
    """A run recorded before `data.retrieval.fusion` and `answer_from` existed retrieved and answered as the
    defaults of its day (reciprocal-rank fusion; the reader's best span anywhere): eval and predict keep doing so,
    rather than reading its recipe with today's defaults (`recorded`: its recipe.yaml as written)."""
    data = recorded.get("data") or {}
    retrieval = data.get("retrieval") or {}
    if not isinstance(retrieval, dict) or not data.get("knowledge_base"):
        return []
    found = []
    if retrieval.get("method") == "hybrid" and "fusion" not in retrieval:
        found.append("data.retrieval.fusion=rrf")
    if recorded.get("task") == "qa" and recorded.get("mode") != "generative" and "answer_from" not in retrieval:
        found.append("data.retrieval.answer_from=any")
    return found


def _data_where_it_ran(run: RunDir, recorded: dict) -> list[str]:
    """A run's relative data files, read from the directory it ran in (manifest.json's `working_directory`):
    `finetune eval RUN` from another directory refused the run's own eval file as missing ("file not found:
    data/test.jsonl"), or read another file of that name. Where that directory is gone (the project moved whole),
    they are read from the working directory, as any recipe's are. A user's override still wins."""
    where = (read_manifest(run.manifest) or {}).get("working_directory")
    if not isinstance(where, str) or not Path(where).is_dir() or Path(where).resolve() == Path.cwd().resolve():
        return []
    data = recorded.get("data") or {}
    if not isinstance(data, dict):
        return []
    pinned = []
    for key in ("train", "eval", "knowledge_base"):
        value = data.get(key)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        moved = [_as_ran(item, Path(where)) for item in items]
        if any(new != old for new, old in zip(moved, items)):
            pinned.append(f"data.{key}={json.dumps(moved if isinstance(value, list) else moved[0])}")
    return pinned


def _as_ran(item: object, where: Path) -> object:
    """One data spec as the run read it: a relative local file that is there in `where`, by its absolute path."""
    if not isinstance(item, str) or item.startswith("pkg:") or Path(item).expanduser().is_absolute():
        return item
    there = where / item
    return str(there) if there.is_file() else item


def _watermark_key_override(run: RunDir) -> list[str]:
    """A run's recipe.yaml shows its watermark key redacted; the key itself is in the adapter's key file."""
    key = watermark.read_key(run.adapter)
    return [] if key is None else [f"eval.watermark.key={key}"]


def resolve_run(
    run_path: str | Path, overrides: list[str] | None = None, splits: tuple[str, ...] = ()
) -> tuple[Resolved, RunDir]:
    """A finished run directory (its recipe.yaml and adapter/), resolved for a command that reads `splits`
    (predict, merge, export, the watermark's detector). A run another process holds (training it, resuming it,
    evaluating into it) is refused, that process named: its adapter and card may be replaced under the reader."""
    path = Path(run_path).expanduser()
    run = RunDir(path)
    if path.is_dir():
        RunLock(path, label=str(run_path)).refuse_if_held()
    if not path.is_dir() or not run.is_run():
        aside = path / "adapter.old"  # files.replace_directory's: a kill came between its two renames
        hint = (
            f"; {aside} holds the adapter it was replacing when it stopped: rename it to adapter/ to use it"
            if aside.is_dir() and not run.adapter.exists()
            else ""
        )
        raise RecipeError(f"{run_path}: not a finished run directory (needs recipe.yaml and adapter/){hint}")
    resolved, _ = resolve_source(path, overrides, splits)
    return resolved, run


def validate_recipe_file(path: Path, overrides: list[str] | None = None) -> str:
    """`finetune validate` for one file with run's overrides: a one-line summary, or the error run would give."""
    with overrides_named(overrides):
        checked = check_recipe(_parse(read_recipe(path, overrides), str(path), SPLITS), source=str(path))
        recipe = checked.recipe
        # Where run would write, refused as run refuses it whatever its flags (a sweep's folder is the sweep's).
        problem = (
            None
            if recipe.sweep is not None
            else rundir.output_dir_problem(RunDir(Path(recipe.output.dir).expanduser()))
        )
        if problem is not None:
            raise RecipeError(f"{path}: {problem}")
        # The variable belongs to the machine that runs the recipe, so validate does not refuse without it; it says
        # so where run on this machine would (validate said only "ok", and run then exited 2).
        code = runs_code(recipe) or (
            "codegen: scoring runs generated code against the eval rows' tests, where they have them"
            if recipe.task == "codegen"
            else None
        )
        unset = code is not None and recipe.eval.execute_code and os.environ.get(sandbox.OPT_IN_ENV) != "1"
        idle = [w for m, c in recipe.eval.gates.items() if (w := guards_nothing(parse_gate(f"{m}{c}"))) is not None]
        return (
            checked.summary()
            + (
                f"; note: {code}, and run needs {sandbox.OPT_IN_ENV}=1 on the machine that runs it (not set here)"
                if unset
                else ""
            )
            + "".join(f"; warning: {warning}" for warning in idle)
        )


__all__ = [
    "CheckedRecipe",
    "Resolved",
    "build_recipe",
    "check_recipe",
    "load_recipe",
    "read_recipe",
    "resolve",
    "resolve_recipe",
    "resolve_run",
    "resolve_source",
    "validate_recipe_file",
]
