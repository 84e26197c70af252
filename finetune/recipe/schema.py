"""The recipe: one typed, validated object built from YAML plus `section.key=value` overrides.

Every problem is collected and reported at once, each naming its place in the
recipe and, for a misspelt key, the nearest valid name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.errors import RecipeError, did_you_mean
from finetune.recipe.gates import parse_gate
from finetune.secrets import REDACTED

TaskName = Literal["classification", "copywriting", "codegen", "qa"]
# LoRA target groups, resolved to module names by finetune.lora.
ABSTRACT_TARGETS = ("attention", "self_attention", "cross_attention", "mlp", "all_linear")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = Field(
        description="Hub id, local directory, `pkg:MODULE/SUBDIR`, a `.gguf` file or `DIR::FILE.gguf`."
    )
    family: Literal["auto", "bert", "bart", "gpt"] = Field(
        "auto", description="Model family; `auto` reads it from the checkpoint's config."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with a hub checkpoint to run. Off unless set; logged when on."
    )
    # 0 by default: with LoRA the frozen base needs no dropout, and on a CPU its random masks cost 40% of a
    # MiniLM training step (bench/README.md: same or better accuracy, 1.6x faster training).
    dropout: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="While training: every dropout probability of the base model's config (hidden, "
        "attention, ...) set to this value; null keeps the checkpoint's own. LoRA's own dropout is lora.dropout.",
    )


class RetrievalSection(Section):
    method: Literal["dense", "bm25", "hybrid"] = Field(
        "dense",
        description="dense: sentence-transformers embeddings; bm25: bm25s; hybrid: reciprocal-rank fusion of both.",
    )
    top_k: int = Field(5, gt=0, description="Passages retrieved per question (the reader sees all of them).")
    model: str | None = Field(
        None, description="Sentence-embedding model for dense retrieval (default: the shipped all-MiniLM-L6-v2)."
    )
    train: bool = Field(False, description="Fine-tune the retriever on the training pairs (not supported yet).")


class DataSection(Section):
    train: str | list[str] = Field(
        description="Training file(s) (.jsonl/.json/.csv/.parquet) or a hub dataset id (`id` or `id:split`)."
    )
    eval: str | list[str] | None = Field(None, description="Evaluation file(s) or hub dataset id.")
    eval_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the training rows held out for evaluation when no `eval` is given."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map the task's field names to the file's column names."
    )
    max_length: int = Field(256, gt=0, description="Maximum tokens per example.")
    overflow: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with examples longer than `max_length`; counts are always reported."
    )
    template: str | None = Field(
        None,
        description="Generation tasks: a Python format string over any columns that builds the prompt, "
        "e.g. 'Write copy for {product} aimed at {audience}:'.",
    )
    chat_template: bool = Field(
        False, description="Generation tasks: wrap each prompt as a user turn with the tokenizer's chat template."
    )
    doc_stride: int | None = Field(
        None,
        gt=0,
        description="Extractive qa: tokens shared by neighbouring windows of a long context (default: derived "
        "from the training answers, so the longest fits whole in some window).",
    )
    labels: list[str | int] | None = Field(
        None,
        description="Classification: the label set in a fixed order (default: sorted labels of the training data).",
    )
    knowledge_base: str | list[str] | None = Field(
        None,
        description="qa: passage file(s) (`text`, optional `title`, `id`); rows then need only question and "
        "answer, and each question is answered from its retrieved passages.",
    )
    on_overlap: Literal["warn", "drop", "error"] = Field(
        "warn",
        description="Eval rows that duplicate training rows (exact or near): warn, drop those training rows, "
        "or error (exit 3).",
    )
    retrieval: RetrievalSection = Field(default_factory=RetrievalSection, description="qa with a knowledge base.")
    num_workers: int | None = Field(
        None,
        gt=0,
        description="Processes that tokenise large data in parallel (default: the cores this process may "
        "use). The features are the same for any number.",
    )
    max_train_samples: int | None = Field(None, gt=0, description="Use only the first N training rows.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use only the first N evaluation rows.")


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    targets: str | list[str] = Field(
        "all_linear",
        description="attention | self_attention | cross_attention | mlp | all_linear, or explicit module names.",
    )
    use_dora: bool = Field(
        False, description="DoRA: learn a magnitude per output beside the LoRA direction (peft's use_dora)."
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (peft's use_rslora)."
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="LoRA initialisation (peft's init_lora_weights). pissa/olora start from the base weights' principal "
        "directions; the saved adapter is converted so it applies to the unchanged base.",
    )

    @field_validator("targets")
    @classmethod
    def _known_abstract_target(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ABSTRACT_TARGETS:
            raise ValueError(
                f"unknown target group {value!r}{did_you_mean(value, ABSTRACT_TARGETS)}; "
                f"use one of {', '.join(ABSTRACT_TARGETS)} or a list of module names"
            )
        if isinstance(value, list) and not value:
            raise ValueError("an explicit target list must name at least one module")
        return value


class EarlyStopping(Section):
    patience: int = Field(gt=0, description="Evaluations without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0, description="The smallest change of eval.best_metric that counts as better.")


class TrainSection(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers' get_scheduler names)."
    )
    warmup: float = Field(
        0.06, ge=0, description="Warmup: a fraction of all optimizer steps when < 1, else a number of steps."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null turns it off.")
    seed: int = Field(42, description="Seed for model head init, shuffling and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it natively (CUDA or AVX-512 BF16 CPUs), else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, same data each epoch)."
    )
    packing: bool = Field(
        False,
        description="GPT-family generation tasks: concatenate each batch into one row with no padding, attention "
        "kept within each example (position ids restart per example).",
    )
    checkpoint_every: int = Field(100, gt=0, description="Optimizer steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="How many resumable checkpoints to keep.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between lines of train_log.jsonl.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers, through accelerate (none by default; each needs its own package).",
    )
    optimizer: Literal["adamw", "loraplus"] = Field(
        "adamw",
        description="adamw, or loraplus: AdamW with the LoRA B matrices at lr x loraplus_lr_ratio (peft's LoRA+).",
    )
    loraplus_lr_ratio: float = Field(
        16.0, gt=0, description="LoRA+: learning-rate ratio of the B matrices to the A matrices."
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="Stop after `patience` evaluations (eval.every) without an improvement of eval.best_metric "
        "larger than `min_delta`; a stopped run is a successful run.",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss or gradient: stop (exit 5, last good checkpoint kept) or skip that update "
        "(counted in metrics.json).",
    )


class WatermarkSection(Section):
    method: Literal["kirchenbauer", "synthid"] = Field(
        "kirchenbauer",
        description="kirchenbauer: transformers' green-list watermark (Kirchenbauer et al. 2023); "
        "synthid: transformers' SynthID Text tournament sampling (Dathathri et al. 2024; needs eval.temperature > 0).",
    )
    key: int | Literal["<redacted>"] = Field(
        description="The secret that seeds the green lists (kirchenbauer) or the tournament keys (synthid); a run keeps "
        "it in adapter/watermark.key (mode 0600), never in recipe.yaml, the manifest, logs or the model card."
    )
    greenlist_ratio: float = Field(
        0.25, gt=0, lt=1, description="kirchenbauer: fraction of the vocabulary that is green at each step."
    )
    # 3.0 with the entropy gate: 57 of 57 held-out 64-token generations detected at ROUGE-L -0.042; 2.0 detected
    # 45 of 57 (README "Watermarks").
    bias: float = Field(
        3.0, gt=0, description="kirchenbauer: added to the green tokens' logits: the watermark's strength."
    )
    context_width: int = Field(1, gt=0, description="kirchenbauer: previous tokens that seed each step's green list.")
    entropy_threshold: float = Field(
        1.0,
        ge=0,
        description="kirchenbauer: mark and count only tokens where the model's next-token entropy is at "
        "least this many nats (SWEET): a token the model is sure of cannot carry the mark. Detection then loads the "
        "run's model. 0: every token (plain Kirchenbauer; detection needs only the tokenizer).",
    )
    ngram_len: int = Field(
        5, ge=2, description="synthid: each token's g-values are seeded by the ngram_len - 1 tokens before it."
    )
    depth: int = Field(
        30,
        gt=0,
        le=64,
        description="synthid: tournament layers (one derived key each): more layers, a "
        "stronger mark at the same distortion.",
    )
    # 3.0: a false-positive rate of about 1e-3 on unmarked text (at 4.0, 52 of the 57 above were detected).
    z_threshold: float = Field(
        3.0,
        gt=0,
        description="A text is flagged when its z-score (green tokens, or synthid's mean g-value) exceeds this.",
    )

    # Which settings belong to which method: a setting of the other method is an error, never ignored.
    METHOD_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "kirchenbauer": ("greenlist_ratio", "bias", "context_width", "entropy_threshold"),
        "synthid": ("ngram_len", "depth"),
    }

    def other_method_keys(self) -> tuple[str, ...]:
        """The settings that belong to the other methods, not to this one."""
        return tuple(key for method, keys in self.METHOD_KEYS.items() if method != self.method for key in keys)


class EvalSection(Section):
    metrics: list[str] | None = Field(None, description="Metrics to report (default: all of the task's).")
    gates: dict[str, str] = Field(
        default_factory=dict, description='Quality gates, e.g. {accuracy: ">=0.85"}; a failed gate exits 4.'
    )
    batch_size: int | None = Field(None, gt=0, description="Evaluation batch size (default: 2 x train.batch_size).")
    every: int | Literal["epoch"] | None = Field(
        None, description="Evaluate during training: every N optimizer steps, or at each epoch end (null: only after)."
    )
    during_max_samples: int | None = Field(
        None,
        gt=0,
        description="Evaluations during training use the first N eval rows (the final one uses all); "
        "generation tasks default to 64.",
    )
    best_metric: str | None = Field(
        None,
        description="The metric that decides the best weights (default: the task's main metric; eval_loss: lower "
        "is better).",
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description="Which weights become adapter/ and are scored in metrics.json: the last, or the best evaluated.",
    )
    # Generation (copywriting, codegen, generative qa)
    max_new_tokens: int = Field(128, gt=0, description="Generation: most new tokens per answer.")
    temperature: float = Field(0.0, ge=0, description="Generation: 0 is greedy decoding; above 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Generation: nucleus sampling mass (with temperature > 0).")
    num_samples: int = Field(1, gt=0, description="Generation: samples per prompt (codegen pass@k needs n >= k).")
    stop: list[str] | None = Field(
        None, description="Generation: cut each answer at the first of these strings (default: the task's own)."
    )
    watermark: WatermarkSection | None = Field(
        None,
        description="Generation tasks: watermark every generation of run, eval and predict (finetune detect finds it).",
    )
    # Extractive question answering
    n_best: int = Field(20, gt=0, description="Extractive qa: start and end candidates considered per window.")
    max_answer_length: int | None = Field(
        None,
        gt=0,
        description="Extractive qa: longest answer span, in tokens (default: derived from the training "
        "answers, at least SQuAD's 30).",
    )
    # Code execution (codegen)
    pass_k: list[int] | None = Field(
        None, description="Codegen: the k of pass@k (default: 1, 2, 4, 8, 10, 16, 32, 64, 100 up to num_samples)."
    )
    execute_code: bool = Field(
        False, description="Codegen: run generated code against the tests (also needs FINETUNE_ALLOW_CODE_EXECUTION=1)."
    )
    sandbox: Literal["strict", "basic"] = Field(
        "strict",
        description="Codegen: strict = bubblewrap namespaces (no network, read-only filesystem, own PIDs), required "
        "unless you choose basic = resource limits and a scrubbed environment only.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Codegen: wall-clock seconds per sample before it is killed.")
    memory_mb: int = Field(1024, gt=0, description="Codegen: address-space limit per sample, in MiB.")

    @field_validator("pass_k")
    @classmethod
    def _positive_k(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and (not values or any(k < 1 for k in values)):
            raise ValueError("pass_k must list positive integers, e.g. [1, 10]")
        return values

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: dict[str, str]) -> dict[str, str]:
        for metric, condition in gates.items():
            try:
                parse_gate(f"{metric}{condition}")
            except RecipeError as exc:
                raise ValueError(str(exc)) from None
        return gates


class DistributedSection(Section):
    num_processes: int | Literal["auto"] = Field(
        1,
        description="Processes to launch through accelerate (auto: one per GPU, 1 without GPUs); --num-processes wins.",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="How several GPUs share the work: ddp (replicas), fsdp or deepspeed (ZeRO-2), via accelerate.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes); CUDA only."
    )


class OutputSection(Section):
    dir: str = Field("runs/latest", description="Run directory (created; an existing run is resumed or replaced).")


class Recipe(Section):
    task: TaskName = Field(description="classification | copywriting | codegen | qa")
    mode: Literal["extractive", "generative"] | None = Field(
        None, description="qa only: extractive (a span of the context; the default) or generative (a written answer)."
    )
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @property
    def eval_batch_size(self) -> int:
        return self.eval.batch_size or 2 * self.train.batch_size


# --------------------------------------------------------------------------- loading


def _section_fields(loc: tuple) -> list[str]:
    """Valid key names at the place `loc` (a path of field names) in the Recipe."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def _format_problem(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    place = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        hint = did_you_mean(loc[-1], _section_fields(loc[:-1]))
        return f"{place}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{place}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error" and loc:
        message += did_you_mean(error.get("input"), _literal_choices(error))
    if error["type"] not in ("value_error", "assertion_error") and "input" in error:
        return f"{place}: {message} (got {error['input']!r})"
    return f"{place}: {message}"


