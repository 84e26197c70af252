"""`distributed.strategy: fsdp` on CPU: torch's FSDP2 over two gloo processes trains the adapter ddp trains, saves
it whole (a plain peft adapter), and resumes exactly after both processes are killed."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import classification_recipe
from safetensors.torch import load_file

from finetune.launch import CPU_STRATEGY_FLAGS
from tests.cli.test_distributed import accelerate_launch, isolated_env

# Three launches of two processes each (about 20 s apiece): `make test` runs it, the fast loop does not.
pytestmark = pytest.mark.slow

# Launched by accelerate in each process, with the launcher's own fsdp flags: records the shapes of this process's
# shards of the trained parameters as the loop built them, and SIGKILLs the process at its N-th optimizer step.
DRIVER = r"""
import json, os, signal, sys
import finetune.training.loop as loop
import finetune.training.sharding as sharding

at, out = int(sys.argv[1]), sys.argv[2]
original_init, original_check, calls = sharding.CpuShards.__init__, loop.NonFiniteGuard.check, [0]

def init(self, plain, accelerator):
    original_init(self, plain, accelerator)
    shapes = {n: list(p.to_local().shape) for n, p in self.model.named_parameters() if p.requires_grad}
    released = all(p.is_meta for p in plain.parameters())  # the unsharded weights let go
    with open(os.path.join(out, f"shards-{accelerator.process_index}.json"), "w") as handle:
        json.dump({"shapes": shapes, "released": released}, handle)

def check(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_check(self, *args, **kwargs)

sharding.CpuShards.__init__, loop.NonFiniteGuard.check = init, check
from finetune.cli import main
sys.argv = ["finetune", *sys.argv[3:]]
main()
"""


def losses(run) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]


def test_fsdp_on_cpu_trains_the_ddp_adapter_and_resumes_exactly(tiny_models, topic_data, write_recipe, tmp_path):
    # Dropout on, 2 batches accumulated, clipping, evaluation during training: every consumer of the sharded model.
    settings = dict(epochs=2, grad_accum=2, checkpoint_every=3, log_every=1, max_grad_norm=0.5)

    def recipe(name: str, strategy: str):
        values = classification_recipe(tiny_models["gpt2"], topic_data, tmp_path / name, **settings)
        values["distributed"] = {"strategy": strategy, "num_processes": 2}
        values["eval"] = {"every": 4}
        return write_recipe(values, f"{name}.yaml")

    env = isolated_env(tmp_path)

    def finetune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "finetune", *args], env=env, capture_output=True, text=True, timeout=300
        )

    ddp = finetune("run", str(recipe("ddp", "ddp")))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp_recipe = recipe("fsdp", "fsdp")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def launched(at: int, *args: str) -> subprocess.CompletedProcess:
        """The recipe through accelerate's launcher as `finetune run` starts it, each process recording its shards
        and killed in its `at`-th optimizer step."""
        return subprocess.run(
            [
                # what `finetune run` gives accelerate's launcher for fsdp on CPU
                *accelerate_launch(*CPU_STRATEGY_FLAGS["fsdp"]),
                str(driver),
                str(at),
                str(tmp_path),
                "run",
                str(fsdp_recipe),
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = launched(7)  # both processes killed in step 7, after the checkpoint of step 6
    assert killed.returncode != 0, killed.stderr[-3000:]
    fsdp = tmp_path / "fsdp"
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]

    # Each process held half of every trained matrix (FSDP2 shards dim 0), not a replica, and no unsharded copy.
    whole = load_file(fsdp / "checkpoints" / "step-00000006" / "trainable.safetensors")
    for rank in (0, 1):
        recorded = json.loads((tmp_path / f"shards-{rank}.json").read_text())
        shards = recorded["shapes"]
        assert recorded["released"] and set(shards) == set(whole)
        for name, shape in shards.items():
            rows = whole[name].shape[0]
            expected = min(math.ceil(rows / 2), rows - rank * math.ceil(rows / 2))
            assert shape == [expected, *whole[name].shape[1:]], (name, shape, rank)

    for rank in (0, 1):
        (tmp_path / f"shards-{rank}.json").unlink()
    resumed = launched(10**6, "--resume", "auto")  # never killed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all((tmp_path / f"shards-{rank}.json").exists() for rank in (0, 1))  # the resumed run trained sharded
    assert f"resuming from {fsdp / 'checkpoints' / 'step-00000006'}" in resumed.stdout.replace("\n", "")

    # The same adapter, tensor by tensor (only the order of float additions differs), in the plain peft layout.
    a = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert b[name].shape == a[name].shape
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    # What the training forward wrote into the model's config (a classifier's problem_type) is in the saved base.
    base_config = "adapter/base/config.json"
    assert json.loads((fsdp / base_config).read_text()) == json.loads((tmp_path / "ddp" / base_config).read_text())
    # The same log (the steps before the kill written by the killed run) and the same metrics.
    logged_ddp, logged_fsdp = losses(tmp_path / "ddp"), losses(fsdp)
    assert [s for s, _ in logged_fsdp] == [s for s, _ in logged_ddp] == list(range(1, 9))
    assert [v for _, v in logged_fsdp] == pytest.approx([v for _, v in logged_ddp], rel=1e-5)
    metrics_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    metrics_fsdp = json.loads((fsdp / "metrics.json").read_text())
    assert metrics_fsdp["metrics"]["eval_loss"] == pytest.approx(metrics_ddp["metrics"]["eval_loss"], rel=1e-5)
    assert metrics_fsdp["metrics"]["accuracy"] == metrics_ddp["metrics"]["accuracy"]
    # Evaluation during training (on the gathered weights) saw the same model at the same steps.
    history = [(e["step"], e["metrics"]["eval_loss"]) for e in metrics_fsdp["evaluation"]["history"]]
    expected = [(e["step"], e["metrics"]["eval_loss"]) for e in metrics_ddp["evaluation"]["history"]]
    assert [s for s, _ in history] == [s for s, _ in expected] == [4, 8]
    assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-5)
