"""`finetune run` and `finetune data`: recipe -> session -> train -> evaluate -> run directory."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from rich.console import Console

from finetune import files
from finetune.data import report as data_report
from finetune.data.features import Features
from finetune.data.tables import data_file_hashes, read_split
from finetune.errors import RecipeError
from finetune.evaluation import scoring as evaluation
from finetune.evaluation.compare import eval_data_record
from finetune.flows.estimate import measure
from finetune.flows.evaluate import SessionEvaluator, evaluate_features
from finetune.flows.plan import plan_document, show_plan
from finetune.flows.resolve import (
    RETRIEVER_RUN,
    RETRIEVER_TRAINING,
    Resolved,
    resolve_recipe,
    retriever_recipe,
    runs_code,
    start_adapter_hash,
    trains_retriever,
)
from finetune.flows.session import (
    Session,
    SessionData,
    changes_base_weights,
    during_rows,
    generates_during,
    needs_sparse_weight,
    open_data,
    open_session,
    settle_retrieval,
    training_collator,
)
from finetune.models.embedding import BiEncoder, write_sentence_transformer_files
from finetune.outputs import card, rundir
from finetune.outputs import manifest as provenance
from finetune.outputs.adapter import TASK_STATE_FILES, AdapterSaver, write_task_files
from finetune.outputs.lock import RunLock
from finetune.outputs.rundir import RunDir
from finetune.recipe.gates import evaluate_gates
from finetune.recipe.schema import Recipe, RetrievalSection, read_recipe_file, recipe_to_yaml
from finetune.secrets import redact
from finetune.tasks import sandbox
from finetune.training import checkpoint, trackers
from finetune.training.loop import Checkpointing, has_accelerator_device, make_accelerator, return_freed_memory, train
from finetune.training.monitor import Monitor, summary
from finetune.training.objectives import reference_logps, with_columns

log = logging.getLogger("finetune")


def run(
    resolved: Resolved,
    console: Console,
    *,
    dry_run: bool = False,
    resume: str | None = None,
    force_resume: bool = False,
    overwrite: bool = False,
    judge: Callable[[int, dict[str, float]], bool] | None = None,
    estimate: bool = False,
    owner: Path | None = None,
) -> dict | None:
    """Train, evaluate and write the run directory. Returns the metrics document (a dry run: the plan's, with
    the estimate). `owner`: the run this one is part of (a knowledge-base run's retriever, inside it).

    `resume` is "auto" (the newest usable checkpoint in the run directory, if
    any) or a checkpoint path; the run then continues exactly where it stopped.
    `estimate`: measure a few steps and evaluation batches here first and show the expected time and memory
    (`flows/estimate.py`).
    """
    run_dir = RunDir(Path(resolved.recipe.output.dir).expanduser())
    accelerator = make_accelerator(
        resolved.recipe.train, resolved.precision, trackers_dir=None if dry_run else run_dir.trackers
    )
    # One writer per run directory: the main process holds the lock from its claim to the last file written.
    lock = RunLock(run_dir.path) if accelerator.is_main_process and not dry_run else None
    try:
        return _run(
            resolved,
            console,
            accelerator,
            run_dir,
            lock,
            dry_run=dry_run,
            resume=resume,
            force_resume=force_resume,
            overwrite=overwrite,
            judge=judge,
            estimate=estimate,
            owner=owner,
        )
    finally:
        if lock is not None:
            lock.release()


def check_output(
    run_dir: RunDir,
    lock: RunLock | None,
    *,
    resume: str | None,
    overwrite: bool,
    owner: Path | None = None,
    inputs: tuple[Path, ...] = (),
) -> str:
    """What the run does with its output directory, or the RecipeError refusing it: a live run there is named as
    such (not mistaken for an unfinished one), then `rundir.output_decision` (given the run's `inputs`, which an
    --overwrite never removes). `lock`: None for a dry run."""
    if lock is not None:
        lock.refuse_if_held()
    return rundir.output_decision(
        run_dir, resume=resume, overwrite=overwrite, owner=owner, inputs=inputs, writes=lock is not None
    )


def _resumed_elsewhere(resolved: Resolved, run_dir: RunDir, resume: str | None) -> Path | None:
    """The run whose recorded recipe a `--resume` names while its output.dir, as that recipe wrote it, is another
    folder from here (relative to another working directory, or the run was moved: RunDir.resumed_elsewhere). An
    output.dir given on the command line is the user's own choice (the model card's `output.dir=RUN-again`)."""
    if resume is None:
        return None
    recorded_in = run_dir.resumed_elsewhere(Path(resolved.source))
    if recorded_in is None:
        return None
    written = (read_recipe_file(resolved.source).get("output") or {}).get("dir")
    return recorded_in if written == resolved.recipe.output.dir else None


def _run(
    resolved: Resolved,
    console: Console,
    accelerator: Accelerator,
    run_dir: RunDir,
    lock: RunLock | None,
    *,
    dry_run: bool,
    resume: str | None,
    force_resume: bool,
    overwrite: bool,
    judge: Callable[[int, dict[str, float]], bool] | None = None,
    estimate: bool = False,
    owner: Path | None = None,
) -> dict | None:
    recipe = resolved.recipe
    code = runs_code(recipe)
    if code is not None:  # both opt-ins and the sandbox before anything is written (a directory left behind
        sandbox.require_opt_in(recipe.eval.execute_code, code)  # refused the retry)
        sandbox.check_level(recipe.eval.sandbox)
    # The main process alone decides and claims the directory; the others wait, so none sees the fresh claim.
    created, output_note = False, ""
    if accelerator.is_main_process:
        recorded_in = _resumed_elsewhere(resolved, run_dir, resume)
        if recorded_in is not None:
            raise RecipeError(
                f"--resume {resume}: {resolved.source} is the recipe of the run in {recorded_in}, but its output.dir "
                f"({resolved.recipe.output.dir}) is {run_dir.path.expanduser().resolve()} from here: run it from the "
                f"directory the run was started in, or give output.dir={files.shell_word(recorded_in)}"
            )
        output_note = check_output(
            run_dir, lock, resume=resume, overwrite=overwrite, owner=owner, inputs=resolved.input_paths()
        )
        if resume == "auto" and run_dir.is_finished():
            return _finished(run_dir, resolved, accelerator.num_processes, force_resume, console)
        created = False if dry_run else rundir.claim(run_dir)
        if lock is not None:
            lock.acquire()  # before anything is removed or written
    accelerator.wait_for_everyone()
    retriever: dict | None = None
    try:
        # With the starting retriever, before it is trained below; chosen by the main process, shared with the rest.
        settled = settle_retrieval(recipe, console=console, accelerator=accelerator)
        if settled is not recipe:
            resolved, recipe = dataclasses.replace(resolved, recipe=settled), settled
        if retriever_recipe(recipe, run_dir.path) is not None:
            resolved, retriever = train_retriever(
                resolved,
                console,
                run_dir,
                dry_run=dry_run,
                resume=resume,
                force_resume=force_resume,
                overwrite=overwrite,
            )
            recipe = resolved.recipe
            # The retriever's run made its own accelerator (accelerate's state is one per process): this run's again.
            accelerator = make_accelerator(
                recipe.train, resolved.precision, trackers_dir=None if dry_run else run_dir.trackers
            )
        # The starting adapter as this run reads it (a preference run's reference policy): its hash, recorded in the
        # manifest, is what `finetune eval` compares with later (taken at the end, it was of whatever replaced it).
        started_from = (
            {provenance.START_ADAPTER: {recipe.model.adapter: start_adapter_hash(recipe.model.adapter)}}
            if recipe.model.adapter is not None
            else {}
        )
        # LoRA is applied to freshly loaded base weights, also when resuming: a
        # checkpoint holds the trained values, never a second set of adapters.
        session = open_session(resolved)
        report = session_report(recipe, session)
        measured, identity = None, None
        if estimate and accelerator.num_processes > 1:
            estimate = False  # each process would measure beside the others: the figures would not be this run's
            if accelerator.is_main_process:
                console.print(
                    "note: no time and memory estimate for a run of several processes; measure it with one "
                    "(--num-processes 1 --dry-run)",
                    highlight=False,
                    soft_wrap=True,
                )
        if estimate:
            if accelerator.is_main_process:
                console.print(
                    "estimating time and memory: a few training steps and evaluation batches on this machine "
                    "(--no-estimate skips this)",
                    highlight=False,
                    soft_wrap=True,
                )
            # Computed once, for the estimate's checkpoint and the run's: it hashes the data files and a local base.
            identity = rundir.resume_identity(recipe, accelerator.num_processes)
            measured = measure(session, identity, accelerator.num_processes, accelerator.process_index)
            # The measurement made its own accelerator (accelerate's state is one per process): this run's again.
            accelerator = make_accelerator(
                recipe.train, resolved.precision, trackers_dir=None if dry_run else run_dir.trackers
            )
        if accelerator.is_main_process:
            show_plan(
                console,
                session,
                accelerator.num_processes,
                output_note,
                data_report.warnings(report),
                measured,
                accelerator.device,
            )
        if dry_run:
            return plan_document(session, accelerator.num_processes, output_note, measured)
        if resume:
            if accelerator.is_main_process:
                checkpoint.discard_partial(run_dir.checkpoints)
            accelerator.wait_for_everyone()  # every process then sees the same free space, and refuses alike
        held = checkpoint.bytes_held(run_dir.checkpoints) if resume else 0
        rundir.check_free_space(
            run_dir.path,
            rundir.checkpoint_bytes(session.model, recipe.train.keep_checkpoints, held),
            "the checkpoints it keeps (train.keep_checkpoints) and the one being written need about"
            + (" (beyond those it holds)" if held else ""),
        )
        if identity is None:
            identity = rundir.resume_identity(recipe, accelerator.num_processes)
        resume_from = checkpoint.resolve(resume, run_dir.checkpoints) if resume else None
        if resume_from is not None:
            checkpoint.check_identity(checkpoint.read_progress(resume_from).identity, identity, force_resume)
            # Before anything is written into the run: a forced resume of another task's checkpoint was refused
            # here only after the run's adapter and metrics were removed and its recipe.yaml replaced. (Not where
            # FSDP or DeepSpeed will wrap the model on a GPU: the saved names and flat shards are the wrapped
            # model's; restore compares those after preparing it.)
            if recipe.distributed.strategy == "ddp" or not has_accelerator_device():
                checkpoint.check_layout(resume_from, session.model)
    except BaseException:
        rundir.release(run_dir, created)
        raise
    main = accelerator.is_main_process
    if main:
        if resume_from is not None:
            console.print(f"resuming from {resume_from}", highlight=False, soft_wrap=True)
        _start_outputs(run_dir, recipe, keep_training_state=resume_from is not None, retriever=retriever is not None)
        files.write_json(run_dir.data_report, report)
    saver = _adapter_saver(session, run_dir, write_initial=main)
    accelerator.wait_for_everyone()
    trackers.start(accelerator, recipe, run_dir.path.name)
    train_features, eval_features = session.features["train"], session.features["eval"]
    if session.objective.needs_reference:
        train_features, eval_features = with_reference(session, run_dir, accelerator, resume_from is not None)
    monitor = build_monitor(session, eval_features, accelerator, run_dir.eval_log if main else None, judge)
    set_seed(recipe.train.seed)
    result = train(
        session.model,
        train_features.dataset,
        training_collator(session),
        recipe.train,
        accelerator,
        run_dir.train_log,
        console if main else None,
        Checkpointing(run_dir.checkpoints, identity, resume_from, saver),
        monitor,
        session.objective,
        recipe.distributed.strategy,
    )
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(session.model)
    kept_step = keep_weights(monitor, recipe, run_dir, model, result.steps, console if main else None)
    if main:
        saver.save(model, run_dir.adapter, for_other_tools=True)
        if isinstance(model, BiEncoder):  # SentenceTransformer(RUN/adapter) loads the trained bi-encoder
            write_sentence_transformer_files(
                model.embedder.encoder,
                session.model_path,
                model.embedder.layout,
                recipe.data.max_length,
                run_dir.adapter,
            )
        # What --overwrite and --resume may replace in adapter/, listed before the task's files after the evaluation
        # go in: a run killed between the two wrote them unlisted, and its folder then refused both as a user's.
        rundir.record_adapter_files(run_dir.adapter, coming=[f"{name}.json" for name in TASK_STATE_FILES])
    # The training step's heap, free now, goes back to the system: the evaluation's own peak (generation's cache,
    # the loss's chunks) then starts from the model's footprint, not from training's high-water mark on top of it.
    return_freed_memory()
    rows, scored = evaluate_features(session, model, eval_features, accelerator)
    if main:  # what the final evaluation decided for the adapter (multi-label thresholds), beside it
        write_task_files(run_dir.adapter, session.task.adapter_files(rows, recipe, session.state))
        rundir.record_adapter_files(run_dir.adapter)
    training = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        # what was trained (LoRA matrices, a head, a watermark embedder): a sweep's cost, a reader's scale
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "skipped_nonfinite_steps": result.skipped_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "stopped_early": bool(monitor and monitor.state.stopped_early),
    }
    gates = evaluation.collect_gates(recipe.eval.gates, None)
    extra = {
        "data": session.reports(),
        "eval_data": eval_data_record(recipe, session.features["eval"].rows),  # what --compare checks
        "training": training,
    }
    if retriever is not None:  # knowledge-base qa: the retriever's own run, trained first
        extra["retriever"] = retriever
    if monitor is not None:
        extra["evaluation"] = summary(monitor, kept_step, recipe.eval.keep)
    document = evaluation.metrics_document(recipe.task, scored, gates, extra)
    if main:
        manifest = provenance.build_manifest(
            recipe,
            data_file_hashes(recipe.data),
            accelerator,
            # What a resume must match: `--resume auto` of the finished run compares a recipe with it where no
            # checkpoint is left (train.keep_checkpoints, or checkpoints/ removed to save space). Kept in the run's
            # manifest, not the adapter that is handed to other tools.
            {"family": session.family.name, **started_from, provenance.RESUME_IDENTITY: identity},
        )
        files.write_json(run_dir.manifest, manifest)
        files.write_jsonl(run_dir.predictions, rows)
        card.write_pictures(run_dir, document)
        card.write_model_card(
            run_dir,
            recipe,
            document,
            manifest,
            session.reports(),
            data_report.warnings(report),
            f'sentence-transformers\' `SentenceTransformer("{run_dir.adapter}")`'
            if isinstance(model, BiEncoder)
            else f"peft's `AutoPeft{session.family.auto_class_name(session.task.head).removeprefix('Auto')}"
            f'.from_pretrained("{run_dir.adapter}")`',
        )
        # Last: metrics.json is what makes the run finished (--resume auto then has nothing to do), so a stop while
        # the card or the pictures were written resumes and writes them, instead of leaving them out for good.
        files.write_json(run_dir.metrics, document)
    accelerator.log({f"eval/{name}": value for name, value in document["metrics"].items()}, step=result.steps)
    trackers.finish(accelerator)
    accelerator.wait_for_everyone()
    return document


def train_retriever(
    resolved: Resolved,
    console: Console,
    run_dir: RunDir,
    *,
    dry_run: bool,
    resume: str | None,
    force_resume: bool,
    overwrite: bool,
) -> tuple[Resolved, dict | None]:
    """Knowledge-base qa with data.retrieval.train: fine-tune the retriever first, as a `task: retrieval` run of its
    own in RUN/retriever (the questions as queries, each one's gold passage the one holding its answer), then
    answer from it: the returned recipe retrieves with the trained retriever (`data.retrieval.model` is its
    adapter, which sentence-transformers loads), so the reader trains on what it returns, and eval and predict
    (which read RUN/recipe.yaml) use it too. The retriever's run resumes, is replaced or is kept as this run is.

    A dry run shows the retriever's plan and the reader's with the untrained retriever."""
    derived = retriever_recipe(resolved.recipe, run_dir.path)
    assert derived is not None
    inner = resolve_recipe(derived, f"{resolved.source} (data.retrieval: the retriever's run)")
    directory = run_dir.path / RETRIEVER_RUN
    if console is not None and PartialState().is_main_process:  # once, not once per process
        console.print(f"fine-tuning the retriever first: {directory}", highlight=False, soft_wrap=True)
    document = run(
        inner,
        console,
        dry_run=dry_run,
        resume="auto" if resume is not None and directory.exists() else None,
        force_resume=force_resume,
        overwrite=overwrite,
        owner=run_dir.path,
    )
    if dry_run or document is None:
        return resolved, None
    recipe = _reading_trained_retriever(resolved.recipe, directory)
    summary = {"run": str(directory), "model": recipe.data.retrieval.model, "metrics": document["metrics"]}
    return dataclasses.replace(resolved, recipe=recipe), summary


def _reading_trained_retriever(recipe: Recipe, directory: Path) -> Recipe:
    """The reader's recipe once the retriever's run in `directory` trained: it names the trained retriever and no
    longer trains one (its training settings are in RUN/retriever/recipe.yaml; left here, they would name settings
    nothing reads)."""
    trained = str((directory / "adapter").resolve())
    retrieval = recipe.data.retrieval.model_copy(
        update={"model": trained, "train": False, **RetrievalSection.defaults(*RETRIEVER_TRAINING)}
    )
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"retrieval": retrieval})})


def _finished(run_dir: RunDir, resolved: Resolved, processes: int, force: bool, console: Console) -> dict:
    """`--resume auto` on a finished run: nothing to train, if this recipe is the one it was trained with (its last
    checkpoint's identity, as any resume: a changed recipe or data is refused, naming each change); its metrics,
    judged by this recipe's gates (a CI caching runs/ kept reporting the gates of the day it trained)."""
    recipe = resolved.recipe
    if trains_retriever(recipe):
        # A knowledge-base run: its retriever's run first (by its own recipe, derived from this one), then the reader
        # as it trained, reading the trained retriever.
        inner = RunDir(run_dir.path / RETRIEVER_RUN)
        derived = retriever_recipe(recipe, run_dir.path)
        assert derived is not None
        _check_finished_identity(inner, derived, processes, force)
        recipe = _reading_trained_retriever(recipe, inner.path)
    # A hybrid knowledge base's sparse weight this recipe leaves open: the one the run settled (from the training
    # questions, which the data hashes compared cover) is what it trained with.
    if needs_sparse_weight(recipe) and run_dir.recipe.is_file():
        recorded = read_recipe_file(run_dir.recipe)
        weight = ((recorded.get("data") or {}).get("retrieval") or {}).get("sparse_weight")
        if weight is not None:
            retrieval = recipe.data.retrieval.model_copy(update={"sparse_weight": weight})
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"retrieval": retrieval})})
    _check_finished_identity(run_dir, recipe, processes, force)
    document = _finished_metrics(run_dir)
    stored = document.get("intervals") or {}

    def bounds(metric: str, level: float) -> tuple[float, float] | None:
        """The stored interval at its own level; a gate at another level has none here (it fails, said)."""
        interval = stored.get(metric)
        return (interval["low"], interval["high"]) if interval and interval.get("level") == level else None

    gates = evaluation.collect_gates(recipe.eval.gates, None)
    metrics = document["metrics"]
    # A recipe matching the run cannot gate a metric the run does not report (resolve refuses it); one forced past
    # a changed task or metric list can: that is this recipe's error (exit 2), not a failed gate of the run's.
    if unreported := sorted({g.metric for g in gates} - set(metrics)):
        raise RecipeError(
            f"eval.gates: {run_dir.path} reports no {', '.join(unreported)} (it reports {', '.join(sorted(metrics))}); "
            "a forced resume keeps the run's own metrics; train again with --overwrite to report these"
        )
    console.print(
        f"{run_dir.path} is a finished run; nothing to resume (its metrics are below, judged by this recipe's gates)",
        highlight=False,
        soft_wrap=True,
    )
    return {**document, "gates": evaluate_gates(gates, metrics, bounds)}


