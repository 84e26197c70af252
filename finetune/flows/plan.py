"""The plan a run shows before it trains (and all `--dry-run` shows): model, LoRA, data, steps, warnings."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.flows.estimate import Estimate
from finetune.flows.session import Session, during_rows, generates_during
from finetune.models.lora import count_parameters, group_targets
from finetune.models.references import cache_root, reference_is_local
from finetune.recipe.schema import Recipe, RewardSection
from finetune.tasks.generative import GenerationTask
from finetune.tasks.text2text import MEMORY_CHOICE, batch_plan, decode_batch_size, generation_batch_size
from finetune.training.loop import TrainPlan


def plan_warnings(session: Session, plan: TrainPlan, world_size: int = 1) -> list[str]:
    """Settings the run will not follow to the letter, said before it starts."""
    recipe, warnings = session.recipe, []
    t = recipe.train
    asked = int(t.warmup * plan.total_steps) if t.warmup < 1 else int(t.warmup)
    if asked > plan.total_steps:
        warnings.append(
            f"train.warmup: {asked} warmup steps asked, but the run has {plan.total_steps}; "
            "the learning rate never reaches train.lr"
        )
    if recipe.distributed.strategy != "ddp" and world_size == 1:
        warnings.append(
            f"distributed.strategy: {recipe.distributed.strategy} shards over processes; with one "
            "process it changes nothing"
        )
    if recipe.model.revision and reference_is_local(recipe.model.name_or_path):
        warnings.append("model.revision: applies to hub ids only; it is ignored for this local reference")
    return warnings


def evaluation_plan(session: Session, plan: TrainPlan) -> str:
    """How often the run evaluates during training, on how many rows, and what it keeps."""
    settings, recipe = session.recipe.eval, session.recipe
    if settings.every is None:
        return "after training only (eval.every: null)"
    count = plan.epochs if settings.every == "epoch" else plan.total_steps // settings.every
    if settings.every != "epoch" and plan.total_steps % settings.every:
        count += 1  # the last step is always evaluated
    limit = during_rows(session)
    rows = len(session.features["eval"].rows)
    shown = (
        f"the first {min(limit, rows)} of {rows} eval rows"
        if limit is not None and limit < rows
        else f"all {rows} eval rows"
    )
    if not generates_during(session):
        shown += " (judged, no generation)"
    elif limit is not None and settings.during_max_samples is None:
        shown += " (generation: eval.during_max_samples defaults to a bounded sample)"
    metric = session.resolved.best_metric
    stopping = recipe.train.early_stopping
    return (
        f"{count} evaluations during training (every {settings.every if settings.every == 'epoch' else f'{settings.every} steps'}) "
        f"on {shown}; {metric} decides the best; keep {settings.keep}"
        + (
            f"; early stopping after {stopping.patience} without improvement > {stopping.min_delta:g}"
            if stopping
            else ""
        )
    )


def generation_plan(session: Session, device: torch.device) -> str | None:
    """How the final evaluation batches its generation (a generation task): the rows decoded together on `device`
    (the accelerator's: the model is still on the CPU when the plan is shown)."""
    if not isinstance(session.task, GenerationTask) or "eval" not in session.features:
        return None
    settings = session.recipe.eval
    fixed = decode_batch_size(settings, session.recipe.eval_batch_size)
    if fixed is not None:
        how = "eval.batch_size" if settings.batch_size is not None else "sampled decoding: the eval batch, fixed"
        return batch_plan(fixed, how, settings.num_samples)
    longest = max((len(p) for p in session.features["eval"].prompts or []), default=0)
    rows = generation_batch_size(session.model.config, longest, settings, device)
    # At most the rows there are: the memory's own figure ("1143566 rows per batch" for 8 rows) read as a bug.
    total = max(1, len(session.features["eval"].rows) * settings.num_samples)
    if rows >= total:
        return batch_plan(total, f"every row at once: {MEMORY_CHOICE} now", settings.num_samples)
    return batch_plan(rows, f"{MEMORY_CHOICE} now; eval.batch_size sets it", settings.num_samples)


def objective_plan(recipe: Recipe, supervised: str) -> str:
    """What training optimises, and against which reference policy; `supervised` is the task's own loss (sft)."""
    train = recipe.train
    preference = train.preference
    if train.objective == "sft":
        return supervised
    reference = (
        f"the starting adapter {recipe.model.adapter}" if recipe.model.adapter else "the base model (fresh LoRA)"
    )
    if train.objective == "dpo":
        loss = preference.loss + (
            f", label_smoothing {preference.label_smoothing:g}" if preference.loss == "robust" else ""
        )
        return f"dpo ({loss} loss), beta {preference.beta:g}; reference: {reference}, log-probs computed once"
    if train.objective == "kto":
        return (
            f"kto, beta {preference.beta:g}, weights desirable {preference.desirable_weight:g} / undesirable "
            f"{preference.undesirable_weight:g}; reference: {reference}, log-probs computed once"
        )
    if train.objective == "grpo":
        g = train.grpo
        return (
            f"grpo: {g.group_size} samples per prompt (temperature {g.temperature:g}, top_p {g.top_p:g}, up to "
            f"{g.max_new_tokens} tokens), rewarded by {reward_terms(g.reward)}; {g.loss_type} loss, clip "
            f"{g.epsilon:g}, KL beta {g.beta:g}" + (f" to {reference}" if g.beta else "")
        )
    return f"orpo, beta {preference.beta:g} (odds-ratio term beside the chosen answers' NLL); no reference model"


def reward_terms(reward: RewardSection) -> str:
    """GRPO's reward as the plan says it: the task's own score and each extra term the recipe adds, weighted."""
    terms = [f"{reward.task:g} x the task's own score"] if reward.task else []
    if reward.length_target is not None:
        terms.append(f"{reward.length_weight:g} x closeness to {reward.length_target} tokens")
    if reward.pattern:
        terms.append(f"{reward.pattern_weight:g} x matching {reward.pattern!r}")
    if reward.function:
        terms.append(f"{reward.function_weight:g} x {reward.function} (in the sandbox)")
    return " + ".join(terms) or "nothing (every term weighs 0)"


def topology_plan(world_size: int) -> str:
    """Where the processes are, as the launcher (torchrun, under accelerate) told each one."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    nodes = max(1, world_size // max(per_node, 1))
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    where = f"rendezvous {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if nodes == 1:
        return f"{world_size} on this machine, backend {backend}, {where}"
    return f"{world_size} = {nodes} nodes x {per_node} per node, backend {backend}, {where}"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def estimate_rows(estimate: Estimate) -> list[tuple[str, str]]:
    """The plan's lines for the estimate: the figures, then how each was obtained."""
    gpu = f", GPU {estimate.peak_gpu_bytes / 2**30:.2f} GiB" if estimate.peak_gpu_bytes is not None else ""
    rows = [
        (
            "estimate",
            f"{duration(estimate.total_seconds)} in all (training {duration(estimate.train_seconds)}, final "
            f"evaluation {duration(estimate.eval_seconds)}, start-up and loading {duration(estimate.startup_seconds)}, "
            f"measuring {duration(estimate.measure_seconds)}, writing {duration(estimate.writing_seconds)}"
            + (f", reference {duration(estimate.reference_seconds)}" if estimate.reference_seconds else "")
            + f"); peak memory {estimate.peak_rss_bytes / 2**30:.2f} GiB resident{gpu}",
        )
    ]
    rows.extend(("", escape(line)) for line in estimate.how)
    return rows


def plan_document(session: Session, world_size: int, output_note: str, estimate: Estimate | None) -> dict:
    """What `run --dry-run --json` prints: the plan's numbers and the estimate."""
    recipe = session.recipe
    trainable, total = count_parameters(session.model)
    plan = TrainPlan.build(recipe.train, len(session.features["train"].dataset), world_size)
    return {
        "task": recipe.task,
        "model": recipe.model.name_or_path,
        "family": session.family.name,
        "parameters": {"trainable": trainable, "total": total},
        "data": {split: {"rows": f.report.rows, "inputs": len(f.dataset)} for split, f in session.features.items()},
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "processes": world_size,
        "precision": session.precision,
        "output": output_note,
        "estimate": estimate.as_dict() if estimate is not None else None,
    }


def show_plan(
    console: Console,
    session: Session,
    world_size: int,
    output_note: str,
    data_warnings: list[str] | None,
    estimate: Estimate | None,
    device: torch.device,
) -> None:
    recipe = session.recipe
    trainable, total = count_parameters(session.model)
    plan = TrainPlan.build(recipe.train, len(session.features["train"].dataset), world_size)
    table = Table(title="plan", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("task", recipe.task)
    table.add_row(
        "model", f"{recipe.model.name_or_path}  ({session.family.name} family, {session.family.architecture})"
    )
    base_dropout = "the checkpoint's own" if recipe.model.dropout is None else f"{recipe.model.dropout:g}"
    table.add_row("base dropout", f"{base_dropout} (model.dropout)")
    lora = recipe.lora
    method = [
        "DoRA" if lora.use_dora else "LoRA",
        *(["rsLoRA scaling"] if lora.use_rslora else []),
        *([f"{lora.init} init"] if lora.init != "default" else []),
    ]
    table.add_row(
        "adapter",
        f"{' + '.join(method)}, r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}; "
        f"optimizer {recipe.train.optimizer}"
        + (f" (B lr x{recipe.train.loraplus_lr_ratio:g})" if recipe.train.optimizer == "loraplus" else ""),
    )
    if recipe.model.adapter is not None:
        table.add_row("starts from", f"{recipe.model.adapter} (model.adapter; its LoRA settings)")
    table.add_row("objective", objective_plan(recipe, session.task.loss_plan(recipe, session.state)))
    groups = group_targets(list(session.targets), session.family)
    table.add_row("LoRA targets", f"{len(session.targets)} modules" + "".join(f"\n{line}" for line in groups))
    if recipe.data.knowledge_base is not None:
        table.add_row("knowledge base", session.task.knowledge_base_plan(recipe))
    table.add_row("parameters", f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    for split, features in session.features.items():
        r = features.report
        pct = ", ".join(f"{k} {v}" for k, v in r.percentiles.items())
        table.add_row(
            f"{split} data",
            f"{r.rows} rows -> {len(features.dataset)} inputs; tokens {pct}; "
            f"truncated {r.truncated}, dropped {r.dropped} (max_length {r.max_length}, overflow {recipe.data.overflow})",
        )
        for note in r.notes:
            table.add_row("", note)
    if session.cache_note:
        table.add_row("data cache", f"{session.cache_note} in {cache_root() / 'features'}")
    table.add_row(
        "steps",
        f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch, warmup {plan.warmup_steps}); "
        f"batch {recipe.train.batch_size} x {recipe.train.grad_accum} accumulation x {world_size} processes",
    )
    if world_size > 1:
        table.add_row("processes", topology_plan(world_size))
    table.add_row("evaluation", evaluation_plan(session, plan))
    generation = generation_plan(session, device)
    if generation is not None:
        table.add_row("generation", generation)
    # accelerate's "no" is fp32
    table.add_row(
        "precision",
        f"{'fp32' if session.precision == 'no' else session.precision}; gradient checkpointing "
        f"{'on' if recipe.distributed.gradient_checkpointing else 'off'} (distributed.gradient_checkpointing: on "
        "keeps less for the backward pass and recomputes the rest, slower)",
    )
    table.add_row("output", output_note)
    for name, value in estimate_rows(estimate) if estimate is not None else []:
        table.add_row(name, value)
    for warning in [*plan_warnings(session, plan, world_size), *(data_warnings or [])]:
        table.add_row("[yellow]warning[/]", escape(warning))
    console.print(table)
