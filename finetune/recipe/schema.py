"""The recipe: one typed, validated object built from YAML plus `section.key=value` overrides.

Every problem is collected and reported at once, each naming its place in the
recipe and, for a misspelt key, the nearest valid name.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finetune.errors import RecipeError, brief, did_you_mean
from finetune.recipe.gates import parse_gate
from finetune.secrets import REDACTED

# LoRA target groups, resolved to module names by finetune.lora.
ABSTRACT_TARGETS = ("attention", "self_attention", "cross_attention", "mlp", "all_linear")


# --------------------------------------------------------------------------- value types
#
# YAML 1.1 reads an unquoted yes/no, on/off, true/false as a boolean, and pydantic's lax mode would turn that into
# 1 or 0 for a number (and 1/0 into true/false for a switch). Numbers here refuse booleans and switches accept
# only booleans; numbers still accept numeric text, because YAML reads `lr: 1e-3` (no dot) as the string '1e-3'.
# Every float refuses inf and nan (Section's allow_inf_nan).

BOOL_FOR_NUMBER = "bool_for_number"


def _refuse_bool(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError(
            BOOL_FOR_NUMBER,
            "Input should be a number, not a boolean (YAML reads an unquoted yes/no, on/off or true/false as a "
            "boolean)",
        )
    return value


Int = Annotated[int, BeforeValidator(_refuse_bool)]
Float = Annotated[float, BeforeValidator(_refuse_bool)]
Bool = Annotated[bool, Strict()]


def _number_or(*words: str, secret: bool = False) -> WrapValidator:
    """A whole number or one of `words`, reported as one problem at the key (pydantic reports one per alternative,
    at places like `eval.every.int`). A secret's problem never shows the value given."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        _refuse_bool(value)
        try:
            return handler(value)
        except ValidationError as exc:
            number = next((e for e in exc.errors() if e["type"] != "literal_error"), None)
            if number is None or (isinstance(value, str) and number["type"] == "int_parsing"):
                choices = " or ".join(repr(word) for word in words)
                message = f"Input should be a whole number or {choices}{did_you_mean(value, words)}"
            else:  # a number out of range, a fraction, a list...: what the number alternative said
                message = number["msg"]
        if secret:
            raise ValueError(message)  # shown without the value (see _format_problem)
        raise PydanticCustomError("number_or_word", "{message}", {"message": message})

    return WrapValidator(validate)


def _threshold(value: object) -> object:
    """eval.threshold: a probability in [0, 1] or `tune`, as one problem at the key (a union reports one per
    alternative)."""
    if value == "tune":
        return value
    _refuse_bool(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PydanticCustomError(
            "threshold", "Input should be a number in [0, 1] or 'tune'{hint}", {"hint": did_you_mean(value, ["tune"])}
        ) from None
    if not 0 <= number <= 1:  # nan fails both comparisons
        raise PydanticCustomError("threshold", "Input should be a number in [0, 1] (a probability) or 'tune'")
    return number


# Bounds shared by several settings (docs/recipe.md shows each setting's own).
SEED_MAX = 2**32 - 1  # numpy's global seed (accelerate's set_seed) takes 0 .. 2**32 - 1
KEY_MAX = 2**64 - 1  # torch.Generator.manual_seed (transformers' green lists) takes up to 2**64 - 1
# Above every model's context today (Llama 4 Scout: 10M positions); the model's own limit is checked against its
# config by `finetune validate`.
TOKENS_MAX = 2**24
MIN_LENGTH = 8  # below this the special tokens (2-4) leave nothing to learn from; at 1-2 tokens runs crash
MAX_RANK = 16384  # the widest hidden size of current dense models (Llama 3.1 405B); a larger rank adds nothing
MAX_PROCESSES = 1024
# Step counts are worked out in floats (epochs x steps per epoch, warmup x total), exact for whole numbers only up
# to 2**53; an epochs of 1e308 became an infinite step count. 2**53 steps is also far beyond any run.
STEPS_MAX = 2**53
# Codegen's address-space limit goes to setrlimit in bytes, a 64-bit number: 2**64 bytes is 2**44 MiB.
MEMORY_MB_MAX = 2**44 - 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def changed(self, *names: str) -> list[str]:
        """Of `names` (every setting when none), those not at the schema's default. A run's recipe.yaml writes every
        setting out, so a rule about settings a recipe "sets" means those changed from their defaults: this is the
        one comparison every such rule makes."""
        defaults = type(self).defaults(*names)
        return [n for n in defaults if getattr(self, n) != defaults[n]]

    @classmethod
    def defaults(cls, *names: str) -> dict[str, Any]:
        """The schema's default of each of `names` (every setting with one, when none)."""
        fields = cls.model_fields
        return {
            n: fields[n].get_default(call_default_factory=True) for n in names or fields if not fields[n].is_required()
        }


class ModelSection(Section):
    name_or_path: str = Field(
        description="The base model: a hub id, a local directory, `pkg:MODULE/SUBDIR`, a `.gguf` file or "
        "`DIR::FILE.gguf` (required)."
    )
    # The names come from the family registry (models/families.py FAMILIES); the rules check them.
    family: str = Field(
        "auto",
        description="Model family: `auto` reads it from the checkpoint's config, or one of the registered families "
        "(bert: encoders, bart: encoder-decoders, gpt: decoders).",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) for hub ids; null takes the default branch."
    )
    trust_remote_code: Bool = Field(
        False, description="Allow code shipped with a hub checkpoint to run. Off unless set; logged when on."
    )
    # 0 by default: with LoRA the frozen base needs no dropout, and on a CPU its random masks cost 40% of a
    # MiniLM training step (bench/README.md: same or better accuracy, 1.6x faster training).
    dropout: Float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="While training: every dropout probability of the base model's config (hidden, "
        "attention, ...) set to this value; null keeps the checkpoint's own. LoRA's own dropout is lora.dropout.",
    )

    adapter: str | None = Field(
        None,
        description="Start from an earlier run's adapter (its run directory or adapter/ directory) instead of "
        "fresh LoRA: its LoRA settings replace the lora section, and preference objectives use it as the "
        "reference policy (the usual SFT -> DPO path). Null: fresh LoRA on the base model.",
    )


