"""How long a run will take here and how much memory it will need: a few of the run's own training steps and
evaluation batches, measured on this machine through the real loop and evaluation, then extrapolated.

Training: the run's batches are known before it starts (the data order is a pure function of seed and epoch,
`LengthGroupedBatches`), so each one's padded size is known. The longest of them and one batch per fifth of the
run's batches by size (after an untimed warm-up) each run as one real optimizer step through `training.loop.train`
(the run's collator, objective, optimizer, precision and accelerator settings); each fifth of the run is priced at
its measured step. One more step writes a checkpoint (to a temporary directory) to price the
checkpoints the run will write. Evaluation: a sample of eval rows spread over their lengths (the longest
included), in batches of the run's eval batch size, through `flows.evaluate.evaluate_features` (generation with
the run's `eval.max_new_tokens`), scaled by the number of batches the run will evaluate. Writing: the final adapter
saved, as the run saves it, to a temporary directory. Start-up: the seconds this process has lived so far
(interpreter, imports, data, model loading), which the run spends the same way.

Peak memory is what the operating system saw: this process's peak resident set (`ru_maxrss`) once the
measurement has run its steps (the longest again after the others, as a run meets its widest batch on a heap that
earlier steps have grown), its evaluation batches and the adapter save, plus what each batch shape it did not meet
would leave resident (measured on the shapes it met after the widest); on CUDA, the caching allocator's peak
reservation.

Nothing lands in the run directory: no log, no checkpoint, no lock. Afterwards the trainable weights, the
model's mode and forward, and every random generator are as they were, so a run that follows is unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # a dependency of accelerate
import torch
from datasets import Dataset

from finetune.data.features import Features
from finetune.data.tables import token_lengths
from finetune.evaluation.scoring import metrics_document
from finetune.flows.evaluate import evaluate_features
from finetune.flows.session import Session, changes_base_weights, during_rows, training_collator
from finetune.outputs import card
from finetune.outputs.rundir import RunDir
from finetune.recipe.schema import TrainSection
from finetune.training.loop import Checkpointing, LengthGroupedBatches, TrainPlan, make_accelerator, train
from finetune.training.objectives import reference_logps, with_columns

# Eval batches measured (each of the run's eval batch size); the whole eval set when it is no larger.
EVAL_BATCHES = 2
# Groups of the run's batches by cost, each priced by one measured step.
STRATA = 5


@dataclass(frozen=True)
class Estimate:
    """Expected wall time (seconds) and peak memory (bytes) of `finetune run`, and how each figure was obtained."""

    total_seconds: float
    startup_seconds: float  # interpreter, imports, data, model loading: measured in this process
    measure_seconds: float  # this measurement (a real run measures too, unless --no-estimate)
    reference_seconds: float  # DPO/KTO: the reference policy's log-probabilities, before the first step
    train_seconds: float  # the training loop: steps, checkpoints, evaluations during training
    eval_seconds: float  # the final evaluation
    writing_seconds: float  # the adapter and the run's files
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    how: tuple[str, ...]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["how"] = list(self.how)
        for name, value in out.items():
            if isinstance(value, float):
                out[name] = round(value, 2)
        if self.peak_gpu_bytes is None:
            del out["peak_gpu_bytes"]
        return out


def process_seconds() -> float:
    """Seconds since this process started (the shell's clock starts there too)."""
    return max(0.0, time.time() - psutil.Process().create_time())


def peak_rss_bytes() -> int:
    """This process's peak resident set so far, as the kernel counts it (kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_gpu_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    return int(max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count())))


# The steps whose batches are listed and priced one by one; a longer run is priced from these, scaled to its steps
# (each epoch draws the same rows in another order, so a few epochs' batches stand for the rest).
PRICED_STEPS = 100_000


def run_batches(session: Session, world_size: int, rank: int = 0) -> tuple[list[np.ndarray], int]:
    """This process's batches of the run, in order, as the loop's sampler will draw them (positions into the
    training features), for its first PRICED_STEPS steps at most; and how many steps they make."""
    t = session.recipe.train
    dataset = session.features["train"].dataset
    plan = TrainPlan.build(t, len(dataset), world_size)
    sampler = LengthGroupedBatches(token_lengths(dataset), t.batch_size, t.seed, window=64 if t.group_by_length else 1)
    out: list[np.ndarray] = []
    steps, wanted = 0, min(plan.total_steps, PRICED_STEPS)
    for epoch in range(plan.epochs):
        sampler.set_epoch(epoch)
        mine = sampler.batches()[rank::world_size]  # accelerate deals the batches out to the processes in turn
        for start in range(0, len(mine), t.grad_accum):
            for _ in range(t.passes_per_batch):  # grpo's num_iterations: each batch again (grad_accum is then 1)
                if steps == wanted:
                    return out, steps
                out.extend(np.asarray(batch) for batch in mine[start : start + t.grad_accum])
                steps += 1
    return out, steps


def padded_tokens(lengths: np.ndarray, batch: np.ndarray) -> int:
    """What one batch costs: its rows padded to its longest (a packed row has no padding: its length)."""
    return int(len(batch) * lengths[batch].max())


def shape(lengths: np.ndarray, batch: np.ndarray) -> tuple[int, int]:
    """A batch's shape before the collator pads it: (rows, longest row)."""
    return len(batch), int(lengths[batch].max())


def checkpoints_written(session: Session, plan: TrainPlan) -> tuple[int, int]:
    """(checkpoints the loop writes, evaluations during training), by the loop's own rule: every
    `train.checkpoint_every` steps, each epoch's end, each evaluated step and the last step."""
    return saves_and_evaluations(
        plan.total_steps, plan.steps_per_epoch, session.recipe.train.checkpoint_every, session.recipe.eval.every
    )


def saves_and_evaluations(
    steps: int, per_epoch: int, checkpoint_every: int, every: int | str | None
) -> tuple[int, int]:
    """The loop's rule counted in closed form (steps 1..`steps`: the multiples of each period, by
    inclusion-exclusion, and the last step), not step by step: a plan of 10^7 steps took seconds, 2^53 forever."""
    periods = [per_epoch, checkpoint_every]
    if every is None:
        evaluated = 0
    else:  # training.monitor.Monitor.due: the schedule's steps, and the last step whatever the schedule says
        period = per_epoch if every == "epoch" else int(every)
        periods.append(period)
        evaluated = steps // period + (steps % period != 0)
    saved = _multiples(steps, periods)
    if all(steps % period for period in periods):  # the last step saves whatever the periods say
        saved += 1
    return saved, evaluated


def _multiples(n: int, periods: list[int]) -> int:
    """How many of 1..n are a multiple of at least one of `periods`."""
    distinct = sorted(set(periods))
    return sum(
        (-1) ** (k + 1) * (n // math.lcm(*group))
        for k in range(1, len(distinct) + 1)
        for group in itertools.combinations(distinct, k)
    )


def eval_sample(features: Features, lengths: np.ndarray, batch_size: int) -> list[int]:
    """Eval rows spread evenly over their lengths, the longest included: `EVAL_BATCHES` batches' worth."""
    n = len(lengths)
    wanted = min(n, EVAL_BATCHES * batch_size)
    order = np.argsort(-lengths, kind="stable")
    picks = np.unique(np.linspace(0, n - 1, wanted).round().astype(int)) if n else np.array([], dtype=int)
    return sorted(int(order[i]) for i in picks)


def eval_subset(session: Session, features: Features, rows: list[int]) -> Features:
    """The eval features of some rows, built the way evaluation during training builds its subset."""
    if len(rows) == len(features.rows):
        return features
    if not session.recipe.train.learns_from_judgements:
        # In memory: a selection of a cached table would otherwise write its index file beside the cache.
        return session.featurize(features.rows.select(rows, keep_in_memory=True), "data.eval")
    return dataclasses.replace(
        features,
        dataset=features.dataset.select(rows, keep_in_memory=True),
        rows=features.rows.select(rows, keep_in_memory=True),
        prompts=[features.prompts[i] for i in rows] if features.prompts is not None else None,
    )


def row_lengths(features: Features) -> np.ndarray:
    """Per eval row, its input length: the prompt for generation, else its one input."""
    if features.prompts is not None:
        return np.asarray([len(p) for p in features.prompts])
    if len(features.dataset) == len(features.rows):
        return token_lengths(features.dataset)
    return np.zeros(len(features.rows), dtype=int)  # several inputs per row (QA windows): rows in their order


@contextmanager
def unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Whatever the measurement does to `model` and the random generators is undone afterwards: trainable
    weights, each module's train/eval mode, the forward that accelerate's `prepare` wraps (mixed precision) and the
    attributes it adds, and the torch, CUDA, numpy and Python generators."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    patched: dict[str, Any] = {
        key: model.__dict__[key] for key in ("forward", "_original_forward") if key in model.__dict__
    }
    # Attributes the measurement adds: accelerate's `prepare` marks the model `_is_accelerate_prepared` and then
    # skips wrapping it again, so the real run after the estimate trained without its mixed-precision forward.
    attributes = set(model.__dict__)
    # Every module's own mode: the session keeps frozen base modules in eval mode inside a training model, and
    # `model.train(mode)` alone put them back in training mode (a run with --estimate trained another model).
    modes = {module: module.training for module in model.modules()}
    states = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name].to(p.device))
                    p.grad = None
        for key in ("forward", "_original_forward", *(set(model.__dict__) - attributes)):
            model.__dict__.pop(key, None)
        model.__dict__.update(patched)
        for module, training in modes.items():
            module.training = training
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
        np.random.set_state(states[2])
        random.setstate(states[3])


