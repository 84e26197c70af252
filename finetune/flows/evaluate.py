"""`finetune eval` and `finetune predict`: a run's (or a base model's) predictions and metrics; the one
evaluation step that training also uses."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import string
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset

from finetune import files
from finetune.data.conversations import LAYOUT_FIELDS
from finetune.data.features import Features
from finetune.data.retrieval import attach_passages
from finetune.data.tables import Origins, data_file_hashes
from finetune.errors import DataError, OutputsNotFinite, RecipeError
from finetune.evaluation import scoring as evaluation
from finetune.evaluation.compare import eval_data_record
from finetune.evaluation.preference import check_preference_rows
from finetune.evaluation.scoring import eval_loader
from finetune.flows.resolve import (
    Resolved,
    adapter_problems,
    gate_problems,
    resolve_run,
    resolve_source,
    start_adapter_hash,
)
from finetune.flows.session import (
    REFERENCE_ADAPTER,
    Session,
    build_retriever,
    open_session,
    placed_errors,
    settle_retrieval,
    task_rows,
)
from finetune.outputs import card, plots, rundir
from finetune.outputs.adapter import read_adapter_meta
from finetune.outputs.lock import RunLock
from finetune.outputs.manifest import RESUME_IDENTITY, START_ADAPTER, read_manifest
from finetune.outputs.rundir import RunDir
from finetune.recipe.schema import EvalSection, Recipe, WatermarkSection
from finetune.tasks import Task, get_task
from finetune.tasks.preference import PAIR_SIDES, REFERENCE_COLUMNS, PreferenceCollator, sides_of
from finetune.tasks.text2text import CompletionEntropy
from finetune.training import checkpoint
from finetune.training.checkpoint import INDEX as CHECKPOINT_INDEX
from finetune.training.checkpoint import verify as verify_checkpoint
from finetune.training.loop import make_accelerator
from finetune.training.objectives import OBJECTIVES, make_objective, reference_logps, reference_policy, with_columns
from finetune.watermark import learned
from finetune.watermark import marking as watermark

log = logging.getLogger("finetune")


def evaluate_features(
    session: Session,
    model,
    features: Features,
    accelerator: Accelerator,
    *,
    generate: bool = True,
    intervals: bool = True,
) -> tuple[list[dict], dict]:
    """The one evaluation step: the task's predictions on `features`, then its metrics (with each metric's interval
    estimate unless `intervals=False`: evaluations during training only pick weights). Under a preference
    objective each judged row also carries the policy's rewards; `generate=False` scores those alone (cheap, for
    evaluations during training)."""
    judged: list[dict] | None = None
    preference_loss = None
    if is_preference_data(features.dataset):
        judged, preference_loss = judge_preferences(session, model, features, accelerator)
    if not generate and judged is not None:
        rows = [{**row, **judgement} for row, judgement in zip(features.rows, judged)]
        return rows, evaluation.score(
            session.task, rows, session.recipe.eval, preference_loss, generated=False, intervals=intervals
        )
    rows, loss = session.task.predict(
        model, session.tokenizer, features, accelerator, session.recipe, dict(session.state)
    )
    if judged is not None:  # generation keeps the rows' order; several samples of a row share its judgement
        rows = [{**row, **judged[index]} for index, row in zip(_row_indices(rows), rows)]
        loss = preference_loss
    if loss is not None and not math.isfinite(loss):
        # A model whose outputs are NaN still "predicts" (the argmax of NaN is the first class) and can pass a gate.
        raise OutputsNotFinite(
            f"the evaluated model's outputs are not finite (eval_loss {loss}): its predictions would be meaningless, "
            "so nothing is scored; the weights are damaged or overflowed (try train.precision: fp32)"
        )
    mark = session.recipe.eval.watermark
    if mark is not None:  # each prediction scored on its own tokens
        detector = watermark_detector(session, accelerator.unwrap_model(model), mark, accelerator)
        # A learned watermark's decoded bits stay out of predictions.jsonl: their majority is the run's message.
        scored = (detector.score(row["prediction"], row["prompt"]).as_dict() for row in rows)
        rows = [{**row, **{k: v for k, v in found.items() if k != "message"}} for row, found in zip(rows, scored)]
    rewards = session.recipe.train.objective == "grpo"  # GRPO's reward_mean (evaluation/scoring.py)
    return rows, evaluation.score(session.task, rows, session.recipe.eval, loss, intervals=intervals, rewards=rewards)


def _row_indices(rows: list[dict]) -> list[int]:
    """The eval row each prediction row came from (a row generated n times gives n prediction rows)."""
    out, index = [], -1
    for row in rows:
        index += 1 if row.get("sample", 0) == 0 else 0
        out.append(index)
    return out


def is_preference_data(dataset: Dataset) -> bool:
    return sides_of(dataset.column_names) is not None


@torch.no_grad()
def judge_preferences(
    session: Session, model, features: Features, accelerator: Accelerator
) -> tuple[list[dict], float | None]:
    """Each pair's (or thumb's) rewards under the policy, and the objective's mean loss (the eval loss).

    The reference log-probabilities come with the features when training computed them; otherwise from the
    reference policy (the starting adapter loaded beside the trained one, or the base with adapters disabled).
    A KTO run judged on pairs reports rewards alone: its loss is defined on thumbs.
    """
    recipe, family = session.recipe, session.family
    objective = session.objective
    # KTO judged on pairs: each side's reward as DPO defines it (the same beta x log-ratio); no loss.
    rewards_only = objective.name == "kto" and sides_of(features.dataset.column_names) == PAIR_SIDES
    if rewards_only:
        objective = make_objective("dpo", recipe.train.preference, family.encoder_decoder)
    dataset = features.dataset
    collate = PreferenceCollator(session.tokenizer)
    if objective.needs_reference and not any(name in dataset.column_names for name in REFERENCE_COLUMNS):
        adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) else None
        policy = reference_policy(model, adapter)
        columns = reference_logps(
            model, dataset, collate, recipe.eval_batch_size, accelerator, family.encoder_decoder, policy
        )
        dataset = with_columns(dataset, columns)
    was_training = model.training
    model.eval()
    judged: dict[str, list] = {}
    total = torch.zeros(2, device=accelerator.device)  # loss x rows, rows: summed over every process
    try:
        for batch in eval_loader(dataset, collate, recipe.eval_batch_size, accelerator):
            with accelerator.autocast():
                step = objective.step(model, batch)
            size = len(batch["input_ids"]) // 2
            total += torch.stack([step.loss.detach().float() * size, torch.tensor(float(size), device=total.device)])
            for name, values in accelerator.gather_for_metrics(step.rows).items():
                judged.setdefault(name, []).extend(values.cpu().tolist())
    finally:
        model.train(was_training)
    names = list(judged)
    rows = [dict(zip(names, values)) for values in zip(*(judged[n] for n in names))]
    loss_sum, count = accelerator.reduce(total, "sum").tolist()
    return rows, (loss_sum / count if count and not rewards_only else None)


def watermark_detector(
    session: Session, model, settings: WatermarkSection, accelerator: Accelerator
) -> watermark.Detector | learned.BitDetector:
    """The run's detector; an entropy-gated watermark's also reads the model's entropies; a learned one is its
    extractor, against the message the model marks with."""
    found = learned.find(model)
    if learned.is_learned(settings) and found is not None:
        references = session.reference_completions
        if references:  # during (and right after) training: the extractor as it is now, on every process alike
            learned.calibrate(found, [list(t) for t in references])
        return learned.BitDetector(session.tokenizer, found, found.message_text(), settings.p_threshold)
    entropies = None
    if watermark.gated(settings):
        entropies = CompletionEntropy(model, session.tokenizer, session.family, session.recipe, accelerator)
    return watermark.Detector(session.tokenizer, model.config, settings, entropies)


class SessionEvaluator:
    """The task's own predict + metrics on the live model, over the evaluation rows used during training."""

    def __init__(self, session: Session, features: Features, accelerator: Accelerator, generate: bool = True):
        self.session, self.features, self.accelerator = session, features, accelerator
        self.generate = generate
        self.rows = len(features.rows)

    def __call__(self, model) -> dict[str, float]:
        _, scored = evaluate_features(
            self.session, model, self.features, self.accelerator, generate=self.generate, intervals=False
        )
        return scored["metrics"]