class RetrievalSection(Section):
    method: Literal["dense", "bm25", "hybrid"] = Field(
        "dense",
        description="dense: sentence-transformers embeddings; bm25: bm25s; hybrid: both, fused as `fusion` says.",
    )
    fusion: Literal["convex", "rrf"] = Field(
        "convex",
        description="Hybrid retrieval: convex: (1 - sparse_weight) x dense similarity + sparse_weight x BM25 score, "
        "each min-max normalised over the corpus per question; rrf: reciprocal-rank fusion (1 / (60 + rank) summed), "
        "which ignores how far apart the scores are.",
    )
    answer_from: Literal["first", "any"] = Field(
        "first",
        description="Extractive qa with a knowledge base: where the reader's answer may lie. first: in the "
        "highest-ranked retrieved passage (the reader still reads them all); any: anywhere in them, the reader's "
        "highest-scoring span. On a FAQ nobody here wrote the reader's answers from a passage below the first were "
        "wrong in every case measured (docs/retrieval.md), so first is the default.",
    )
    sparse_weight: Float | None = Field(
        None,
        ge=0,
        le=1,
        description="Hybrid retrieval with convex fusion: BM25's share of the fused score. null: chosen on the "
        "training questions with the starting model (the weight of 0, 0.1, ..., 0.5 ranking their gold passages "
        "best by MRR@10; ties to the smaller) and recorded in RUN/recipe.yaml.",
    )
    top_k: Int = Field(
        5,
        ge=1,
        description="Passages retrieved per question, all of which the reader sees (at most the passages there are); "
        "task retrieval: the k of its recall@k.",
    )
    model: str | None = Field(
        None,
        description="Sentence-embedding model for dense retrieval; null uses the shipped all-MiniLM-L6-v2. Task "
        "rerank: the first-stage retriever whose candidates the cross-encoder reorders (e.g. a retrieval run's "
        "adapter/).",
    )
    candidates: Int = Field(
        20,
        ge=1,
        le=1000,
        description="Task rerank: passages the first-stage retriever hands the cross-encoder per query; the "
        "cross-encoder reorders them, the rest keep the first stage's order below them.",
    )
    train: Bool | None = Field(
        None,
        description="qa with a knowledge base: fine-tune the dense retriever on the training questions first (the "
        "gold passage of a question is the one holding its answer; a `task: retrieval` run in RUN/retriever), then "
        "train the reader on what the trained retriever returns. null: on for dense and hybrid retrieval, off for "
        "bm25 (nothing to train).",
    )
    pooling: Literal["auto", "mean", "cls", "lasttoken"] = Field(
        "auto",
        description="How a bi-encoder turns token vectors into one embedding. auto: the checkpoint's "
        "sentence-transformers config, else mean for encoders; a decoder without one is refused (choose lasttoken "
        "or mean).",
    )
    temperature: Float = Field(
        0.05,
        gt=0,
        le=1,
        description="Bi-encoder training: the InfoNCE temperature of the multiple-negatives ranking loss "
        "(sentence-transformers' scale = 1 / temperature; 0.05 is its default scale of 20).",
    )
    hard_negatives: Int = Field(
        1,
        ge=0,
        le=64,
        description="Bi-encoder training: negatives per training row mined from the knowledge base with the "
        "starting model, beside the in-batch ones (a row's own `negative` texts count first); 0: in-batch only.",
    )
    negative_margin: Float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Hard-negative mining skips near-duplicates of the positive: a passage is a negative only if "
        "its score is below the positive's by at least this share of the positive's score "
        "(sentence-transformers' relative_margin; the row's relevant passages are never negatives).",
    )
    matryoshka_dims: list[Int] | None = Field(
        None,
        description="Bi-encoder training: also train these truncated embedding sizes (sentence-transformers' "
        "MatryoshkaLoss), e.g. [384, 256, 128, 64]; null: the full size only.",
    )
    epochs: Float = Field(
        3,
        gt=0,
        le=STEPS_MAX,
        description="qa with a knowledge base: passes over the training questions when the retriever is "
        "fine-tuned first (data.retrieval.train); task retrieval uses train.epochs.",
    )
    lr: Float = Field(
        1.0e-3,
        gt=0,
        description="qa with a knowledge base: the retriever's peak learning rate (LoRA) when it is fine-tuned "
        "first; task retrieval uses train.lr.",
    )
    batch_size: Int = Field(
        32,
        ge=2,
        description="qa with a knowledge base: questions per batch when the retriever is fine-tuned first (each "
        "question's in-batch negatives are the other questions' passages); task retrieval uses train.batch_size.",
    )

    @field_validator("matryoshka_dims")
    @classmethod
    def _positive_dims(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and (not values or any(d < 1 for d in values) or len(set(values)) != len(values)):
            raise ValueError("matryoshka_dims must list distinct positive sizes, e.g. [384, 256, 128, 64]")
        return values


class DataSection(Section):
    train: str | list[str] = Field(
        description="Training file(s) (.jsonl/.json/.csv/.tsv, each optionally .gz, or .parquet) or a hub dataset id "
        "(`id` or `id:split`) (required)."
    )
    eval: str | list[str] | None = Field(
        None,
        description="Evaluation file(s) or hub dataset id; null holds out `eval_split` of the training rows "
        "instead (both are null by default: give one of them).",
    )
    eval_split: Float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of the training rows held out for evaluation (chosen with train.seed) when no `eval` "
        "is given.",
    )
    stratify: Bool | None = Field(
        None,
        description="How `eval_split` draws the eval rows in classification: true: stratified by label (each class "
        "gives its share, and keeps a training row); false: at random. null: stratified for single-label "
        "classification when every class has two rows or more, else random (a class with one row stays in "
        "training); the data report says which.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the task's field names to the file's column names; empty: the columns carry the field names.",
    )
    max_length: Int = Field(
        256,
        ge=MIN_LENGTH,
        le=TOKENS_MAX,
        description="Maximum tokens per example, special tokens included (at most the model's positions).",
    )
    overflow: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with examples longer than `max_length`; counts are always reported."
    )
    template: str | None = Field(
        None,
        description="Generation tasks: a Python format string over any columns that builds the prompt, "
        "e.g. 'Write copy for {product} aimed at {audience}:'; null uses the prompt column as it is. A template "
        "whose filled prompts could pass 1,048,576 characters (a field repeated, a huge width) is refused (exit 2) "
        "before any row is filled.",
    )
    chat_template: Bool = Field(
        False, description="Generation tasks: wrap each prompt as a user turn with the tokenizer's chat template."
    )
    format: Literal["auto", "prompt", "messages", "alpaca", "sharegpt"] = Field(
        "auto",
        description="Generation tasks: the rows' layout. prompt: the task's own fields (prompt/completion, "
        "question/answer). messages: a list of {role, content} turns (system, user, assistant). alpaca: "
        "instruction, optional input, output (and system). sharegpt: `conversations` of {from, value} turns "
        "(human, gpt, system). Conversations go through the tokenizer's chat template (GPT family). auto: the "
        "fields data.columns maps decide, else the file's columns (the task's own fields, then messages, "
        "conversations, instruction + output).",
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all",
        description="Conversations: the assistant turns the loss falls on (their content and end-of-turn token): "
        "all of them, or the last one only.",
    )
    doc_stride: Int | None = Field(
        None,
        ge=1,
        le=TOKENS_MAX,
        description="Extractive qa: tokens shared by neighbouring windows of a long context, below max_length "
        "(null: derived from the training answers, so the longest fits whole in some window).",
    )
    labels: list[str | int] | None = Field(
        None,
        min_length=1,
        description="Classification: the label set in a fixed order (null: sorted labels of the training data); "
        "quote yes/no labels, which YAML reads as booleans.",
    )
    multi_label: Bool | None = Field(
        None,
        description="Classification: several labels per text (a sigmoid head, one yes/no per label, binary "
        "cross-entropy). null: decided from the data: on when the training label column holds lists or "
        "label_separator is set; false refuses list labels (exit 3).",
    )
    label_separator: str | None = Field(
        None,
        min_length=1,
        description="Classification: the label column is text holding several labels split on this string "
        "(e.g. ';'), each stripped; an empty text is a text with no labels. Implies multi_label.",
    )
    knowledge_base: str | list[str] | None = Field(
        None,
        description="qa: passage file(s) (`text`, optional `title`, `id`); rows then need only question and "
        "answer, and each question is answered from its retrieved passages. retrieval: the corpus searched (ids "
        "unique, at least one passage).",
    )
    on_overlap: Literal["warn", "drop", "error"] = Field(
        "warn",
        description="Eval rows that duplicate training rows (exact or near): warn, drop those training rows, "
        "or error (exit 3).",
    )
    retrieval: RetrievalSection = Field(
        default_factory=RetrievalSection, description="qa with a knowledge base: how passages are retrieved."
    )
    num_workers: Int | None = Field(
        None,
        ge=1,
        le=MAX_PROCESSES,
        description="Processes that tokenise large data (20,000 rows or more) in parallel; null: the cores this "
        "process may use. The features are the same for any number.",
    )
    max_train_samples: Int | None = Field(
        None, ge=1, description="Use only the first N training rows; null uses them all."
    )
    max_eval_samples: Int | None = Field(
        None, ge=1, description="Use only the first N evaluation rows; null uses them all."
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _no_boolean_labels(cls, value: object) -> object:
        if isinstance(value, list):
            for index, label in enumerate(value):
                if isinstance(label, bool):
                    raise ValueError(
                        f"label {index + 1} is the boolean {str(label).lower()}: YAML reads an unquoted yes/no, "
                        f"on/off or true/false as a boolean; quote it ('{'yes' if label else 'no'}')"
                    )
        return value


class LoraSection(Section):
    r: Int = Field(
        16,
        ge=1,
        le=MAX_RANK,
        description="LoRA rank: the inner dimension of each adapter's two matrices (trainable parameters grow "
        "with it).",
    )
    alpha: Float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r)).")
    dropout: Float = Field(0.05, ge=0, lt=1, description="Dropout probability on the LoRA path while training.")
    targets: str | list[str] = Field(
        "all_linear",
        description="attention | self_attention | cross_attention | mlp | all_linear, or explicit module names.",
    )
    use_dora: Bool = Field(
        False, description="DoRA: learn a magnitude per output beside the LoRA direction (peft's use_dora)."
    )
    use_rslora: Bool = Field(
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
    patience: Int = Field(
        ge=1, description="Evaluations (eval.every) without improvement before training stops (required)."
    )
    min_delta: Float = Field(
        0.0, ge=0, description="The smallest change of eval.best_metric that counts as better; 0: any change."
    )


class PreferenceSection(Section):
    """How the preference objectives weigh their judgements (train.objective dpo, orpo or kto)."""

    beta: Float = Field(
        0.1,
        gt=0,
        le=100,
        description="DPO/KTO: strength of the pull towards the reference policy (the KL penalty's inverse "
        "temperature); ORPO: weight of the odds-ratio term against the chosen answers' NLL.",
    )
    loss: Literal["sigmoid", "ipo", "robust", "hinge"] = Field(
        "sigmoid",
        description="DPO's loss: sigmoid (the DPO paper), ipo (squared, length-normalised), robust (noisy "
        "labels, with label_smoothing) or hinge (SLiC). Each equals TRL's loss of the same name.",
    )
    label_smoothing: Float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="DPO robust loss: the assumed share of pairs whose judgement is flipped (0 .. 0.5).",
    )
    desirable_weight: Float = Field(1.0, gt=0, le=1000, description="KTO: weight of the desirable rows' losses.")
    undesirable_weight: Float = Field(1.0, gt=0, le=1000, description="KTO: weight of the undesirable rows' losses.")

    # The objectives that read each setting (beta: all three): one set for another objective is an error, never
    # ignored.
    OBJECTIVE_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "beta": ("dpo", "orpo", "kto"),
        "loss": ("dpo",),
        "label_smoothing": ("dpo",),
        "desirable_weight": ("kto",),
        "undesirable_weight": ("kto",),
    }


