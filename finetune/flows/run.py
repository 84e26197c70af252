"""The commands' flows, each read top-down: recipe -> session -> train -> evaluate -> run directory.

cli.py parses arguments and calls these; the steps they share live in their own modules
(validation, session, preflight, plan, train, evaluation, artifacts).
"""

from __future__ import annotations

import logging
import random
import shutil
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from rich.console import Console
from transformers import AutoTokenizer

from finetune import files
from finetune.data import report as data_report
from finetune.data.features import Features
from finetune.data.retrieval import attach_passages
from finetune.data.tables import file_hashes
from finetune.errors import DataError, RecipeError
from finetune.evaluation import scoring as evaluation
from finetune.flows import detector as synthid_detector
from finetune.flows.plan import show_plan
from finetune.flows.resolve import check_recipe, load_recipe
from finetune.flows.session import (
    Session,
    SessionData,
    build_retriever,
    changes_base_weights,
    during_rows,
    open_data,
    open_session,
    task_rows,
    training_collator,
)
from finetune.models.references import load_config, resolve_reference
from finetune.outputs import adapter as adapter_files
from finetune.outputs import card, plots, rundir
from finetune.outputs import manifest as provenance
from finetune.outputs.adapter import AdapterSaver
from finetune.outputs.gguf import QUANTS, export_arch, write_gguf
from finetune.outputs.rundir import RunDir
from finetune.recipe.schema import EvalSection, Recipe, WatermarkSection, recipe_to_yaml
from finetune.secrets import redact
from finetune.tasks import Task, get_task, recipe_task
from finetune.tasks.text2text import CompletionEntropy
from finetune.training import checkpoint, trackers
from finetune.training.loop import Checkpointing, make_accelerator, train
from finetune.training.monitor import Monitor, summary
from finetune.watermark import marking as watermark

log = logging.getLogger("finetune")


# --------------------------------------------------------------------------- run


def run(
    recipe: Recipe,
    console: Console,
    *,
    dry_run: bool = False,
    resume: str | None = None,
    force_resume: bool = False,
    overwrite: bool = False,
) -> dict | None:
    """Train, evaluate and write the run directory. Returns the metrics document (None for a dry run).

    `resume` is "auto" (the newest usable checkpoint in the run directory, if
    any) or a checkpoint path; the run then continues exactly where it stopped.
    """
    check_recipe(recipe, source=recipe.output.dir)
    run_dir = RunDir(Path(recipe.output.dir).expanduser())
    accelerator = make_accelerator(recipe, trackers_dir=None if dry_run else run_dir.path)
    # The main process alone decides and claims the directory; the others wait, so none sees the fresh claim.
    created, output_note = False, ""
    if accelerator.is_main_process:
        output_note = rundir.output_decision(run_dir, resume=resume, overwrite=overwrite)
        if resume == "auto" and run_dir.is_run() and run_dir.metrics.is_file():
            console.print(
                f"{run_dir.path} is a finished run; nothing to resume (its metrics are below)",
                highlight=False,
                soft_wrap=True,
            )
            return files.read_json(run_dir.metrics)
        created = False if dry_run else rundir.claim(run_dir)
    accelerator.wait_for_everyone()
    try:
        # LoRA is applied to freshly loaded base weights, also when resuming: a
        # checkpoint holds the trained values, never a second set of adapters.
        session = open_session(recipe)
        report = session_report(recipe, session)
        if accelerator.is_main_process:
            show_plan(console, session, accelerator.num_processes, output_note, data_report.warnings(report))
        if dry_run:
            return None
        rundir.check_free_space(run_dir.path, rundir.checkpoint_bytes(session.model, recipe.train.keep_checkpoints))
        identity = rundir.resume_identity(recipe, accelerator.num_processes)
        resume_from = checkpoint.resolve(resume, run_dir.checkpoints) if resume else None
        if resume_from is not None:
            checkpoint.check_identity(checkpoint.read_progress(resume_from).identity, identity, force_resume)
    except BaseException:
        rundir.release(run_dir, created)
        raise
    main = accelerator.is_main_process
    if main:
        if resume_from is not None:
            console.print(f"resuming from {resume_from}", highlight=False, soft_wrap=True)
        _start_outputs(run_dir, recipe, keep_training_state=resume_from is not None)
        files.write_json(run_dir.data_report, report)
    saver = _adapter_saver(session, run_dir, write_initial=main)
    accelerator.wait_for_everyone()
    trackers.start(accelerator, recipe, run_dir.path.name)
    monitor = build_monitor(session, accelerator, run_dir.eval_log if main else None)
    set_seed(recipe.train.seed)
    result = train(
        session.model,
        session.features["train"].dataset,
        training_collator(session),
        recipe,
        accelerator,
        run_dir.train_log,
        console if main else None,
        Checkpointing(run_dir.checkpoints, identity, resume_from, saver),
        monitor,
    )
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(session.model)
    kept_step = keep_weights(monitor, recipe, run_dir, model, result.steps, console if main else None)
    if main:
        saver.save(model, run_dir.adapter, for_other_tools=True)
    rows, scored = evaluate_features(session, model, session.features["eval"], accelerator)
    training = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "skipped_nonfinite_steps": result.skipped_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "stopped_early": bool(monitor and monitor.state.stopped_early),
    }
    gates = evaluation.collect_gates(recipe.eval.gates, None)
    extra = {"data": session.reports(), "training": training}
    if monitor is not None:
        extra["evaluation"] = summary(monitor, kept_step, recipe.eval.keep)
    document = evaluation.metrics_document(recipe.task, scored, gates, extra)
    if main:
        manifest = provenance.build_manifest(recipe, _data_hashes(recipe), accelerator, {"family": session.family.name})
        files.write_json(run_dir.manifest, manifest)
        files.write_jsonl(run_dir.predictions, rows)
        files.write_json(run_dir.metrics, document)
        card.write_pictures(run_dir, document)
        card.write_model_card(run_dir, recipe, document, manifest, session.reports(), data_report.warnings(report))
    accelerator.log({f"eval/{name}": value for name, value in document["metrics"].items()}, step=result.steps)
    trackers.finish(accelerator)
    accelerator.wait_for_everyone()
    return document


