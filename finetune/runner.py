"""The flow of PRODUCT.md, once and forward: recipe -> model -> data -> train -> evaluate -> run directory.

Commands in cli.py are thin wrappers over the functions here.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune import artifacts, evaluation, trackers
from finetune.artifacts import RunDir
from finetune.config import EvalSection, Recipe, flat_settings, load_recipe, recipe_to_yaml
from finetune.data import apply_template, file_hashes, load_table, map_columns, split_for_eval
from finetune.errors import DataError, RecipeError
from finetune.secrets import redact, redact_tree
from finetune.lora import apply_lora, count_parameters, head_modules, resolve_targets, summarise_targets
from finetune.models import detect_family, load_config, load_model, load_tokenizer, quantization_config, resolve_reference
from finetune.tasks import Features, Task, get_task, recipe_task

log = logging.getLogger("finetune")


@dataclass
class Session:
    """Everything resolved for one recipe before training or evaluation."""

    recipe: Recipe
    task: Task
    family: str
    model_path: str
    tokenizer: object
    state: dict
    features: dict[str, Features] = field(default_factory=dict)
    model: object = None
    targets: list[str] = field(default_factory=list)

    def reports(self) -> dict:
        return {split: f.report.as_dict() for split, f in self.features.items()}


# --------------------------------------------------------------------------- resolution


def resolve_model(recipe: Recipe) -> tuple[str, str]:
    """(path for from_pretrained, family), refusing unsupported task x family pairs."""
    path = resolve_reference(recipe.model.name_or_path)
    config = load_config(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    family = detect_family(config, recipe.model.family)
    task = recipe_task(recipe)
    if family in task.refused_families:
        raise RecipeError(f"{recipe.model.name_or_path}: {task.refusal(family)}")
    return path, family


def task_rows(table, recipe: Recipe, task: Task, key: str, columns=None, required=None):
    """A loaded table as the task's fields: the prompt template applied, then the column mapping."""
    if recipe.data.template is not None:
        table = apply_template(table, recipe.data.template, key)
    columns = recipe.data.columns if columns is None else columns
    required = task.required_fields if required is None else required
    return map_columns(table, columns, required, task.optional_fields, key=key)


def load_rows(recipe: Recipe, task: Task):
    """(train rows, eval rows) mapped to the task's field names."""
    train = load_table(recipe.data.train, "data.train")
    train = task_rows(train, recipe, task, f"data.train ({_shown(recipe.data.train)})")
    if recipe.data.eval is not None:
        eval_rows = load_table(recipe.data.eval, "data.eval")
        eval_rows = task_rows(eval_rows, recipe, task, f"data.eval ({_shown(recipe.data.eval)})")
    else:
        train, eval_rows = split_for_eval(train, recipe.data.eval_split, recipe.train.seed)
    if recipe.data.max_train_samples:
        train = train.select(range(min(len(train), recipe.data.max_train_samples)))
    if recipe.data.max_eval_samples:
        eval_rows = eval_rows.select(range(min(len(eval_rows), recipe.data.max_eval_samples)))
    return train, eval_rows


def _shown(spec) -> str:
    return spec if isinstance(spec, str) else ", ".join(spec)


def open_session(recipe: Recipe, *, adapter_dir: Path | None = None, splits=("train", "eval")) -> Session:
    """Resolve the model, read the data, and tokenise the requested splits. No weights are loaded yet."""
    task = recipe_task(recipe)
    path, family = resolve_model(recipe)
    tokenizer = load_tokenizer(path, family, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    train_rows, eval_rows = load_rows(recipe, task)
    if "eval" in splits:
        task.check_eval_rows(eval_rows, recipe.eval)
    if adapter_dir is not None:
        state = artifacts.read_adapter_meta(adapter_dir)["state"]
    else:
        state = task.fit_state(train_rows, recipe)
    session = Session(recipe, task, family, path, tokenizer, _with_family(state, family))
    rows = {"train": train_rows, "eval": eval_rows}
    for split in splits:
        session.features[split] = task.featurize(rows[split], tokenizer, recipe, session.state, f"data.{split}")
    return session


def _with_family(state: dict, family: str) -> dict:
    """The family travels in the task state: featurize and predict choose the decoder or encoder-decoder layout by it."""
    return {**state, "family": family}


def load_session_model(session: Session, adapter_dir: Path | None = None, with_lora: bool = True) -> None:
    """Load the task's model; add fresh LoRA, or load a trained adapter from `adapter_dir`."""
    from accelerate.utils import set_seed

    recipe, task = session.recipe, session.task
    set_seed(recipe.train.seed)  # the new head's initial weights
    model = load_model(
        task.auto_class(session.family),
        session.model_path,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        **task.model_kwargs(session.state),
        quantization_config=quantization_config(recipe.distributed.quantization),
    )
    task.prepare_model(model, session.tokenizer, session.family)
    distributed = recipe.distributed
    if distributed.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=distributed.gradient_checkpointing)
    elif distributed.gradient_checkpointing and with_lora:
        # Non-reentrant checkpointing needs no input gradients, so it works with every weight frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    elif with_lora:
        try:
            session.targets = resolve_targets(model, recipe.lora.targets)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        heads = head_modules(model, task.head_candidates)
        model = apply_lora(model, recipe.lora, session.targets, heads, task.peft_task(session.family))
    session.model = model


