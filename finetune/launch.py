"""`finetune run --num-processes N`: start N processes through accelerate's own launcher, on one machine or on
several (`--nnodes`, or the topology a scheduler's environment describes: Slurm, SkyPilot, PBS, torchrun).

One owner decides the topology: `Topology.find` (flags first, then the scheduler's variables), and every node
runs the same command; only the node rank differs, and the scheduler supplies it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import PeerLost, RecipeError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    """Where this run's processes are: `nodes` machines with `per_node` processes each, this one being
    `node_rank`, meeting at `address:port` (the first node), found from `source`."""

    nodes: int = 1
    node_rank: int = 0
    per_node: int = 1
    address: str = "127.0.0.1"
    port: int = 0
    source: str = "this machine"

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    def describe(self) -> str:
        if self.nodes == 1:
            return f"{self.per_node} process{'es' if self.per_node > 1 else ''} on this machine"
        return (
            f"{self.nodes} nodes x {self.per_node} process{'es' if self.per_node > 1 else ''} (this is node "
            f"{self.node_rank}), rendezvous {self.address}:{self.port}, from {self.source}"
        )

    @staticmethod
    def find(
        per_node: int,
        nnodes: int | None = None,
        node_rank: int | None = None,
        endpoint: str | None = None,
        environ: Mapping[str, str] | None = None,
        recipe_nodes: int | None = None,
    ) -> Topology:
        """The topology the flags give (`--nnodes`, `--node-rank`, `--rdzv-endpoint`), else the one a scheduler's
        environment describes, else the recipe's `distributed.nnodes` (`recipe_nodes`), else this machine alone.
        A flag wins over the environment, key by key."""
        environ = os.environ if environ is None else environ
        found = _from_scheduler(environ) if nnodes is None else None
        source = (
            found.source if found else "--nnodes" if nnodes is not None or not recipe_nodes else "distributed.nnodes"
        )
        nodes = nnodes if nnodes is not None else found.nodes if found else recipe_nodes or 1
        if nodes == 1 and node_rank in (None, 0) and endpoint is None:
            return Topology(per_node=per_node)
        rank = node_rank if node_rank is not None else found.node_rank if found else None
        if rank is None:
            raise RecipeError("--node-rank: a run on several nodes needs each node's rank (0 on the first node)")
        if not 0 <= rank < nodes:
            raise RecipeError(f"--node-rank: {rank} is not a node of {nodes} (0 to {nodes - 1})")
        if endpoint is not None:
            address, port = _endpoint(endpoint)
        elif found is not None:
            address, port = found.address, found.port
        else:
            raise RecipeError("--rdzv-endpoint: a run on several nodes needs HOST:PORT of the first node")
        return Topology(nodes, rank, per_node, address, port, source)


def _endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecipeError(f"--rdzv-endpoint: {value!r} is not HOST:PORT (e.g. node01:29500)")
    return host.strip("[]"), int(port)


def _from_scheduler(environ: Mapping[str, str]) -> Topology | None:
    """The topology a scheduler set in the environment of a one-task-per-node job, or None outside one."""
    port = int(environ.get("MASTER_PORT") or 0)
    if "SLURM_NNODES" in environ and "SLURM_NODEID" in environ:
        nodes = int(environ["SLURM_NNODES"])
        tasks = int(environ.get("SLURM_NTASKS") or nodes)
        if tasks > nodes:
            raise RecipeError(
                f"Slurm: {tasks} tasks on {nodes} nodes; finetune starts the processes of each node itself, so run "
                "one task per node (srun --ntasks-per-node=1 finetune run RECIPE --num-processes P)"
            )
        hosts = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
        # The same port on every node without talking to each other: derived from the job id.
        job = environ.get("SLURM_JOB_ID", "")
        return Topology(
            nodes,
            int(environ["SLURM_NODEID"]),
            address=environ.get("MASTER_ADDR") or first_host(hosts),
            port=port or (DEFAULT_PORT + int(job) % 10000 if job.isdigit() else DEFAULT_PORT),
            source="Slurm",
        )
    if "SKYPILOT_NODE_RANK" in environ and "SKYPILOT_NODE_IPS" in environ:
        ips = environ["SKYPILOT_NODE_IPS"].split()
        return Topology(
            int(environ.get("SKYPILOT_NUM_NODES") or len(ips)),
            int(environ["SKYPILOT_NODE_RANK"]),
            address=ips[0],
            port=port or DEFAULT_PORT,
            source="SkyPilot",
        )
    if environ.get("PBS_NODEFILE"):
        listed = list(dict.fromkeys(Path(environ["PBS_NODEFILE"]).read_text().split()))  # one line per slot
        here = socket.gethostname()
        names = [h.split(".")[0] for h in listed]
        if here.split(".")[0] not in names:
            raise RecipeError(f"PBS_NODEFILE: this machine ({here}) is not among the job's nodes: {', '.join(listed)}")
        return Topology(
            len(listed), names.index(here.split(".")[0]), address=listed[0], port=port or DEFAULT_PORT, source="PBS"
        )
    return None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `node[03-05,07],gpu1` -> node03 (as `scontrol show hostnames`)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise RecipeError(f"SLURM_JOB_NODELIST: cannot read the first node of {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def inside_launched_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def follow_launcher(poll_seconds: float = 1.0) -> None:
    """End this launched process when its launcher ends.

    torch's elastic agent starts each process in a session of its own, so a node whose launcher was killed
    (`kill -9` of its process group, a scheduler cancelling the step) kept its processes training as orphans: the
    other nodes then finished the run beside a node nobody could stop, and waited in the agents' exit barrier for
    a launcher that was gone. A process whose parent changes has lost its launcher: it stops at once, with the
    lost-peer code, and the other nodes see the connection close (gloo) and stop too.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # Started by something other than torch's agent (a scheduler's own launcher, a shell with LOCAL_RANK set
        # in its environment): its parent may end normally (`nohup … &`), and that is no lost node.
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        try:  # the launcher held the other end of our stderr: writing may raise (closed pipe); stop all the same
            sys.stderr.write("error: the launcher of this process was lost; this process stopped\n")
            sys.stderr.flush()
        finally:
            os._exit(PeerLost.exit_code)

    threading.Thread(target=watch, name="finetune-follow-launcher", daemon=True).start()


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


