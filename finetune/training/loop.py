"""One accelerate training loop, the same for every task: the task only supplies features and a collator."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

from finetune.data.tables import shared_positives, token_lengths
from finetune.errors import Interrupted, RecipeError, TrainingDiverged
from finetune.files import TERMINAL_GONE, json_text, quiet_stdout, write_text_atomic
from finetune.outputs.adapter import AdapterSaver
from finetune.recipe.schema import PreferenceSection, TrainSection
from finetune.training import checkpoint
from finetune.training.monitor import Monitor
from finetune.training.objectives import Objective
from finetune.training.sharding import CpuShards, shards_on_cpu

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("finetune")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str) -> str:
    """accelerate's mixed_precision value for `train.precision`."""
    if setting == "fp32":
        return "no"
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "no"


def has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def collective_timeout() -> int:
    """Seconds a process waits in a collective for the others (FINETUNE_COLLECTIVE_TIMEOUT, default 600)."""
    value = os.environ.get("FINETUNE_COLLECTIVE_TIMEOUT", "600")
    if not value.isdigit() or int(value) < 1:
        raise RecipeError(f"FINETUNE_COLLECTIVE_TIMEOUT: {value!r} is not a whole number of seconds")
    return int(value)


def make_accelerator(settings: TrainSection, precision: str, trackers_dir: Path | None = None) -> Accelerator:
    """The Accelerator for a train section and the precision resolved with the recipe (`resolve_precision`); with
    `trackers_dir` (the run's), the section's trackers write their files there (TensorBoard)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # Precision lives in a per-process singleton; a second run or eval in the
    # same process (library use, tests) may ask for another one. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on machines without an accelerator is what makes accelerate join
    # the processes of `accelerate launch` / torchrun as MULTI_CPU (gloo)
    # instead of running each as an independent single process.
    report_to = settings.report_to if trackers_dir is not None else []
    return Accelerator(
        # A lost peer must end the others with an error, not hang them in a collective for torch's 30 minutes.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout()))],
        mixed_precision=precision,
        gradient_accumulation_steps=settings.grad_accum,
        cpu=not has_accelerator_device(),
        log_with=report_to or None,
        project_dir=str(trackers_dir) if report_to and trackers_dir is not None else None,
    )


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar-length examples, reproducible from (seed, epoch).

    Indices are shuffled, cut into windows of `window` batches, sorted by length
    inside each window, cut into batches, and the batches shuffled again: padding
    shrinks while each epoch still sees the data in a fresh random order.
    Without grouping (`window=1`) it is a plain shuffled batcher.
    """

    def __init__(self, lengths, batch_size: int, seed: int, window: int = 64, apart: Sequence[Hashable] | None = None):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.apart = apart  # per row: rows of one key are kept out of each other's batch (`keep_apart`)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        span = self.batch_size * self.window
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            if self.window > 1:  # longest first; a stable sort keeps equal lengths in their shuffled order
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            chunk = chunk.tolist()
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.apart is not None:
            batches = keep_apart(batches, self.apart)
        # (Any change to this order bumps outputs/rundir.BATCH_ORDER, so older checkpoints are not resumed into it.)
        # A short batch (the rows left over) stays last: accelerate deals batches out to processes in turn and
        # evens them out by the last one only; a short batch in the middle would take a batch from one process and
        # leave it fewer than len(loader) (its epoch never ends: a run of several processes spun forever).
        short = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle] + ([short] if short else [])

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def keep_apart(batches: list[list[int]], keys: Sequence[Hashable]) -> list[list[int]]:
    """The batches with no two rows of one key in a batch (retrieval rows training on one passage: each would be the
    other's in-batch negative), as sentence-transformers' no-duplicates batch sampler keeps them: a row whose key
    its batch already holds is swapped with a row of the nearest later batch (then earlier) that holds neither
    key. Deterministic; batch sizes unchanged; a key on more rows than there are batches keeps the rest together."""
    held = [Counter(keys[row] for row in batch) for batch in batches]
    holders = Counter(key for counts in held for key in counts)  # batches holding each key
    for b, batch in enumerate(batches):
        for position, row in enumerate(batch):
            key = keys[row]
            if held[b][key] < 2 or holders[key] == len(batches):  # every batch holds it: nowhere to go
                continue
            for c in itertools.chain(range(b + 1, len(batches)), range(b)):
                if held[c][key]:
                    continue
                j = next((j for j, other in enumerate(batches[c]) if not held[b][keys[other]]), None)
                if j is None:
                    continue
                other = batches[c][j]
                batch[position], batches[c][j] = other, row
                # b keeps `key` (it held two) and gains other's, which c may lose; c gains `key`
                holders[keys[other]] += 1 - (held[c][keys[other]] == 1)
                holders[key] += 1
                held[b][key] -= 1
                held[b][keys[other]] += 1
                held[c][keys[other]] -= 1
                held[c][key] += 1
                break
    return batches