def _one_step(
    session: Session, dataset: Dataset, settings: TrainSection, accelerator, log: Path, checkpointing=None
) -> float:
    """Seconds of the loop's own work for one optimizer step on exactly `dataset`'s rows (one batch)."""
    result = train(
        session.model,
        dataset,
        training_collator(session),
        settings,
        accelerator,
        log,  # the scratch run's: the pictures are drawn from it
        None,  # no progress display
        checkpointing,
        None,  # no evaluation during training
        session.objective,
    )
    # A GRPO rollout kept for num_iterations' later passes: never into the next measured step, nor the run's.
    session.objective.load_state({}, {})
    return result.seconds


def measure(session: Session, identity: dict, world_size: int = 1, rank: int = 0) -> Estimate:
    """Run a few training steps and evaluation batches of `session`'s run here, and extrapolate to the run.
    `identity`: the run's resume identity, written into the measured checkpoint as the run writes it."""
    started = time.perf_counter()
    startup = process_seconds()
    recipe, t = session.recipe, session.recipe.train
    train_features = session.features["train"]
    plan = TrainPlan.build(t, len(train_features.dataset), world_size)
    lengths = token_lengths(train_features.dataset)
    batches, listed = run_batches(session, world_size, rank)
    costs = np.asarray([padded_tokens(lengths, b) for b in batches], dtype=float)
    first_epoch = batches[: max(1, plan.batches_per_epoch)]
    epoch_costs = np.asarray([padded_tokens(lengths, b) for b in first_epoch], dtype=float)
    # Strata of the run's batches by cost (quintiles): each is priced by one measured batch of the first epoch,
    # the one nearest its median cost. Step time is not a straight line of the tokens (kernels work in tiles: a
    # few more tokens can cost a whole tile more), so every part of the distribution gets its own measurement.
    strata = np.minimum(np.argsort(np.argsort(costs, kind="stable")) * STRATA // max(len(costs), 1), STRATA - 1)
    representatives = {  # stratum -> its measured batch (a run of few batches leaves some strata empty)
        k: int(np.argmin(np.abs(epoch_costs - np.median(costs[strata == k]))))
        for k in range(STRATA)
        if (strata == k).any()
    }
    longest, short = int(np.argmax(epoch_costs)), int(np.argmin(epoch_costs))
    # The longest first: the heap grows to what the widest batch needs, so what each later new shape leaves
    # resident is its own (kernels, buffers), not the heap growing batch by batch towards the widest. The short one
    # last. Distinct batches only.
    timed = list(dict.fromkeys([longest, *representatives.values(), short]))
    how: list[str] = []
    # One optimizer step per call, on exactly one batch of the run (no shuffle can regroup its rows).
    settings = t.model_copy(
        update={"max_steps": 1, "grad_accum": 1, "epochs": 1, "warmup": 0, "log_every": 1, "group_by_length": False}
    )
    accelerator = make_accelerator(settings, session.precision)
    dataset = train_features.dataset
    with unchanged(session.model), tempfile.TemporaryDirectory(prefix="finetune-estimate-") as scratch:
        scratch_run = RunDir(Path(scratch))
        reference_seconds = 0.0
        chosen = sorted({int(i) for b in (first_epoch[j] for j in [short, *timed]) for i in b})
        measured_rows = dataset.select(chosen, keep_in_memory=True)
        position = {row: k for k, row in enumerate(chosen)}
        if session.objective.needs_reference:  # the columns the objective reads, as the run computes them first
            if recipe.distributed.quantization == "none":
                session.model.to(accelerator.device)
            begun = time.perf_counter()
            saved = reference_logps(
                session.model,
                measured_rows,
                training_collator(session),
                recipe.eval_batch_size,
                accelerator,
                session.family.encoder_decoder,
            )
            per_row = (time.perf_counter() - begun) / len(chosen)
            measured_rows = with_columns(measured_rows, saved)
            every_row = len(dataset) + len(session.features["eval"].dataset)
            reference_seconds = per_row * every_row
            how.append(
                f"reference log-probabilities: measured {len(chosen)} rows at {per_row:.3f} s/row; "
                f"extrapolated to {every_row} train and eval rows"
            )

        def rows_of(batch: np.ndarray) -> Dataset:
            return measured_rows.select([position[int(i)] for i in batch], keep_in_memory=True)

        _one_step(
            session, rows_of(first_epoch[short]), settings, accelerator, scratch_run.train_log
        )  # warm-up: first-call costs
        seconds, kept = [], []  # kept: what a step of a shape not met before left resident (kernels, buffers)
        seen = {shape(lengths, first_epoch[short])}
        for i in timed:
            before, this = current_rss_bytes(), shape(lengths, first_epoch[i])
            seconds.append(_one_step(session, rows_of(first_epoch[i]), settings, accelerator, scratch_run.train_log))
            if this not in seen and i != longest:  # the widest step's own rise is its peak, not what a shape leaves
                kept.append(max(0, current_rss_bytes() - before))
            seen.add(this)
        # The longest once more, after the others: a run meets its widest batch with what earlier steps left behind
        # (allocator pages, kernels and buffers of other shapes), and its peak is that batch on top of them; the
        # first time, the widest step found a fresh heap and its peak was lower than the run's.
        _one_step(session, rows_of(first_epoch[longest]), settings, accelerator, scratch_run.train_log)
        tokens = [padded_tokens(lengths, first_epoch[i]) for i in timed]
        train_peak = peak_rss_bytes()
        # The short step twice more, back to back: plain (the baseline), then writing a checkpoint as the loop does
        # (to a scratch directory); the difference is the checkpoint's cost.
        same = _one_step(session, rows_of(first_epoch[short]), settings, accelerator, scratch_run.train_log)
        saver = None if changes_base_weights(recipe) else session.adapter_saver()
        with_checkpoint = _one_step(
            session,
            rows_of(first_epoch[short]),
            settings.model_copy(update={"keep_checkpoints": 1}),
            accelerator,
            scratch_run.train_log,
            Checkpointing(scratch_run.checkpoints, identity, None, saver),
        )
        checkpoint_seconds = max(0.0, with_checkpoint - same)

        # Evaluation: a sample of rows in the run's eval batches, through the one evaluation step.
        eval_features = session.features["eval"]
        eval_rows = len(eval_features.rows)
        batch_size = recipe.eval_batch_size
        sample = eval_sample(eval_features, row_lengths(eval_features), batch_size)
        subset = eval_subset(session, eval_features, sample)
        begun = time.perf_counter()
        _, scored = evaluate_features(session, session.model, subset, accelerator)
        eval_measured = time.perf_counter() - begun
        per_batch = eval_measured / max(1, math.ceil(len(sample) / batch_size))
        eval_seconds = per_batch * math.ceil(eval_rows / batch_size)
        # Generation decodes in batches of its own size (generation_plan: often every row at once), not the eval
        # batch: priced per row, linearly, an upper bound (a larger decoding batch is faster per row).
        generates, per_row = subset.prompts is not None, eval_measured / max(1, len(sample))
        if generates:
            eval_seconds = per_row * eval_rows
        eval_peak = peak_rss_bytes()

        # Writing: the final adapter as the run saves it, and the pictures (from the measured steps' log lines
        # and the sample's metrics), all in the scratch directory.
        begun = time.perf_counter()
        session.adapter_saver().save(accelerator.unwrap_model(session.model), scratch_run.adapter, for_other_tools=True)
        card.write_pictures(scratch_run, metrics_document(recipe.task, scored, [], {}))
        writing_seconds = time.perf_counter() - begun

    per_stratum = {k: seconds[timed.index(i)] for k, i in representatives.items()}
    steps_seconds = float(sum(seconds_k * int((strata == k).sum()) for k, seconds_k in per_stratum.items()))
    steps_seconds *= plan.total_steps / max(listed, 1)  # a run longer than PRICED_STEPS: scaled from its first ones
    saves, evaluations = checkpoints_written(session, plan)
    limit = during_rows(session)
    during = min(limit, eval_rows) if limit is not None else eval_rows
    # Evaluations during training skip the intervals and, under a preference objective, may skip generation:
    # priced as the final evaluation's batches, an upper bound.
    during_seconds = evaluations * (per_row * during if generates else per_batch * math.ceil(during / batch_size))
    train_seconds = steps_seconds + saves * checkpoint_seconds + during_seconds
    measure_seconds = time.perf_counter() - started
    total = startup + measure_seconds + reference_seconds + train_seconds + eval_seconds + writing_seconds
    span = ", ".join(f"{n} tokens {s:.2f} s" for n, s in zip(tokens, seconds))
    how.insert(
        0,
        f"training: measured {len(timed)} steps after a warm-up step ({span}; the longest batch of the run "
        f"first, and again after the others for the peak); the run's {len(batches)} batches "
        f"({listed} steps{'' if listed == plan.total_steps else f' of {plan.total_steps}, the rest scaled from them'}) "
        f"priced in {len(per_stratum)} groups by padded tokens, each at its measured batch",
    )
    how.append(
        f"checkpoints: {saves} written at {checkpoint_seconds:.2f} s each (measured: one step with a checkpoint)"
        + (
            f"; {evaluations} evaluations during training on {during} rows, {during_seconds:.1f} s"
            if evaluations
            else ""
        )
    )
    if generates:
        how.append(
            f"evaluation: measured {len(sample)} of {eval_rows} eval rows, generating up to "
            f"{recipe.eval.max_new_tokens} new tokens, in {eval_measured:.2f} s; extrapolated per row to "
            f"{eval_rows} rows (an upper bound: the run decodes in the batches the plan's generation row says, "
            "and a larger batch is faster per row)"
        )
    else:
        how.append(
            f"evaluation: measured {len(sample)} of {eval_rows} eval rows in batches of {batch_size} at "
            f"{per_batch:.2f} s per batch; extrapolated to {math.ceil(eval_rows / batch_size)} batches"
        )
    how.append(f"writing: the final adapter and the pictures written in {writing_seconds:.2f} s (measured)")
    if t.passes_per_batch > 1:
        how.append(
            f"grpo num_iterations {t.passes_per_batch}: every step priced as one that samples and scores its "
            f"completions, which only 1 in {t.passes_per_batch} does (an upper bound)"
        )
    how.append(
        f"start-up (imports, data, model): {startup:.1f} s measured in this process; this measurement: "
        f"{measure_seconds:.1f} s (--no-estimate skips it)"
    )
    measured_peak = peak_rss_bytes()
    # Each new batch shape leaves memory behind (the CPU kernels and buffers made for it, allocator pages): the
    # run meets shapes the measurement did not, in training and in the final evaluation's other batches.
    unseen = len({shape(lengths, b) for b in batches} - seen)
    unseen_eval = max(0, math.ceil(eval_rows / batch_size) - math.ceil(len(sample) / batch_size))
    per_shape = float(np.median(kept)) if kept else 0.0
    growth = int(per_shape * (unseen + unseen_eval))
    peak = measured_peak + growth
    how.append(
        f"peak memory: resident set of this process (ru_maxrss) after the measured steps {train_peak / 2**30:.2f} "
        f"GiB, after the evaluation batches {eval_peak / 2**30:.2f} GiB, after writing {measured_peak / 2**30:.2f} "
        f"GiB; plus {growth / 2**20:.0f} MiB for the {unseen} batch shapes and {unseen_eval} eval batches the "
        f"measurement did not meet, at the {per_shape / 2**20:.1f} MiB a new shape left resident here"
    )
    return Estimate(
        total_seconds=total,
        startup_seconds=startup,
        measure_seconds=measure_seconds,
        reference_seconds=reference_seconds,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        writing_seconds=writing_seconds,
        peak_rss_bytes=peak,
        peak_gpu_bytes=peak_gpu_bytes(),
        how=tuple(how),
    )