class RewardSection(Section):
    """What a sampled completion scores under GRPO: the task's own score (the metric the gates judge), plus
    optional terms, each weighted; the reward is their weighted sum."""

    task: Float = Field(1.0, ge=0, le=100, description="Weight of the task's own score (test share, F1, ROUGE-L).")
    length_target: Int | None = Field(
        None,
        ge=1,
        le=65536,
        description="A completion length to aim at, in tokens: the term is 1 - |length - target| / target (at "
        "least 0). Null: no length term.",
    )
    length_weight: Float = Field(0.1, ge=0, le=100, description="Weight of the length term.")
    pattern: str | None = Field(
        None,
        description="A regular expression a completion should contain (Python `re.search`, e.g. '```python'): the "
        "term is 1 when it does, else 0. Null: no pattern term.",
    )
    pattern_weight: Float = Field(0.1, ge=0, le=100, description="Weight of the pattern term.")
    function: str | None = Field(
        None,
        description="Your own reward, `module:function` (a .py path or a module on the path, e.g. "
        "rewards.py:score), called as TRL calls one: function(prompts=[...], completions=[...], **row_fields) -> "
        "one number per completion. It runs in the code sandbox, never in finetune's process, so it needs the "
        "same two opt-ins as generated code (eval.execute_code and FINETUNE_ALLOW_CODE_EXECUTION=1). Only its own "
        "file goes into the sandbox: a module beside it cannot be imported there.",
    )
    function_weight: Float = Field(1.0, ge=0, le=100, description="Weight of the function's reward.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            if not value:  # (one that matches an empty text may still differ: '^(?!.*TODO)')
                raise ValueError(
                    "an empty pattern matches every completion, so the term never differs; use null (got '')"
                )
        return value

    @field_validator("function")
    @classmethod
    def _names_a_function(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^:]+:[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not `module:function` (e.g. rewards.py:score or my_rewards:score)")
        return value


class GRPOSection(Section):
    """Group-relative policy optimisation: sample a group per prompt, score it with the task, learn from the
    differences within each group (train.objective grpo)."""

    group_size: Int = Field(4, ge=2, le=64, description="Completions sampled per prompt (a group).")
    max_new_tokens: Int = Field(64, ge=1, le=4096, description="Longest sampled completion, in tokens.")
    temperature: Float = Field(
        1.0, ge=0.05, le=5, description="Sampling temperature; the log-probabilities are taken at it too (as TRL)."
    )
    top_p: Float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set with this mass.")
    beta: Float = Field(
        0.04, ge=0, le=10, description="Weight of the KL penalty to the reference policy (0: no reference pass)."
    )
    epsilon: Float = Field(0.2, gt=0, lt=1, description="Clipping range of the policy ratio, 1 +- epsilon.")
    kl_bias_correction: Bool = Field(
        True,
        description="Weight each token's KL penalty by the policy ratio (the importance-sampling correction TRL "
        "applies by default, use_bias_correction_kl): the KL of the current policy, not of the one that sampled.",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        "grpo",
        description="Loss normalisation: grpo (mean over each completion's tokens, then over completions), bnpo "
        "(over all tokens of the batch, as DAPO), dr_grpo (over batch x max_new_tokens, Dr. GRPO). Equal to "
        "TRL's of the same name.",
    )
    scale_rewards: Bool = Field(
        True, description="Divide each group's advantages by its reward spread (false: Dr. GRPO's unscaled)."
    )
    num_iterations: Int = Field(
        1,
        ge=1,
        le=16,
        description="Optimizer steps on each sampled batch (TRL's num_iterations, the paper's mu): the later ones "
        "train on completions the policy of an earlier step sampled, so the ratio to that policy and its clipping "
        "act. Each step's sampled batch is kept in the checkpoints, so a resumed run continues exactly. Above 1, "
        "train.grad_accum must be 1.",
    )
    reward: RewardSection = Field(
        default_factory=RewardSection, description="What a completion scores: the task's score and optional terms."
    )


class TrainSection(Section):
    # The names are training/objectives.py's OBJECTIVES (a test checks they agree).
    objective: Literal["sft", "dpo", "orpo", "kto", "grpo"] = Field(
        "sft",
        description="What training optimises. sft: cross-entropy on the reference completion. dpo / orpo: "
        "pairs (prompt, chosen, rejected); kto: thumbs (prompt, completion, label true/false), or pairs, each two "
        "thumbs as TRL unpairs them; grpo: the task's own score of sampled completions as the reward (GPT-style models). Generation tasks only; the adapter "
        "stays a plain peft adapter.",
    )
    preference: PreferenceSection = Field(
        default_factory=PreferenceSection, description="Settings of the preference objectives (dpo, orpo, kto)."
    )
    grpo: GRPOSection = Field(default_factory=GRPOSection, description="Settings of train.objective grpo.")

    @property
    def learns_from_judgements(self) -> bool:
        """dpo, orpo, kto: trained on pairs or thumbs instead of one reference completion per prompt."""
        return self.objective in ("dpo", "orpo", "kto")

    @property
    def passes_per_batch(self) -> int:
        """Optimizer steps each loader batch is trained for: grpo's num_iterations, else 1."""
        return self.grpo.num_iterations if self.objective == "grpo" else 1

    @model_validator(mode="after")
    def _one_batch_a_step_when_repeated(self) -> TrainSection:
        # Each pass over a sampled batch must be its own optimizer step, or the later passes would accumulate
        # into the first one's step, where the policy has not moved yet.
        if self.passes_per_batch > 1 and self.grad_accum > 1:
            raise ValueError(
                f"grpo.num_iterations {self.passes_per_batch} trains each sampled batch once per optimizer step, "
                f"which grad_accum {self.grad_accum} would merge into one; set grad_accum 1 (a larger batch_size "
                "instead) or num_iterations 1"
            )
        return self

    epochs: Float = Field(
        3,
        gt=0,
        le=STEPS_MAX,
        description="Passes over the training data; a fraction ends partway through the last pass. Ignored when "
        "max_steps is set.",
    )
    max_steps: Int | None = Field(
        None,
        ge=1,
        le=STEPS_MAX,
        description="Stop after this many optimizer steps (overrides epochs); null: epochs decide.",
    )
    batch_size: Int = Field(16, ge=1, description="Examples per process per forward pass.")
    grad_accum: Int = Field(
        1,
        ge=1,
        description="Forward passes per optimizer step (effective batch = batch_size x grad_accum x processes).",
    )
    lr: Float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW), reached after warmup.")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW decoupled weight decay; 0 turns it off.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers' get_scheduler names)."
    )
    warmup: Float = Field(
        0.06,
        ge=0,
        le=STEPS_MAX,
        description="Warmup: a fraction of all optimizer steps when < 1, else a number of steps; 0: no warmup.",
    )
    max_grad_norm: Float | None = Field(
        1.0, gt=0, description="Gradient clipping: the largest total L2 norm of the gradients; null turns it off."
    )
    seed: Int = Field(
        42,
        ge=0,
        le=SEED_MAX,
        description="Seed for head initialisation, shuffling, the eval_split hold-out and dropout (0 .. 2**32 - 1, "
        "numpy's range).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it natively (CUDA or AVX-512 BF16 CPUs), else fp32."
    )
    group_by_length: Bool = Field(
        True, description="Batch examples of similar length together (less padding, same data each epoch)."
    )
    packing: Bool = Field(
        False,
        description="GPT-family generation tasks: concatenate each batch into one row with no padding, attention "
        "kept within each example (position ids restart per example).",
    )
    checkpoint_every: Int = Field(
        100,
        ge=1,
        description="Optimizer steps between resumable checkpoints; one is also written at each epoch's end, at "
        "every evaluated step and at the last step.",
    )
    keep_checkpoints: Int = Field(2, ge=1, description="How many resumable checkpoints to keep (the newest).")
    log_every: Int = Field(10, ge=1, description="Optimizer steps between lines of train_log.jsonl.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers, through accelerate (none by default; each needs its own package).",
    )
    optimizer: Literal["adamw", "loraplus"] = Field(
        "adamw",
        description="adamw, or loraplus: AdamW with the LoRA B matrices at lr x loraplus_lr_ratio (peft's LoRA+).",
    )
    loraplus_lr_ratio: Float = Field(
        16.0, gt=0, description="LoRA+: learning-rate ratio of the B matrices to the A matrices."
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="Stop after `patience` evaluations (eval.every) without an improvement of eval.best_metric "
        "larger than `min_delta`; a stopped run is a successful run. Null: train to the end.",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss or gradient: stop (exit 5, last good checkpoint kept) or skip that update "
        "(counted in metrics.json).",
    )
    # inverse_sqrt, not inverse: a class with 3 rows beside one with 100 gets 5.8x, not 33x, the weight.
    class_weights: Literal["auto", "none", "inverse", "inverse_sqrt"] = Field(
        "auto",
        description="Classification: weight the loss by the training distribution (single-label: per-class "
        "cross-entropy weights; multi-label: BCE pos_weight per label). inverse: n_max / n_class (multi-label: "
        "negatives / positives); inverse_sqrt: its square root; none: unweighted. auto: inverse_sqrt when the most "
        "frequent class has at least 4x the training rows of the rarest, else none.",
    )


