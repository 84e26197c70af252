"""`finetune sweep`: Optuna proposes recipe settings, every trial is a normal `finetune run`, and the recipe's own
metric and gates judge it. The study lives in SQLite beside the trials, so a killed sweep resumes where it stood.

The sweep directory (the recipe's `output.dir`):

    study.db        Optuna's study (SQLite): every trial, its settings, state and results
    trials/N/       trial N as a normal run directory (a killed trial's retry continues it from its checkpoint)
    sweep.json      the trials, the best, the cheapest passing and (with a cost objective) the Pareto front
    trials.csv      the same trials as a table
    sweep.png       the objective per trial (and against the cost)
    best.yaml       the best trial's recipe, runnable as it is (`finetune run DIR/best.yaml` writes DIR/best/)
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.data.tables import data_file_hashes
from finetune.errors import DataError, RecipeError, TrainingDiverged, brief
from finetune.evaluation.compare import LOWER_IS_BETTER
from finetune.evaluation.scoring import collect_gates
from finetune.files import write_json, write_text_atomic
from finetune.flows.resolve import (
    COSTS,
    RETRIEVER_RUN,
    build_recipe,
    overrides_named,
    read_recipe,
    resolve_recipe,
    whole_numbers,
    yaml_text,
)
from finetune.flows.train import run
from finetune.outputs import rundir
from finetune.outputs.lock import RunLock
from finetune.outputs.rundir import RunDir
from finetune.recipe.gates import Gate
from finetune.recipe.schema import (
    Recipe,
    SweepRange,
    SweepSection,
    apply_overrides,
    flat_settings,
    recipe_problems_error,
    same_setting,
)
from finetune.secrets import redact, redact_tree

# What the sweep directory's marker records (outputs/rundir.mark_output), telling our sweep from a user's folder.
SWEEP = rundir.SWEEP
STUDY_NAME = "finetune-sweep"
WRITTEN_BY = "finetune sweep"
# The user attribute naming why a trial failed for a reason of its own (a diverged loss, out of memory, settings the
# rules refuse): a result, counted in the budget. A trial that ended FAIL without it was interrupted (killed with
# the sweep, so left RUNNING and failed on resume, or stopped by a signal) and is retried once in its run directory.
FAILURE = "failure"


class SweepDir:
    """The layout of a sweep directory (see the module's docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    study = property(lambda self: self.path / "study.db")
    trials = property(lambda self: self.path / "trials")
    summary = property(lambda self: self.path / "sweep.json")
    table = property(lambda self: self.path / "trials.csv")
    plot = property(lambda self: self.path / "sweep.png")
    best = property(lambda self: self.path / "best.yaml")
    best_run = property(lambda self: self.path / "best")  # where best.yaml's run writes; the user's, never removed

    def trial(self, number: int) -> Path:
        return self.trials / str(number)

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.study.resolve()}"


# What `--overwrite` may remove from an earlier sweep: the names a sweep writes (best/ is a run the user started).
SWEEP_OUTPUT_NAMES = frozenset(
    getattr(SweepDir("."), name).name
    for name, member in vars(SweepDir).items()
    if isinstance(member, property) and name not in ("best_run", "storage")
)


# --------------------------------------------------------------------------- what is searched


@dataclass(frozen=True)
class Objective:
    """What a trial is judged by: the metric, and optionally a cost minimised beside it (a Pareto front)."""

    metric: str
    cost: str | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def directions(self) -> list[StudyDirection]:
        metric = StudyDirection.MINIMIZE if self.lower_is_better else StudyDirection.MAXIMIZE
        return [metric] + ([StudyDirection.MINIMIZE] if self.cost else [])

    def quality(self, value: float) -> float:
        """Larger is better, whichever way the metric points."""
        return -value if self.lower_is_better else value


@dataclass(frozen=True)
class Param:
    """One swept setting: its Optuna distribution, and how a sampled value becomes a `section.key=value` override.

    Choices are given to Optuna as their YAML text (Optuna's categories must be scalars; a choice may be a list,
    such as lora.targets [query, value]), so the text is the override as it is."""

    key: str
    distribution: BaseDistribution
    grid: tuple | None  # every value, for the grid sampler; None when the range is continuous

    @property
    def categorical(self) -> bool:
        return isinstance(self.distribution, CategoricalDistribution)

    def override(self, value: Any) -> str:
        return f"{self.key}={value if self.categorical else yaml_text(value)}"

    def shown(self, value: Any) -> Any:
        """The value as the recipe holds it (a choice's YAML text read back)."""
        return yaml.safe_load(value) if self.categorical else value