def check_recipe_gates(resolved: Resolved, gates: list[str] | None, adapter_dir: Path | None = None) -> None:
    """check_gates for an evaluation of `resolved`: the metrics its evaluation never reports are refused too;
    `adapter_dir`: the trained adapter evaluated, whose recorded state (what its data decided) rules out more."""
    state = read_adapter_meta(adapter_dir).get("state") if adapter_dir is not None else None
    check_gates(resolved.task, gates, lambda asked: resolved.task.unavailable_metrics(resolved.recipe, asked, state))


def check_gates(
    task: Task, gates: list[str] | None, unavailable: Callable[[list[str]], dict[str, str]] | None = None
) -> None:
    """Command-line gates, before any model loads: well formed, on a metric the task reports, and by the rules a
    recipe's gates follow (`resolve.gate_problems`: exit 2 alike); `unavailable`: of the metrics asked, those this
    evaluation cannot produce (re-scoring saved predictions has no model to compute a loss with)."""
    parsed = evaluation.collect_gates(None, gates)
    missing = unavailable([gate.metric for gate in parsed]) if unavailable is not None else None
    problems = []
    for gate in parsed:
        if not task.knows_metric(gate.metric):
            problems.append(task.unknown_metric(f"--gate {gate}", gate.metric))
        else:
            problems += gate_problems(gate, f"--gate {gate}", missing)
    if problems:
        raise RecipeError("; ".join(problems))