def _check_finished_identity(run_dir: RunDir, recipe: Recipe, processes: int, force: bool) -> None:
    """A finished run's last checkpoint against `recipe`, as any resume checks it (a change refused, named); where
    none is left, the identity its manifest recorded (a run finished before it did, without checkpoints, is taken at
    its word). Nothing trains, so the run's own process count is taken."""
    last = checkpoint.newest_usable(run_dir.checkpoints)
    saved = checkpoint.read_progress(last).identity if last is not None else _recorded_identity(run_dir)
    if saved is not None:
        identity = rundir.resume_identity(recipe, saved.get("number of processes", processes))
        checkpoint.check_identity(saved, identity, force)


def _recorded_identity(run_dir: RunDir) -> dict | None:
    saved = (provenance.read_manifest(run_dir.manifest) or {}).get(provenance.RESUME_IDENTITY)
    return saved if isinstance(saved, dict) else None


def _finished_metrics(run_dir: RunDir) -> dict:
    """A finished run's metrics.json, or a refusal naming it where it is damaged (an internal error before)."""
    try:
        document: object = files.read_json(run_dir.metrics)
    except (OSError, ValueError):
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("metrics"), dict):
        raise RecipeError(
            f"{run_dir.metrics}: damaged, not the metrics.json a finished run writes; the run's adapter is whole: "
            "score it again with `finetune eval RUN`, or train again with --overwrite"
        )
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


