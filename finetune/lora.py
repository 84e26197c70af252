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

import re

import torch

ABSTRACT_TARGETS = ("attention", "self_attention", "cross_attention", "mlp", "all_linear")

# Task heads are trained in full (peft's modules_to_save), never wrapped with LoRA.
HEAD_MODULES = ("classifier", "score", "classification_head", "qa_outputs", "lm_head", "pooler")

_ATTENTION = re.compile(r"(attn|attention)", re.IGNORECASE)
_CROSS = re.compile(r"(encoder_attn|crossattention|cross_attn|encdecattention)", re.IGNORECASE)


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


def role_of(name: str) -> str:
    parts = name.split(".")[:-1]  # the block it sits in, not its own name
    if any(_CROSS.search(part) for part in parts):
        return "cross_attention"
    if any(_ATTENTION.search(part) for part in parts):
        return "self_attention"
    return "mlp"


def resolve_targets(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
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
    chosen = [n for n in layers if role_of(n) in wanted]
    if not chosen:
        raise ValueError(f"lora.targets: {targets!r} matches no layer of this model (it has no {targets} layers)")
    return chosen


def head_modules(model: torch.nn.Module, candidates: tuple[str, ...]) -> list[str]:
    """Which of the task's head modules this model actually has (trained fully, saved with the adapter)."""
    present = {part for name, _ in model.named_modules() for part in name.split(".")}
    return [c for c in candidates if c in present]


def summarise_targets(names: list[str]) -> str:
    """`query, key, value (x6)` style summary of resolved module names."""
    counts: dict[str, int] = {}
    for name in names:
        leaf = ".".join(name.split(".")[-2:]) if name.split(".")[-2] in ("self", "output") else name.split(".")[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{leaf} x{n}" for leaf, n in counts.items())


def apply_lora(model, recipe_lora, targets: list[str], modules_to_save: list[str], task_type: str | None):
    """Wrap the model; `task_type` (peft's SEQ_CLS, CAUSAL_LM, ...) lets AutoPeftModelFor... reload it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task_type,
        r=recipe_lora.r,
        lora_alpha=recipe_lora.alpha,
        lora_dropout=recipe_lora.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