def _literal_choices(error: dict) -> list[str]:
    expected = (error.get("ctx") or {}).get("expected", "")
    return [part.strip(" '") for part in expected.replace(" or ", ",").split(",") if part.strip()]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML."""
    for override in overrides:
        key, sep, text = override.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip() or any(not p for p in parts):
            raise RecipeError(f"malformed override {override!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {override!r}: value is not valid YAML ({exc.problem})") from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML lets the last one win silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {exc.start}); a recipe is YAML text") from None
    if "\x00" in text:
        raise RecipeError(f"{path}: a binary file, not a YAML recipe")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (task, model, data, ...)")
    return raw


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """The recipe's structure and types (the schema only; finetune.validation adds every other rule)."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_format_problem(e) for e in exc.errors()]
    raise recipe_problems_error(source, problems)


def recipe_problems_error(source: str, problems: list[str]) -> RecipeError:
    noun = "problem" if len(problems) == 1 else "problems"
    return RecipeError(f"{source}: {len(problems)} {noun}", problems)


def flat_settings(recipe: Recipe) -> dict:
    """The recipe as {"section.key": value}; the mappings users fill in (columns, gates) stay whole."""
    flat = {}
    for section, value in recipe.model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": inner for key, inner in value.items()})
        else:
            flat[section] = value
    return flat


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; the watermark key never leaves the adapter's key file."""
    data = recipe.model_dump(mode="json")
    mark = recipe.eval.watermark
    if mark is not None:
        data["eval"]["watermark"]["key"] = REDACTED
        for key in mark.other_method_keys():  # only the settings the method uses
            del data["eval"]["watermark"][key]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