def keep_weights(
    monitor: Monitor | None, recipe: Recipe, run_dir: RunDir, model, last_step: int, console: Console | None
) -> int:
    """eval.keep: best loads the best evaluated checkpoint's weights into `model`; returns the step kept."""
    if monitor is None:
        return last_step
    state, kept = monitor.state, last_step
    if recipe.eval.keep == "best" and state.best_step not in (None, last_step):
        kept = state.best_step
        checkpoint.load_trainable(run_dir.checkpoints / f"{checkpoint.PREFIX}{kept:08d}", model)
    if console is not None:
        if state.stopped_early:
            console.print(
                f"stopped early at step {last_step}: {monitor.metric} did not improve for "
                f"{state.evals_without_improvement} evaluations",
                highlight=False,
                soft_wrap=True,
            )
        if recipe.eval.keep == "best" and state.best_step is not None:
            console.print(
                f"keeping the weights of step {kept}: best {monitor.metric} {state.best_value:.4f}",
                highlight=False,
                soft_wrap=True,
            )
    return kept


def session_report(recipe: Recipe, data: Session | SessionData) -> dict:
    """The data report of what a session read (data_report.json)."""
    features = data.features
    return data_report.build_report(
        recipe, features["train"].rows, features["eval"].rows, features, data.tokenizer, dict(data.overlap)
    )


def report_data(recipe: Recipe) -> dict:
    """`finetune data`: the data report, without loading weights."""
    check_recipe(recipe, source=recipe.output.dir)
    return session_report(recipe, open_data(recipe))


def evaluate_features(session: Session, model, features: Features, accelerator: Accelerator) -> tuple[list[dict], dict]:
    """The one evaluation step: the task's predictions on `features`, then its metrics."""
    rows, loss = session.task.predict(
        model, session.tokenizer, features, accelerator, session.recipe, dict(session.state)
    )
    mark = session.recipe.eval.watermark
    if mark is not None:  # each prediction scored on its own tokens
        detector = watermark_detector(session, accelerator.unwrap_model(model), mark, accelerator)
        rows = [{**row, **detector.score(row["prediction"], row["prompt"]).as_dict()} for row in rows]
    return rows, evaluation.score(session.task, rows, session.recipe.eval, loss)