class _MaskedDropout(torch.autograd.Function):
    """PyTorch's CPU dropout, step by step (ATen's `_dropout`: float noise from `bernoulli_`, divided by 1 - p,
    times the input): the same random draws and the same numbers. Only what the backward pass keeps differs: a
    1-byte mask instead of the 4-byte float noise, from which the backward remakes that noise exactly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        keep = noise.bool()
        noise.div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(keep)
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).div_(1 - ctx.p), None


class MaskedDropout(torch.nn.Module):
    """`nn.Dropout` that keeps a boolean mask for the backward pass on CPU (`_MaskedDropout`). A LoRA layer drops
    out its input before its A matrix, so every adapted linear layer kept a float copy of its input's size:
    SmolLM2 with LoRA on all linear layers, about 0.6 MB a token; the mask is a quarter of that. Elsewhere
    (CUDA) PyTorch's fused dropout already keeps a mask, and runs as it is."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        return _MaskedDropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextlib.contextmanager
def masked_dropouts(model: torch.nn.Module):
    """Every `nn.Dropout` of `model` (0 < p < 1, not in place) replaced by a `MaskedDropout` of the same p while
    training, and put back after: the same masks and numbers (the random draws are the same), less memory."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and 0 < child.p < 1 and not child.inplace:
                setattr(parent, name, MaskedDropout(child.p).train(child.training))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class _RecastLinear(torch.autograd.Function):
    """`F.linear(x, weight.to(x.dtype))` for a frozen weight, keeping the weight itself for the backward pass (no
    copy) and casting it again there. Autocast keeps the low-precision copy it made from the forward to the
    backward pass instead: for every frozen linear layer of the model at once, at the step's peak."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        # What autograd computes for a linear layer's input: the output gradient times the (cast) weight.
        return grad.matmul(weight.to(grad.dtype)), None, None