class WatermarkSection(Section):
    method: Literal["kirchenbauer", "synthid", "learned"] = Field(
        "kirchenbauer",
        description="kirchenbauer: transformers' green-list watermark (Kirchenbauer et al. 2023); "
        "synthid: transformers' SynthID Text tournament sampling (Dathathri et al. 2024; needs eval.temperature > 0); "
        "learned: a k-bit message written by gated cross-attention blocks trained with the run and read back by a "
        "jointly trained extractor (Baldassini et al. 2024; GPT-family decoders, train.objective sft).",
    )
    # Not negative: synthid derives its layer keys with random.Random, which seeds from abs(key), so -k would
    # mark exactly as k does.
    key: Annotated[
        Annotated[int, Field(ge=0, le=KEY_MAX)] | Literal["<redacted>"], _number_or("<redacted>", secret=True)
    ] = Field(
        description="The secret (0 .. 2**64 - 1) that seeds the green lists (kirchenbauer) or the tournament keys "
        "(synthid); a run keeps it in adapter/watermark.key (mode 0600), never in recipe.yaml, the manifest, logs "
        "or the model card, which show <redacted> (required)."
    )
    greenlist_ratio: Float = Field(
        0.25, gt=0, lt=1, description="kirchenbauer: fraction of the vocabulary that is green at each step."
    )
    # 3.0 with the entropy gate: 57 of 57 held-out 64-token generations detected at ROUGE-L -0.042; 2.0 detected
    # 45 of 57 (docs/watermarks.md).
    bias: Float = Field(
        3.0, gt=0, description="kirchenbauer: added to the green tokens' logits: the watermark's strength."
    )
    context_width: Int = Field(1, ge=1, description="kirchenbauer: previous tokens that seed each step's green list.")
    entropy_threshold: Float = Field(
        1.0,
        ge=0,
        description="kirchenbauer: mark and count only tokens where the model's next-token entropy is at "
        "least this many nats (SWEET): a token the model is sure of cannot carry the mark. Detection then loads the "
        "run's model. 0: every token (plain Kirchenbauer; detection needs only the tokenizer).",
    )
    ngram_len: Int = Field(
        5, ge=2, description="synthid: each token's g-values are seeded by the ngram_len - 1 tokens before it."
    )
    depth: Int = Field(
        30,
        ge=1,
        le=64,
        description="synthid: tournament layers (one derived key each): more layers, a "
        "stronger mark at the same distortion.",
    )
    # 3.0: a false-positive rate of about 1e-3 on unmarked text (at 4.0, 52 of the 57 above were detected).
    z_threshold: Float = Field(
        3.0,
        gt=0,
        description="A text is flagged when its z-score (green tokens, or synthid's mean g-value) exceeds this.",
    )

    # learned: the message, the blocks that write it, the extractor that reads it, and the joint loss.
    bits: Int = Field(16, ge=1, le=256, description="learned: the message's length k in bits.")
    message: str | None = Field(
        None,
        description="learned: the run's message, a quoted string of `bits` characters 0/1; null: drawn from the key. "
        "Kept in adapter/watermark.message (mode 0600) and shown <redacted> in recipe.yaml like the key.",
    )
    extractor: Literal["embeddings"] = Field(
        "embeddings",
        description="learned: what reads the message back. embeddings: a few bidirectional transformer layers over "
        "the decoder's own frozen token embeddings (no vocabulary mapping needed).",
    )
    extractor_layers: Int = Field(2, ge=1, le=12, description="learned: the extractor's transformer layers.")
    extractor_width: Int = Field(256, ge=8, le=4096, description="learned: the extractor's hidden width.")
    embedder_layers: Int = Field(
        2, ge=1, description="learned: how many of the decoder's top layers attend to the message (one block each)."
    )
    gate_scale: Float = Field(
        10.0,
        gt=0,
        description="learned: each block adds tanh(gate x gate_scale) x its attention; the gate starts at 0 (the "
        "unchanged model) and, scaled, opens in tens of steps at eval.watermark.lr.",
    )
    # null: the best rate falls with the model's width (AdamW moves every weight by about lr a step): on a decoder
    # 32 wide 1e-2 learnt fastest, 256 wide 2e-3 to 3e-3 did and 1e-2 worse, and on SmolLM2 (576 wide) neither
    # 1e-2 nor the LoRA's 2e-3 taught the mark in 30 steps, and 1e-2 moved the text far more (KL 0.45 nats per
    # token at the last step against 0.006; docs/watermarks.md).
    # A run checkpointed with one group also resumes with one.
    lr: Float | None = Field(
        None,
        gt=0,
        description="learned: the peak learning rate of the watermark's blocks and extractor, an AdamW group of their "
        "own on the run's schedule (they start from a closed gate and random weights, beside a LoRA on a trained "
        "model); null: train.lr, in the LoRA's group.",
    )
    bit_weight: Float = Field(1.0, ge=0, description="learned: weight of the bits' binary cross-entropy in the loss.")
    kl_weight: Float = Field(
        1.0,
        ge=0,
        description="learned: weight of KL(marked || unmarked) per completion token: the fluency the mark may cost.",
    )
    gumbel_temperature: Float = Field(
        1.0, gt=0, description="learned: temperature of the straight-through Gumbel-softmax tokens in training."
    )
    noise: Float = Field(
        0.1,
        ge=0,
        lt=1,
        description="learned: in training, this fraction of the tokens the extractor reads is substituted at random "
        "(robustness to edits).",
    )
    p_threshold: Float = Field(
        0.01,
        gt=0,
        lt=1,
        description="learned: a text is flagged when its binomial-test p-value (matching bits) is below this.",
    )

    # Which settings belong to which method: a setting of the other method is an error, never ignored.
    METHOD_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "kirchenbauer": ("greenlist_ratio", "bias", "context_width", "entropy_threshold", "z_threshold"),
        "synthid": ("ngram_len", "depth", "z_threshold"),
        "learned": (
            "bits",
            "message",
            "extractor",
            "extractor_layers",
            "extractor_width",
            "embedder_layers",
            "gate_scale",
            "lr",
            "bit_weight",
            "kl_weight",
            "gumbel_temperature",
            "noise",
            "p_threshold",
        ),
    }

    @field_validator("message", mode="before")
    @classmethod
    def _message_bits(cls, value: object, info: ValidationInfo) -> object:
        """k characters 0/1 (k = bits), or <redacted> in a run's recipe.yaml; the value is never shown."""
        if value is None or value == REDACTED:
            return value
        if not isinstance(value, str):
            raise ValueError("a message is a quoted string of 0/1 characters (YAML reads 0101 unquoted as a number)")
        bits = info.data.get("bits")
        if set(value) - {"0", "1"} or (isinstance(bits, int) and len(value) != bits):
            raise ValueError(f"a message is a string of exactly bits ({bits}) characters 0 or 1")
        return value

    def other_method_keys(self) -> tuple[str, ...]:
        """The settings that belong to the other methods, not to this one."""
        own = self.METHOD_KEYS[self.method]
        return tuple(
            dict.fromkeys(
                key
                for method, keys in self.METHOD_KEYS.items()
                if method != self.method
                for key in keys
                if key not in own
            )
        )