def watermark_detector(
    session: Session, model, settings: WatermarkSection, accelerator: Accelerator
) -> watermark.Detector:
    """The run's detector; an entropy-gated watermark's also reads the model's entropies."""
    entropies = None
    if watermark.gated(settings):
        entropies = CompletionEntropy(model, session.tokenizer, session.family, session.recipe, accelerator)
    return watermark.Detector(session.tokenizer, model.config, settings, entropies)


class SessionEvaluator:
    """The task's own predict + metrics on the live model, over the evaluation rows used during training."""

    def __init__(self, session: Session, features: Features, accelerator: Accelerator):
        self.session, self.features, self.accelerator = session, features, accelerator
        self.rows = len(features.rows)

    def __call__(self, model) -> dict[str, float]:
        _, scored = evaluate_features(self.session, model, self.features, self.accelerator)
        return scored["metrics"]


def build_monitor(session: Session, accelerator: Accelerator, log_path: Path | None) -> Monitor | None:
    """Evaluation during training (eval.every), or None."""
    recipe = session.recipe
    if recipe.eval.every is None:
        return None
    features = session.features["eval"]
    limit = during_rows(session)
    if limit is not None and limit < len(features.rows):
        features = session.featurize(features.rows.select(range(limit)), "data.eval")
    metric = recipe.eval.best_metric or session.task.main_metric(recipe.eval)
    return Monitor(
        recipe.eval.every,
        metric,
        SessionEvaluator(session, features, accelerator),
        log_path,
        recipe.train.early_stopping,
    )


def _start_outputs(run: RunDir, recipe: Recipe, keep_training_state: bool) -> None:
    """A fresh run (after --overwrite's consent) starts from an empty directory; a resumed one keeps its
    checkpoints and log and drops only the outputs it is about to write again."""
    if keep_training_state:
        for path in (run.metrics, run.predictions, run.card, run.manifest, run.curves, run.confusion):
            path.unlink(missing_ok=True)
        shutil.rmtree(run.adapter, ignore_errors=True)
    else:
        rundir.clear_previous_run(run)
    files.write_text_atomic(run.recipe, redact(recipe_to_yaml(recipe)))


def _adapter_saver(session: Session, run: RunDir, write_initial: bool) -> AdapterSaver:
    """The saver for checkpoints and the final adapter. PiSSA/OLoRA first keep the adapter as initialised, which
    saving needs to convert the trained one into a LoRA on the unchanged base."""
    if not changes_base_weights(session.recipe):
        return session.adapter_saver()
    initial = run.path / "lora_init"
    if write_initial and not initial.is_dir():  # a resumed run kept it; the initialisation is deterministic
        session.model.save_pretrained(str(initial), safe_serialization=True)
    return session.adapter_saver(initial_adapter=initial)


def _data_hashes(recipe: Recipe) -> dict:
    return {**file_hashes(recipe.data.train), **file_hashes(recipe.data.eval)}


# --------------------------------------------------------------------------- eval / predict / merge


def recipe_of(source: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, RunDir | None]:
    """A recipe file, or the resolved recipe inside a run directory."""
    source = Path(source).expanduser()
    if source.is_dir():
        run = RunDir(source)
        if not run.recipe.is_file():
            raise RecipeError(f"{source}: not a run directory (no recipe.yaml)")
        return load_recipe(run.recipe, [*_watermark_key_override(run), *(overrides or [])]), run
    return load_recipe(source, overrides), None


def _watermark_key_override(run: RunDir) -> list[str]:
    """A run's recipe.yaml shows its watermark key redacted; the key itself is in the adapter's key file."""
    key = watermark.read_key(run.adapter)
    return [] if key is None else [f"eval.watermark.key={key}"]