def search_space(settings: SweepSection) -> dict[str, Param]:
    """The swept settings as Optuna distributions (after `sweep_rules` passed)."""
    space = {}
    for key, spec in settings.params.items():
        if isinstance(spec, SweepRange):
            space[key] = _range_param(key, spec)
        else:
            texts = tuple(dict.fromkeys(yaml_text(choice) for choice in spec))  # a repeated choice is one choice
            space[key] = Param(key, CategoricalDistribution(texts), texts)
    return space


def _range_param(key: str, spec: SweepRange) -> Param:
    if whole_numbers(key):
        step = int(spec.step or 1)
        low, high = int(spec.low), int(spec.high)
        high = low + (high - low) // step * step  # Optuna's own adjustment, without its warning
        return Param(key, IntDistribution(low, high, log=spec.log, step=step), tuple(range(low, high + 1, step)))
    if spec.step is None:
        return Param(key, FloatDistribution(spec.low, spec.high, log=spec.log), None)
    count = int(math.floor((spec.high - spec.low) / spec.step + 1e-9))
    values = tuple(round(spec.low + i * spec.step, 12) for i in range(count + 1))  # no 0.30000000000000004
    return Param(key, FloatDistribution(spec.low, values[-1], step=spec.step), values)


def objective_of(settings: SweepSection, default_metric: str) -> Objective:
    names = settings.objective
    return Objective(names[0] if names else default_metric, names[1] if len(names) > 1 else None)


def sweep_warnings(recipe: Recipe, objective: Objective) -> list[str]:
    """What the sweep will not do as the recipe may expect (said before the first trial)."""
    settings = recipe.sweep
    notes = []
    if settings is not None and settings.pruner != "none":
        if objective.cost is not None:
            notes.append("sweep.pruner: Optuna prunes single-objective studies only; every trial runs to its end")
        elif recipe.eval.every is None:
            notes.append("sweep.pruner: no evaluations during training (eval.every) to prune on; trials run to the end")
    return notes


# --------------------------------------------------------------------------- the sweep


def sweep(source: str | Path, overrides: list[str] | None, console: Console, *, overwrite: bool = False) -> dict:
    """`finetune sweep RECIPE [overrides]`: run the trials the budget allows, each a normal run under
    output.dir/trials/N, and write sweep.json, trials.csv, sweep.png and best.yaml. Returns sweep.json's document.

    Running it again on the same directory continues the study: finished trials are never run again, a trial
    killed mid-run is marked failed and retried once (its run resumes from its last checkpoint), and the trial and
    time budgets count every session. `overwrite` replaces an earlier sweep there (only what a sweep writes).
    """
    path = Path(source).expanduser()
    with overrides_named(overrides):
        raw = read_recipe(path, overrides)
        recipe = build_recipe(raw, str(path))
    settings = recipe.sweep
    if settings is None:
        raise RecipeError(
            f"{path}: no sweep section; name the settings to vary and the budget, e.g. "
            "sweep: {trials: 12, params: {train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}, lora.r: [4, 8, 16]}}"
        )
    for override in overrides or []:  # every trial sets a swept key: an override of it would be lost silently
        key = override.partition("=")[0].strip()
        swept = next((name for name in settings.params if same_setting(key, name)), None)
        if swept is not None:
            raise RecipeError(
                f"override {brief(override)}: {swept} is swept (sweep.params.{swept}), so every trial sets it; drop "
                "the override, or take it out of sweep.params"
            )
    base = resolve_recipe(recipe, str(path))  # every rule, the sweep section's too, before anything is written
    trial_raw = {key: value for key, value in raw.items() if key != "sweep"}
    _check_candidates(trial_raw, settings, str(path))
    objective = objective_of(settings, base.best_metric)
    space = search_space(settings)
    gates = collect_gates(recipe.eval.gates, None)
    directory = SweepDir(Path(recipe.output.dir).expanduser())
    lock = _claim(directory, overwrite, base.input_paths())
    try:
        for note in sweep_warnings(recipe, objective):
            console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
        with _library_quiet():
            study = _open_study(directory, settings, objective, gates, _identity(recipe, objective))
            _retry_interrupted(study, directory)
            sweeping = Sweeping(study, space, objective, gates, trial_raw, str(path), directory, console, settings)
            try:
                sweeping.run()
            finally:  # also when stopped by a signal: what is done so far is on disk
                document = write_results(
                    study, space, objective, settings, directory, gates, trial_raw, str(path), sweeping.stopped_because
                )
    finally:
        lock.release()
    return document


