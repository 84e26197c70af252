"""Abstract LoRA targets (attention, mlp, ...) resolved to a model's real module names.

The role of a linear layer is read from its place in the module tree rather
than from a per-architecture table: anything under an attention block
(`attention`, `attn`, `self_attn`, `encoder_attn`, `SelfAttention`, ...) is
attention, cross-attention when the block attends to the encoder, and every
other linear layer of the transformer body is MLP. This covers BERT
(`query/key/value`, `attention.output.dense`), BART/T5 (`self_attn` vs
`encoder_attn`/`EncDecAttention`), GPT-2 (`c_attn`/`c_proj` Conv1D) and Llama-style
(`q_proj ... down_proj`) alike, and new architectures that follow the same naming.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from finetune.models.families import FamilySpec
from finetune.recipe.schema import LoraSection

# Task heads are trained in full (peft's modules_to_save), never wrapped with LoRA.
HEAD_MODULES = ("classifier", "score", "classification_head", "qa_outputs", "lm_head", "pooler")


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return isinstance(module, (torch.nn.Linear, Conv1D))


def body_linear_layers(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers of the transformer body (no heads)."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if _is_linear(module) and not any(part in HEAD_MODULES for part in parts):
            names.append(name)
    return names


def role_of(name: str, family: FamilySpec) -> str:
    """self_attention, cross_attention or mlp, from the blocks the layer sits in (the family names them)."""
    blocks = name.split(".")[:-1]  # the blocks it sits in, not its own name
    if any(family.is_cross_attention(part) for part in blocks):
        return "cross_attention"
    if any(family.is_attention(part) for part in blocks):
        return "self_attention"
    return "mlp"


def resolve_targets(model: torch.nn.Module, targets: str | list[str], family: FamilySpec) -> list[str]:
    """Full module names to wrap with LoRA. Raises ValueError naming what matched nothing."""
    layers = body_linear_layers(model)
    if isinstance(targets, list):
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(
                f"lora.targets: no linear layer named {', '.join(map(repr, unmatched))}; "
                f"this model has: {', '.join(leaves)}"
            )
        return chosen
    wanted = {
        "attention": {"self_attention", "cross_attention"},
        "self_attention": {"self_attention"},
        "cross_attention": {"cross_attention"},
        "mlp": {"mlp"},
        "all_linear": {"self_attention", "cross_attention", "mlp"},
    }[targets]
    chosen = [n for n in layers if role_of(n, family) in wanted]
    if not chosen:
        raise ValueError(f"lora.targets: {targets!r} matches no layer of this model (it has no {targets} layers)")
    return chosen


def head_modules(model: torch.nn.Module, candidates: tuple[str, ...]) -> list[str]:
    """Which of the task's head modules this model actually has (trained fully, saved with the adapter)."""
    present = {part for name, _ in model.named_modules() for part in name.split(".")}
    return [c for c in candidates if c in present]


def group_targets(names: list[str], family: FamilySpec) -> list[str]:
    """The targets by block, e.g. `encoder self-attention: query, key, value, output x6`.

    The stack (encoder/decoder) comes from the module path, the role from the
    family's naming, and xN counts the layers each group spans.
    """
    groups: dict[str, dict[str, int]] = {}
    for name in names:
        parts = name.split(".")
        stack = next((p for p in parts if p in ("encoder", "decoder")), "")
        role = role_of(name, family).replace("_", "-")
        leaf = parts[-2] if parts[-1] == "dense" and len(parts) > 1 else parts[-1]  # BERT: attention.output.dense
        leaves = groups.setdefault(f"{stack} {role}".strip(), {})
        leaves[leaf] = leaves.get(leaf, 0) + 1
    lines = []
    for group, leaves in groups.items():
        counts = set(leaves.values())
        if len(counts) == 1:
            lines.append(f"{group}: {', '.join(leaves)} x{counts.pop()}")
        else:
            lines.append(f"{group}: " + ", ".join(f"{leaf} x{n}" for leaf, n in leaves.items()))
    return lines


INIT_WEIGHTS: dict[str, bool | Literal["gaussian", "pissa", "olora"]] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
# These initialisations move the base weights' principal part into the adapter: the base itself changes.
BASE_CHANGING_INITS = ("pissa", "olora")


def lora_config(lora: LoraSection, targets: list[str], modules_to_save: list[str], task_type: str | None) -> LoraConfig:
    """peft's LoraConfig for the recipe's lora section; `task_type` lets AutoPeftModelFor... reload it."""
    return LoraConfig(
        task_type=task_type,
        r=lora.r,
        # peft annotates lora_alpha as int, but only divides by it (alpha / r): a float alpha is meant.
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        bias="none",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=INIT_WEIGHTS[lora.init],
    )


def apply_lora(
    model: PreTrainedModel, lora: LoraSection, targets: list[str], modules_to_save: list[str], task_type: str | None
) -> PeftModel:
    return get_peft_model(model, lora_config(lora, targets, modules_to_save, task_type))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
