"""Resumable training states: written atomically, verified on load, never unpickled.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding

    trainable.safetensors   every parameter with requires_grad (LoRA + trained heads)
    optimizer.safetensors   the optimizer's tensors; optimizer.json the rest of its state
    scheduler.json          the learning-rate schedule's position
    scaler.json             the fp16 gradient scaler, when there is one
    rng-R.safetensors       torch (and CUDA) generator states of process R
    rank-R.json             Python and NumPy generator states and log window of process R
    progress.json           step, epoch, batches consumed in that epoch, what the run must match
    adapter/                a plain peft adapter, so `finetune eval --checkpoint` can use it
    checkpoint.json         size and sha256 of every file above; written last

Everything is staged in a hidden directory and renamed into place when
complete, so a kill at any moment leaves the previous checkpoint intact, and a
file damaged afterwards is caught by its checksum. Only safetensors and JSON are
read back: nothing in a checkpoint can execute code when loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from finetune.errors import DataError, RecipeError
from finetune.files import read_json_input, sha256_file, weights_with_umask
from finetune.outputs.adapter import AdapterSaver
from finetune.outputs.rundir import BATCH_ORDER_KEY, HASHED, same_batch_order

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("finetune")

INDEX = "checkpoint.json"
PROGRESS = "progress.json"
PREFIX = "step-"
STAGING_PREFIX = ".partial-"


class Stateful(Protocol):
    """What a checkpoint saves and restores of the optimizer and the learning-rate schedule."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Carrier(Protocol):
    """What a training objective keeps between steps (GRPO's rollouts with passes left): tensors and facts."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], facts: dict) -> None: ...


@dataclass
class Progress:
    """Where training stands after an optimizer step; enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # per-process batches of `epoch` already consumed
    tokens: int = 0  # real tokens trained on so far, all processes
    skipped_steps: int = 0  # non-finite steps skipped (train.nonfinite: skip)
    last_loss: float = float("nan")
    monitor: dict = field(default_factory=dict)  # evaluation during training: history, best so far, patience
    identity: dict = field(default_factory=dict)  # what a resume must match (see resume_identity)


# --------------------------------------------------------------------------- writing


def save(
    directory: Path,
    progress: Progress,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Stateful,
    scheduler: Stateful,
    logger_state: dict,
    keep: int,
    objective: Carrier | None = None,
    adapter: AdapterSaver | None = None,
    protect: int | None = None,
) -> Path:
    """Write a checkpoint for `progress.step` atomically and keep only the newest `keep`, and step `protect`
    (the best evaluated so far, which pruning never removes)."""
    final = directory / f"{PREFIX}{progress.step:08d}"
    staging = directory / f"{STAGING_PREFIX}{PREFIX}{progress.step:08d}"
    main, rank = accelerator.is_main_process, accelerator.process_index
    try:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Per-process generator states (each rank draws its own dropout masks).
        _save_tensors({"torch": torch.get_rng_state(), **_cuda_rng_states()}, staging / f"rng-{rank}.safetensors")
        # And what this process's objective holds between steps (a GRPO rollout with passes left).
        carried, facts = objective.state() if objective is not None else ({}, {})
        if carried:
            _save_tensors(carried, staging / f"objective-{rank}.safetensors")
        _write_json(
            staging / f"rank-{rank}.json",
            {
                "python_random": _python_rng_state(),
                "numpy_random": _numpy_rng_state(),
                "log_window": logger_state,
                "objective": facts,
            },
        )
        # On every process: a sharded optimizer (fsdp on CPU) gathers its state from all of them.
        optimizer_state = optimizer.state_dict()
        if main:
            unwrapped = accelerator.unwrap_model(model)
            trainable = {name: p.detach() for name, p in unwrapped.named_parameters() if p.requires_grad}
            _save_tensors(trainable, staging / "trainable.safetensors")
            tensors, rest = _split_optimizer_state(optimizer_state)
            _save_tensors(tensors, staging / "optimizer.safetensors")
            _write_json(staging / "optimizer.json", rest)
            _write_json(staging / "scheduler.json", scheduler.state_dict())
            if accelerator.scaler is not None:
                _write_json(staging / "scaler.json", accelerator.scaler.state_dict())
            _write_json(staging / PROGRESS, asdict(progress))
            if adapter is not None:  # a plain adapter too, so `finetune eval --checkpoint` can use it
                adapter.save(unwrapped, staging / "adapter")
        accelerator.wait_for_everyone()
        if main:
            _write_json(staging / INDEX, {"step": progress.step, "files": _inventory(staging)})
            _fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in complete_checkpoints(directory)[:-keep]:
                if protect is None or old.name != f"{PREFIX}{protect:08d}":
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        # A write that failed (a full disk) or was stopped: its half is removed, not left to take the space a
        # resume needs (the error says nothing half-written was left).
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    weights_with_umask(path)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _inventory(directory: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != INDEX
    }


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """torch optimizer state -> (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _cuda_rng_states() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    # legacy=True is numpy's default; spelled out because numpy's stubs give the default call the dict form.
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)  # the legacy form, which the global generator (MT19937) always has
    kind, keys, position, has_gauss, cached = state
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


# --------------------------------------------------------------------------- finding and checking


def complete_checkpoints(directory: Path) -> list[Path]:
    """Renamed-into-place checkpoints, oldest first (partial ones are hidden staging directories)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}*") if p.is_dir())