def _check_candidates(trial_raw: dict, settings: SweepSection, source: str) -> None:
    """Candidate models (choices under model.) resolved now, their configs fetched where they are not cached: what
    `resolve_recipe` checks without downloading (every swept value against the model and files, as `validate`
    does) is completed for hub checkpoints before the first trial, not when the sampler first picks one."""
    problems = []
    for key, spec in settings.params.items():
        if key.split(".")[0] != "model" or isinstance(spec, SweepRange):
            continue
        for choice in spec:
            raw = apply_overrides(copy.deepcopy(trial_raw), [f"{key}={yaml_text(choice)}"])
            try:
                resolve_recipe(build_recipe(raw, source), source)
            except (RecipeError, DataError) as exc:
                details = getattr(exc, "problems", None) or [str(exc)]
                problems += [f"sweep.params.{key}: {yaml_text(choice)}: {p}" for p in details]
    if problems:
        raise recipe_problems_error(source, problems)


def _claim(directory: SweepDir, overwrite: bool, inputs: tuple[Path, ...]) -> RunLock:
    """The write policy for a sweep directory (outputs/rundir): an earlier sweep there is continued (or, with
    --overwrite, replaced: only the names a sweep writes); otherwise a new or empty directory, never inside a run
    or an input. One sweep at a time holds it (the same lock as a run's)."""
    ours = rundir.made_by_finetune(directory.path, SWEEP)
    if not ours:
        rundir.claim_output(
            directory.path, key="output.dir", what=SWEEP, directory=True, overwrite=False, inputs=inputs
        )
    lock = RunLock(directory.path).acquire()
    try:
        if ours and overwrite:
            _refuse_foreign_trials(directory)  # before anything is removed
            for name in SWEEP_OUTPUT_NAMES:
                target = directory.path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
        rundir.mark_output(directory.path, SWEEP)
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_foreign_trials(directory: SweepDir) -> None:
    """--overwrite replaces the trials/ folder whole: a file or folder there that no trial's run wrote (a trial run
    kept it, `rundir.not_written_by_finetune`, or it is no run) refuses the overwrite, naming it, with nothing
    removed; `run --overwrite` keeps such files, but a new trial needs its folder new."""
    trials = directory.path / "trials"
    if not trials.is_dir() or trials.is_symlink():
        return
    for entry in sorted(trials.iterdir()):
        run = RunDir(entry)
        if entry.is_symlink() or not entry.is_dir() or not run.marker.is_file():
            foreign = [entry]
        else:  # a knowledge-base trial's retriever is a run of its own inside it, its part, as `run --overwrite` takes it
            foreign = rundir.not_written_by_finetune(run, parts=(entry / RETRIEVER_RUN,))
        if foreign:
            raise RecipeError(
                f"--overwrite: {foreign[0]} was not written by a trial of this sweep, and the new sweep replaces "
                "trials/ whole; nothing was removed. Move it out of the sweep first."
            )


def _identity(recipe: Recipe, objective: Objective) -> dict:
    """What must not change while a study continues: the recipe (but the budget and where it lives), the data
    files, the objective. Trials of another recipe are not comparable."""
    settings = {
        key: value
        for key, value in flat_settings(recipe).items()
        if key not in ("output.dir", "sweep.trials", "sweep.time_budget", "distributed.nnodes")
    }
    data = data_file_hashes(recipe.data)
    identity = {"settings": settings, "data": data, "objective": [objective.metric, objective.cost]}
    return json.loads(json.dumps(redact_tree(identity), default=str))


def _open_study(
    directory: SweepDir, settings: SweepSection, objective: Objective, gates: list[Gate], identity: dict
) -> optuna.Study:
    """Create the study, or load it and check it is this recipe's (`propose` gives it its sampler)."""
    study = optuna.create_study(
        storage=directory.storage, study_name=STUDY_NAME, directions=objective.directions, load_if_exists=True
    )
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        saved = identity
    # A data file the saved identity has no hash of (the knowledge base, for a study begun before 2026-12-07) is
    # unknown, not changed: which files the trials read is bound by the recipe's settings, compared in full.
    known = {**identity, "data": {k: v for k, v in identity["data"].items() if k in (saved.get("data") or {})}}
    if saved != known:
        changed = _differences(saved, known)
        raise RecipeError(
            f"output.dir: {directory.path} holds a sweep of another recipe ({'; '.join(changed[:5])}); continue it "
            "with the same recipe and overrides, choose another output.dir, or --overwrite to start it again"
        )
    return optuna.load_study(
        study_name=STUDY_NAME,
        storage=directory.storage,
        pruner=optuna.pruners.NopPruner() if settings.pruner == "none" else optuna.pruners.MedianPruner(),
    )


def queue_grid_point(study: optuna.Study, space: dict[str, Param], seed: int) -> bool:
    """sampler grid: queue the next combination not tried yet, in an order shuffled by the seed; False when every
    one was. One at a time, so that a retry queued before it runs first and trials are numbered as they run.
    (Optuna's GridSampler stops the study from inside `tell`, which only its own `optimize` loop allows.)"""
    keys = list(space)
    points = list(itertools.product(*(space[key].grid or () for key in keys)))
    random.Random(seed).shuffle(points)
    tried = [trial.params for trial in study.get_trials(deepcopy=False)]
    for point in points:
        params = dict(zip(keys, point))
        if params not in tried:
            study.enqueue_trial(params)
            return True
    return False