def check_gates(task: Task, gates: list[str] | None) -> None:
    """Command-line gates: well formed and on a metric the task reports, before any model loads."""
    problems = []
    for gate in evaluation.collect_gates(None, gates):
        if not task.knows_metric(gate.metric):
            problems.append(task.unknown_metric(f"--gate {gate}", gate.metric))
    if problems:
        raise RecipeError("; ".join(problems))


def evaluation_output(run: RunDir | None, output: str | None, label: str, overwrite: bool) -> Path | None:
    """Where an evaluation's files go: `--output`, else a new `RUN/evals/<time>-<label>/`; never over a run's results."""
    if output is not None:
        target = Path(output).expanduser()
        target_run = RunDir(target)
        if target_run.holds_run():
            raise RecipeError(
                f"--output: {target} holds a training run; its results are never replaced by an "
                f"evaluation (evaluations of a run go to RUN/evals/)"
            )
        if target.exists() and not target.is_dir():
            raise RecipeError(f"--output: {target} is a file, not a directory")
        if not target_run.is_empty() and not overwrite:
            raise RecipeError(f"--output: {target} is not empty; choose a new or empty directory, or --overwrite")
        return target
    if run is None:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run.evals / f"{stamp}-{label}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = run.evals / f"{stamp}-{label}-{suffix}"
    return target


def evaluate(
    source: str,
    *,
    checkpoint: str | None = None,
    gates: list[str] | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
    baseline=None,
    overwrite: bool = False,
) -> dict:
    """Evaluate a run (its adapter), a checkpoint, or a recipe's base model. Files go where evaluation_output says;
    the document's `written_to` names the place."""
    recipe, run = recipe_of(source, overrides)
    check_gates(recipe_task(recipe), gates)
    adapter_dir = None
    if checkpoint:
        adapter_dir = Path(checkpoint).expanduser()
        adapter_dir = adapter_dir / "adapter" if (adapter_dir / "adapter").is_dir() else adapter_dir
    elif run is not None:
        adapter_dir = run.adapter
    if adapter_dir is not None and not (adapter_dir / rundir.ADAPTER_META).is_file():
        raise RecipeError(f"{adapter_dir}: no trained adapter here ({rundir.ADAPTER_META} missing)")
    label = (
        "base"
        if adapter_dir is None
        else adapter_dir.parent.name
        if adapter_dir.name == "adapter" and checkpoint
        else "adapter"
    )
    out_dir = evaluation_output(run, output, label, overwrite)
    check_recipe(recipe, source=str(source))

    accelerator = make_accelerator(recipe)
    session = open_session(recipe, adapter_dir=adapter_dir, splits=("eval",), with_lora=False)
    rows, scored = evaluate_features(session, session.model, session.features["eval"], accelerator)
    document = evaluation.metrics_document(
        recipe.task,
        scored,
        evaluation.collect_gates(recipe.eval.gates, gates),
        {
            "evaluated": str(adapter_dir) if adapter_dir else f"base model {recipe.model.name_or_path}",
            "data": session.reports(),
        },
    )
    evaluation.attach_comparison(document, baseline)
    marked = _watermarked_metrics(run, recipe, adapter_dir, overrides)
    if marked is not None:  # the run's own evaluation, watermark off: what the mark costs
        document["watermark_cost"] = evaluation.watermark_cost(marked, document["metrics"])
    if out_dir is not None and accelerator.is_main_process:
        if overwrite and out_dir.is_dir():
            for stale in (out_dir / "metrics.json", out_dir / "predictions.jsonl"):
                stale.unlink(missing_ok=True)
        files.write_json(out_dir / "metrics.json", document)
        files.write_jsonl(out_dir / "predictions.jsonl", rows)
        if marked is not None:
            card.record_watermark_cost(run, document["watermark_cost"], out_dir)
    document["written_to"] = str(out_dir) if out_dir is not None else None
    return document


def _watermarked_metrics(
    run: RunDir | None, recipe: Recipe, adapter_dir: Path | None, overrides: list[str] | None
) -> dict | None:
    """The run's watermarked metrics, when this evaluation scores the same adapter the same way, unwatermarked."""
    if run is None or adapter_dir != run.adapter or recipe.eval.watermark is not None or not run.metrics.is_file():
        return None
    # Comparable only when nothing else changed (other rows, other generation settings).
    if not all(o.split("=")[0].strip().startswith("eval.watermark") for o in overrides or []):
        return None
    metrics = files.read_json(run.metrics).get("metrics", {})
    return metrics if "watermark_detected" in metrics else None


