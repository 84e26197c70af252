"""Never lose a run: atomic checkpoints, exact resume after kill -9, signals, divergence, safe loading.

Faults are injected from outside the product: a helper process patches one
function so that it kills itself with SIGKILL at a chosen moment.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import classification_recipe
from helpers import invoke

# Subprocesses, signals and kill -9: `make test` runs these, the fast loop (`-m "not slow"`) does not.
pytestmark = pytest.mark.slow

# Runs `finetune ARGS` and SIGKILLs itself: at the N-th optimizer step, after the
# forward and backward passes and before the update ("step"), or while writing
# the checkpoint of step N, after its tensors and before the rest ("checkpoint").
KILLER = r"""
import os, signal, sys
import finetune.training.checkpoint as checkpoint
import finetune.training.loop as train

where, at = sys.argv[1], int(sys.argv[2])
if where == "step":
    original, calls = train.NonFiniteGuard.check, [0]
    def check(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    train.NonFiniteGuard.check = check
else:
    original_write = checkpoint._write_json
    def write_json(path, data):
        if path.name == "optimizer.json" and f"step-{at:08d}" in path.parent.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, data)
    checkpoint._write_json = write_json
from finetune.cli import main
sys.argv = ["finetune", *sys.argv[3:]]
main()
"""


def killed_run(where: str, at: int, recipe) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLER, where, str(at), "run", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def adapter_bytes(run_dir) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def log_losses(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [(entry["step"], entry["loss"]) for entry in map(json.loads, lines)]


def steps_on_disk(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture()
def pair(tiny_models, topic_data, write_recipe, tmp_path):
    """(recipe of an uninterrupted run, its run dir, recipe of the run to interrupt, its run dir).

    Tiny GPT-2 with dropout on, gradient accumulation over 2 batches, 2 epochs
    of 8 steps each (15 batches), a checkpoint every 3 steps and at each epoch end.
    """
    settings = dict(checkpoint_every=3, keep_checkpoints=2, grad_accum=2, log_every=1)
    model = tiny_models["gpt2"]
    whole = write_recipe(classification_recipe(model, topic_data, tmp_path / "whole", **settings), "whole.yaml")
    broken = write_recipe(classification_recipe(model, topic_data, tmp_path / "broken", **settings), "broken.yaml")
    assert invoke("run", whole).exit_code == 0
    return whole, tmp_path / "whole", broken, tmp_path / "broken"


@pytest.mark.parametrize(
    "where, at, resumes_from",
    [
        ("step", 11, "step-00000009"),  # in epoch 2, after a mid-epoch checkpoint
        ("step", 2, None),  # before any checkpoint: auto starts over
        ("checkpoint", 6, "step-00000003"),  # the half-written checkpoint 6 is skipped
        ("checkpoint", 3, None),
    ],
)
def test_kill_9_then_resume_auto_gives_the_same_adapter_bytes(pair, where, at, resumes_from):
    whole_recipe, whole, broken_recipe, broken = pair
    killed_run(where, at, broken_recipe)
    if where == "checkpoint":
        assert any(name.startswith(".partial-") for name in steps_on_disk(broken))
    result = invoke("run", broken_recipe, "--resume", "auto")
    assert result.exit_code == 0, result.output
    resumed = json.loads((broken / "metrics.json").read_text())
    resumed_from = resumed["training"]["resumed_from"]
    assert (resumed_from and Path(resumed_from).name) == resumes_from
    assert adapter_bytes(broken) == adapter_bytes(whole)
    assert log_losses(broken) == log_losses(whole)  # the log continues exactly, no repeated or lost steps
    assert resumed["metrics"] == json.loads((whole / "metrics.json").read_text())["metrics"]
    assert not any(name.startswith(".partial-") for name in steps_on_disk(broken))


def test_checkpoints_are_complete_verified_and_pruned(pair):
    _, whole, _, _ = pair
    assert steps_on_disk(whole) == ["step-00000015", "step-00000016"]  # every 3rd and each epoch end, newest two
    state = whole / "checkpoints" / "step-00000015"
    index = json.loads((state / "checkpoint.json").read_text())
    assert {
        "trainable.safetensors",
        "optimizer.safetensors",
        "rng-0.safetensors",
        "progress.json",
        "adapter/adapter_model.safetensors",
    } <= set(index["files"])
    assert not [p for p in state.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # nothing to unpickle
    evaluated = invoke("eval", whole, "--checkpoint", state, "--output", whole.parent / "ckpt-eval", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert "step-00000015" in json.loads(evaluated.output)["evaluated"]


def test_resume_from_the_final_checkpoint_never_applies_lora_twice(pair):
    whole_recipe, whole, _, _ = pair
    before = adapter_bytes(whole)
    result = invoke("run", whole_recipe, "--resume", whole / "checkpoints" / "step-00000016")
    assert result.exit_code == 0, result.output
    assert adapter_bytes(whole) == before
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert not any("base_layer" in name for name in config["target_modules"])


def test_resume_refuses_a_changed_recipe_or_data_unless_forced(pair, topic_data):
    _, _, broken_recipe, broken = pair
    killed_run("step", 11, broken_recipe)
    changed = invoke("run", broken_recipe, "train.lr=0.001", "--resume", "auto")
    assert changed.exit_code == 2
    assert "recipe train.lr: 0.005 in the checkpoint, 0.001 now" in changed.output
    with open(topic_data["train"], "a") as handle:
        handle.write(json.dumps({"text": "one more row", "label": "sports"}) + "\n")
    data_changed = invoke("run", broken_recipe, "--resume", "auto")
    assert data_changed.exit_code == 2 and f"data file {topic_data['train']}" in data_changed.output
    forced = invoke("run", broken_recipe, "--resume", "auto", "--force-resume")
    assert forced.exit_code == 0, forced.output


def test_a_different_process_count_is_named(pair):
    from finetune.errors import RecipeError
    from finetune.training.checkpoint import check_identity

    with pytest.raises(RecipeError) as refused:
        check_identity({"number of processes": 2}, {"number of processes": 1}, force=False)
    assert "number of processes: 2 in the checkpoint, 1 now" in str(refused.value)
    assert check_identity({"number of processes": 2}, {"number of processes": 1}, force=True)
    # A recipe setting a newer finetune leaves free: a checkpoint that names it still resumes.
    assert (
        check_identity({"recipe distributed.num_processes": 1, "recipe train.lr": 0.1}, {"recipe train.lr": 0.1}, False)
        == []
    )


def test_an_older_batch_order_resumes_where_it_drew_the_same_batches():
    """Version 3 of the batch order changed only retrieval's batches (rows sharing a positive kept apart): a
    checkpoint of another task written under version 2 resumes; a retrieval one, or one from an unknown version,
    is refused, naming the order."""
    from finetune.errors import RecipeError
    from finetune.outputs.rundir import BATCH_ORDER, BATCH_ORDER_KEY
    from finetune.training.checkpoint import check_identity

    assert BATCH_ORDER == 3

    def identity(order: int, task: str) -> dict:
        return {BATCH_ORDER_KEY: order, "recipe task": task}

    for task in ("classification", "copywriting", "qa", "codegen", "rerank"):
        assert check_identity(identity(2, task), identity(3, task), force=False) == []
    for saved in (1, 4):
        with pytest.raises(RecipeError):
            check_identity(identity(saved, "classification"), identity(3, "classification"), force=False)
    with pytest.raises(RecipeError) as refused:
        check_identity(identity(2, "retrieval"), identity(3, "retrieval"), force=False)
    assert "order of training batches: 2 in the checkpoint, 3 now" in str(refused.value)


def test_a_truncated_checkpoint_is_named_and_auto_falls_back(pair):
    _, _, broken_recipe, broken = pair
    killed_run("step", 14, broken_recipe)  # checkpoints 9 and 12 on disk
    newest = broken / "checkpoints" / "step-00000012"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    explicit = invoke("run", broken_recipe, "--resume", newest)
    assert explicit.exit_code == 3
    assert "trainable.safetensors: truncated or damaged" in explicit.output and "Traceback" not in explicit.output
    automatic = invoke("run", broken_recipe, "--resume", "auto")
    assert automatic.exit_code == 0, automatic.output
    assert json.loads((broken / "metrics.json").read_text())["training"]["resumed_from"].endswith("step-00000009")


def test_a_pickle_payload_in_a_checkpoint_never_executes(pair, tmp_path):
    import pickle

    _, _, broken_recipe, broken = pair
    killed_run("step", 11, broken_recipe)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = broken / "checkpoints" / "step-00000009"
    for name in ("optimizer.safetensors", "trainable.safetensors"):
        (state / name).write_bytes(pickle.dumps(Payload()))
    (state / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))  # accelerate's name: never read
    # The attacker also rewrites the index so the checksums match.
    index = json.loads((state / "checkpoint.json").read_text())
    from finetune.files import sha256_file

    for name in ("optimizer.safetensors", "trainable.safetensors"):
        index["files"][name] = {"bytes": (state / name).stat().st_size, "sha256": sha256_file(state / name)}
    (state / "checkpoint.json").write_text(json.dumps(index))
    result = invoke("run", broken_recipe, "--resume", state)
    assert result.exit_code == 3, result.output
    assert "not a readable safetensors file" in result.output
    # A pickled adapter is only ever read with weights_only=True (peft), which refuses the payload.
    adapter = state / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    evaluated = invoke("eval", broken, "--checkpoint", state)
    assert evaluated.exit_code != 0
    assert not marker.exists()


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tiny_models, topic_data, write_recipe, tmp_path):
    settings = dict(epochs=12, log_every=1, checkpoint_every=1000)
    whole = write_recipe(
        classification_recipe(tiny_models["bert"], topic_data, tmp_path / "whole", **settings), "w.yaml"
    )
    broken = write_recipe(
        classification_recipe(tiny_models["bert"], topic_data, tmp_path / "broken", **settings), "b.yaml"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(broken)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "broken" / "train_log.jsonl"
    # The handler is installed before the first step, so a logged step proves it is there; no wall-clock
    # guess decides when to signal, and a run that never gets that far fails the test by name.
    deadline = time.time() + 600
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"training never logged a step: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]
    assert "interrupted by SIGTERM at step" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split("interrupted by SIGTERM at step ")[1].split(";")[0])
    assert f"step-{stopped_at:08d}" in steps_on_disk(tmp_path / "broken")
    assert not (tmp_path / "broken" / "metrics.json").exists()
    assert invoke("run", whole).exit_code == 0
    resumed = invoke("run", broken, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert adapter_bytes(tmp_path / "broken") == adapter_bytes(tmp_path / "whole")


class NaNInjection:
    """Makes the loss (or only its gradient) NaN at the N-th forward pass of GPT-2 classification."""

    def __init__(self, monkeypatch, at: int, gradient_only: bool = False):
        import torch
        from transformers.models.gpt2 import modeling_gpt2

        original = modeling_gpt2.GPT2ForSequenceClassification.forward
        calls = [0]

        def forward(model, *args, **kwargs):
            out = original(model, *args, **kwargs)
            if model.training and out.loss is not None:
                calls[0] += 1
                if calls[0] == at:
                    if gradient_only:
                        out.loss.register_hook(lambda grad: grad * torch.nan)
                    else:
                        out.loss = out.loss * torch.nan
            return out

        monkeypatch.setattr(modeling_gpt2.GPT2ForSequenceClassification, "forward", forward)


@pytest.mark.parametrize("gradient_only, what", [(False, "the loss"), (True, "the gradient norm")])
def test_an_injected_nan_stops_with_exit_5_and_keeps_the_last_good_checkpoint(
    gradient_only, what, monkeypatch, tiny_models, topic_data, write_recipe, tmp_path
):
    NaNInjection(monkeypatch, at=7, gradient_only=gradient_only)
    out = tmp_path / "run"
    recipe = classification_recipe(tiny_models["gpt2"], topic_data, out, checkpoint_every=4)
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 5, result.output
    assert f"training diverged at step 7 (in epoch 1): {what} is not finite" in result.output
    assert steps_on_disk(out) == ["step-00000004"]


def test_nonfinite_skip_drops_the_update_and_counts_it(monkeypatch, tiny_models, topic_data, write_recipe, tmp_path):
    NaNInjection(monkeypatch, at=7)
    out = tmp_path / "run"
    recipe = classification_recipe(tiny_models["gpt2"], topic_data, out, nonfinite="skip")
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert training["skipped_nonfinite_steps"] == 1 and training["steps"] == 30


def test_a_learning_rate_that_blows_up_exits_5(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["gpt2"], topic_data, tmp_path / "run", lr=1e6, max_grad_norm=None)
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 5, result.output
    assert "training diverged at step" in result.output


def test_preflight_names_an_unwritable_output_and_a_full_disk(
    monkeypatch, tiny_models, topic_data, write_recipe, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recipe = classification_recipe(tiny_models["bert"], topic_data, blocker / "run")
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 2 and "which is a file, not a directory" in result.output  # before loading anything

    import finetune.outputs.rundir as rundir

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    result = invoke("run", write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")))
    assert result.exit_code == 2 and "1 MiB free; a run starts only with 64 MiB" in " ".join(result.output.split())


def test_a_base_model_replaced_under_its_path_is_named_by_resume_and_eval(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """A local base model rewritten in place (a merged checkpoint replaced with `merge --overwrite`) is not the model
    a run's checkpoints and adapter were trained on: a resume refuses it, naming it, and eval says so."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models["bert"], base)
    out = tmp_path / "run"
    recipe = write_recipe(classification_recipe(base, topic_data, out, epochs=1))
    assert invoke("run", recipe).exit_code == 0
    again = invoke("run", recipe, "--resume", "auto")
    assert again.exit_code == 0 and "nothing to resume" in again.output, again.output
    (base / "config.json").write_text((base / "config.json").read_text().replace("{", '{"replaced": true,', 1))
    refused = invoke("run", recipe, "--resume", "auto")
    assert refused.exit_code == 2 and f"model files {base}" in " ".join(refused.output.split()), refused.output
    evaluated = invoke("eval", out, "--output", tmp_path / "ev")
    assert evaluated.exit_code == 0 and f"the base model {base} is not the one the run trained on" in (
        " ".join(evaluated.output.split())
    ), evaluated.output