class EvalSection(Section):
    metrics: list[str] | None = Field(
        None, min_length=1, description="Metrics to report; null: all of the task's (an empty list is refused)."
    )
    gates: dict[str, str] = Field(
        default_factory=dict,
        description='Quality gates, e.g. {accuracy: ">=0.85"}, or {accuracy: ">=0.85@95"} to judge the lower bound '
        "of its 95% interval; a failed gate exits 4.",
    )
    batch_size: Int | None = Field(
        None,
        ge=1,
        description="Evaluation batch size per process; null: 2 x train.batch_size for the loss, and for generation "
        "as many rows as fit in memory (the plan states the number).",
    )
    every: Annotated[Annotated[int, Field(ge=1)] | Literal["epoch"], _number_or("epoch")] | None = Field(
        None,
        description="Evaluate during training: every N optimizer steps, or at each epoch end; null: only after "
        "training.",
    )
    during_max_samples: Int | None = Field(
        None,
        ge=1,
        description="Evaluations during training use the first N eval rows (the final one uses all); "
        "null: all for classification and extractive qa, 64 for generation tasks.",
    )
    best_metric: str | None = Field(
        None,
        description="The metric that decides the best weights (null: the task's main metric; eval_loss: lower "
        "is better).",
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description="Which weights become adapter/ and are scored in metrics.json: the last, or the best evaluated.",
    )
    threshold: Annotated[Annotated[float, Field(ge=0, le=1)] | Literal["tune"], BeforeValidator(_threshold)] = Field(
        "tune",
        description="Multi-label classification: a label is chosen when its sigmoid score is at least its "
        "threshold. A number in [0, 1]: that threshold for every label. tune: per label, the one that maximises "
        "the label's F1 on the eval split after training, saved as adapter/thresholds.json and used by eval and "
        "predict (a label with no eval positives keeps 0.5).",
    )
    # Generation (copywriting, codegen, generative qa)
    max_new_tokens: Int = Field(128, ge=1, le=TOKENS_MAX, description="Generation: most new tokens per answer.")
    temperature: Float = Field(
        0.0, ge=0, description="Generation: 0 is greedy decoding; above 0 samples at that softmax temperature."
    )
    top_p: Float = Field(
        1.0, gt=0, le=1, description="Generation: nucleus sampling mass (with temperature > 0); 1 keeps every token."
    )
    num_samples: Int = Field(
        1, ge=1, description="Generation: samples per prompt (codegen pass@k needs n >= k; above 1 needs sampling)."
    )
    stop: list[str] | None = Field(
        None,
        description="Generation: cut each answer at the first of these strings after its text begins (one it opens "
        "with is not its end); null: the task's own.",
    )

    @field_validator("stop")
    @classmethod
    def _stops_hold_text(cls, value: list[str] | None) -> list[str] | None:
        # An empty string is found in every text at once: every answer would end after its first token.
        if value is not None and any(stop == "" for stop in value):
            raise ValueError("an empty stop string would end every answer at its first token; remove it")
        return value

    watermark: WatermarkSection | None = Field(
        None,
        description="Generation tasks: watermark every generation of run, eval and predict (finetune detect finds "
        "it); null: no watermark.",
    )
    # Extractive question answering
    n_best: Int = Field(20, ge=1, description="Extractive qa: start and end candidates considered per window.")
    max_answer_length: Int | None = Field(
        None,
        ge=1,
        description="Extractive qa: longest answer span, in tokens (null: derived from the training "
        "answers, at least SQuAD's 30).",
    )
    # Code execution (codegen)
    pass_k: list[Int] | None = Field(
        None,
        description="Codegen: the k of pass@k, each at least 1 (null: 1, 2, 4, 8, 10, 16, 32, 64, 100 up to "
        "num_samples).",
    )
    execute_code: Bool = Field(
        False, description="Codegen: run generated code against the tests (also needs FINETUNE_ALLOW_CODE_EXECUTION=1)."
    )
    sandbox: Literal["strict", "basic"] = Field(
        "strict",
        description="Codegen: strict = bubblewrap namespaces (no network, read-only filesystem, own PIDs), required "
        "unless you choose basic = resource limits and a scrubbed environment only.",
    )
    timeout_s: Float = Field(
        10.0, gt=0, le=1e9, description="Codegen: wall-clock seconds per sample before it is killed."
    )
    memory_mb: Int = Field(1024, ge=1, le=MEMORY_MB_MAX, description="Codegen: address-space limit per sample, in MiB.")

    @field_validator("pass_k")
    @classmethod
    def _positive_k(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and (not values or any(k < 1 for k in values)):
            raise ValueError("pass_k must list positive integers, e.g. [1, 10]")
        return values

    @field_validator("gates", mode="before")
    @classmethod
    def _gates_compare(cls, gates: object) -> object:
        """`accuracy: 0.85` is a threshold without its comparison ("Input should be a valid string" said only that
        it was no text)."""
        if isinstance(gates, dict):
            for metric, condition in gates.items():
                if isinstance(condition, (int, float)) and not isinstance(condition, bool):
                    raise ValueError(
                        f'{metric}: {condition} has no comparison; write one, quoted: {metric}: ">={condition}"'
                    )
                if isinstance(condition, str) and not condition.strip():
                    # `accuracy: >1` unquoted is a YAML folded block (indentation 1) holding the lines below it
                    raise ValueError(
                        f"{metric}: no condition (a bare >N in YAML starts a block of text, not a comparison); "
                        f'write it quoted, e.g. {metric}: ">=0.8"'
                    )
        return gates

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
    num_processes: Annotated[Annotated[int, Field(ge=1, le=MAX_PROCESSES)] | Literal["auto"], _number_or("auto")] = (
        Field(
            1,
            description="Processes to launch through accelerate (auto: one per GPU, 1 without GPUs); --num-processes "
            "wins.",
        )
    )
    nnodes: Annotated[Annotated[int, Field(ge=1, le=MAX_PROCESSES)] | Literal["auto"], _number_or("auto")] = Field(
        "auto",
        description="Machines the run spans where neither --nnodes nor a scheduler's variables (Slurm, SkyPilot, PBS) "
        "say (auto: 1). With more than 1, each node needs its rank and the first node's address: --node-rank and "
        "--rdzv-endpoint.",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="How several processes share the work: ddp (a replica each), fsdp (weights, gradients and "
        "optimizer state sharded: accelerate's FSDP on GPUs, torch's FSDP2 over gloo on CPU) or deepspeed (ZeRO-2, "
        "GPUs only).",
    )
    gradient_checkpointing: Bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes); CUDA only."
    )