def evaluate_all_checkpoints(
    run_path: str,
    *,
    gates: list[str] | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Every checkpoint on disk and the final adapter, one row per step; the gates apply to the kept weights
    (the final adapter). The table (JSON) and a plot go with the run's evaluations."""
    recipe, run = finished_run(run_path, overrides)
    check_gates(recipe_task(recipe), gates)
    out_dir = evaluation_output(run, output, "all-checkpoints", overwrite)
    check_recipe(recipe, source=str(run_path))
    accelerator = make_accelerator(recipe)
    sources = [
        (int(c.name.removeprefix(checkpoint.PREFIX)), c / "adapter", c.name)
        for c in checkpoint.complete_checkpoints(run.checkpoints)
        if (c / "adapter" / rundir.ADAPTER_META).is_file()
    ]
    trained = files.read_json(run.metrics) if run.metrics.is_file() else {}
    kept_step = trained.get("evaluation", {}).get("kept_step", trained.get("training", {}).get("steps"))
    sources.append((kept_step, run.adapter, "adapter (kept)"))
    table, kept = [], None
    for step, adapter_dir, label in sources:
        session = open_session(recipe, adapter_dir=adapter_dir, splits=("eval",), with_lora=False)
        _, scored = evaluate_features(session, session.model, session.features["eval"], accelerator)
        table.append({"step": step, "weights": label, "metrics": scored["metrics"]})
        kept = scored
    document = evaluation.metrics_document(
        recipe.task,
        kept,
        evaluation.collect_gates(recipe.eval.gates, gates),
        {"evaluated": str(run.adapter), "checkpoints": table},
    )
    if out_dir is not None and accelerator.is_main_process:
        files.write_json(out_dir / "checkpoints.json", table)
        files.write_json(out_dir / "metrics.json", document)
        plots.checkpoint_metrics(table, out_dir / "checkpoints.png")
    document["written_to"] = str(out_dir) if out_dir is not None else None
    return document


def rescore(
    predictions: str, task_name: str, gates: list[str] | None, settings: EvalSection | None = None, baseline=None
) -> dict:
    """Metrics from a saved predictions.jsonl alone, without a model."""
    task = get_task(task_name)
    check_gates(task, gates)
    rows = evaluation.read_prediction_rows(predictions)
    task.check_prediction_rows(rows, predictions)
    scored = evaluation.score(task, rows, settings or EvalSection())
    document = evaluation.metrics_document(task_name, scored, evaluation.collect_gates(None, gates))
    return evaluation.attach_comparison(document, baseline)


def predict(run_path: str, rows: list[dict], source: str, knowledge_base: str | None = None) -> list[dict]:
    """The run's model on new rows; every input field it does not use comes back in the output row, in order.

    Input rows may use the training file's column names or the task's field names, and may carry the reference
    answer (a labelled test file): it is passed through, never used.
    """
    recipe, run = finished_run(run_path)
    task = recipe_task(recipe)
    if not rows:
        raise DataError(f"{source}: no input rows")
    if recipe.data.overflow == "drop":  # every input gets an answer: over-long ones are truncated, not dropped
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"overflow": "truncate"})})
    table = _input_table(rows, source)
    columns = {f: c for f, c in recipe.data.columns.items() if c in table.column_names}
    required, optional = task.fields(recipe)
    table = task_rows(
        table,
        recipe,
        task,
        source,
        columns=columns,
        required=_inputs_only(task, required),
        optional=(*optional, *task.reference_fields),
    )
    if knowledge_base is not None or recipe.data.knowledge_base is not None:  # answers come from retrieved passages
        retriever = build_retriever(recipe, knowledge_base)
        table = attach_passages(
            table, retriever, extractive=task.head == "question_answering", training=False, split=source
        )
    session = open_session(recipe, adapter_dir=run.adapter, splits=(), with_lora=False)
    features = session.featurize(table, source, labeled=False)
    out, _ = session.task.predict(
        session.model, session.tokenizer, features, make_accelerator(recipe), recipe, dict(session.state)
    )
    per_row = len(out) // len(rows)  # codegen: one row per sample
    return [
        {**rows[i // per_row], **{k: v for k, v in row.items() if k not in rows[i // per_row] or k == "prediction"}}
        for i, row in enumerate(out)
    ]


def _input_table(rows: list[dict], source: str) -> Dataset:
    try:
        return Dataset.from_list(rows)
    except Exception as exc:  # mixed types in one field: name it
        raise DataError(
            f"{source}: the input rows do not form a table (a field holds values of different types): "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def _inputs_only(task: Task, required: tuple[str, ...]) -> tuple[str, ...]:
    """Fields needed to predict: the required fields minus the reference answer."""
    return tuple(f for f in required if f not in task.reference_fields)


def merge(run_path: str, output: str, overwrite: bool = False) -> Path:
    """The adapter merged into the base weights, saved as a plain transformers checkpoint (safetensors).

    The output must be new or an empty directory (or --overwrite of one that holds no run); it is written
    beside it and renamed into place, so a failure leaves nothing half-written.
    """
    recipe, run = finished_run(run_path)
    target = Path(output).expanduser()
    if target.exists() and not target.is_dir():
        raise RecipeError(f"--output: {target} is a file; give a new or empty directory")
    if RunDir(target).holds_run() or run.contains(target) or RunDir(target).contains(run.path):
        raise RecipeError(f"--output: {target} is or holds a finetune run; choose a directory outside any run")
    if not RunDir(target).is_empty() and not overwrite:
        raise RecipeError(f"--output: {target} is not empty; choose a new or empty directory, or --overwrite")
    session = open_session(recipe, adapter_dir=run.adapter, splits=(), with_lora=False)
    merged = session.model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    session.tokenizer.save_pretrained(str(staging))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def export(run_path: str, output: str, *, format: str, quant: str = "f16", overwrite: bool = False) -> Path:
    """`finetune export`: `hf` writes what merge writes; `gguf` a merged GGUF file for llama.cpp/Ollama."""
    if format == "hf":
        return merge(run_path, output, overwrite=overwrite)
    if format != "gguf":
        raise RecipeError(f"--format: {format!r} is not gguf or hf")
    if quant not in QUANTS:
        raise RecipeError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    recipe, run = finished_run(run_path)
    target = Path(output).expanduser()
    if target.suffix != ".gguf":
        raise RecipeError(f"--output: {target} must be a .gguf file")
    if target.exists() and (target.is_dir() or not overwrite):
        raise RecipeError(f"--output: {target} exists; choose a new file, or --overwrite to replace a file")
    if run.contains(target):
        raise RecipeError(f"--output: {target} is inside the run; write the export outside it")
    meta = adapter_files.read_adapter_meta(run.adapter)
    config = load_config(resolve_reference(recipe.model.name_or_path), revision=recipe.model.revision)
    export_arch(meta["family"], config.model_type)  # refused before any weights load
    session = open_session(recipe, adapter_dir=run.adapter, splits=(), with_lora=False)
    merged = session.model.merge_and_unload()
    card_text = run.card.read_text(encoding="utf-8") if run.card.is_file() else ""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    staging.unlink(missing_ok=True)
    write_gguf(
        merged,
        session.tokenizer,
        staging,
        quant=quant,
        name=run.path.resolve().name,
        description=card_text,
        generation=meta.get("generation", {}),
    )
    staging.replace(target)
    card.add_run_elsewhere(run, target)
    return target


def detect(
    run_path: str, rows: list[dict], source: str, field: str = "prediction", key: int | None = None
) -> tuple[list[dict], dict]:
    """Watermark scores for texts (`field` of each row), with the run's tokenizer and key; rows keep their fields."""
    recipe, run = finished_run(run_path)
    settings = recipe.eval.watermark
    if key is not None:
        settings = (settings or WatermarkSection(key=key)).model_copy(update={"key": key})
    if settings is None or not isinstance(settings.key, int):
        raise RecipeError(
            f"{run_path}: no watermark key: the run was not watermarked (eval.watermark) or its "
            f"adapter/{watermark.KEY_FILE} is gone; give --key"
        )
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get(field), str):
            raise DataError(f"{source}:{number}: field {field!r} must be text, got {type(row.get(field)).__name__}")
    if watermark.gated(settings):  # the model's entropies choose the tokens to count
        session = open_session(recipe, adapter_dir=run.adapter, splits=(), with_lora=False)
        detector = watermark_detector(session, session.model, settings, make_accelerator(recipe))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(run.adapter))
        config = load_config(resolve_reference(recipe.model.name_or_path), revision=recipe.model.revision)
        detector = watermark.Detector(tokenizer, config, settings, bayesian=_trained_detector(run, settings))
    # The prompt each text answers: the task's field, or the recipe's column for it.
    prompt_fields = ("prompt", recipe.data.columns.get("prompt", "prompt"))
    scored, without_prompt = [], 0
    for row in rows:
        prompt = next((row[f] for f in prompt_fields if isinstance(row.get(f), str)), None)
        without_prompt += prompt is None
        scored.append({**row, **detector.score(row[field], prompt or "").as_dict()})
    flagged = sum(r["watermarked"] for r in scored)
    summary = {
        "rows": len(scored),
        "watermarked": flagged,
        "fraction": flagged / len(scored) if scored else 0.0,
        "unscored": sum(r["z_score"] is None for r in scored),
        "z_threshold": settings.z_threshold,
        "false_positive_rate": watermark.false_positive_rate(settings.z_threshold),
    }
    if watermark.gated(settings):
        summary["without_prompt"] = without_prompt
    if detector.bayesian is not None:  # its probabilities beside the verdicts, and what its training measured
        trained = files.read_json(run.path / synthid_detector.DETECTOR_DIR / synthid_detector.REPORT_FILE)
        summary["bayesian"] = {
            "probability_above_half": sum((r.get("probability") or 0) > 0.5 for r in scored),
            **{k: v for k, v in trained.items() if k.startswith("validation_")},
        }
    return scored, summary


def _trained_detector(run: RunDir, settings: WatermarkSection):
    """The run's trained SynthID Bayesian detector (`finetune train-detector`), if there is one."""
    directory = run.path / synthid_detector.DETECTOR_DIR
    if settings.method != "synthid" or not directory.is_dir():
        return None
    from transformers import BayesianDetectorModel

    return BayesianDetectorModel.from_pretrained(str(directory)).eval()


def train_watermark_detector(run_path: str, samples: int, overwrite: bool = False) -> dict:
    """Train the SynthID Bayesian detector of a run on its own marked and unmarked generations of its training
    prompts; the weights go to RUN/watermark_detector/ (written beside, then renamed into place)."""
    recipe, run = finished_run(run_path)
    settings = recipe.eval.watermark
    if settings is None or settings.method != "synthid":
        raise RecipeError(
            f"{run_path}: train-detector is for synthid watermarks; a kirchenbauer watermark's z-test needs no training"
            if settings
            else f"{run_path}: the run was not watermarked"
        )
    target = run.path / synthid_detector.DETECTOR_DIR
    if target.exists() and not overwrite:
        raise RecipeError(f"{target}: a trained detector is already there; --overwrite replaces it")
    session = open_session(recipe, adapter_dir=run.adapter, splits=("train",), with_lora=False)
    prompts = list(session.features["train"].prompts)
    random.Random(recipe.train.seed).shuffle(prompts)
    model, report = synthid_detector.train_for_model(session, prompts[:samples], make_accelerator(recipe))
    synthid_detector.save(model, report, target)
    return {"written_to": str(target), **report}


def finished_run(run_path: str, overrides: list[str] | None = None) -> tuple[Recipe, RunDir]:
    recipe, run = recipe_of(run_path, overrides)
    if run is None or not run.is_run():
        raise RecipeError(f"{run_path}: not a finished run directory (needs recipe.yaml and adapter/)")
    return recipe, run