def _recast_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A frozen linear layer's forward under autocast, as autocast runs it (input and weight cast to its dtype, the
    same kernel), through `_RecastLinear`; anything else (no autocast, no gradient to pass back) as it was."""
    device = x.device.type
    if not (torch.is_autocast_enabled(device) and torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.linear(x, module.weight, module.bias)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _RecastLinear.apply(x.to(dtype), module.weight, module.bias)


@contextlib.contextmanager
def recast_frozen_weights(model: torch.nn.Module, enabled: bool = True):
    """Every frozen float32 CPU `nn.Linear` of `model` runs through `_recast_forward` while inside, so the
    backward pass casts its weight again instead of keeping autocast's copy from the forward pass: the same numbers
    bit for bit, 255 MB less kept by a SmolLM2-135M step (its ~210 MB of bf16 weight copies and the head's), one
    more cast of each frozen weight a step (+4% step time). Put back afterwards.

    `train` enters it for every CPU run but FSDP's (a shard's weight is whole only inside its forward): the
    training step holds the generative SFT command's peak RSS once the heap is returned after training
    (`return_freed_memory`), so what a step keeps is what the command needs."""
    swapped = []
    if enabled:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                type(module) is torch.nn.Linear
                and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.float32
                and not weight.requires_grad
                and weight.device.type == "cpu"
                and (module.bias is None or not module.bias.requires_grad)
                # A forward of the instance's own (accelerate's hooks) stays: replacing it would drop the hook.
                and "forward" not in module.__dict__
            ):
                module.forward = _recast_forward.__get__(module)  # type: ignore[method-assign]
                swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def return_freed_memory() -> None:
    """Give the memory freed since the last collection back to the system, between phases of a command.

    glibc keeps what a process frees in its heap for later allocations; after training that is the whole
    training step's working set (activations, autocast's casts, gradients: ~1.2 GB for SmolLM2-135M at batch 8),
    which the evaluation after it, with other shapes, reuses badly and piles its own peak on top of. `gc.collect`
    first frees what only reference cycles still hold (autograd graphs), then glibc's `malloc_trim(0)` returns
    every free page of every arena. Elsewhere than glibc (musl, macOS) only the collection runs."""
    import ctypes
    import gc

    gc.collect()
    try:  # the process's own symbols: libc's, without ctypes.util.find_library's subprocess
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: no malloc_trim to call
        return
    trim(0)


@dataclass
class TrainPlan:
    """Step arithmetic, shown by --dry-run and used by the loop."""

    examples: int
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    epochs: int  # passes started (the last may be partial)
    world_size: int

    @classmethod
    def build(cls, t: TrainSection, examples: int, world_size: int) -> TrainPlan:
        batches = math.ceil(examples / t.batch_size)
        # GRPO's num_iterations trains each loader batch that many times in a row (grad_accum is then 1).
        per_process = math.ceil(batches / world_size) * t.passes_per_batch
        steps_per_epoch = max(1, math.ceil(per_process / t.grad_accum))
        total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        warmup = int(t.warmup * total) if t.warmup < 1 else int(t.warmup)
        return cls(
            examples,
            per_process,
            steps_per_epoch,
            total,
            min(warmup, total),
            math.ceil(total / steps_per_epoch),
            world_size,
        )


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    skipped_steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Checkpointing:
    """Where resumable states go, what they must match, and where to resume from."""

    directory: Path
    identity: dict  # recipe, data and world size a resume must match
    resume_from: Path | None = None
    adapter: AdapterSaver | None = None  # also writes a plain adapter into each checkpoint


def make_optimizer(model: torch.nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, or peft's LoRA+ (B matrices at lr x ratio); a learned watermark with
    an lr of its own (eval.watermark.lr) trains its blocks and extractor in a last group of their own."""
    from finetune.watermark.learned import find

    fused = torch.cuda.is_available() or None
    mark = find(model)
    # At the LoRA's lr the watermark's gates barely open in a short run (docs/watermarks.md, measured): its
    # modules start from zero or random weights and need a larger step than an adapter beside a trained model.
    lr = mark.lr if mark is not None else None
    own = [p for p in mark.parameters() if p.requires_grad] if mark is not None and lr is not None else []
    owned = {id(p) for p in own}
    if t.optimizer == "loraplus":
        from peft import PeftModel
        from peft.optimizers import create_loraplus_optimizer

        assert isinstance(model, PeftModel), "LoRA+ groups the adapter's A and B matrices"
        optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=t.lr,
            loraplus_lr_ratio=t.loraplus_lr_ratio,
            weight_decay=t.weight_decay,
            fused=fused,
        )
        # LoRA+ sorts every trainable parameter by its name and shape (the watermark's biases would train at
        # lr x ratio): the watermark's leave those groups before any step, so no state is lost, for a group of
        # their own at their lr (or the run's).
        watermark = [p for p in mark.parameters() if p.requires_grad] if mark is not None else []
        leaving = {id(p) for p in watermark}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in leaving]
        if watermark:
            optimizer.add_param_group({"params": watermark, "lr": lr if lr is not None else t.lr})
        return optimizer
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    groups: list[dict] = [{"params": rest}] if rest else []
    if own:
        groups.append({"params": own, "lr": lr})
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def train(
    model: torch.nn.Module,
    features: Dataset,
    collate: Callable[[list[dict]], dict],
    t: TrainSection,
    accelerator: Accelerator,
    log_path: Path | None,
    console=None,
    checkpointing: Checkpointing | None = None,
    monitor: Monitor | None = None,
    objective: Objective | None = None,
    strategy: str = "ddp",
) -> TrainResult:
    """Fit `model` on `features` (a datasets.Dataset of model inputs). Returns when the plan's steps are done.
    `strategy`: the recipe's distributed.strategy (fsdp on CPU processes shards the model here).

    The data order is a pure function of (seed, epoch), and every generator state
    is checkpointed, so a run resumed from a checkpoint continues exactly as if
    it had never stopped.
    """
    from transformers import get_scheduler

    objective = objective or Objective(PreferenceSection(), encoder_decoder=False)
    sampler = LengthGroupedBatches(
        token_lengths(features),
        t.batch_size,
        t.seed,
        window=64 if t.group_by_length else 1,
        apart=shared_positives(features),
    )
    # A private generator: creating a loader iterator must not draw from the
    # global torch generator, or a mid-epoch resume would shift every dropout mask.
    loader = DataLoader(
        features, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator().manual_seed(t.seed)
    )
    plan = TrainPlan.build(t, len(features), accelerator.num_processes)

    # fsdp on CPU: the sharded copy trains (its optimizer over its sharded parameters); accelerate still splits
    # the data, accumulates and reduces, but does not wrap the model (it would wrap it in DDP).
    shards = CpuShards(model, accelerator) if shards_on_cpu(accelerator, strategy) else None
    if shards is not None:
        model = shards.model
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, t)
    # The scheduler is stepped by hand once per optimizer step, so it is not
    # handed to accelerate (which would step it once per process).
    scheduler = get_scheduler(
        t.scheduler, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps
    )
    if shards is None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    optimizer_state = optimizer if shards is None else shards.optimizer_state(optimizer)
    passes = t.passes_per_batch
    batches_per_epoch = len(loader) * passes

    progress = checkpoint.Progress(identity=checkpointing.identity if checkpointing else {})
    logger = StepLogger(log_path if accelerator.is_main_process else None, accelerator, t.log_every)
    if checkpointing and checkpointing.resume_from:
        progress, window = checkpoint.restore(
            checkpointing.resume_from, accelerator, model, optimizer_state, scheduler, objective
        )
        progress.identity = checkpointing.identity
        logger.resume(progress, window)
        accelerator.step = progress.batches_in_epoch  # gradient-accumulation phase
        if monitor is not None:
            monitor.resume(progress.monitor, progress.step)

    guard = NonFiniteGuard(t.nonfinite, accelerator)
    model.train()
    display = progress_bar(console, plan, accelerator.is_main_process, logger)
    # FSDP's shards are whole only inside their own forward: their frozen weights are not recast.
    with StopSignals() as stop, display as bar, masked_dropouts(model), recast_frozen_weights(model, shards is None):
        bar.update(progress.step, None)
        while progress.step < plan.total_steps:
            sampler.set_epoch(progress.epoch)
            loader.set_epoch(progress.epoch)
            # Repeated after accelerate split the batches among processes, so each process repeats its own.
            skip, into = divmod(progress.batches_in_epoch, passes)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in repeat_batches(batches, passes, done=into):
                progress.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    train_step(objective, model, batch, accelerator, guard, logger)
                    if accelerator.sync_gradients:
                        # The norm of the gradients summed over processes: the same on every rank.
                        norm = accelerator.clip_grad_norm_(parameters, t.max_grad_norm or math.inf)
                        healthy, stopping = guard.check(norm, stop, progress)
                        if healthy:
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.step += 1
                if progress.batches_in_epoch >= batches_per_epoch:
                    progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
                done = progress.step >= plan.total_steps
                entry = logger.maybe_log(
                    progress.step, progress.step / plan.steps_per_epoch, scheduler.get_last_lr()[0], force=done
                )
                if entry:
                    progress.last_loss = entry["loss"]
                bar.update(progress.step, entry, scheduler.get_last_lr()[0])
                if bar.closed:
                    stop.ask("the closed standard output (its reader stopped reading)")
                epoch_end = progress.batches_in_epoch == 0
                evaluated = monitor is not None and monitor.due(progress.step, epoch_end, done)
                whole = None  # fsdp on CPU: the weights gathered for this step's evaluation and checkpoint
                if evaluated and monitor is not None:
                    whole = shards.gather() if shards is not None else None
                    result = monitor.evaluate(
                        model if whole is None else whole, progress.step, progress.step / plan.steps_per_epoch
                    )
                    accelerator.log({f"eval/{k}": v for k, v in result["metrics"].items()}, step=progress.step)
                    bar.note_eval(result, monitor.metric)
                    # At the schedule's last step nothing is left to skip: the run ends, it does not stop early.
                    if not done and monitor.should_stop():
                        done = True
                        if entry is None:  # the last step of a run always has its log line
                            entry = logger.maybe_log(
                                progress.step,
                                progress.step / plan.steps_per_epoch,
                                scheduler.get_last_lr()[0],
                                force=True,
                            )
                            progress.last_loss = entry["loss"] if entry else progress.last_loss
                    progress.monitor = monitor.to_dict()
                saved = None
                # Every evaluated step is checkpointed, so the best weights are on disk to keep.
                if checkpointing and (
                    stopping or done or epoch_end or evaluated or progress.step % t.checkpoint_every == 0
                ):
                    progress.tokens, progress.skipped_steps = logger.total_tokens, guard.skipped
                    if shards is not None and whole is None:
                        whole = shards.gather(frozen=False)
                    saved = checkpoint.save(
                        checkpointing.directory,
                        progress,
                        accelerator,
                        model if whole is None else whole,
                        optimizer_state,
                        scheduler,
                        logger.window_state(),
                        t.keep_checkpoints,
                        objective=objective,
                        adapter=checkpointing.adapter,
                        protect=monitor.state.best_step if monitor else None,
                    )
                if shards is not None and whole is not None:
                    shards.release()
                # At the last step too: the final evaluation and save are what a preempted job has no time for.
                if stopping:
                    where = f"resumable checkpoint saved in {saved}" if saved else "no checkpoint directory was given"
                    raise Interrupted(f"interrupted by {stop.name()} at step {progress.step}; {where}")
                if done or epoch_end:
                    break
            else:  # the loader ran out before the epoch's batches_per_epoch: never wait for batches that never come
                raise RuntimeError(
                    f"the training data loader gave {progress.batches_in_epoch} of its {batches_per_epoch} batches "
                    f"in epoch {progress.epoch + 1}"
                )
            if monitor is not None and monitor.state.stopped_early:
                break
    if shards is not None:  # the caller's model, whole again, for what follows training (evaluation, the adapter)
        shards.gather()
    return TrainResult(progress.step, progress.last_loss, logger.total_tokens, logger.elapsed(), guard.skipped)