class OutputSection(Section):
    dir: str = Field("runs/latest", description="Run directory (created; an existing run is resumed or replaced).")


def _seconds(value: object) -> object:
    """A duration: seconds as a number, or a string with a unit (90s, 40m, 2h, 1h30m)."""
    if isinstance(value, str):
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", value)
        if not value.strip() or parts is None:
            raise ValueError(f"{value!r} is not a duration (e.g. 90s, 40m, 2h, 1h30m)")
        hours, minutes, seconds = (float(x) if x else 0.0 for x in parts.groups())
        return hours * 3600 + minutes * 60 + seconds
    return value


class SweepRange(Section):
    """A numeric setting's range: from `low` to `high`, on a log scale or in steps."""

    low: Float = Field(description="The smallest value tried.")
    high: Float = Field(description="The largest value tried.")
    log: Bool = Field(False, description="Sample on a log scale (learning rates).")
    step: Float | None = Field(None, gt=0, description="Only multiples of this step above `low` (null: continuous).")

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        return self


class SweepSection(Section):
    """`finetune sweep`: the settings to vary, how many trials, what "best" means (Optuna)."""

    trials: Int = Field(12, ge=1, le=100000, description="How many trials at most.")
    time_budget: Annotated[float | None, BeforeValidator(_seconds)] = Field(
        None, gt=0, description="Stop starting trials after this long (e.g. 40m, 2h); null: no limit."
    )
    objective: list[str] = Field(
        default_factory=list,
        max_length=2,
        description="What a trial is judged by: a metric (default: eval.best_metric), and optionally a cost to "
        "minimise as a second objective (train_seconds or trainable_params), which gives a Pareto front.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Recipe settings to vary, by their dotted key (train.lr, lora.r, ...): a range "
        "{low, high, log, step} or a list of choices.",
    )
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna's sampler.")
    pruner: Literal["median", "none"] = Field(
        "median", description="Stop a trial early when its evaluations during training trail the others' (median)."
    )
    seed: Int = Field(
        0,
        ge=0,
        le=SEED_MAX,
        description="The sampler's seed: the same sweep proposes the same trials.",
    )

    @field_validator("params")
    @classmethod
    def _ranges_or_choices(cls, params: dict[str, Any]) -> dict[str, SweepRange | list[Any]]:
        checked: dict[str, SweepRange | list[Any]] = {}
        problems = []
        for key, value in params.items():
            if isinstance(value, list) and value:
                checked[key] = value
            elif isinstance(value, Mapping):
                try:
                    checked[key] = SweepRange.model_validate(value)
                except ValidationError as exc:
                    for error in exc.errors():
                        where = ".".join(str(part) for part in error["loc"])
                        if error["type"] == "extra_forbidden":  # a misspelt key: named with the nearest valid one
                            hint = did_you_mean(where, list(SweepRange.model_fields))
                            problems.append(f"{key}.{where}: unknown key{hint}")
                            continue
                        problems.append(
                            f"{key}{'.' + where if where else ''}: {error['msg'].removeprefix('Value error, ')}"
                        )
            else:
                problems.append(f"{key}: give a range {{low, high}} or a non-empty list of choices, not {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return checked


class Recipe(Section):
    # The names come from the task registry (tasks/__init__.py TASKS); the rules check them.
    task: str = Field(description="What the model learns: one of the registered tasks, e.g. classification (required).")
    mode: Literal["extractive", "generative"] | None = Field(
        None, description="qa only: extractive (a span of the context; the default) or generative (a written answer)."
    )
    model: ModelSection = Field(description="The base model (required).")
    data: DataSection = Field(description="Training and evaluation data (required).")
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapter.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation and checkpoints.")
    eval: EvalSection = Field(
        default_factory=EvalSection, description="Evaluation, quality gates, generation and code execution."
    )
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Processes, sharding, memory savers and quantisation."
    )
    output: OutputSection = Field(default_factory=OutputSection, description="Where the run is written.")
    sweep: SweepSection | None = Field(
        None, description="`finetune sweep`: settings to vary and the trial budget; `finetune run` ignores it."
    )

    @property
    def eval_batch_size(self) -> int:
        return self.eval.batch_size or 2 * self.train.batch_size


