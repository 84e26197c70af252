"""One accelerate training loop, the same for every task: the task only supplies features and a collator."""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from finetune.errors import Interrupted, TrainingDiverged


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


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Precision lives in a per-process singleton; a second run or eval in the
    # same process (library use, tests) may ask for another one. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on machines without an accelerator is what makes accelerate join
    # the processes of `accelerate launch` / torchrun as MULTI_CPU (gloo)
    # instead of running each as an independent single process.
    return Accelerator(
        mixed_precision=resolve_precision(recipe.train.precision),
        gradient_accumulation_steps=recipe.train.grad_accum,
        cpu=not has_accelerator_device(),
    )


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar-length examples, reproducible from (seed, epoch).

    Indices are shuffled, cut into windows of `window` batches, sorted by length
    inside each window, cut into batches, and the batches shuffled again: padding
    shrinks while each epoch still sees the data in a fresh random order.
    Without grouping (`window=1`) it is a plain shuffled batcher.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 64):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            if self.window > 1:
                chunk.sort(key=lambda i: self.lengths[i], reverse=True)
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


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
    def build(cls, recipe, examples: int, world_size: int) -> "TrainPlan":
        t = recipe.train
        batches = math.ceil(examples / t.batch_size)
        per_process = math.ceil(batches / world_size)
        steps_per_epoch = max(1, math.ceil(per_process / t.grad_accum))
        total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        warmup = int(t.warmup * total) if t.warmup < 1 else int(t.warmup)
        return cls(examples, per_process, steps_per_epoch, total, min(warmup, total), math.ceil(total / steps_per_epoch), world_size)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def save_checkpoint(accelerator, directory: Path, step: int, epoch: int, keep: int, on_checkpoint=None) -> Path:
    """A resumable state (model, optimizer, scheduler, RNG) in `directory/step-N`, written atomically.

    Everything goes into a hidden staging directory first and is renamed into
    place only when complete, so a kill at any moment leaves the previous
    checkpoint intact. Only the newest `keep` checkpoints are kept.
    """
    final = directory / f"step-{step:08d}"
    staging = directory / f".partial-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    if accelerator.is_main_process:
        (staging / "progress.json").write_text(json.dumps({"step": step, "epoch": epoch}))
        if on_checkpoint is not None:
            on_checkpoint(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(directory.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def train(model, features, collate, recipe, accelerator, log_path: Path | None, console=None,
          checkpoint_dir: Path | None = None, on_checkpoint=None) -> TrainResult:
    """Fit `model` on `features` (a datasets.Dataset of model inputs). Returns when the plan's steps are done."""
    from transformers import get_scheduler

    t = recipe.train
    lengths = [len(ids) for ids in features["input_ids"]]
    sampler = LengthGroupedBatches(lengths, t.batch_size, t.seed, window=64 if t.group_by_length else 1)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=collate)
    plan = TrainPlan.build(recipe, len(features), accelerator.num_processes)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=t.lr, weight_decay=t.weight_decay, fused=torch.cuda.is_available() or None
    )
    # The scheduler is stepped by hand once per optimizer step, so it is not
    # handed to accelerate (which would step it once per process).
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    logger = StepLogger(log_path if accelerator.is_main_process else None, accelerator, t.log_every)
    step, last_loss = 0, float("nan")
    model.train()
    with StopSignals() as stop, progress_bar(console, plan.total_steps, accelerator.is_main_process) as bar:
        for epoch in range(plan.epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"training diverged at step {step + 1} (epoch {epoch + 1}): loss is {loss.item()}; "
                            "lower train.lr or check the data"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(parameters, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                logger.add(loss.detach(), batch["attention_mask"].sum())
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                entry = logger.maybe_log(
                    step, step / plan.steps_per_epoch, scheduler.get_last_lr()[0], force=step == plan.total_steps
                )
                if entry:
                    last_loss = entry["loss"]
                bar.update(step, entry)
                if step >= plan.total_steps:
                    break
                stopping = stop.requested(accelerator)
                saved = None
                if checkpoint_dir is not None and (stopping or step % t.checkpoint_every == 0):
                    saved = save_checkpoint(accelerator, checkpoint_dir, step, epoch, t.keep_checkpoints, on_checkpoint)
                if stopping:
                    where = f"resumable checkpoint saved in {saved}" if saved else "no checkpoint directory was given"
                    raise Interrupted(f"interrupted by {stop.name()} at step {step}; {where}")
            if step >= plan.total_steps:
                break
    return TrainResult(step, last_loss, logger.total_tokens, logger.elapsed())


class StopSignals:
    """SIGTERM/SIGINT during training ask the loop to stop after the current optimizer step.

    A second signal while the checkpoint is being written is only noted: the
    save completes (and is atomic anyway). Under several processes the flag is
    all-reduced each step, so every rank stops at the same step.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.received = self.received or signum

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(1.0 if self.received else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class StepLogger:
    """Mean loss and real (non-padding) tokens/s over each logging window, summed over processes."""

    def __init__(self, path: Path | None, accelerator, every: int):
        self.path, self.accelerator, self.every = path, accelerator, every
        self.start = self.window_start = time.perf_counter()
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.batches = torch.zeros((), device=accelerator.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.total_tokens = 0
        if path is not None:
            path.write_text("")

    def add(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss_sum += loss.float()
        self.batches += 1
        self.tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

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
        self.total_tokens += int(tokens)
        self.loss_sum.zero_(), self.batches.zero_(), self.tokens.zero_()
        self.window_start = now
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        return entry


class progress_bar:
    """A rich progress bar on the main process showing loss and tokens/s; silent elsewhere."""

    def __init__(self, console, total: int, enabled: bool):
        self.enabled = enabled and console is not None
        self.console, self.total = console, total

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, status="")
        return self

    def update(self, step: int, entry: dict | None) -> None:
        if not self.enabled:
            return
        if entry:
            status = f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=step, status=status)
        else:
            self.progress.update(self.task, completed=step)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False