# --------------------------------------------------------------------------- run


# A checkpoint of a LoRA run is small; this floor is checked before anything is
# loaded, and the exact size (from the trainable parameters) once LoRA is applied.
MIN_FREE_BYTES = 64 << 20


def preflight(run: RunDir) -> None:
    """Fail before loading anything if the run directory cannot be written or its disk is full."""
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        probe = run.path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"output.dir: {run.path} is not writable: {exc.strerror or exc}") from None
    check_free_space(run.path, MIN_FREE_BYTES)


def check_free_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise RecipeError(
            f"output.dir: {path} has {free / 2**20:.0f} MiB free; a checkpoint needs about {needed / 2**20:.0f} MiB"
        )


def checkpoint_bytes(model, keep: int) -> int:
    """Disk for `keep` checkpoints plus the one being written: trainable weights, two Adam moments, the adapter copy."""
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return (keep + 1) * 4 * trainable + MIN_FREE_BYTES


def resume_identity(recipe: Recipe, world_size: int) -> dict:
    """What must not change between a checkpoint and the run resuming from it, for the result to be exact.

    Evaluation settings, logging and checkpoint cadence may change freely.
    """
    free_sections = ("output.", "eval.")
    free_keys = {"data.eval", "data.max_eval_samples", "train.checkpoint_every", "train.keep_checkpoints",
                 "train.log_every", "train.nonfinite", "train.report_to"}
    identity = {
        f"recipe {k}": v for k, v in flat_settings(recipe).items() if not k.startswith(free_sections) and k not in free_keys
    }
    identity.update({f"data file {name}": digest for name, digest in file_hashes(recipe.data.train).items()})
    versions = artifacts.library_versions()
    identity.update({f"version of {lib}": versions.get(lib) for lib in ("torch", "transformers", "peft")})
    identity["number of processes"] = world_size
    return redact_tree(identity)  # it is written into every checkpoint


def show_plan(console, session: Session, world_size: int) -> None:
    from rich.table import Table

    from finetune.train import TrainPlan, resolve_precision

    recipe = session.recipe
    trainable, total = count_parameters(session.model)
    plan = TrainPlan.build(recipe, len(session.features["train"].dataset), world_size)
    table = Table(title="plan", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("task", recipe.task)
    table.add_row("model", f"{recipe.model.name_or_path}  ({session.family} family)")
    table.add_row("LoRA targets", f"{len(session.targets)} modules: {summarise_targets(session.targets)}")
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
    table.add_row(
        "steps",
        f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch, warmup {plan.warmup_steps}); "
        f"batch {recipe.train.batch_size} x {recipe.train.grad_accum} accumulation x {world_size} processes",
    )
    table.add_row("precision", resolve_precision(recipe.train.precision))
    table.add_row("output", recipe.output.dir)
    console.print(table)