# --------------------------------------------------------------------------- loading


def _section_fields(loc: tuple) -> list[str]:
    """Valid key names at the place `loc` (a path of field names) in the Recipe."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model else None
        model = _section_model(getattr(field, "annotation", None))  # optional sections (`X | None`) too
    return list(model.model_fields) if model else []


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds (`X`, or `X | None`), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


@functools.cache
def _key_paths() -> tuple[str, ...]:
    """Every key of the recipe as a dotted path, sections included (`train.grpo`, `train.grpo.beta`)."""

    def under(model: type[BaseModel], prefix: str) -> list[str]:
        paths = []
        for name, field in model.model_fields.items():
            paths.append(f"{prefix}{name}")
            section = _section_model(field.annotation)
            if section is not None:
                paths.extend(under(section, f"{prefix}{name}."))
        return paths

    return tuple(under(Recipe, ""))


# Keys the product contract (PRODUCT.md) sketched that finetune builds otherwise: what to write instead (the
# nearest spelling would suggest an unrelated key).
_CONTRACT_SKETCH = {
    "data.retrieval.rerank": "a reranker is a run of its own: task: rerank, with data.retrieval.model its first stage",
    "train.grpo.rewards": "train.grpo.reward: {task: 1.0, ...}, the task's score and weighted optional terms",
}


def _elsewhere(place: str) -> str:
    """` (did you mean 'data.max_length'?)` for a key written in the wrong section: the same name where it is valid
    (several, nearest first), or "" when it is valid nowhere."""
    name = place.rsplit(".", 1)[-1]
    found = [path for path in _key_paths() if path.rsplit(".", 1)[-1] == name and path != place]
    if not found:
        return ""
    found.sort(key=lambda path: -difflib.SequenceMatcher(None, place, path).ratio())
    return f" (did you mean {' or '.join(repr(path) for path in found[:3])}?)"


def _format_problem(error: Mapping[str, Any]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    place = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        sketched = _CONTRACT_SKETCH.get(place)
        hint = f" ({sketched})" if sketched else _elsewhere(place) or did_you_mean(loc[-1], _section_fields(loc[:-1]))
        return f"{place}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{place}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error" and loc:
        message += did_you_mean(error.get("input"), _literal_choices(error))
    if error["type"] == "string_type" and isinstance(error.get("input"), bool):
        message += " (YAML reads an unquoted yes/no, on/off or true/false as a boolean; quote it)"
    if error["type"] not in ("value_error", "assertion_error") and "input" in error:
        return f"{place}: {message} (got {_shown(error['input'])})"
    return f"{place}: {message}"


def _shown(value: object) -> str:
    """A value as the recipe's YAML spells it: true, false and null, other values as Python writes them (cut
    short: `brief`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return brief(value)


def _literal_choices(error: Mapping[str, Any]) -> list[str]:
    expected = (error.get("ctx") or {}).get("expected", "")
    return [part.strip(" '") for part in expected.replace(" or ", ",").split(",") if part.strip()]


def within(key: str, setting: str) -> bool:
    """Whether the dotted `key` is `setting` or a key inside it (`lora.r` within `lora`)."""
    return key == setting or key.startswith(f"{setting}.")


def same_setting(key: str, other: str) -> bool:
    """Whether two dotted keys set one value: the same key, or a section and a key inside it."""
    return within(key, other) or within(other, key)