def _differences(saved: dict, current: dict) -> list[str]:
    found = []
    for part in ("settings", "data"):
        before, now = saved.get(part, {}), current.get(part, {})
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                found.append(f"{key}: {_written(before.get(key))} then, {_written(now.get(key))} now")
    if saved.get("objective") != current.get("objective"):
        found.append(f"objective: {saved.get('objective')} then, {current.get('objective')} now")
    return found


def _written(value: object) -> str:
    """A setting as a recipe writes it (epochs 2, not 2.0)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def propose(
    study: optuna.Study, settings: SweepSection, gates: list[Gate], distributions: dict[str, BaseDistribution]
) -> Trial:
    """The next trial, from a sampler seeded by the sweep's seed and the trials the study holds: what it proposes
    depends on the study's history alone, so a sweep stopped between trials and resumed proposes what one never
    stopped would have (a sampler made once and drawn from in turn started again from its seed in the resumed
    process). A retried trial is one more trial in that history."""
    study.sampler = _sampler(settings, gates, seed=settings.seed + len(study.get_trials(deepcopy=False)))
    return study.ask(distributions)


def _sampler(settings: SweepSection, gates: list[Gate], seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler in ("random", "grid"):  # a grid's points are queued in the study itself (queue_grid_point)
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE's model needs a few random trials first: Optuna's 10 would be the whole of a small budget.
    startup = max(1, min(10, settings.trials // 3))
    # The gates as Optuna's constraints (<= 0 feasible): TPE then prefers settings that pass them.
    constraints = (lambda trial: trial.user_attrs.get("constraints", [1.0] * len(gates))) if gates else None
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constraints_func=constraints)


def _retry_interrupted(study: optuna.Study, directory: SweepDir) -> None:
    """Trials a killed or stopped sweep left behind: marked failed (a RUNNING trial under our lock is dead), and
    each retried once with the same settings in the same run directory, which resumes from its checkpoint."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        # Once: a retry interrupted in its turn stays as it is (a trial that crashes the sweep would otherwise
        # crash every session), and the sampler goes on with other settings.
        again = "retry_of" in trial.user_attrs
        if _interrupted(trial) and trial.number not in retried and not again and trial.params:
            where = trial.user_attrs.get("dir") or str(directory.trial(trial.number))
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "dir": where})


def _interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and FAILURE not in trial.user_attrs