def report_data(resolved: Resolved, tokens: Path | None = None) -> dict:
    """`finetune data`: the data report, without loading weights. With `tokens`, also every training row's
    input_ids and labels there (JSON Lines, in the training file's order, before packing)."""
    if tokens is not None and resolved.recipe.train.objective != "sft":
        raise RecipeError(
            f"--tokens: writes supervised rows (input_ids, labels); train.objective {resolved.recipe.train.objective} "
            "trains on pairs, thumbs or sampled completions (use train.objective=sft to see its rows)"
        )
    # A hybrid knowledge base's open sparse weight, from its one owner (a feature-cache hit reads no rows to
    # choose it from, and must still print and key on the same weight as a run).
    resolved = dataclasses.replace(resolved, recipe=settle_retrieval(resolved.recipe))
    data = open_data(resolved, machine=False)  # a report: no eval row is scored
    if tokens is not None:
        recipe, task = resolved.recipe, resolved.task
        required, optional = task.fields(recipe)
        file_rows, _ = read_split(  # the training file(s) as the run reads them, in their order
            recipe.data.train,
            "data.train",
            recipe,
            required,
            optional,
            **task.reading(),
        )
        files.write_jsonl(tokens, data_report.token_lines(data.features["train"], file_rows))
    return session_report(resolved.recipe, data)