def repeat_batches(batches: Iterable[dict], times: int, done: int = 0) -> Iterator[dict]:
    """Each batch `times` times in a row (GRPO's num_iterations: the objective keeps what it sampled from the
    first pass for the others); the first batch only the `times - done` passes a resumed run has left."""
    for index, batch in enumerate(batches):
        for _ in range(times - done if index == 0 else times):
            yield batch


def train_step(objective: Objective, model, batch: dict, accelerator, guard: NonFiniteGuard, logger: StepLogger):
    """Forward and backward of one batch, in the objective's parts (a pair batch runs as two halves, so its
    activations are those of one supervised batch); the parts' gradients add up to the whole batch's."""
    total, tokens, stats = None, None, dict[str, float]()
    parts = objective.parts(batch)
    for index, (part, weight) in enumerate(parts):
        step = objective.step(model, part)
        loss = step.loss * weight
        guard.watch(loss)
        # Processes exchange gradients once per batch, after its last part (no_sync: none for the ones before).
        with gradient_sync(accelerator, model, last=index == len(parts) - 1):
            accelerator.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        counted = real_tokens(part) if step.tokens is None else step.tokens
        tokens = counted if tokens is None else tokens + counted
        for name, value in step.stats.items():
            stats[name] = stats.get(name, 0.0) + value * weight
    assert total is not None and tokens is not None
    logger.add(total, tokens, stats)
    return total