def _counted(trial: FrozenTrial) -> bool:
    """Whether a trial uses up the trial budget: finished, pruned or failed for a reason of its own (an
    interrupted one is retried instead)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and FAILURE in trial.user_attrs
    )


class Sweeping:
    """The trial loop of one session: ask Optuna, run the trial as a normal run, tell Optuna what it scored."""

    def __init__(
        self,
        study: optuna.Study,
        space: dict[str, Param],
        objective: Objective,
        gates: list[Gate],
        trial_raw: dict,
        source: str,
        directory: SweepDir,
        console: Console,
        settings: SweepSection,
    ):
        self.study, self.space, self.objective, self.gates = study, space, objective, gates
        self.trial_raw, self.source, self.directory, self.console = trial_raw, source, directory, console
        self.settings = settings
        self.spent = float(study.user_attrs.get("seconds", 0.0))  # earlier sessions' time
        self.started = time.monotonic()
        self.stopped_because = ""

    def seconds(self) -> float:
        return self.spent + time.monotonic() - self.started

    def run(self) -> None:
        budget = self.settings.trials
        distributions = {key: param.distribution for key, param in self.space.items()}
        try:
            while True:
                done = sum(_counted(t) for t in self.study.get_trials(deepcopy=False))
                if done >= budget:
                    self.stopped_because = f"trial budget: {done} trials (sweep.trials {budget})"
                    return
                limit = self.settings.time_budget
                if limit is not None and self.seconds() >= limit:
                    self.stopped_because = f"time budget: {self.seconds():.0f} s of sweep.time_budget {limit:.0f} s"
                    return
                waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if self.settings.sampler == "grid" and not waiting:
                    if not queue_grid_point(self.study, self.space, self.settings.seed):
                        size = math.prod(len(p.grid or ()) for p in self.space.values())
                        self.stopped_because = f"every one of the grid's {size} settings was tried"
                        return
                trial = propose(self.study, self.settings, self.gates, distributions)
                self.console.rule(f"trial {trial.number} ({done + 1} of at most {budget})", style="dim")
                self.run_trial(trial)
                self.study.set_user_attr("seconds", round(self.seconds(), 2))
                write_results(
                    self.study,
                    self.space,
                    self.objective,
                    self.settings,
                    self.directory,
                    self.gates,
                    self.trial_raw,
                    self.source,
                )
        finally:
            self.study.set_user_attr("seconds", round(self.seconds(), 2))

    def run_trial(self, trial: Trial) -> None:
        overrides = [self.space[key].override(trial.params[key]) for key in self.space]
        where = Path(trial.user_attrs.get("dir") or self.directory.trial(trial.number))
        retry = trial.user_attrs.get("retry_of")
        trial.set_user_attr("dir", str(where))
        trial.set_user_attr("overrides", overrides)
        same = self._finished_with(overrides, trial.number)
        if same is not None:  # the same settings already ran: the same seed gives the same run
            self.console.print(f"same settings as trial {same.number}; its result is taken", highlight=False)
            self._tell_as(trial, same)
            return
        self.console.print(escape(f"{' '.join(overrides)} -> {where}"), highlight=False, soft_wrap=True)
        label = f"{self.source} (trial {trial.number}: {' '.join(overrides)})"
        try:
            recipe = apply_overrides(copy.deepcopy(self.trial_raw), [*overrides, f"output.dir={yaml_text(str(where))}"])
            # A trial's value decides what else it reads (bm25 reads no retriever settings): judged as a trial.
            resolved = resolve_recipe(build_recipe(recipe, label, recorded=True), label, recorded=True)
        except (RecipeError, DataError) as exc:  # a combination of settings the rules refuse: this trial's result
            self._fail(trial, f"refused: {exc}")
            return
        if where.exists() and retry is None:
            raise RecipeError(
                f"output.dir: {where} exists but the study has no trial there; the sweep directory was changed by "
                "hand. Choose a new output.dir, or --overwrite to start the sweep again"
            )
        feed = PrunerFeed(trial, self.objective.metric) if self._prunes() else None
        try:
            document = run(
                resolved,
                self.console,
                resume="auto" if retry is not None else None,
                judge=feed,
                owner=self.directory.path,
            )
        except TrainingDiverged as exc:  # a learning rate too high is an outcome of the settings, not an error
            self._fail(trial, f"diverged: {exc}")
            return
        except torch.OutOfMemoryError:
            self._fail(trial, "out of memory")
            return
        except BaseException:  # a signal or a crash: failed without a failure of its own, so it is retried
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        assert document is not None  # not a dry run
        self._tell(trial, document, where, feed)

    def _prunes(self) -> bool:
        """Whether trials report their evaluations to the pruner as they happen (Optuna prunes one objective)."""
        return self.settings.pruner != "none" and self.objective.cost is None

    def _finished_with(self, overrides: list[str], number: int) -> FrozenTrial | None:
        for other in self.study.get_trials(deepcopy=False):
            if other.number != number and _counted(other) and other.user_attrs.get("overrides") == overrides:
                return other
        return None

    def _tell_as(self, trial: Trial, same: FrozenTrial) -> None:
        for key in ("metrics", "gates", "passed", "costs", "constraints", FAILURE):
            if key in same.user_attrs:
                trial.set_user_attr(key, same.user_attrs[key])
        trial.set_user_attr("same_as", same.number)
        trial.set_user_attr("dir", same.user_attrs.get("dir"))
        if same.state == TrialState.COMPLETE:
            self.study.tell(trial, same.values)
        else:
            self.study.tell(trial, state=same.state)

    def _fail(self, trial: Trial, why: str) -> None:
        self.console.print(f"trial {trial.number} failed: {escape(redact(why))}", highlight=False, soft_wrap=True)
        trial.set_user_attr(FAILURE, redact(why))
        self.study.tell(trial, state=TrialState.FAIL)

    def _tell(self, trial: Trial, document: dict, where: Path, feed: PrunerFeed | None = None) -> None:
        metrics = document.get("metrics", {})
        gates = document.get("gates", {})
        training = document.get("training", {})
        costs = {"train_seconds": training.get("train_seconds"), "trainable_params": trainable_params(document, where)}
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("gates", gates)
        trial.set_user_attr("passed", all(entry["passed"] for entry in gates.values()))
        trial.set_user_attr("costs", costs)
        trial.set_user_attr("constraints", constraints(self.gates, gates))
        if feed is not None and feed.pruned:  # stopped by the pruner: its outputs are an early-stopped run's
            self.console.print(f"trial {trial.number} pruned at step {feed.step}", highlight=False)
            self.study.tell(trial, state=TrialState.PRUNED)
            return
        value = metrics.get(self.objective.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            self._fail(trial, f"metrics.json has no finite {self.objective.metric}")
            return
        values = [float(value)]
        if self.objective.cost is not None:
            cost = costs[self.objective.cost]
            if cost is None:
                self._fail(trial, f"no {self.objective.cost} recorded")
                return
            values.append(float(cost))
        self.study.tell(trial, values)


class PrunerFeed:
    """The judge a trial's run asks after each evaluation during training (training/monitor.py): the value of the
    objective's metric is reported to Optuna at that step, and the pruner says whether to stop the trial there."""

    def __init__(self, trial: Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned, self.step = False, 0

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        self.trial.report(float(value), step)
        self.pruned, self.step = self.trial.should_prune(), step
        return self.pruned


def trainable_params(document: dict, run_dir: Path) -> int | None:
    """The trained parameters of a run: metrics.json's `training.trainable_params` when the run records it, else
    the tensors of its saved adapter (the LoRA matrices and any trained head)."""
    recorded = (document.get("training") or {}).get("trainable_params")
    if recorded is not None:
        return int(recorded)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = handle.keys()  # the file's tensors, read from its header alone
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def constraints(gates: list[Gate], results: Mapping[str, dict]) -> list[float]:
    """The gates as Optuna constraint values (<= 0 is feasible): 0 for a gate that passed, else how far its judged
    value (the value, or an interval gate's bound) is from the threshold; 1 when there is nothing to judge."""
    values = []
    for gate in gates:
        entry = results.get(str(gate)) or {}
        judged = entry.get("bound") if gate.level is not None else entry.get("value")
        if entry.get("passed"):
            values.append(0.0)
        elif not isinstance(judged, int | float) or not math.isfinite(judged):
            values.append(1.0)
        else:  # never 0 for a failed gate (== and strict comparisons fail at the threshold itself)
            values.append(max(abs(float(judged) - gate.threshold), 1e-12))
    return values


# --------------------------------------------------------------------------- results


def trial_records(study: optuna.Study, space: dict[str, Param]) -> list[dict]:
    """sweep.json's `trials`: every trial that ran, in order (a queued retry is not one yet)."""
    records = []
    trials = study.get_trials(deepcopy=False)
    retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    for trial in trials:
        if trial.state == TrialState.WAITING:
            continue
        attrs = trial.user_attrs
        state = "interrupted" if _interrupted(trial) else trial.state.name.lower()
        if state == "fail":
            state = "failed"
        seconds = None
        if trial.datetime_start is not None and trial.datetime_complete is not None and state != "interrupted":
            seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
        costs = attrs.get("costs") or {}
        record = {
            "number": trial.number,
            "state": state,
            "params": {key: space[key].shown(value) if key in space else value for key, value in trial.params.items()},
            "metrics": attrs.get("metrics", {}),
            "passed": attrs.get("passed", False) if state == "complete" else False,
            "gates": attrs.get("gates", {}),
            "seconds": seconds,
            "train_seconds": costs.get("train_seconds"),
            "trainable_params": costs.get("trainable_params"),
            "dir": attrs.get("dir"),
            "overrides": attrs.get("overrides", []),
        }
        for key in ("retry_of", "same_as", FAILURE):
            if key in attrs:
                record[key] = attrs[key]
        if state == "interrupted" and trial.number in retries:
            record["retried_as"] = retries[trial.number]
        records.append(record)
    return records


def choose(records: list[dict], objective: Objective) -> dict:
    """The best trial (the best metric among the trials that passed their gates, or among all finished ones when
    none passed; ties: the lower cost, then the earlier trial), the cheapest passing trial (the least cost:
    the cost objective, else trainable parameters; ties: the better metric, then the earlier trial) and, with a
    cost objective, the Pareto front of (metric, cost) among the same trials as the best."""
    cost_name = objective.cost or "trainable_params"
    finished = [r for r in records if r["state"] == "complete" and objective.metric in r["metrics"]]
    passing = [r for r in finished if r["passed"]]
    pool = passing or finished

    def quality(record: dict) -> float:
        return objective.quality(record["metrics"][objective.metric])

    def cost(record: dict) -> float:
        value = record.get(cost_name)
        return math.inf if value is None else float(value)

    best = min(pool, key=lambda r: (-quality(r), cost(r), r["number"]), default=None)
    cheapest = min(passing, key=lambda r: (cost(r), -quality(r), r["number"]), default=None)
    chosen: dict[str, Any] = {
        "best": None if best is None else best["number"],
        "best_passed": bool(passing),
        "cheapest": None if cheapest is None else cheapest["number"],
        "cheapest_by": cost_name,
    }
    if objective.cost is not None:
        chosen["pareto"] = [
            r["number"]
            for r in pool
            if not any(
                quality(o) >= quality(r) and cost(o) <= cost(r) and (quality(o) > quality(r) or cost(o) < cost(r))
                for o in pool
            )
        ]
    return chosen


def write_results(
    study: optuna.Study,
    space: dict[str, Param],
    objective: Objective,
    settings: SweepSection,
    directory: SweepDir,
    gates: list[Gate],
    trial_raw: dict,
    source: str,
    stopped_because: str = "",
) -> dict:
    """sweep.json, trials.csv, sweep.png and best.yaml from the study as it stands; returns sweep.json's document."""
    records = trial_records(study, space)
    chosen = choose(records, objective)
    document = {
        "written_by": WRITTEN_BY,
        "recipe": source,
        "directory": str(directory.path),
        "objective": {
            "metric": objective.metric,
            "direction": objective.directions[0].name.lower(),
            "cost": objective.cost,
        },
        "gates": [str(gate) for gate in gates],
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "budget": {
            "trials": settings.trials,
            "time_budget": settings.time_budget,
            "seconds": study.user_attrs.get("seconds", 0.0),
            "stopped_because": stopped_because,
        },
        "trials": records,
        **chosen,
        "best_recipe": None,
    }
    if chosen["best"] is not None:
        best = next(r for r in records if r["number"] == chosen["best"])
        write_text_atomic(directory.best, best_recipe(trial_raw, best, objective, directory, source))
        document["best_recipe"] = str(directory.best)
    write_json(directory.summary, document)
    write_text_atomic(directory.table, trials_csv(records, space, objective))
    plot(records, objective, chosen, gates, directory.plot)
    return document


def best_recipe(trial_raw: dict, best: dict, objective: Objective, directory: SweepDir, source: str) -> str:
    """The recipe as given (file and overrides), with the best trial's settings, without the sweep section, its
    run going to DIR/best/: `finetune run DIR/best.yaml` trains the best trial again as it is."""
    raw = apply_overrides(
        copy.deepcopy(trial_raw), [*best["overrides"], f"output.dir={yaml_text(str(directory.best_run))}"]
    )
    value = best["metrics"].get(objective.metric)
    verdict = "passed its gates" if best["passed"] else "no trial passed the gates; the best of all"
    header = (
        f"# The best trial ({best['number']}) of `finetune sweep {source}` in {directory.path}: "
        f"{objective.metric} {value:.4f}, {verdict}.\n"
        f"# Settings: {' '.join(best['overrides'])}\n"
        f"# Run: finetune run {directory.best}  (relative paths as in {source})\n"
    )
    return redact(header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))