def build_monitor(
    session: Session,
    features: Features,
    accelerator: Accelerator,
    log_path: Path | None,
    judge: Callable[[int, dict[str, float]], bool] | None = None,
) -> Monitor | None:
    """Evaluation during training (eval.every), or None."""
    recipe = session.recipe
    if recipe.eval.every is None:
        return None
    metric = session.resolved.best_metric
    generate = generates_during(session)
    limit = during_rows(session)
    if limit is not None and limit < len(features.rows):
        if not recipe.train.learns_from_judgements:
            features = session.featurize(features.rows.select(range(limit)), "data.eval")
        else:  # one judged row per feature row; slicing keeps the reference log-probabilities
            features = dataclasses.replace(
                features,
                dataset=features.dataset.select(range(limit)),
                rows=features.rows.select(range(limit)),
                prompts=features.prompts[:limit] if features.prompts is not None else None,
            )
    return Monitor(
        recipe.eval.every,
        metric,
        SessionEvaluator(session, features, accelerator, generate=generate),
        log_path,
        recipe.train.early_stopping,
        judge=judge,
    )


def with_reference(
    session: Session, run_dir: RunDir, accelerator: Accelerator, resumed: bool
) -> tuple[Features, Features]:
    """The train and eval features with the reference policy's log-probabilities (DPO, KTO).

    Computed once, before the first step, from the model as it starts (fresh LoRA is the base model; a
    model.adapter run starts from that adapter), and kept in the run directory: a resumed run reads them back
    instead of recomputing them from weights that have moved."""
    path = run_dir.reference_logps
    if resumed and path.is_file():
        saved = files.read_json(path)
    else:
        if session.recipe.distributed.quantization == "none":  # quantised weights are placed when they load
            session.model.to(accelerator.device)  # the batches are: the pass runs before accelerate.prepare
        saved = {
            split: reference_logps(
                session.model,
                session.features[split].dataset,
                training_collator(session),
                session.recipe.eval_batch_size,
                accelerator,
                session.family.encoder_decoder,
            )
            for split in ("train", "eval")
        }
        if accelerator.is_main_process:
            files.write_json(path, saved)
    return tuple(  # type: ignore[return-value]
        dataclasses.replace(features, dataset=with_columns(features.dataset, saved[split]))
        for split, features in (("train", session.features["train"]), ("eval", session.features["eval"]))
    )


