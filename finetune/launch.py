"""`finetune run --num-processes N`: start N processes through accelerate's own launcher."""

from __future__ import annotations

import os
import socket

from finetune.errors import RecipeError


def inside_launched_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def processes_wanted(setting: int | str) -> int:
    """distributed.num_processes: a number, or auto = one per GPU (1 without GPUs)."""
    if setting != "auto":
        return int(setting)
    import torch

    return max(1, torch.cuda.device_count())


def free_port() -> int:
    """A port nothing listens on now: two runs on one machine must not both take torch's default 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STRATEGY_FLAGS = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_use_orig_params", "true"],
    "deepspeed": ["--use_deepspeed", "--zero_stage", "2"],
}


def relaunch(num_processes: int, finetune_args: list[str], strategy: str = "ddp") -> int:
    """Run `finetune ARGS` in `num_processes` processes on this machine; return the worst exit code.

    accelerate's multi-process launcher (torch.distributed.run underneath) is
    used on CPU too: each process then joins a gloo group (see make_accelerator).
    Multi-node runs use `accelerate launch` directly with its machine-rank flags.
    """
    import torch

    from finetune.flows.resolve import too_many_processes

    problems = too_many_processes(num_processes, "--num-processes")
    if problems:
        raise RecipeError(problems[0])
    if strategy != "ddp" and not torch.cuda.is_available():
        raise RecipeError(f"distributed.strategy: {strategy} shards over GPUs; without one use ddp (gloo on CPU)")
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(
        [
            *STRATEGY_FLAGS[strategy],
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "finetune",
            *finetune_args,
        ]
    )
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.values(), key=lambda failure: failure.timestamp)
        return worst_exit_code([failure.exitcode for failure in failures])
    return 0


def worst_exit_code(codes: list[int]) -> int:
    """The exit code of several processes (in the order they failed): the worst code a process chose itself. When
    none did, the first process killed by a signal (torch reports signal N as -N) gives 128 + N, as a shell reports
    it (137 for kill -9, often the out-of-memory killer); the launcher's own SIGTERM to the others comes later."""
    chosen = [code for code in codes if code > 0]
    if chosen:
        return max(chosen)
    killed = [code for code in codes if code < 0]
    return 128 - killed[0] if killed else 1