def run(recipe: Recipe, console, *, dry_run: bool = False, resume: str | None = None,
        force_resume: bool = False) -> dict | None:
    """Train, evaluate and write the run directory. Returns the metrics document (None for a dry run).

    `resume` is "auto" (the newest usable checkpoint in the run directory, if
    any) or a checkpoint path; the run then continues exactly where it stopped.
    """
    from accelerate.utils import set_seed

    from finetune import checkpoint
    from finetune.train import Checkpointing, make_accelerator, train

    run_dir = RunDir(recipe.output.dir)
    trackers.check_installed(recipe.train.report_to)
    quantization_config(recipe.distributed.quantization)  # refused here, before anything loads
    if not dry_run:
        preflight(run_dir)
    accelerator = make_accelerator(recipe, trackers_dir=None if dry_run else run_dir.path)
    main = accelerator.is_main_process
    session = open_session(recipe)
    collate = training_collator(session)
    # LoRA is applied to freshly loaded base weights, also when resuming: a
    # checkpoint holds the trained values, never a second set of adapters.
    load_session_model(session)
    if main:
        show_plan(console, session, accelerator.num_processes)
    if dry_run:
        return None
    check_free_space(run_dir.path, checkpoint_bytes(session.model, recipe.train.keep_checkpoints))

    identity = resume_identity(recipe, accelerator.num_processes)
    resume_from = checkpoint.resolve(resume, run_dir.checkpoints) if resume else None
    if resume_from is not None:
        checkpoint.check_identity(checkpoint.read_progress(resume_from).identity, identity, force_resume)
        if main:
            console.print(f"resuming from {resume_from}", highlight=False)
    if main:
        _clear_previous_outputs(run_dir, keep_training_state=resume_from is not None)
        artifacts.write_text_atomic(run_dir.recipe, redact(recipe_to_yaml(recipe)))
    accelerator.wait_for_everyone()
    trackers.start(accelerator, recipe, run_dir.path.name)
    set_seed(recipe.train.seed)
    task = session.task
    result = train(
        session.model,
        session.features["train"].dataset,
        collate,
        recipe,
        accelerator,
        run_dir.train_log,
        console if main else None,
        Checkpointing(
            run_dir.checkpoints, identity, resume_from,
            # Each checkpoint also holds a plain adapter, so `finetune eval --checkpoint` can use it.
            on_checkpoint=lambda staging: save_adapter(accelerator.unwrap_model(session.model), session, staging / "adapter"),
        ),
    )
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(session.model)
    if main:
        save_adapter(model, session, run_dir.adapter, for_other_tools=True)

    rows, loss = task.predict(model, session.tokenizer, session.features["eval"], accelerator, recipe, session.state)
    scored = evaluation.score(task, rows, recipe.eval, loss)
    gates = evaluation.collect_gates(recipe.eval.gates, None)
    training = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "skipped_nonfinite_steps": result.skipped_steps,
        "resumed_from": str(resume_from) if resume_from else None,
    }
    document = evaluation.metrics_document(recipe.task, scored, gates, {"data": session.reports(), "training": training})
    if main:
        manifest = artifacts.build_manifest(recipe, _data_hashes(recipe), accelerator, {"family": session.family})
        artifacts.write_json(run_dir.manifest, manifest)
        artifacts.write_jsonl(run_dir.predictions, rows)
        artifacts.write_json(run_dir.metrics, document)
        artifacts.write_pictures(run_dir, document)
        artifacts.write_model_card(run_dir, recipe, document, manifest, session.reports())
    accelerator.log({f"eval/{name}": value for name, value in document["metrics"].items()}, step=result.steps)
    trackers.finish(accelerator)
    accelerator.wait_for_everyone()
    return document


def training_collator(session: Session):
    """The task's padding collator, or one-row packing (train.packing) for decoder generation tasks."""
    if not session.recipe.train.packing:
        return session.task.collate(session.tokenizer)
    from finetune.generation import PackedCollator
    from finetune.tasks.generative import GenerationTask

    if not isinstance(session.task, GenerationTask) or session.family != "gpt":
        raise RecipeError(
            f"train.packing: only for GPT-family models on generation tasks (copywriting, codegen, generative qa); "
            f"this is {session.recipe.task} on a {session.family}-family model"
        )
    return PackedCollator()


def _data_hashes(recipe: Recipe) -> dict:
    return {**file_hashes(recipe.data.train), **file_hashes(recipe.data.eval)}


def _clear_previous_outputs(run: RunDir, keep_training_state: bool) -> None:
    """A new run replaces the outputs of an older one in the same directory, never half of them.

    A resumed run keeps the checkpoints and the training log it continues.
    """
    for path in (run.metrics, run.predictions, run.card, run.manifest, run.curves, run.confusion):
        path.unlink(missing_ok=True)
    shutil.rmtree(run.adapter, ignore_errors=True)
    if not keep_training_state:
        run.train_log.unlink(missing_ok=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)


def save_adapter(model, session: Session, adapter_dir: Path, for_other_tools: bool = False) -> None:
    """The peft adapter (safetensors), the tokenizer, and what the task needs to use it again.

    `for_other_tools` (the run's final adapter) also writes the task's base
    config, so peft's AutoPeftModel classes load it without extra arguments.
    """
    from finetune.export import write_task_base

    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    session.tokenizer.save_pretrained(str(staging))
    recipe = session.recipe
    meta = {
        "task": recipe.task,
        "mode": recipe.mode,
        "family": session.family,
        "base_model": recipe.model.name_or_path,
        "base_model_path": session.model_path,
        "state": session.state,  # label order for classification, prompt layout for generation
        "generation": recipe.eval.model_dump(include={"max_new_tokens", "temperature", "top_p", "num_samples", "stop"}),
    }
    artifacts.write_json(staging / artifacts.ADAPTER_META, meta)
    if for_other_tools:
        write_task_base(model, session.model_path, recipe.model.revision, staging, adapter_dir)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(staging, adapter_dir)


# --------------------------------------------------------------------------- eval / predict


def recipe_of(source: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, RunDir | None]:
    """A recipe file, or the resolved recipe inside a run directory."""
    source = Path(source)
    if source.is_dir():
        run = RunDir(source)
        if not run.recipe.is_file():
            raise RecipeError(f"{source}: not a run directory (no recipe.yaml)")
        return load_recipe(run.recipe, overrides), run
    return load_recipe(source, overrides), None