def _start_outputs(run: RunDir, recipe: Recipe, keep_training_state: bool, retriever: bool) -> None:
    """A fresh run (after --overwrite's consent) starts from an empty directory; a resumed one keeps its
    checkpoints and log and drops only the outputs it is about to write again. `retriever`: this run trained its
    retriever's run in RUN/retriever just now (which that run replaced itself); where it did not, a retriever's run
    an earlier run left there is replaced with the rest."""
    if keep_training_state:
        for path in (
            run.metrics,
            run.predictions,
            run.card,
            run.manifest,
            run.curves,
            run.confusion,
            run.confusion_csv,
        ):
            path.unlink(missing_ok=True)
        shutil.rmtree(run.adapter, ignore_errors=True)
    else:
        # An earlier retriever's run goes with the rest where this run trained none (its own replaced itself) and
        # does not read that one's adapter (a recipe.yaml of the earlier run, reused, names it as its retriever).
        part = run.path / RETRIEVER_RUN
        reads = recipe.data.retrieval.model is not None and RunDir(part).contains(Path(recipe.data.retrieval.model))
        rundir.clear_previous_run(run, parts=() if retriever or reads else (part,))
    files.write_text_atomic(run.recipe, redact(recipe_to_yaml(recipe)))


def _adapter_saver(session: Session, run: RunDir, write_initial: bool) -> AdapterSaver:
    """The saver for checkpoints and the final adapter. PiSSA/OLoRA first keep the adapter as initialised, which
    saving needs to convert the trained one into a LoRA on the unchanged base."""
    if not changes_base_weights(session.recipe):
        return session.adapter_saver()
    initial = run.lora_init
    if write_initial and not initial.is_dir():  # a resumed run kept it; the initialisation is deterministic
        session.model.save_pretrained(str(initial), safe_serialization=True)
    return session.adapter_saver(initial_adapter=initial)