def discard_partial(directory: Path) -> None:
    """Checkpoints whose writing was stopped (kill -9, a lost machine): a resume trains their steps again, and their
    bytes were counted against the space it needs. Only the run's holder calls this, under the run's lock."""
    for partial in sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []:
        log.warning("removing %s: a checkpoint whose writing was interrupted", partial)
        shutil.rmtree(partial, ignore_errors=True)


def bytes_held(directory: Path) -> int:
    """What the complete checkpoints in `directory` take on disk."""
    return sum(f.stat().st_size for c in complete_checkpoints(directory) for f in c.rglob("*") if f.is_file())


def newest_usable(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; partial or damaged ones are skipped with a warning."""
    for partial in sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []:
        log.warning("skipping %s: a checkpoint whose writing was interrupted", partial)
    for candidate in reversed(complete_checkpoints(directory)):
        try:
            verify(candidate)
            return candidate
        except DataError as exc:
            log.warning("skipping %s", exc)
    return None


def verify(path: Path) -> dict:
    """Check every file against the index written last; return the index. DataError names what is wrong."""
    index_path = path / INDEX
    if not index_path.is_file():
        raise DataError(f"{path}: not a complete checkpoint ({INDEX} missing)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        files = index["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{index_path}: damaged checkpoint index") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise DataError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise DataError(f"{file}: truncated or damaged ({size} bytes, the checkpoint recorded {expected['bytes']})")
        if sha256_file(file) != expected["sha256"]:
            raise DataError(f"{file}: damaged (its sha256 differs from the one recorded when it was written)")
    return index


def resolve(resume: str, directory: Path) -> Path | None:
    """`--resume auto` -> the newest usable checkpoint or None; `--resume PATH` -> that checkpoint, verified."""
    if resume == "auto":
        found = newest_usable(directory)
        if found is None:
            log.warning("--resume auto: no usable checkpoint in %s; starting from the beginning", directory)
        return found
    path = Path(resume)
    if path.is_dir() and not (path / INDEX).is_file() and complete_checkpoints(path / "checkpoints"):
        path = path / "checkpoints"  # a run directory
    if path.is_dir() and not (path / INDEX).is_file() and complete_checkpoints(path):
        found = newest_usable(path)  # a checkpoints directory
        if found is None:
            raise DataError(f"--resume {resume}: no usable checkpoint in {path}")
        return found
    if not path.is_dir():
        raise RecipeError(f"--resume {resume}: no such checkpoint directory (use --resume auto or a step-N directory)")
    verify(path)
    return path


def read_progress(path: Path) -> Progress:
    try:
        return Progress(**json.loads((path / PROGRESS).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{path / PROGRESS}: unreadable progress record ({exc})") from None


def check_identity(saved: dict, current: dict, force: bool) -> list[str]:
    """Differences between what the checkpoint was trained with and this run; refused unless forced."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("recipe ") and key not in current:
            # A setting a newer finetune leaves free (distributed.num_processes, bound by the process count): the
            # identity decides what must match, and it no longer names this one.
            continue
        if key.startswith(HASHED) and key not in saved:
            # A file a checkpoint from before its hash was kept (the knowledge base, until 2026-12-07): unknown, not
            # changed; which files a run reads is bound by the recipe's own settings, compared here too.
            continue
        before, now = saved.get(key), current.get(key)
        if key == BATCH_ORDER_KEY and same_batch_order(before, now, current.get("recipe task")):
            continue  # an older version of the order, which draws this task's batches alike
        if before != now:
            differences.append(f"{key}: {_short(before)} in the checkpoint, {_short(now)} now")
    if differences and not force:
        raise RecipeError(
            "cannot resume exactly: the run changed since the checkpoint was written "
            "(pass --force-resume to continue anyway, without the exactness guarantee)",
            differences,
        )
    for difference in differences:
        log.warning("resuming despite a change: %s", difference)
    return differences


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- loading


def check_layout(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's trained parameters against `model`'s trainable ones, by name and shape (read from the file's
    header, no tensor loaded): a resume checks them before it writes anything into the run, since a checkpoint of
    another task or LoRA layout (--force-resume past a changed recipe) cannot load."""
    from safetensors import SafetensorError, safe_open

    trainable = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    file = path / "trainable.safetensors"
    try:
        with safe_open(str(file), framework="pt") as weights:
            saved = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable safetensors file ({exc})") from None
    if set(saved) != set(trainable):
        missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise RecipeError(
            f"{path}: its trained parameters do not match this model's LoRA layout "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, shape in trainable.items():
        if saved[name] != shape:
            raise RecipeError(f"{path}: {name} has shape {saved[name]}, the model {shape}")


def restore(
    path: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Stateful,
    scheduler: Stateful,
    objective: Carrier | None = None,
) -> tuple[Progress, dict]:
    """Load a verified checkpoint into the live objects; returns (progress, this rank's log window)."""
    rank = accelerator.process_index
    rank_files = [path / f"rng-{rank}.safetensors", path / f"rank-{rank}.json"]
    if not all(f.is_file() for f in rank_files):
        raise RecipeError(f"{path}: has no state for process {rank}; it was written by fewer processes")
    unwrapped = accelerator.unwrap_model(model)
    check_layout(path, unwrapped)
    trainable = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
    _load_trainable(unwrapped, trainable, _load_tensors(path / "trainable.safetensors"))
    rest = read_json_input(path / "optimizer.json")
    optimizer.load_state_dict(_join_optimizer_state(_load_tensors(path / "optimizer.safetensors"), rest))
    scheduler.load_state_dict(read_json_input(path / "scheduler.json"))
    if accelerator.scaler is not None and (path / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(read_json_input(path / "scaler.json"))
    rng = _load_tensors(path / f"rng-{rank}.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    host = read_json_input(path / f"rank-{rank}.json")
    version, internal, gauss = host["python_random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = host["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if objective is not None:
        carried = path / f"objective-{rank}.safetensors"
        objective.load_state(_load_tensors(carried) if carried.is_file() else {}, host.get("objective", {}))
    return read_progress(path), host["log_window"]


def _load_trainable(model: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], saved: dict) -> None:
    """The saved (whole) values into the live parameters. A model sharded by FSDP2 (fsdp on CPU) holds each
    parameter as a DTensor shard: torch's state-dict loader scatters the whole values to the shards."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(parameter, DTensor) for parameter in trainable.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(saved[name])


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy a verified checkpoint's trained values into `model` (eval.keep: best)."""
    verify(path)
    saved = _load_tensors(path / "trainable.safetensors")
    live = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            live[name].copy_(tensor)


def _load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