def trials_csv(records: list[dict], space: dict[str, Param], objective: Objective) -> str:
    metric_names = list(dict.fromkeys(name for r in records for name in r["metrics"]))
    columns = [
        "number",
        "state",
        "passed",
        *metric_names,
        "train_seconds",
        "trainable_params",
        "seconds",
        *space,
        "dir",
        "note",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        note = _note(r)
        params = {
            key: yaml_text(value) if isinstance(value, list | dict) else value for key, value in r["params"].items()
        }
        writer.writerow(
            {
                **{key: r.get(key) for key in ("number", "state", "passed", "train_seconds", "trainable_params")},
                "seconds": r["seconds"],
                **{name: r["metrics"].get(name) for name in metric_names},
                **params,
                "dir": r["dir"],
                "note": note,
            }
        )
    return buffer.getvalue()


def _note(record: dict) -> str:
    """What a trial's row says beside its numbers: its failure, whose retry it is, what it took its result from."""
    notes = [
        f"retry of trial {record['retry_of']}" if "retry_of" in record else "",
        f"retried as trial {record['retried_as']}" if "retried_as" in record else "",
        f"same settings as trial {record['same_as']}" if "same_as" in record else "",
        record.get(FAILURE, ""),
    ]
    return "; ".join(note for note in notes if note)


def plot(records: list[dict], objective: Objective, chosen: dict, gates: list[Gate], target: Path) -> bool:
    """The objective metric per trial (passing trials filled, others hollow, the best circled, the best passing so
    far as a line, the metric's gates dashed); with a cost objective, the metric against the cost with the Pareto
    front beside it. False when no trial finished."""
    finished = [r for r in records if r["state"] == "complete" and objective.metric in r["metrics"]]
    if not finished:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = objective.metric
    panels = [("trial", [float(r["number"]) for r in finished], finished)]
    if objective.cost:
        costed = [r for r in finished if r.get(objective.cost) is not None]
        panels.append((objective.cost, [float(r[objective.cost]) for r in costed], costed))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (label, xs, shown) in zip(axes[0], panels):
        ys = [r["metrics"][metric] for r in shown]
        passed = [bool(r["passed"]) for r in shown]
        axis.scatter([x for x, p in zip(xs, passed) if p], [y for y, p in zip(ys, passed) if p], label="passed gates")
        axis.scatter(
            [x for x, p in zip(xs, passed) if not p],
            [y for y, p in zip(ys, passed) if not p],
            facecolors="none",
            edgecolors="tab:gray",
            label="failed gates",
        )
        best = [(x, y) for x, y, r in zip(xs, ys, shown) if r["number"] == chosen["best"]]
        if best:
            axis.scatter(*zip(*best), s=200, facecolors="none", edgecolors="tab:red", label="best")
        for gate in gates:
            if gate.metric == metric:
                axis.axhline(gate.threshold, color="tab:red", linestyle="--", alpha=0.5, label=f"gate {gate}")
        axis.set_xlabel(label)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axis = axes[0][0]
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    counted = [r for r in finished if r["passed"]] if chosen["best_passed"] else finished
    if counted:
        running, best_so_far = [], -math.inf
        for r in counted:
            best_so_far = max(best_so_far, objective.quality(r["metrics"][metric]))
            running.append(-best_so_far if objective.lower_is_better else best_so_far)
        what = "best passing so far" if chosen["best_passed"] else "best so far"
        steps = [r["number"] for r in counted] + [finished[-1]["number"]]  # drawn on to the last trial
        axis.step(steps, running + running[-1:], where="post", color="tab:orange", alpha=0.6, label=what)
    if objective.cost:
        axis = axes[0][1]
        front = sorted(
            (r for r in finished if r["number"] in chosen.get("pareto", [])), key=lambda r: r[objective.cost]
        )
        axis.step(
            [r[objective.cost] for r in front],
            [r["metrics"][metric] for r in front],
            where="post",
            color="tab:green",
            alpha=0.6,
            label="Pareto front",
        )
    for axis in axes[0]:
        axis.legend(fontsize="small")
    figure.tight_layout()
    # Beside the target, then renamed: a reader never sees half a picture. With the user's umask, as files.py does.
    fd, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(staging, dpi=100)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o666 & ~mask)
        os.replace(staging, target)
    finally:
        plt.close(figure)
        Path(staging).unlink(missing_ok=True)
    return True