def evaluate(source: str, *, checkpoint: str | None = None, gates: list[str] | None = None,
             output: str | None = None, overrides: list[str] | None = None, baseline=None) -> dict:
    """Evaluate a run (its adapter), a checkpoint, or a recipe's base model; write metrics and predictions."""
    from finetune.train import make_accelerator

    recipe, run = recipe_of(source, overrides)
    adapter_dir = None
    if checkpoint:
        adapter_dir = Path(checkpoint)
        adapter_dir = adapter_dir / "adapter" if (adapter_dir / "adapter").is_dir() else adapter_dir
    elif run is not None:
        adapter_dir = run.adapter
    if adapter_dir is not None and not (adapter_dir / artifacts.ADAPTER_META).is_file():
        raise RecipeError(f"{adapter_dir}: no trained adapter here ({artifacts.ADAPTER_META} missing)")

    accelerator = make_accelerator(recipe)
    session = open_session(recipe, adapter_dir=adapter_dir, splits=("eval",))
    load_session_model(session, adapter_dir=adapter_dir, with_lora=False)
    task = session.task
    rows, loss = task.predict(session.model, session.tokenizer, session.features["eval"], accelerator, recipe, session.state)
    scored = evaluation.score(task, rows, recipe.eval, loss)
    document = evaluation.metrics_document(
        recipe.task, scored, evaluation.collect_gates(recipe.eval.gates, gates),
        {"evaluated": str(adapter_dir) if adapter_dir else f"base model {recipe.model.name_or_path}",
         "data": session.reports()},
    )
    evaluation.attach_comparison(document, baseline)
    out_dir = Path(output) if output else (run.path if run else None)
    if out_dir is not None and accelerator.is_main_process:
        artifacts.write_json(out_dir / "metrics.json", document)
        artifacts.write_jsonl(out_dir / "predictions.jsonl", rows)
    return document


def rescore(predictions: str, task_name: str, gates: list[str] | None, settings: EvalSection | None = None,
            baseline=None) -> dict:
    """Metrics from a saved predictions.jsonl alone, without a model."""
    task = get_task(task_name)
    rows = evaluation.read_prediction_rows(predictions)
    task.check_prediction_rows(rows, predictions)
    scored = evaluation.score(task, rows, settings or EvalSection())
    document = evaluation.metrics_document(task_name, scored, evaluation.collect_gates(None, gates))
    return evaluation.attach_comparison(document, baseline)


def predict(run_path: str, rows: list[dict], source: str) -> list[dict]:
    """The run's model on new rows (task fields, as in the recipe's column mapping)."""
    from datasets import Dataset

    from finetune.train import make_accelerator

    recipe, run = finished_run(run_path)
    task = recipe_task(recipe)
    if not rows:
        raise DataError(f"{source}: no input rows")
    table = Dataset.from_list(rows)
    # Input rows may use the training file's column names or the task's field names.
    columns = {f: c for f, c in recipe.data.columns.items() if c in table.column_names}
    table = task_rows(table, recipe, task, source, columns=columns, required=_inputs_only(task))
    session = trained_session(recipe, run)
    session.features["input"] = task.featurize(table, session.tokenizer, recipe, session.state, source, labeled=False)
    accelerator = make_accelerator(recipe)
    out, _ = task.predict(session.model, session.tokenizer, session.features["input"], accelerator, recipe, session.state)
    return out


def _inputs_only(task: Task) -> tuple[str, ...]:
    """Fields needed to predict: the required fields minus the reference answer."""
    return tuple(f for f in task.required_fields if f not in task.reference_fields)


def merge(run_path: str, output: str) -> None:
    """The adapter merged into the base weights, saved as a plain transformers checkpoint (safetensors)."""
    recipe, run = finished_run(run_path)
    session = trained_session(recipe, run)
    merged = session.model.merge_and_unload()
    merged.save_pretrained(output, safe_serialization=True)
    session.tokenizer.save_pretrained(output)


def finished_run(run_path: str) -> tuple[Recipe, RunDir]:
    recipe, run = recipe_of(run_path)
    if run is None or not run.is_run():
        raise RecipeError(f"{run_path}: not a finished run directory (needs recipe.yaml and adapter/)")
    return recipe, run


def trained_session(recipe: Recipe, run: RunDir) -> Session:
    """The base model with the run's adapter, its tokenizer and task state; no data read."""
    path, family = resolve_model(recipe)
    tokenizer = load_tokenizer(path, family, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    state = artifacts.read_adapter_meta(run.adapter)["state"]
    session = Session(recipe, recipe_task(recipe), family, path, tokenizer, _with_family(state, family))
    load_session_model(session, adapter_dir=run.adapter, with_lora=False)
    return session
