"""Model families as data: one frozen spec per family replaces every `family == "bart"` comparison.

A family says how a checkpoint is laid out (encoder only, encoder-decoder,
decoder), which transformers Auto class and peft task type each kind of head
uses, how its attention blocks are named (for LoRA target groups), and what it
cannot do. Adding a family is one row in FAMILIES plus its tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The kinds of model a task asks a family for.
# embedding: the bare model, whose token vectors a bi-encoder pools into one vector per text (task retrieval).
HeadKind = Literal["sequence_classification", "question_answering", "generation", "embedding"]

_AUTO_CLASSES: dict[str, str] = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "embedding": "AutoModel",
}
_PEFT_TASK_TYPES: dict[str, str] = {
    "sequence_classification": "SEQ_CLS",
    "question_answering": "QUESTION_ANS",
    "embedding": "FEATURE_EXTRACTION",
}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    architecture: Literal["encoder", "encoder-decoder", "decoder"]
    examples: str
    # Generation: the Auto class and peft task type, or None where the family cannot generate.
    generation_class: str | None
    generation_peft_task: str | None
    # Where a prompt sits in a padded generation batch: a decoder continues from its last token (left
    # padding); an encoder reads the prompt whole (right padding).
    prompt_padding: Literal["left", "right"]
    # train.packing: one unpadded row per batch with per-example position ids (decoders only).
    packs: bool
    # Module-path fragments naming attention blocks and the cross-attention among them.
    attention_pattern: str = r"(attn|attention)"
    cross_attention_pattern: str | None = None
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def encoder_decoder(self) -> bool:
        return self.architecture == "encoder-decoder"

    @property
    def decoder_only(self) -> bool:
        return self.architecture == "decoder"

    def supports(self, head: HeadKind) -> bool:
        return head not in self.refusals

    def auto_class_name(self, head: HeadKind) -> str:
        if head == "generation":
            assert self.generation_class, f"{self.name} cannot generate"
            return self.generation_class
        return _AUTO_CLASSES[head]

    def auto_class(self, head: HeadKind) -> type[Any]:
        import transformers

        return getattr(transformers, self.auto_class_name(head))

    def peft_task_type(self, head: HeadKind) -> str | None:
        return self.generation_peft_task if head == "generation" else _PEFT_TASK_TYPES[head]

    def is_attention(self, block: str) -> bool:
        return re.search(self.attention_pattern, block, re.IGNORECASE) is not None

    def is_cross_attention(self, block: str) -> bool:
        pattern = self.cross_attention_pattern
        return pattern is not None and re.search(pattern, block, re.IGNORECASE) is not None


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="bert",
            architecture="encoder",
            examples="BERT, RoBERTa, MiniLM, DeBERTa",
            generation_class=None,
            generation_peft_task=None,
            prompt_padding="right",
            packs=False,
            refusals={"generation": "encoder-only models do not generate text; use a BART or GPT-style checkpoint"},
        ),
        FamilySpec(
            name="bart",
            architecture="encoder-decoder",
            examples="BART, T5",
            generation_class="AutoModelForSeq2SeqLM",
            generation_peft_task="SEQ_2_SEQ_LM",
            prompt_padding="right",
            packs=False,
            # BART `encoder_attn`, T5 `EncDecAttention`, others `crossattention` / `cross_attn`.
            cross_attention_pattern=r"(encoder_attn|crossattention|cross_attn|encdecattention)",
            refusals={
                "embedding": "an encoder-decoder's bare model needs decoder inputs to give token vectors; embed "
                "with an encoder (BERT family) or a decoder (GPT family, last-token pooling)"
            },
        ),
        FamilySpec(
            name="gpt",
            architecture="decoder",
            examples="GPT-2, Llama, Qwen, SmolLM",
            generation_class="AutoModelForCausalLM",
            generation_peft_task="CAUSAL_LM",
            prompt_padding="left",
            packs=True,
        ),
    )
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def family_spec(name: str) -> FamilySpec:
    return FAMILIES[name]


# Decoders whose attention keeps packed examples apart by their per-example position ids (transformers finds the
# packed sequences from them), each checked: the packed batch's loss equals the padded one's. OPT (its own mask)
# and BLOOM (ALiBi, no position ids) let examples attend across: their packed loss differed. The one list.
PACKING_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi", "phi3",
        "granite", "gpt_neox", "gpt2", "gptj", "falcon", "stablelm", "olmo", "olmo2",
    }
)  # fmt: skip

# Model types whose position ids count on from the padding index (transformers' create_position_ids_from_input_ids):
# the last usable position is max_position_embeddings - padding index - 1 (RoBERTa: 514 - 2 = 512). The index is
# the config's pad_token_id, but MPNet's is 1 whatever its config says.
PADDING_OFFSET_POSITIONS = frozenset(
    {
        "roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert", "mpnet", "data2vec-text",
        "longformer", "ibert", "luke", "esm", "xmod", "markuplm", "lilt",
    }
)  # fmt: skip

# Auto classes by name -> the model types transformers has each for (loading anything else fails).
_AUTO_MAPPINGS: dict[str, str] = {
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def head_problem(config: PretrainedConfig, family: FamilySpec, head: HeadKind) -> str | None:
    """Why the checkpoint cannot be loaded with the task's head, or None: transformers has no such class for its
    model_type (Pegasus has no sequence classifier, Gemma no question answering). A checkpoint with its own code
    (`auto_map`) answers for itself at loading."""
    from transformers.models.auto import modeling_auto

    if not family.supports(head) or getattr(config, "auto_map", None):
        return None
    name = family.auto_class_name(head)
    model_type = getattr(config, "model_type", None)
    if not model_type or model_type in getattr(modeling_auto, _AUTO_MAPPINGS[name]):
        return None
    return f"transformers has no {name} for model_type {model_type!r}; use a checkpoint of another architecture"


def family_of_config(config: PretrainedConfig) -> str | None:
    """The family a checkpoint's config belongs to, or None when it is none of ours."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "bart"
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "bert"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "gpt"
    return None
