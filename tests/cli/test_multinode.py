"""Several nodes: the topology from flags or a scheduler's environment, and two "nodes" on the loopback address."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import classification_recipe

from finetune.errors import RecipeError
from finetune.launch import Topology, first_host, free_port
from tests.cli.test_distributed import isolated_env, last_step


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node01", "node01"), ("node[03-05,07],gpu1", "node03"), ("gpu-a[7,9]", "gpu-a7"), ("a,b", "a")],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.unit
def test_slurm_environment_gives_the_topology_without_flags():
    environ = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "2",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[10-13]",
    }
    topology = Topology.find(8, environ=environ)
    assert (topology.nodes, topology.node_rank, topology.per_node, topology.address) == (4, 2, 8, "gpu10")
    assert topology.port == 29500 + 123456 % 10000 and topology.source == "Slurm"
    assert Topology.find(8, environ=environ | {"MASTER_PORT": "40000"}).port == 40000
    with pytest.raises(RecipeError, match="one task per node"):
        Topology.find(1, environ=environ | {"SLURM_NTASKS": "32"})
    # The recipe's distributed.nnodes counts the nodes only where the scheduler does not (it disabled the scheduler).
    assert Topology.find(8, environ=environ, recipe_nodes=2).nodes == 4


@pytest.mark.unit
def test_skypilot_and_pbs_environments_give_the_topology(tmp_path, monkeypatch):
    sky = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n", "SKYPILOT_NUM_NODES": "2"}
    topology = Topology.find(2, environ=sky)
    assert (topology.nodes, topology.node_rank, topology.address, topology.source) == (2, 1, "10.0.0.5", "SkyPilot")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\nn3\n")  # one line per slot
    monkeypatch.setattr("socket.gethostname", lambda: "n2.cluster")
    topology = Topology.find(1, environ={"PBS_NODEFILE": str(nodefile)})
    assert (topology.nodes, topology.node_rank, topology.address) == (3, 1, "n1")


@pytest.mark.unit
def test_flags_win_and_mistakes_are_named():
    assert Topology.find(2, environ={}) == Topology(per_node=2)  # one machine: nothing to meet
    flagged = Topology.find(1, 2, 1, "head:1234", environ={"SLURM_NNODES": "8", "SLURM_NODEID": "5"})
    assert (flagged.nodes, flagged.node_rank, flagged.address, flagged.port) == (2, 1, "head", 1234)
    with pytest.raises(RecipeError, match="--node-rank"):
        Topology.find(1, 2, None, "head:1234", environ={})
    with pytest.raises(RecipeError, match="--node-rank: 2 is not a node of 2"):
        Topology.find(1, 2, 2, "head:1234", environ={})
    with pytest.raises(RecipeError, match="--rdzv-endpoint"):
        Topology.find(1, 2, 0, None, environ={})
    with pytest.raises(RecipeError, match="HOST:PORT"):
        Topology.find(1, 2, 0, "head", environ={})


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_node_with_two_processes(tiny_models, topic_data, write_recipe, tmp_path):
    """Two launchers (one per "node", one process each) meet on 127.0.0.1 and train the same steps as one launcher
    with two processes; one run directory, written by the first node's process."""
    env = isolated_env(tmp_path)
    recipe = classification_recipe(tiny_models["gpt2"], topic_data, tmp_path / "one-node", batch_size=8, epochs=2)
    one = write_recipe(recipe, "one.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(one), "--num-processes", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recipe["output"]["dir"] = str(tmp_path / "two-nodes")
    two = write_recipe(recipe, "two.yaml")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune", "run", str(two), "--nnodes", "2", "--node-rank", str(rank)]
            + ["--num-processes", "1", "--rdzv-endpoint", endpoint],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [out[1][-3000:] for out in outputs]
    assert "2 = 2 nodes x 1 per node, backend gloo" in outputs[0][0]  # the plan names the topology
    for rank, (_, stderr) in enumerate(outputs):  # said before the rendezvous, which waits silently
        assert f"node {rank} of 2: waiting for every node to meet at {endpoint}" in " ".join(stderr.split())
    a = json.loads((tmp_path / "one-node" / "metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "two-nodes" / "metrics.json").read_text())["metrics"]
    assert last_step(tmp_path / "one-node") == last_step(tmp_path / "two-nodes") > 0
    assert abs(a["eval_loss"] - b["eval_loss"]) <= 0.01 * a["eval_loss"], (a, b)
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.01
    assert json.loads((tmp_path / "two-nodes" / "manifest.json").read_text())["hardware"]["num_processes"] == 2


@pytest.mark.slow
def test_a_lost_node_ends_the_other_with_a_clear_exit(tiny_models, topic_data, write_recipe, tmp_path):
    """The second node's launcher is killed with its process group (its worker lives in a session of its own, as
    torch's agent starts it, and follows its launcher); the first node stops with the lost-peer code, not after
    the agents' 300 s exit barrier or gloo's 30 minutes."""
    import os
    import signal
    import time

    env = isolated_env(tmp_path) | {"FINETUNE_COLLECTIVE_TIMEOUT": "60"}
    recipe = classification_recipe(tiny_models["gpt2"], topic_data, tmp_path / "run", batch_size=2, epochs=50)
    path = write_recipe(recipe, "nodes.yaml")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune", "run", str(path), "--nnodes", "2", "--node-rank", str(rank)]
            + ["--num-processes", "1", "--rdzv-endpoint", endpoint],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    try:
        log = tmp_path / "run" / "train_log.jsonl"
        deadline = time.monotonic() + 300
        while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert log.exists(), "no training step logged"
        os.killpg(nodes[1].pid, signal.SIGKILL)  # the second node is lost, launcher and all
        started = time.monotonic()
        out, err = nodes[0].communicate(timeout=180)
        assert time.monotonic() - started < 120
        assert nodes[0].returncode == 76, err[-2000:]  # a peer was lost: the documented code, one line
        assert "another process or node of this run was lost" in err
        assert "Traceback" not in out
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.unit
@pytest.mark.parametrize("stderr", ["file", "pipe"])
def test_a_launched_process_stops_when_its_launcher_is_killed(tmp_path, stderr):
    """What torch's agent does (a worker in a session of its own), with `follow_launcher` in the worker: killing the
    launcher ends the worker within seconds instead of leaving it training as an orphan, also when its stderr was
    a pipe that only the launcher read (the last words then fail with a closed pipe; they must not keep it alive)."""
    import os
    import signal
    import time

    import psutil

    worker = (
        "import os, time; os.environ['TORCHELASTIC_RUN_ID'] = 'test'; "  # as torch's agent sets for its workers
        "from finetune.launch import follow_launcher; follow_launcher(0.1); time.sleep(60)"
    )
    said = tmp_path / "worker.err"
    target = f"open({str(said)!r}, 'w')" if stderr == "file" else "subprocess.PIPE"
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True, stderr={target})"
        "; time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        (child,) = psutil.Process(parent.pid).children()
        time.sleep(1)  # the worker has imported finetune and started watching
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        started = time.monotonic()
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone and time.monotonic() - started < 10  # (its exit code, 76, is its launcher's to read)
        if stderr == "file":
            assert said.read_text() == "error: the launcher of this process was lost; this process stopped\n"
    finally:
        for process in psutil.Process().children(recursive=True):
            process.kill()


@pytest.mark.unit
def test_a_process_not_started_by_torchs_agent_is_not_watched(monkeypatch):
    """LOCAL_RANK in a login shell's environment, `nohup finetune run … &`: the parent may end, nothing was lost."""
    import threading

    from finetune.launch import follow_launcher

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    follow_launcher(0.1)
    assert not any(t.name == "finetune-follow-launcher" for t in threading.enumerate())


def test_the_recipe_can_name_its_nodes(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    """PRODUCT.md's `distributed: {nnodes: 1}` was an unknown key. Where no flag or scheduler counts the nodes, more
    than 1 needs each node's rank and the first node's address, named as for --nnodes."""
    from helpers import invoke

    for name in ("SLURM_JOB_ID", "SLURM_NNODES", "SKYPILOT_NUM_NODES", "PBS_JOBID"):
        monkeypatch.delenv(name, raising=False)
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["distributed"] = {"nnodes": 1}
    assert invoke("validate", write_recipe(recipe)).exit_code == 0
    recipe["distributed"] = {"nnodes": 2}
    refused = invoke("run", write_recipe(recipe), "--dry-run", "--no-estimate")
    assert refused.exit_code == 2 and "--node-rank: a run on several nodes" in refused.output, refused.output
    recipe["sweep"] = {"trials": 1, "params": {"lora.r": [2]}}
    swept = invoke("validate", write_recipe(recipe))
    assert swept.exit_code == 2 and "distributed.nnodes: 2: a sweep runs each trial on this one machine" in swept.output


def test_launched_processes_record_the_command_the_user_typed(monkeypatch):
    """manifest.json of a `--num-processes 2` run said `/path/finetune/__main__.py run ...`: each process's own
    argv, without the --num-processes that started it. The launcher hands its command line down."""
    import accelerate.commands.launch as accelerate_launch

    from finetune import launch
    from finetune.outputs.lock import COMMAND_ENV, command_line
    from finetune.outputs.manifest import build_manifest
    from finetune.recipe.schema import Recipe

    monkeypatch.setenv(COMMAND_ENV, "")  # recorded as it was (unset), so what relaunch sets is undone after
    monkeypatch.delenv(COMMAND_ENV)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/finetune", "run", "r.yaml", "--num-processes", "2"])
    handed: list[str | None] = []
    monkeypatch.setattr(
        accelerate_launch, "launch_command", lambda args: handed.append(launch.os.environ.get(COMMAND_ENV))
    )
    assert launch.relaunch(Topology(per_node=2), ["run", "r.yaml"]) == 0
    assert handed == ["finetune run r.yaml --num-processes 2"]
    assert COMMAND_ENV not in launch.os.environ  # for the launched processes only, not this one's next command
    monkeypatch.setenv(COMMAND_ENV, handed[0])  # as a launched process finds it
    monkeypatch.setattr(sys, "argv", ["/repo/finetune/__main__.py", "run", "r.yaml"])
    assert command_line() == "finetune run r.yaml --num-processes 2"
    recipe = Recipe.model_validate(
        {"task": "classification", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    )
    assert build_manifest(recipe, {}, None)["command"] == "finetune run r.yaml --num-processes 2"
    monkeypatch.delenv(COMMAND_ENV)
    assert command_line() == "finetune run r.yaml"