# Settings only training reads. `eval` and `predict` score what was trained (or the base model) and never read them,
# so a command-line override of one there is refused rather than ignored (`eval RUN eval.watermark.noise=0.3` and
# `eval RUN train.lr=1` changed nothing, without a word), and the rules on them are not applied there (a recipe
# naming a tracker this machine lacks still evaluates). Dotted keys; a key inside one counts. Settings evaluation
# does read stay out: train.seed and train.precision (the eval split's draw, the decoding precision), the
# objective and its preference/reward settings (what is scored), class weights and the retriever's temperature
# (the eval loss), data.retrieval.train (an untrained knowledge-base retriever pools as its run will).
TRAINING_ONLY = (
    "lora",
    "sweep",
    "model.dropout",
    "output.dir",  # evaluations go to --output, or a run's evals/
    *(f"distributed.{key}" for key in ("gradient_checkpointing", "num_processes", "nnodes", "strategy")),
    *(
        f"train.{key}"
        for key in (
            "epochs", "max_steps", "grad_accum", "lr", "weight_decay", "scheduler", "warmup", "max_grad_norm",
            "group_by_length", "packing", "checkpoint_every", "keep_checkpoints", "log_every", "report_to",
            "optimizer", "loraplus_lr_ratio", "early_stopping", "nonfinite",
        )
    ),
    *(
        f"train.grpo.{key}"
        for key in (
            "group_size", "max_new_tokens", "temperature", "top_p", "beta", "epsilon", "kl_bias_correction",
            "loss_type", "scale_rewards", "num_iterations",
        )
    ),
    "eval.every",
    "eval.best_metric",
    "eval.during_max_samples",
    "eval.keep",
    *(f"eval.watermark.{key}" for key in ("lr", "bit_weight", "kl_weight", "gumbel_temperature", "noise")),
    *(
        f"data.retrieval.{key}"
        for key in ("hard_negatives", "negative_margin", "epochs", "lr", "batch_size")
    ),
)  # fmt: skip


def training_only(key: str) -> bool:
    """Whether the dotted `key` is a setting only training reads, or inside one (TRAINING_ONLY)."""
    return any(within(key, only) for only in TRAINING_ONLY)


def _leaf_keys(key: str, value: object) -> list[str]:
    """The dotted keys a value set at `key` sets: a mapping's, each of its own, recursively."""
    if not isinstance(value, dict) or not value:
        return [key]
    return [leaf for name, inner in value.items() for leaf in _leaf_keys(f"{key}.{name}", inner)]


def training_only_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a command that trains nothing which set a setting only training reads (TRAINING_ONLY), a
    section given whole (`train={lr: 1}`) by the keys its value sets."""
    found = []
    for override in overrides:
        key, _, text = override.partition("=")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
        except yaml.YAMLError:  # apply_overrides names it
            value = None
        if any(training_only(leaf) for leaf in _leaf_keys(key.strip(), value)):
            found.append(override)
    return found


def distinct_overrides(overrides: list[str]) -> list[str]:
    """A command line's overrides, each setting named once: `lr=1 lr=2` or `lora=null lora.r=4` would leave the
    recipe to whichever came last, which reads as a typo more often than an intent."""
    seen: dict[str, str] = {}
    for override in overrides:
        key = override.partition("=")[0].strip()
        for other, first in seen.items():
            if same_setting(key, other):
                raise RecipeError(
                    f"overrides {brief(first)} and {brief(override)} both set {min(key, other, key=len)}; give each "
                    "setting once"
                )
        seen[key] = override
    return overrides


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML."""
    for override in overrides:
        key, sep, text = override.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip() or any(not p for p in parts):
            raise RecipeError(f"malformed override {override!r}: expected section.key=value")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
        except yaml.YAMLError as exc:
            what = "value refused" if isinstance(exc, _AliasesRefused) else "value is not valid YAML"
            # A gate's condition opens with a character YAML reads as syntax: the commonest such value.
            quote = (
                f"; quote it: {key.strip()}='\"{text.strip()}\"'"
                if text.strip()[:1] in "<>=!"
                else _quote_hint(text, getattr(exc, "problem_mark", None))  # inside a mapping: {accuracy: >=0.8}
            )
            raise RecipeError(
                f"override {brief(override)}: {what} ({getattr(exc, 'problem', None) or exc}){quote}"
            ) from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


# What YAML aliases (*name, repeating an &name anchor) may add to a recipe, in values. PyYAML shares one object
# per anchor, but everything that walks the recipe afterwards (validation, its messages, hashing, recipe.yaml)
# walks every repetition: nine nested anchors of nine items each (a "billion laughs") are 43 million values and
# took 1.9 GB before the first message was written. A real recipe repeats a few settings, far below this.
ALIAS_VALUES_MAX = 100_000


class _AliasesRefused(yaml.constructor.ConstructorError):
    """Valid YAML that a recipe refuses (`_refuse_alias_bomb`)."""


def _refuse_alias_bomb(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it by more than ALIAS_VALUES_MAX values, or refer to themselves
    (a recursive value no setting takes), counting each node once per place it appears without expanding it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    added = 0

    def size(node: yaml.Node) -> int:
        nonlocal added
        key = id(node)
        if key in open_nodes:
            raise _AliasesRefused(
                None, None, "an alias refers to the value that contains it (a recursive value)", node.start_mark
            )
        if key in sizes:  # a repetition through an alias
            added += sizes[key]
            if added > ALIAS_VALUES_MAX:
                raise _AliasesRefused(
                    None,
                    None,
                    f"aliases repeat this anchored value until the recipe holds more than {ALIAS_VALUES_MAX:,} "
                    "values; write the values out instead",
                    node.start_mark,
                )
            return sizes[key]
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML lets the last one win silently)
    and aliases that multiply the recipe (`_refuse_alias_bomb`)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _refuse_alias_bomb(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys a key given here overrides
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# `key: <value>` where the value opens with a comparison, in block (`  accuracy: >=0.8`) or flow style
# (`gates: {accuracy: >=0.8, f1: <0.2}`): the key, then the condition up to a comma, brace or comment.
_BARE_CONDITION = re.compile(r"([^\s{},:#][^{},:#]*?)\s*:\s+([<>=!][^,{}#]*)")


def _quote_hint(text: str, mark: yaml.Mark | None) -> str:
    """A gate's condition written bare (`accuracy: >=0.8`) opens with a character YAML reads as syntax (`>` folds
    a block, `<`/`=`/`!` cannot start a value), and YAML's words name a chomping indicator: say to quote it."""
    lines = text.splitlines()
    if mark is None or mark.line >= len(lines):
        return ""
    for match in _BARE_CONDITION.finditer(lines[mark.line]):
        if match.start(2) <= mark.column <= match.end(2):
            key, condition = match.group(1).strip(), match.group(2).strip()
            return f'; a gate\'s condition is quoted: {key}: "{condition}"'
    return ""


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
        what = "refused" if isinstance(exc, _AliasesRefused) else "not valid YAML"
        raise RecipeError(f"{path}: {what}{where}: {getattr(exc, 'problem', exc)}{_quote_hint(text, mark)}") from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (task, model, data, ...)")
    return raw


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """The recipe's structure and types (the schema only; finetune.flows.resolve adds every other rule)."""
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
        if mark.message is not None:  # a learned watermark's message: kept beside the key, never here
            data["eval"]["watermark"]["message"] = REDACTED
        for key in mark.other_method_keys():  # only the settings the method uses
            del data["eval"]["watermark"][key]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