def evaluation_output(
    run: RunDir | None, output: str | None, label: str, overwrite: bool, inputs: tuple[Path, ...]
) -> Path | None:
    """Where an evaluation's files go: `--output` (as the write policy allows), else a new
    `RUN/evals/<time>-<label>/`, or for a base model (a recipe, no run) a new `evals/<time>-base/` in the working
    directory (its predictions were not written anywhere); never over a run's results or the evaluation's inputs."""
    if output is not None:
        return rundir.claim_output(
            output, key="--output", what=EVALUATION, directory=True, overwrite=overwrite, inputs=inputs
        )
    folder = run.evals if run is not None else Path("evals")
    if run is not None and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
        # A link planted there sent the evaluation outside the run; a file there is not the run's folder either.
        kind = "a link" if folder.is_symlink() else "not a folder"
        raise RecipeError(
            f"{folder} is {kind}: a run's evaluations go only into its own evals/ folder; remove it, or give "
            "--output DIR"
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder / f"{stamp}-{label}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"{stamp}-{label}-{suffix}"
    if run is None:  # the working directory may lie inside a run, or hold an input: the write policy decides
        return rundir.claim_output(
            target, key="--output", what=EVALUATION, directory=True, overwrite=False, inputs=inputs
        )
    return target


EVALUATION = rundir.EVALUATION


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
    resolved, run = resolve_source(source, overrides)
    recipe = resolved.recipe
    adapter_dir: Path | None = None
    if checkpoint:
        adapter_dir = Path(checkpoint).expanduser()
        if not adapter_dir.exists():
            raise RecipeError(f"--checkpoint: {checkpoint} does not exist")
        if (adapter_dir / CHECKPOINT_INDEX).is_file():  # a checkpoint: its bytes as written, or a DataError
            verify_checkpoint(adapter_dir)
        adapter_dir = adapter_dir / "adapter" if (adapter_dir / "adapter").is_dir() else adapter_dir
        if (adapter_dir / rundir.ADAPTER_META).is_file() and (
            problems := adapter_problems(recipe, adapter_dir, "--checkpoint")
        ):  # another run's adapter would load into the wrong layers or score with the wrong head
            raise RecipeError("; ".join(problems))
        if run is not None and output is None and not adapter_dir.resolve().is_relative_to(run.path.resolve()):
            raise RecipeError(
                f"--checkpoint: {checkpoint} is not inside the run {source}: its evaluation would be filed in the "
                "run's evals/ as one of its own; evaluate it with the run it belongs to, or write it elsewhere "
                "(--output DIR)"
            )
    elif run is not None:
        adapter_dir = run.adapter  # checked against the recipe's model and task by resolve_source
        if not (adapter_dir / rundir.ADAPTER_META).is_file():
            raise RecipeError(_unfinished(run, str(source)))
    if adapter_dir is not None and not (adapter_dir / rundir.ADAPTER_META).is_file():
        raise RecipeError(f"{adapter_dir}: no trained adapter here ({rundir.ADAPTER_META} missing)")
    check_recipe_gates(resolved, gates, adapter_dir)  # a trained adapter's data also decided single or multi-label
    label = (
        "base"
        if adapter_dir is None
        else adapter_dir.parent.name
        if adapter_dir.name == "adapter" and checkpoint
        else "adapter"
    )
    out_dir = evaluation_output(run, output, label, overwrite, _inputs(resolved, run, baseline))
    # A recipe leaving a hybrid knowledge base's sparse weight open: settled as `finetune run` settles it (after the
    # refusals above, before the session, whose feature cache is then keyed by it); a run's recipe.yaml records it.
    # The accelerator first (settling touches no training setting): its main process chooses for all of them.
    accelerator = make_accelerator(recipe.train, resolved.precision)
    settled = settle_retrieval(recipe, accelerator=accelerator)
    if settled is not recipe:
        resolved, recipe = dataclasses.replace(resolved, recipe=settled), settled

    lock = _evaluation_lock(run, out_dir, accelerator, str(source))
    try:
        session = open_session(resolved, adapter_dir=adapter_dir, splits=("eval",), with_lora=False)
        rows, scored = evaluate_features(session, session.model, session.features["eval"], accelerator)
        document = evaluation.metrics_document(
            recipe.task,
            scored,
            evaluation.collect_gates(recipe.eval.gates, gates),
            {
                "evaluated": str(adapter_dir) if adapter_dir else f"base model {recipe.model.name_or_path}",
                "data": session.reports(),
                "eval_data": eval_data_record(recipe, session.features["eval"].rows),  # what --compare checks
            },
        )
        changed = _changed_since(run, recipe) if run is not None else []
        fresh = _fresh_head(resolved) if adapter_dir is None else None
        if changed or fresh:
            document.setdefault("warnings", []).extend([*changed, *([fresh] if fresh else [])])
        required, optional = session.task.fields(recipe)
        evaluation.attach_comparison(document, baseline, session.task, rows, recipe.eval, (*required, *optional))
        marked = _watermarked_metrics(run, recipe, adapter_dir, overrides)
        if marked is not None:  # the run's own evaluation, watermark off: what the mark costs
            document["watermark_cost"] = evaluation.watermark_cost(marked, document["metrics"])
        if out_dir is not None and accelerator.is_main_process:

            def write(folder: Path) -> None:
                files.write_jsonl(folder / "predictions.jsonl", rows)
                files.write_json(folder / "metrics.json", document)

            rundir.write_evaluation(out_dir, write, overwrite)
            if marked is not None and run is not None:
                card.record_watermark_cost(run, document["watermark_cost"], out_dir)
        document["written_to"] = str(out_dir) if out_dir is not None else None
        return document
    finally:
        if lock is not None:
            lock.release()


# The head a task puts on the model, as transformers names a checkpoint that already has one trained.
TRAINED_HEADS = {"sequence_classification": "ForSequenceClassification", "question_answering": "ForQuestionAnswering"}


def _fresh_head(resolved: Resolved) -> str | None:
    """Said when a base model is evaluated with a head its checkpoint does not have (a sentence-embedding model
    asked to classify): the head starts from random weights, and its accuracy was shown as the base model's."""
    suffix = TRAINED_HEADS.get(resolved.task.head)
    architectures = getattr(resolved.model_config, "architectures", None) or []
    if suffix is None or resolved.task.name == "rerank" or any(name.endswith(suffix) for name in architectures):
        return None  # (a reranker's fresh head starts at zero: it ranks exactly as its first stage)
    return (
        f"the base model {resolved.recipe.model.name_or_path} has no trained {resolved.task.name} head: it starts "
        f"from random weights (train.seed {resolved.recipe.train.seed}), so these metrics are a chance-level "
        "baseline, not what the checkpoint knows"
    )


def _changed_since(run: RunDir, recipe: Recipe) -> list[str]:
    """The eval file and knowledge base a run's manifest recorded, when the file read now is not the same: every
    row, context and metric of this evaluation come from the file as it is now (a relative path is read from the
    working directory: from another one, an eval file of the same name scored 1.0 where the run scored 0.22)."""
    if (manifest := read_manifest(run.manifest)) is None:
        return []
    recorded = manifest.get("data_files")
    recorded = recorded if isinstance(recorded, dict) else {}
    what = {"eval": "eval file", "knowledge_base": "knowledge base"}
    changed = []
    # Only an objective scored against its reference reads model.adapter again (an SFT or GRPO run's adapter holds
    # all it learned from it).
    start = recipe.model.adapter if OBJECTIVES[recipe.train.objective].needs_reference else None
    started = (manifest.get(START_ADAPTER) or {}).get(start) if start is not None else None
    if start is not None and started is not None and (now := start_adapter_hash(start)) != started:
        changed.append(
            f"the starting adapter {start} (model.adapter: this run's reference policy) is not the one the "
            f"run trained from (weights sha256 {started[:12]} then, {(now or 'none')[:12]} now): the metrics against "
            "the reference (preference_accuracy, reward_margin) are computed against it as it is now"
        )
    base = recipe.model.name_or_path
    trained_on = (manifest.get(RESUME_IDENTITY) or {}).get(f"{rundir.MODEL_FILES}{base}")
    if trained_on is not None and (now := rundir.base_model_hash(base)) != trained_on:
        changed.append(
            f"the base model {base} is not the one the run trained on (files sha256 {str(trained_on)[:12]} then, "
            f"{(now or 'none')[:12]} now): this evaluation loads the run's adapter onto it as it is now"
        )
    return changed + [
        f"the {what[key]} {name} is not the one the run read (sha256 {str(recorded[name])[:12]} then, "
        f"{digest[:12]} now; relative paths are read from the working directory, {Path.cwd()}): this "
        "evaluation read it as it is now"
        for key in what
        for name, digest in data_file_hashes(recipe.data, (key,)).items()
        if name in recorded and recorded[name] != digest
    ]


def _inputs(resolved: Resolved, run: RunDir | None, baseline: object) -> tuple[Path, ...]:
    """What an evaluation reads: never where it writes."""
    extra = [run.path] if run is not None else []
    if isinstance(baseline, tuple):  # (--compare path, its metrics, tolerance)
        extra.append(Path(baseline[0]))
    return (*resolved.input_paths(), *extra)


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


def _unfinished(run: RunDir, source: str) -> str:
    """Why a run has no adapter to evaluate, and what to do. A run another process is training now is that
    process's, named (its refusal, raised here): "continue it with --resume auto" would be refused too."""
    RunLock(run.path, label=source).refuse_if_held()
    aside = run.path / "adapter.old"  # files.replace_directory's: a kill came between its two renames
    if aside.is_dir() and not run.adapter.exists():
        return f"{source}: {aside} holds the adapter it was replacing when it stopped: rename it to adapter/ to use it"
    return (
        f"{source}: the run did not finish (no trained adapter in adapter/): continue it with `finetune run RECIPE "
        "--resume auto`, or score its checkpoints (--checkpoint DIR, --all-checkpoints)"
    )


def _evaluation_lock(run: RunDir | None, out_dir: Path | None, accelerator: Accelerator, label: str) -> RunLock | None:
    """The run's lock, held, where an evaluation writes into the run's evals/: writing there while another process
    writes the run would race (one writer per run directory). An evaluation written elsewhere (--output) only reads
    the run: no lock (a read-only run, parallel gate jobs)."""
    if (
        run is None
        or out_dir is None
        or not out_dir.resolve().is_relative_to(run.path.resolve())
        or not accelerator.is_main_process
    ):
        return None
    lock = RunLock(run.path, label=label)
    try:
        lock.acquire()
    except RecipeError as exc:
        if not _writable(run.path):  # a read-only run (a shared cache, a mounted artefact): scored elsewhere
            raise RecipeError(f"{exc}; give --output DIR to write the evaluation outside the run") from None
        raise
    return lock


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def evaluate_all_checkpoints(
    run_path: str,
    *,
    gates: list[str] | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Every checkpoint on disk and the final adapter, one row per step; the gates apply to the kept weights
    (the final adapter). The table (JSON) and a plot go with the run's evaluations.

    A run that stopped before its final adapter (killed, out of time) is scored too, checkpoint by checkpoint:
    choosing which of them to resume from or keep is what the table is for. Its document's metrics are its last
    checkpoint's, said in a warning; it has no kept weights for gates to judge, so --gate is refused and the
    recipe's gates are left out (said)."""
    resolved, run = resolve_source(run_path, overrides, ("eval",))
    if run is None:
        raise RecipeError(f"--all-checkpoints scores a run's checkpoints: {run_path} is a recipe; give a run directory")
    recipe = resolved.recipe
    finished = run.is_run()
    if not finished and gates:
        raise RecipeError(
            f"--gate: {run_path} did not finish (no adapter/), so it has no kept weights for a gate to judge; gate "
            "one of its checkpoints instead: --checkpoint DIR"
        )
    sources, skipped = [], []
    for c in checkpoint.complete_checkpoints(run.checkpoints):
        if not (c / "adapter" / rundir.ADAPTER_META).is_file():
            continue
        try:  # its bytes as written: a damaged one is left out, said, not scored (nor the whole table refused)
            checkpoint.verify(c)
        except DataError as exc:
            skipped.append(f"{c.name} left out: {exc}")
            continue
        sources.append((int(c.name.removeprefix(checkpoint.PREFIX)), c / "adapter", c.name))
    if finished:
        trained = files.read_json(run.metrics) if run.metrics.is_file() else {}
        kept_step = trained.get("evaluation", {}).get("kept_step", trained.get("training", {}).get("steps"))
        sources.append((kept_step, run.adapter, "adapter (kept)"))
    elif not sources:
        raise RecipeError(
            f"{run_path}: nothing to score: the run has no final adapter and no complete checkpoint"
            + (f" ({'; '.join(skipped)})" if skipped else "")
        )
    elif problems := adapter_problems(recipe, sources[-1][1], "the run's checkpoints"):
        # (a finished run's adapter is checked against the recipe by resolve_source; these are not)
        raise RecipeError("; ".join(problems))
    check_recipe_gates(resolved, gates, sources[-1][1])
    out_dir = evaluation_output(run, output, "all-checkpoints", overwrite, _inputs(resolved, run, None))
    accelerator = make_accelerator(recipe.train, resolved.precision)
    lock = _evaluation_lock(run, out_dir, accelerator, str(run_path))
    try:
        table: list[dict] = []
        kept: dict = {}
        evaluated = (sources[-1][1], sources[-1][2])
        for number, (step, adapter_dir, label) in enumerate(sources, start=1):
            if not adapter_dir.is_dir():  # pruned by the training still writing the run (keep_checkpoints)
                skipped.append(f"{label} left out: removed while the table was made")
                continue
            session = open_session(resolved, adapter_dir=adapter_dir, splits=("eval",), with_lora=False)
            # The document's metrics are the last weights scored (the kept ones): only they need intervals. Later
            # sources still on disk mean this is not the last (one pruned meanwhile leaves the one before last).
            last = not any(later.is_dir() for _, later, _ in sources[number:])
            _, scored = evaluate_features(session, session.model, session.features["eval"], accelerator, intervals=last)
            table.append({"step": step, "weights": label, "metrics": scored["metrics"]})
            kept, evaluated = scored, (adapter_dir, label)
        if not table:
            raise RecipeError(
                f"{run_path}: every checkpoint was removed while the table was made ({'; '.join(skipped)})"
            )
        document = evaluation.metrics_document(
            recipe.task,
            kept,
            evaluation.collect_gates(recipe.eval.gates if finished else {}, gates),
            {"evaluated": str(evaluated[0]), "checkpoints": table},
        )
        if not finished:
            unjudged = "; the recipe's gates are not judged (no kept weights)" if recipe.eval.gates else ""
            skipped.insert(
                0,
                f"the run did not finish (no adapter/): these metrics are its last checkpoint's ({evaluated[1]})"
                + unjudged,
            )
        if skipped:
            document.setdefault("warnings", []).extend(skipped)
        if out_dir is not None and accelerator.is_main_process:

            def write(folder: Path) -> None:
                files.write_json(folder / "checkpoints.json", table)
                plots.checkpoint_metrics(table, folder / "checkpoints.png")
                files.write_json(folder / "metrics.json", document)

            rundir.write_evaluation(out_dir, write, overwrite)
        document["written_to"] = str(out_dir) if out_dir is not None else None
        return document
    finally:
        if lock is not None:
            lock.release()


def rescore(
    predictions: str, task_name: str, gates: list[str] | None, settings: EvalSection | None = None, baseline=None
) -> dict:
    """Metrics from a saved predictions.jsonl alone, without a model."""
    task = get_task(task_name)
    check_gates(task, gates, lambda _: {"eval_loss": "is the model's loss: saved predictions have none to re-score"})
    rows = evaluation.read_prediction_rows(predictions)
    task.check_prediction_rows(rows, predictions)
    check_preference_rows(rows, predictions)
    settings = settings or EvalSection()
    # A GRPO run's rows carry the reward its evaluation gave each prediction: recomputed here, as every other metric
    # is (reward_mean came from the stored values: stale after an edit, above 1, or a row's left out).
    rewarded = bool(getattr(task, "reward_fields", ())) and any(evaluation.REWARD_FIELD in row for row in rows)
    for row in rows if rewarded else []:
        row.pop(evaluation.REWARD_FIELD, None)
    scored = evaluation.score(task, rows, settings, intervals=True, rewards=rewarded)
    asked = evaluation.collect_gates(None, gates)
    # What the rows decide (single labels or lists, pairs or not): a gate on a metric they do not report is a
    # wrong gate (exit 2), as on a run, not a failed one (exit 4: "the model regressed" to a CI job).
    unreported = [gate for gate in asked if gate.metric not in scored["metrics"]]
    if unreported:
        reported = ", ".join(sorted(scored["metrics"]))
        raise RecipeError(
            "; ".join(f"--gate {gate}: {gate.metric} is not reported for these predictions" for gate in unreported)
            + f" (they report {reported})"
        )
    document = evaluation.metrics_document(task_name, scored, asked)
    fields = (*task.required_fields, *task.optional_fields)
    return evaluation.attach_comparison(document, baseline, task, rows, settings, fields)


def predict(
    run_path: str, rows: list[dict], origins: Origins, knowledge_base: str | None = None, message: str | None = None
) -> list[dict]:
    """The run's model on new rows; every input field it does not use comes back in the output row, in order.

    Input rows may use the training file's column names or the task's field names, and may carry the reference
    answer (a labelled test file): it is passed through, never used. A learned watermark marks with the run's
    message, or `message`. `origins`: where the rows are (a message about one names its line).
    """
    source = origins.sources[0].name
    with placed_errors({source: origins}):  # the task's `SOURCE: row N: ...` named at the row's line
        return _predict(run_path, rows, origins, source, knowledge_base, message)


def _predict(
    run_path: str, rows: list[dict], origins: Origins, source: str, knowledge_base: str | None, message: str | None
) -> list[dict]:
    if message is not None and not learned.is_learned(resolve_run(run_path)[0].recipe.eval.watermark):
        raise RecipeError(f"--message: {run_path} carries no learned watermark (eval.watermark.method learned)")
    # Quoted: YAML would read 0101 as a number.
    resolved, run = resolve_run(run_path, [f"eval.watermark.message='{message}'"] if message is not None else None)
    recipe, task = resolved.recipe, resolved.task
    if not rows:
        raise DataError(f"{source}: no input rows")
    if knowledge_base is not None:  # searched instead of the run's own corpus, by retrieval and the reader alike
        if recipe.data.knowledge_base is None and task.name != "qa":
            raise RecipeError(f"--knowledge-base: a {task.name} run searches no knowledge base")
        data = recipe.data.model_copy(update={"knowledge_base": knowledge_base})
        recipe = recipe.model_copy(update={"data": data})
        resolved = dataclasses.replace(resolved, recipe=recipe)
    if recipe.data.overflow == "drop":  # every input gets an answer: over-long ones are truncated, not dropped
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"overflow": "truncate"})})
        resolved = dataclasses.replace(resolved, recipe=recipe)
    # New prompts to answer: a preference recipe's rows are pairs, but what predict reads is prompts, as for sft.
    as_sft = recipe.model_copy(update={"train": recipe.train.model_copy(update={"objective": "sft"})})
    required, optional = task.fields(as_sft)
    table = _input_table(rows, origins, _fields_read(recipe, task, (*required, *optional)))
    columns = {f: c for f, c in recipe.data.columns.items() if c in table.column_names}
    # data.template builds the prompt from other columns: those the template names are checked as it fills them.
    built = ("prompt",) if recipe.data.template is not None else ()
    needed = tuple(f for f in _inputs_only(task, required) if f not in built)
    # Conversations (the input's columns decide under data.format auto, as the training file's did) are checked as
    # conversations by task_rows; the task's own fields are not theirs (a run trained on a file's `messages` refused
    # them as rows without 'prompt').
    if task.conversation_layout(recipe, table.column_names, columns, _inputs_only(task, required)) is None:
        _check_inputs(rows, origins, needed, recipe.data.columns)
    table = task_rows(
        table,
        recipe,
        task,
        source,
        columns=columns,
        required=_inputs_only(task, required),
        optional=(*optional, *task.reference_fields),
        labeled=False,
    )
    read = set(table.column_names)  # what the task reads from the input; whatever else a row comes back with is new
    if knowledge_base is not None or recipe.data.knowledge_base is not None:  # answers come from retrieved passages
        retriever = build_retriever(recipe, knowledge_base)
        table = attach_passages(
            table, retriever, extractive=task.head == "question_answering", training=False, split=source
        )
    # Text prompts to a run that trained on conversations are asked as it trained (GenerationTask.as_trained).
    session = open_session(resolved, adapter_dir=run.adapter, splits=(), with_lora=False)
    features = session.featurize(table, source, labeled=False)
    out, _ = session.task.predict(
        session.model,
        session.tokenizer,
        features,
        make_accelerator(recipe.train, resolved.precision),
        session.recipe,
        dict(session.state),
    )
    per_row = len(out) // len(rows)  # codegen: one row per sample
    for i, row in enumerate(out):
        given = rows[i // per_row]
        # An input field the answer would replace (a `prediction` of an earlier model, say) is the user's: refused
        # rather than overwritten or, worse, passed through in place of the new answer.
        clash = next((k for k in row if k not in read and k in given), None)
        if clash is not None:
            raise DataError(
                f"{origins.place(i // per_row)}: field {clash!r} is what predict writes, and the input row holds one "
                "already; rename or drop it in the input (nothing was written)"
            )
    return [{**rows[i // per_row], **{k: v for k, v in row.items() if k not in read}} for i, row in enumerate(out)]


def _check_inputs(rows: list[dict], origins: Origins, needed: tuple[str, ...], columns: dict[str, str]) -> None:
    """Each input row holds the fields predict reads (by the task's name or the recipe's column name): a row
    without one is named as such, not as one whose value is null (which the table would make of it). Rows naming a
    field by its column in some rows and by the task's name in others are refused: the column was read for all of
    them, and the others were "missing"."""
    for field in needed:
        column = columns.get(field, field)
        if column == field:
            continue
        by_column = next((n for n, row in enumerate(rows) if column in row), None)
        # A row holding both reads the column, as training does (its `text` is another field, passed through).
        by_field = next((n for n, row in enumerate(rows) if field in row and column not in row), None)
        if by_column is None or by_field is None:
            continue
        (first, first_name), (later, later_name) = sorted([(by_column, column), (by_field, field)])
        raise DataError(
            f"{origins.place(later)}: field {field!r} is named {later_name!r} here and {first_name!r} at "
            f"{origins.place(first)} (the recipe's column for it is {column!r}); name it one way in every row"
        )
    for number, row in enumerate(rows):
        for field in needed:
            if field not in row and columns.get(field, field) not in row:
                named = repr(field) if columns.get(field, field) == field else f"{field!r} (column {columns[field]!r})"
                raise DataError(
                    f"{origins.place(number)}: no field {named}; the row has: {', '.join(row) or 'nothing'}"
                )


def _fields_read(recipe: Recipe, task: Task, fields: tuple[str, ...]) -> set[str]:
    """Every input field predict may read: the task's (by field or mapped column name), its reference, the
    conversation layouts', the data.template's placeholders. Any other comes back in its row untouched."""
    named = {*fields, *task.reference_fields, *recipe.data.columns.values()}
    if task.head == "generation":  # only generation tasks read conversations
        named |= {name for required, optional in LAYOUT_FIELDS.values() for name in (*required, *optional)}
    if recipe.data.template is not None:
        named |= {name for _, name, _, _ in string.Formatter().parse(recipe.data.template) if name}
    return named


def _input_table(rows: list[dict], origins: Origins, reads: set[str]) -> Dataset:
    """The input rows as a table. A field of mixed types that predict never reads is left out of it (it comes back
    in its row as it was: refusing a row over a pass-through field broke the contract); an `id` of mixed types
    (1 on one line, "x5" on another) is carried as text; any other field read is refused, named."""
    import pyarrow as pa

    try:
        return Dataset.from_list(rows)
    except Exception as exc:  # mixed types in one field: name the field and the first row that differs
        first: dict[str, tuple[int, str]] = {}
        mixed: dict[str, str] = {}
        for number, row in enumerate(rows):
            for field, value in row.items():
                if value is None:
                    continue
                kind = type(value).__name__
                seen = first.setdefault(field, (number, kind))
                if seen[1] != kind and field not in mixed:
                    mixed[field] = (
                        f"{origins.place(number)}: field {field!r} is {kind}, but {seen[1]} at "
                        f"{origins.place(seen[0])}; a field holds one type in every row"
                    )
        for field in {name for row in rows for name in row} - set(mixed):  # inside objects and lists too
            try:
                pa.array([row.get(field) for row in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                mixed[field] = f"{origins.sources[0].name}: field {field!r} holds values of different types in its rows"
        refused = [why for field, why in mixed.items() if field in reads and field != "id"]
        if refused:
            raise DataError(refused[0]) from exc
        if mixed:
            kept = [
                {
                    k: (str(v) if k == "id" and v is not None else v)
                    for k, v in row.items()
                    if k not in mixed or k == "id"
                }
                for row in rows
            ]
            return _input_table(kept, origins, reads)
        raise DataError(
            f"{origins.sources[0].name}: the input rows do not form a table: {str(exc).splitlines()[0]}"
        ) from exc


def _inputs_only(task: Task, required: tuple[str, ...]) -> tuple[str, ...]:
    """Fields needed to predict: the required fields minus the reference answer."""
    return tuple(f for f in required if f not in task.reference_fields)