def show_sweep(console: Console, document: dict) -> None:
    """The trials as a table, then the best and the cheapest passing trial (what `finetune sweep` prints)."""
    objective = document["objective"]
    metric, cost = objective["metric"], objective["cost"]
    table = Table(title=f"sweep ({document['directory']})", show_header=True, header_style="bold")
    for column in ("trial", "state", "settings", metric, "gates", "train s", "trainable", "note"):
        table.add_column(column, overflow="fold")
    for r in document["trials"]:
        value = r["metrics"].get(metric)
        note = _note(r)
        if r["number"] == document["best"]:
            note = "best" + (f"; {note}" if note else "")
        if r["number"] == document["cheapest"]:
            note = "cheapest passing" + (f"; {note}" if note else "")
        table.add_row(
            str(r["number"]),
            r["state"],
            escape(" ".join(r["overrides"])),
            "" if value is None else f"{value:.4f}",
            ("passed" if r["passed"] else "failed") if r["state"] == "complete" else "",
            "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}",
            "" if r["trainable_params"] is None else f"{r['trainable_params']:,}",
            escape(note.split("\n")[0][:100]),
        )
    console.print(table)
    lines = []
    if document["best"] is None:
        lines.append("no trial finished")
    else:
        best = next(r for r in document["trials"] if r["number"] == document["best"])
        qualifier = "" if document["best_passed"] else " (no trial passed the gates)"
        lines.append(f"best: trial {best['number']}, {metric} {best['metrics'][metric]:.4f}{qualifier}: {best['dir']}")
        lines.append(f"best recipe: {document['best_recipe']}  (finetune run {document['best_recipe']})")
    if document["cheapest"] is not None:
        cheapest = next(r for r in document["trials"] if r["number"] == document["cheapest"])
        by = document["cheapest_by"]
        lines.append(
            f"cheapest passing: trial {cheapest['number']}, {by} {cheapest.get(by)}, "
            f"{metric} {cheapest['metrics'][metric]:.4f}: {' '.join(cheapest['overrides'])}"
        )
    if cost and document.get("pareto"):
        lines.append(f"Pareto front ({metric} against {cost}): trials {', '.join(map(str, document['pareto']))}")
    if document["budget"]["stopped_because"]:
        lines.append(f"stopped: {document['budget']['stopped_because']}")
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True)


@contextmanager
def _library_quiet() -> Iterator[None]:
    """Optuna's messages go through the logging the command line set up (shown with --debug, redacted), not its
    own handler; its experimental-feature notices (TPE's constraints) are for its maintainers."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    if not logging.getLogger().isEnabledFor(logging.INFO):  # --debug shows them; "Using an existing study" is its own
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


__all__ = [
    "COSTS",
    "SweepDir",
    "choose",
    "search_space",
    "show_sweep",
    "sweep",
    "yaml_text",
]