# What accelerate's launcher is told for each strategy. On GPUs accelerate wraps the model (FSDP, DeepSpeed) itself.
STRATEGY_FLAGS = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_use_orig_params", "true"],
    "deepspeed": ["--use_deepspeed", "--zero_stage", "2"],
}
# On CPU accelerate (1.x) shards nothing (its FSDP plugin would even refuse its own defaults there): the processes
# start as for ddp, and the training loop shards the model itself because the recipe says fsdp
# (finetune/training/sharding.py, `shards_on_cpu`).
CPU_STRATEGY_FLAGS = {"fsdp": STRATEGY_FLAGS["ddp"]}


def relaunch(topology: Topology, finetune_args: list[str], strategy: str = "ddp", max_restarts: int = 0) -> int:
    """Run `finetune ARGS` in this node's processes of `topology`; return the worst exit code.

    accelerate's multi-process launcher (torch.distributed.run underneath) is
    used on CPU too: each process then joins a gloo group (see make_accelerator).
    On several nodes every node runs this with its own rank; they meet at the first node's address.
    """
    from finetune.flows.resolve import strategy_problems, too_many_processes

    problems = too_many_processes(topology.per_node, "--num-processes") + strategy_problems(strategy)
    if problems:
        raise RecipeError(problems[0])
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if topology.nodes == 1:
        where = ["--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        where = [
            "--num_machines",
            str(topology.nodes),
            "--machine_rank",
            str(topology.node_rank),
            "--main_process_ip",
            topology.address,
            "--main_process_port",
            str(topology.port),
            "--max_restarts",
            str(max_restarts),
        ]
    import torch

    flags = STRATEGY_FLAGS[strategy]
    if not torch.cuda.is_available():
        flags = CPU_STRATEGY_FLAGS.get(strategy, flags)
    args = launch_command_parser().parse_args(
        [
            *flags,
            "--num_processes",
            str(topology.world_size),  # accelerate counts the processes of all machines
            *where,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "finetune",
            *finetune_args,
        ]
    )
    from finetune.outputs.lock import COMMAND_ENV, command_line

    before = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = command_line()  # the processes record this command, not their own `-m finetune`
    try:
        launch_command(args)
    except ChildFailedError as exc:
        ranked = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
        code = worst_exit_code([failure.exitcode for _, failure in ranked])
        killed = next((rank for rank, failure in ranked if failure.exitcode == 128 - code), None)
        if code > 128 and killed is not None:  # its peers said only that a process was lost: this says which, how
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            print(
                f"error: process {killed} of this run was killed by {name}"
                + (
                    " (often the out-of-memory killer: lower train.batch_size or data.max_length)"
                    if code == 137
                    else ""
                )
                + "; `--resume auto` continues from the last checkpoint",
                file=sys.stderr,
            )
        return code
    finally:  # only for the processes this launch starts
        if before is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = before
    return 0


def worst_exit_code(codes: list[int]) -> int:
    """The exit code of several processes (in the order they failed): the worst code a process chose itself. When
    none did, the first process killed by a signal (torch reports signal N as -N) gives 128 + N, as a shell reports
    it (137 for kill -9, often the out-of-memory killer); the launcher's own SIGTERM to the others comes later. A peer
    lost (exit 76) is what the others of a killed process report: the kill, its cause, is the code then."""
    chosen = [code for code in codes if code > 0]
    own = [code for code in chosen if code != PeerLost.exit_code]
    killed = [code for code in codes if code < 0]
    if own:
        return max(own)
    if killed:
        return 128 - killed[0]
    return max(chosen) if chosen else 1