def gradient_sync(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Around one backward pass: gradients are exchanged only after a batch's last part, and only at the end of
    an accumulation (accelerate's `accumulate` decides `sync_gradients`). DDP skips the exchange inside `no_sync`
    (accumulate enters it for the batches before); an FSDP2 model is told by `set_requires_gradient_sync`, which
    accelerate does not call on a CPU group (it never made the model FSDP), so it is set here for every part."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(accelerator.sync_gradients and last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def real_tokens(batch: dict) -> torch.Tensor:
    """Non-padding tokens of a batch (a packed batch has no padding, and no attention mask)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


class NonFiniteGuard:
    """Catches a NaN/inf loss or gradient before the optimizer step.

    `train.nonfinite: stop` ends the run with exit 5 naming the step (the last
    good checkpoint stays on disk); `skip` drops that update and counts it. The
    verdict and the stop-signal flag travel in one all-reduce, so every process
    takes the same decision at the same step.
    """

    def __init__(self, policy: str, accelerator):
        self.policy, self.accelerator = policy, accelerator
        self.bad_loss = torch.zeros((), device=accelerator.device)
        self.skipped = 0
        # With fp16, inf gradients are routine: the gradient scaler skips those steps itself.
        self.check_gradients = accelerator.scaler is None

    def watch(self, loss: torch.Tensor) -> None:
        self.bad_loss = torch.maximum(self.bad_loss, (~torch.isfinite(loss.detach())).float())

    def check(self, grad_norm, stop, progress) -> tuple[bool, bool]:
        """(apply this update?, stop after it?) for the optimizer step about to happen."""
        bad_grad = 0.0 if not self.check_gradients or grad_norm is None else float(not math.isfinite(float(grad_norm)))
        flags = torch.stack(
            [
                self.bad_loss,
                torch.tensor(bad_grad, device=self.bad_loss.device),
                torch.tensor(float(stop.asked), device=self.bad_loss.device),
            ]
        )
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "max")
        bad_loss, bad_grad, stopping = (bool(v) for v in flags.tolist())
        self.bad_loss.zero_()
        if not (bad_loss or bad_grad):
            return True, stopping
        what = "the loss" if bad_loss else "the gradient norm"
        step = progress.step + 1
        if self.policy == "skip":
            self.skipped += 1
            log.warning("step %d: %s is not finite; update skipped (%d so far)", step, what, self.skipped)
            return False, stopping
        raise TrainingDiverged(
            f"training diverged at step {step} (in epoch {progress.epoch + 1}): {what} is not finite (nan or inf); "
            "the checkpoints saved before it, if any, are kept. Lower train.lr, check the data, or set "
            "train.nonfinite: skip"
        )


class StopSignals:
    """SIGTERM/SIGINT/SIGHUP during training ask the loop to stop after the current optimizer step.

    A second signal while the checkpoint is being written is only noted: the
    save completes (and is atomic anyway). Under several processes the flag is
    all-reduced each step (NonFiniteGuard.check), so every rank stops at the same step.
    """

    def __init__(self):
        self.received: int | None = None
        self.reason: str | None = None  # a stop asked from inside the process (the output pipe closed)
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # SIGHUP: the terminal closed or the ssh session dropped (`nohup` starts it ignored, and so it stays).
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                # A signal the process started with ignored stays ignored (POSIX's convention, which eval and
                # predict keep): a shell starts a background job with SIGINT ignored (`finetune run R &` in a
                # script), so a Ctrl-C meant for the foreground must not stop it; `trap '' TERM` likewise.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.received = self.received or signum

    def ask(self, reason: str) -> None:
        """Stop as on a signal, at the next step with a checkpoint, for a reason of this process's own."""
        self.reason = self.reason or reason

    @property
    def asked(self) -> bool:
        return self.received is not None or self.reason is not None

    def name(self) -> str:
        if self.received:
            return signal.Signals(self.received).name
        return self.reason or "a signal on another rank"

    def __exit__(self, exc_type, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        # A signal noted after the loop's last look at it (while the final checkpoint was written) goes to the
        # handler outside training now, instead of being dropped while the run evaluates and exits 0.
        if self.received and exc_type is None and self.previous:
            signal.raise_signal(self.received)
        return False


def _forget_stop_signals() -> None:
    """A worker forked while training (a pool of the objective, a data worker) must not inherit StopSignals'
    handler: it only notes SIGTERM, so the pool's SIGTERM would never end it. The kernel's default comes back."""
    defaults = (
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGHUP, signal.SIG_DFL),
    )
    for sig, default in defaults:
        handler = signal.getsignal(sig)
        if isinstance(getattr(handler, "__self__", None), StopSignals):
            try:
                signal.signal(sig, default)
            except ValueError:  # not the child's main thread
                pass


os.register_at_fork(after_in_child=_forget_stop_signals)


class StepLogger:
    """Mean loss and real (non-padding) tokens/s over each logging window, summed over processes."""

    def __init__(self, path: Path | None, accelerator, every: int):
        self.path, self.accelerator, self.every = path, accelerator, every
        self.start = self.window_start = time.perf_counter()
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.batches = torch.zeros((), device=accelerator.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.total_tokens = 0  # logged so far, all processes
        self.last_entry: dict | None = None  # the latest train_log line (the main process shows it)
        # The objective's own per-batch figures (rewards, KL, ...), summed over the window.
        self.stat_sums: dict[str, float] = {}

    def add(self, loss: torch.Tensor, tokens: torch.Tensor, stats: dict[str, float] | None = None) -> None:
        self.loss_sum += loss.float()
        self.batches += 1
        self.tokens += tokens
        for name, value in (stats or {}).items():
            self.stat_sums[name] = self.stat_sums.get(name, 0.0) + value

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def window_state(self) -> dict:
        """This process's not-yet-logged sums, so a resumed run logs the same numbers."""
        return {
            "loss_sum": self.loss_sum.item(),
            "batches": self.batches.item(),
            "tokens": int(self.tokens.item()),
            "stats": dict(self.stat_sums),
        }

    def resume(self, progress, window: dict) -> None:
        """Continue the log of a checkpointed run: keep its lines up to the checkpoint's step."""
        (
            self.loss_sum.fill_(window["loss_sum"]),
            self.batches.fill_(window["batches"]),
            self.tokens.fill_(window["tokens"]),
        )
        self.stat_sums = dict(window.get("stats", {}))
        self.total_tokens = progress.tokens
        if self.path is not None and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _logged_step(line) <= progress.step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def window_view(self) -> dict | None:
        """This process's not-yet-logged window as loss and tokens/s, for display only: no collective, so only
        the main process may call it. Tokens/s counts this process's tokens once per process (an estimate
        under several processes). None when the window is empty."""
        batches = self.batches.item()
        if not batches:
            return None
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        processes = getattr(self.accelerator, "num_processes", 1)
        return {"loss": self.loss_sum.item() / batches, "tokens_per_s": self.tokens.item() * processes / seconds}

    def _stats(self, batches: float) -> dict[str, float]:
        """The window's mean of each objective figure; counts (reward_reason_*) stay totals."""
        sums = _merged_sums(self.accelerator, self.stat_sums)
        return {
            name: round(value if name.startswith("reward_reason_") else value / max(batches, 1), 6)
            for name, value in sorted(sums.items())
        }

    def maybe_log(self, step: int, epoch: float, lr: float, force: bool = False) -> dict | None:
        if step % self.every and not force:
            return None
        totals = self.accelerator.reduce(torch.stack([self.loss_sum, self.batches, self.tokens.float()]), "sum")
        loss_sum, batches, tokens = totals.tolist()
        now = time.perf_counter()
        entry = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss_sum / max(batches, 1),
            "lr": lr,
            "tokens_per_s": round(tokens / max(now - self.window_start, 1e-9), 1),
            "elapsed_s": round(now - self.start, 3),
        }
        entry.update(self._stats(batches))
        self.total_tokens += int(tokens)
        self.accelerator.log({f"train/{k}": entry[k] for k in ("loss", "lr", "tokens_per_s")}, step=step)
        self.loss_sum.zero_(), self.batches.zero_(), self.tokens.zero_()
        self.stat_sums = {}
        self.window_start, self.last_entry = now, entry
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json_text(entry) + "\n")
        return entry


def _merged_sums(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Every process's stat sums added up (the names may differ between processes, e.g. sandbox outcomes)."""
    if getattr(accelerator, "num_processes", 1) == 1:
        return sums
    from accelerate.utils import gather_object

    merged: dict[str, float] = {}
    for part in gather_object([sums]):
        for name, value in part.items():
            merged[name] = merged.get(name, 0.0) + value
    return merged


def _logged_step(line: str) -> float:
    """The step of a train_log line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# Progress lines when the console is not a live terminal (CI logs, `> file`, a pipe): one at the first step,
# then every ~5% of the plan's steps or every PLAIN_EVERY_SECONDS, whichever comes first, and one at the end.
PLAIN_LINES = 20
PLAIN_EVERY_SECONDS = 30.0


def live_console(console) -> bool:
    """Whether `console` can redraw a progress bar in place: an interactive terminal that understands escape codes
    (the command line's consoles are interactive only on a real terminal, FORCE_COLOR or not)."""
    return bool(console.is_jupyter or (console.is_interactive and not console.is_dumb_terminal))


class progress_bar:
    """Training progress on the main process; silent elsewhere.

    On a terminal, a rich progress bar showing loss and tokens/s. Otherwise (stdout redirected to a file or a
    pipe, as in CI) plain lines, written and flushed as they happen, that a log shows while the run trains.
    Only displays: nothing here feeds back into training, except that a pipe whose reader stopped reading
    (`finetune run R | head`) is `closed`, and the loop then stops at its next step with a checkpoint, as on
    SIGTERM: the pipeline waits for the run, and the steps since the last checkpoint are not thrown away.
    """

    def __init__(self, console, plan: TrainPlan, enabled: bool, logger: StepLogger | None = None, clock=None):
        self.enabled = enabled and console is not None
        self.closed = False
        self.console, self.total = console, plan.total_steps
        self.plain = None
        if self.enabled and not live_console(console):
            self.plain = PlainProgress(console, plan, logger, clock=clock)

    def __enter__(self):
        if self.enabled and self.plain is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, status="")
        return self

    def update(self, step: int, entry: dict | None, lr: float | None = None) -> None:
        if not self.enabled:
            return
        with self._shown():
            if self.plain is not None:
                self.plain.update(step, entry, lr)
            elif entry:
                status = f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['tokens_per_s']:.0f} tok/s"
                self.progress.update(self.task, completed=step, status=status)
            else:
                self.progress.update(self.task, completed=step)

    def note_eval(self, entry: dict, metric: str) -> None:
        """One line per evaluation during training, above the bar."""
        if self.enabled:
            value = entry["metrics"].get(metric)
            shown = "missing" if value is None else f"{value:.4f}"
            with self._shown():
                self.console.print(
                    f"eval at step {entry['step']}: {metric} {shown} ({entry['seconds']:.1f} s)", highlight=False
                )

    @contextlib.contextmanager
    def _shown(self):
        try:
            yield
        except OSError as exc:  # the pipe's reader gone (EPIPE), or the terminal hung up (EIO: SIGHUP comes too)
            if not isinstance(exc, BrokenPipeError) and exc.errno not in TERMINAL_GONE:
                raise
            self.enabled, self.closed = False, True
            self.console.quiet = True
            quiet_stdout()

    def __exit__(self, *exc):
        if self.enabled:
            with self._shown():
                if self.plain is None:
                    self.progress.__exit__(*exc)
                elif exc[0] is None:
                    self.plain.finish()
        return False


class PlainProgress:
    """`training step 12/200 (6%)  epoch 0.24/4.00  loss 2.3412  lr 1.98e-04  1234 tok/s  elapsed 0:00:31  eta 0:08:10`

    Loss and tokens/s are those of the step's train_log line when it has one; between log lines, the main
    process's own running window (read without any collective, so the other processes never wait on it).
    """

    def __init__(self, console, plan: TrainPlan, logger: StepLogger | None, clock=None):
        self.console, self.logger = console, logger
        self.total, self.steps_per_epoch = plan.total_steps, plan.steps_per_epoch
        self.every_steps = max(1, math.ceil(plan.total_steps / PLAIN_LINES))
        self.every_seconds = PLAIN_EVERY_SECONDS
        self.clock = clock or time.monotonic
        self.first_step: int | None = None  # the step this process started from (a resume starts later)
        self.printed_step = -1
        self.started = self.printed_at = self.clock()
        self.step: int = 0
        self.entry: dict | None = None
        self.lr: float | None = None

    def update(self, step: int, entry: dict | None, lr: float | None) -> None:
        now = self.clock()
        if self.first_step is None:
            self.first_step, self.printed_step, self.started, self.printed_at = step, step, now, now
            return
        self.step, self.entry, self.lr = step, entry, lr
        due = (
            step == self.first_step + 1
            or step >= self.total
            or step % self.every_steps == 0
            or now - self.printed_at >= self.every_seconds
        )
        if due and step > self.printed_step:
            self.print_line(now)

    def finish(self) -> None:
        """The last line, when the run ended on a step that had none (early stop)."""
        if self.first_step is not None and self.step > self.printed_step:
            self.print_line(self.clock())

    def print_line(self, now: float) -> None:
        self.printed_step, self.printed_at = self.step, now
        self.write(self.line(now))

    def line(self, now: float) -> str:
        step, total = self.step, self.total
        epochs = total / self.steps_per_epoch
        # Both with the decimals that show the total to 3 significant digits: rounded alike, the current epoch
        # never shows above the total (a GRPO run of 0.00926 epochs showed "epoch 0.01/0.00926").
        decimals = max(0, 2 - math.floor(math.log10(epochs)))
        parts = [
            f"training step {step}/{total} ({100 * step / total:.0f}%)",
            f"epoch {step / self.steps_per_epoch:.{decimals}f}/{epochs:.{decimals}f}",
        ]
        values = self.entry
        if values is None and self.logger is not None:
            values = self.logger.window_view() or self.logger.last_entry
        if values:
            parts.append(f"loss {values['loss']:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if values:
            parts.append(f"{values['tokens_per_s']:.0f} tok/s")
        elapsed = now - self.started
        done = step - (self.first_step or 0)
        parts.append(f"elapsed {_clock_time(elapsed)}")
        parts.append(f"eta {_clock_time(elapsed / done * (total - step)) if done > 0 else '?'}")
        return "  ".join(parts)

    def write(self, text: str) -> None:
        """Straight to the console's stream, with no markup or escape codes, flushed at once."""
        if self.console.quiet:
            return
        stream = self.console.file
        stream.write(text + "\n")
        stream.flush()


def _clock_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
