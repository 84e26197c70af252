"""GRPO (train.objective grpo): advantages and loss equal TRL's on a fixed batch; rewards are the task's own
scores (ROUGE-L, SQuAD F1, sandboxed tests); end to end through `finetune run`, with exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.recipe.schema import EvalSection, GRPOSection
from finetune.training.objectives import group_advantages, grpo_loss, per_token_logps
from tests.conftest import write_jsonl
from tests.helpers import invoke
from tests.tasks.test_generation import copy_rows

trl = pytest.importorskip("trl")


def _trainer(model_dir, tmp_path, **config):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
    )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=6,
        report_to=[],
        use_cpu=True,
        **config,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a b"}] * 4),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("sampled_earlier", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": "grpo", "beta": 0.1, "epsilon": 0.2, "temperature": 0.7},
        {"loss_type": "bnpo", "beta": 0.0, "epsilon": 0.3, "temperature": 1.0},
        {"loss_type": "dr_grpo", "beta": 0.04, "epsilon": 0.2, "temperature": 1.3},
        {"loss_type": "grpo", "beta": 0.1, "epsilon": 0.2, "temperature": 1.0, "use_bias_correction_kl": False},
    ],
)
def test_grpo_loss_equals_trl(tiny_models, tmp_path, config, sampled_earlier):
    """`sampled_earlier`: num_iterations > 1's later passes, where the completions came from a policy that has
    moved since (ratio != 1, so the clipping acts); else the one pass, old = current."""
    trainer = _trainer(tiny_models["gpt2"], tmp_path, **config)
    model = trainer.model
    model.eval()  # no dropout: both sides score the same network
    # Prompts of one length (TRL left-pads them; finetune scores right-padded rows: the same positions here).
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]]).repeat_interleave(2, 0)
    completions = torch.tensor([[11, 12, 13, 0], [14, 15, 0, 0], [16, 17, 18, 19], [20, 0, 0, 0]])
    completion_mask = (completions != 0).long()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    input_ids = torch.cat([prompts, completions], 1)
    attention_mask = torch.cat([torch.ones_like(prompts), completion_mask], 1)
    labels = torch.cat([torch.full_like(prompts, -100), completions.masked_fill(completion_mask == 0, -100)], 1)
    settings = GRPOSection(
        beta=config["beta"],
        epsilon=config["epsilon"],
        loss_type=config["loss_type"],
        temperature=config["temperature"],
        max_new_tokens=6,
        kl_bias_correction=config.get("use_bias_correction_kl", True),
    )
    width = completions.shape[1]

    def trl_logps():  # TRL's own per-token log-probabilities, one column per completion token
        return trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, width)[0]

    with torch.no_grad():  # the reference: the policy before it moved
        ref = trl_logps()
        ours_ref, ours_mask = per_token_logps(model, input_ids, attention_mask, labels, settings.temperature)
    # finetune's log-probabilities are log_softmax's (TRL's chunked online-softmax kernel agrees to ~1e-4).
    assert torch.allclose(ours_ref[ours_mask], ref[completion_mask.bool()], atol=2e-3)

    def move(seed):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))

    move(2)
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref,
    }
    if sampled_earlier:
        with torch.no_grad():  # the policy that sampled, before a step moved it
            inputs["old_per_token_logps"] = old = trl_logps()
        move(3)
        # And far enough that some tokens' ratios leave 1 +- epsilon either way (the tiny model moves little).
        old += 0.5 * torch.tensor([1.0, -1.0]).repeat(old.numel() // 2).view_as(old)
    logps = trl_logps()
    ours, stats = grpo_loss(
        logps, old if sampled_earlier else logps.detach(), ref, advantages, completion_mask, settings
    )
    expected = trainer._compute_loss(model, inputs)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    trl_clip = trainer._metrics["eval"]["clip_ratio/region_mean"][-1]  # eval: the model is in eval mode
    assert stats["clip_fraction"] == pytest.approx(trl_clip, abs=1e-6)
    assert (stats["clip_fraction"] > 0) == sampled_earlier  # ratio 1 never clips; this step's ratio does


def test_group_advantages_equal_trl():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 1.0, 0.0, 0.0])
    for scale in (True, False):
        ours, flat = group_advantages(rewards, 4, scale)
        # TRL's GRPOTrainer (sum_then_normalize, scale_rewards "group" or "none"), line for line.
        mean = torch.nanmean(rewards.view(-1, 4), dim=1).repeat_interleave(4)
        std = nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
        expected = rewards - mean
        if scale:
            expected = expected / (std + 1e-4)
        assert torch.allclose(ours, expected, atol=1e-6)
    _, flat = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, True)
    assert flat.tolist() == [True, True, False, False]  # a group whose rewards are equal teaches nothing


def test_rewards_are_the_task_scores():
    from finetune.tasks import get_task

    copy = get_task("copywriting").rewards(
        [{"completion": "warm light without glare", "prediction": "warm light without glare"}], EvalSection()
    )
    assert copy.values == [pytest.approx(1.0)]
    qa = get_task("qa", "generative").rewards([{"answer": "Paris", "prediction": " paris "}], EvalSection())
    assert qa.values == [pytest.approx(1.0)]


# --------------------------------------------------------------------------- end to end


def _recipe(model_dir, tmp_path, **train) -> dict:
    rows = copy_rows(40)
    return {
        "task": "copywriting",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(write_jsonl(tmp_path / "data" / "train.jsonl", rows[:32])),
            "eval": str(write_jsonl(tmp_path / "data" / "eval.jsonl", rows[32:])),
            "max_length": 32,
        },
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {
            "objective": "grpo",
            "grpo": {"group_size": 4, "max_new_tokens": 6},
            "epochs": 1,
            "batch_size": 4,
            "lr": 5e-3,
            "seed": 0,
            "precision": "fp32",
            "log_every": 1,
            "checkpoint_every": 2,
            **train,
        },
        "eval": {"max_new_tokens": 6},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_grpo_run_end_to_end_logs_rewards(tiny_models, tmp_path, write_recipe):
    result = invoke("run", str(write_recipe(_recipe(tiny_models["gpt2"], tmp_path))))
    assert result.exit_code == 0, result.output
    assert "grpo" in result.output  # the plan names the objective
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8
    for entry in log:
        assert {"reward_mean", "reward_std", "no_signal_groups", "kl", "clip_fraction", "completion_length"} <= set(
            entry
        )
        assert 0 <= entry["reward_mean"] <= 1 and 0 <= entry["no_signal_groups"] <= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert "rougeL" in metrics
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")


def test_stopped_grpo_run_resumes_to_the_same_adapter_and_rewards(tiny_models, tmp_path, write_recipe, monkeypatch):
    """The sampling random state is checkpointed: a resumed run samples, rewards and trains exactly as one that
    never stopped."""
    from tests.training.test_resume import adapter_bytes
    from tests.training.test_resume_in_process import stop_at_step

    recipe = _recipe(tiny_models["gpt2"], tmp_path)
    assert invoke("run", str(write_recipe(recipe, "whole.yaml"))).exit_code == 0
    recipe["output"]["dir"] = str(tmp_path / "stopped")
    stopped = write_recipe(recipe, "stopped.yaml")
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert invoke("run", str(stopped)).exit_code == 75
    assert invoke("run", str(stopped), "--resume", "auto").exit_code == 0
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / "run")

    def rewards(run):
        lines = (run / "train_log.jsonl").read_text().splitlines()
        return [(e["step"], e["reward_mean"], e["loss"]) for e in map(json.loads, lines)]

    assert rewards(tmp_path / "stopped") == rewards(tmp_path / "run")


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_num_iterations_trains_each_sampled_batch_again_and_resumes_inside_it(
    tiny_models, tmp_path, write_recipe, monkeypatch
):
    """num_iterations 2: each of the 8 batches is sampled once and trained on by two steps (16), the second
    against the first's sampling policy; a run stopped between the two passes carries the rollout in its
    checkpoint and resumes to the same adapter bytes and log."""
    from tests.training.test_resume import adapter_bytes
    from tests.training.test_resume_in_process import stop_at_step

    recipe = _recipe(tiny_models["gpt2"], tmp_path, grpo={"group_size": 4, "max_new_tokens": 6, "num_iterations": 2})
    result = invoke("run", str(write_recipe(recipe, "whole.yaml")))
    assert result.exit_code == 0, result.output
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == list(range(1, 17))
    for first, second in zip(log[::2], log[1::2], strict=True):
        # The same sampled batch (its rewards and lengths), trained on again after a step moved the policy.
        assert first["reward_mean"] == second["reward_mean"]
        assert first["completion_length"] == second["completion_length"]
        assert first["loss"] != second["loss"]
    assert len({e["reward_mean"] for e in log[::2]}) > 1  # new samples each batch
    # A first pass trains against the policy that just sampled: ratio 1 everywhere, so nothing is clipped.
    assert all(e["clip_fraction"] == 0 for e in log[::2])

    recipe["output"]["dir"] = str(tmp_path / "stopped")
    stopped = write_recipe(recipe, "stopped.yaml")
    with monkeypatch.context() as patch:
        stop_at_step(patch, 5)  # after the first of batch 3's two passes
        assert invoke("run", str(stopped)).exit_code == 75
    checkpoints = sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))
    assert (checkpoints[-1] / "objective-0.safetensors").is_file()
    assert invoke("run", str(stopped), "--resume", "auto").exit_code == 0
    assert adapter_bytes(tmp_path / "stopped") == adapter_bytes(tmp_path / "run")
    assert [(e["loss"], e["reward_mean"]) for e in _log(tmp_path / "stopped")] == [
        (e["loss"], e["reward_mean"]) for e in log
    ]

    # The time estimate runs steps of the run's own batches first: no rollout of its may reach the run.
    recipe["output"]["dir"] = str(tmp_path / "estimated")
    result = invoke("run", str(write_recipe(recipe, "estimated.yaml")), "--estimate")
    assert result.exit_code == 0, result.output
    assert "num_iterations 2" in result.output  # the estimate says how it priced the repeated steps
    assert adapter_bytes(tmp_path / "estimated") == adapter_bytes(tmp_path / "run")


def test_num_iterations_needs_one_batch_a_step(tiny_models, tmp_path, write_recipe):
    recipe = _recipe(tiny_models["gpt2"], tmp_path, grad_accum=2, grpo={"num_iterations": 2})
    result = invoke("validate", str(write_recipe(recipe)))
    assert result.exit_code == 2, result.output
    assert "num_iterations" in result.output and "grad_accum" in result.output


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"task": "classification"}, "train.objective"),
        ({"task": "codegen"}, "eval.execute_code"),
    ],
)
def test_grpo_refusals(tiny_models, tmp_path, write_recipe, change, words):
    recipe = _recipe(tiny_models["gpt2"], tmp_path) | change
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_grpo_is_refused_on_bart(tiny_models, tmp_path, write_recipe):
    result = invoke("run", str(write_recipe(_recipe(tiny_models["bart"], tmp_path))), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "GPT-style" in result.output


# --------------------------------------------------------------------------- reward terms and the user's function


def _rewarder(reward: dict, **evaluation):
    from finetune.recipe.schema import RewardSection
    from finetune.tasks import get_task
    from finetune.tasks.rewards import Rewarder

    return Rewarder(get_task("copywriting"), RewardSection(**reward), EvalSection(**evaluation))


def test_reward_terms_are_weighted_and_summed():
    rows = [
        {"completion": "warm light", "prediction": "warm light"},
        {"completion": "warm light", "prediction": "```python\ncold"},
    ]
    rewarder = _rewarder({"task": 0.5, "length_target": 4, "length_weight": 0.2, "pattern": "```python"})
    values = rewarder(rows, [4, 8]).values
    # row 1: ROUGE-L 1.0 * 0.5 + length exactly on target 1.0 * 0.2 + no pattern
    # row 2: ROUGE-L 0 + length 8 vs 4 -> max(0, 1 - 4/4) = 0 + pattern 1 * 0.1
    assert values == [pytest.approx(0.7), pytest.approx(0.1)]


@pytest.mark.skipif(__import__("shutil").which("bwrap") is None, reason="the strict sandbox needs bubblewrap")
def test_user_reward_function_runs_in_the_sandbox_with_trl_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "import os\n"
        "def score(prompts, completions, completion, **kwargs):\n"
        "    # inside the sandbox: no environment of the caller, and the reference rows arrive as keyword lists\n"
        "    assert 'FINETUNE_ALLOW_CODE_EXECUTION' not in os.environ\n"
        "    return [float(len(c) == len(r)) for c, r in zip(completions, completion)]\n"
    )
    rows = [
        {"prompt": "p", "completion": "abcd", "prediction": "wxyz"},
        {"prompt": "q", "completion": "abcd", "prediction": "w"},
    ]
    rewarder = _rewarder({"task": 0.0, "function": f"{module}:score"}, execute_code=True)
    result = rewarder(rows, [1, 1])
    assert result.values == [1.0, 0.0] and result.reasons == {}
    hostile = tmp_path / "hostile.py"
    hostile.write_text("def score(**kwargs):\n    open('/etc/owned', 'w').write('x')\n    return [1.0] * 2\n")
    rewarder = _rewarder({"task": 0.0, "function": f"{hostile}:score"}, execute_code=True)
    result = rewarder(rows, [1, 1])
    assert result.values == [0.0, 0.0] and sum(result.reasons.values()) == 2  # refused writes: 0, counted
    assert not __import__("os").path.exists("/etc/owned")
    # Its printing is its own: a print without a newline, or megabytes of it, zeroed the batch's rewards (blamed on
    # the result), as the result shared standard output with it.
    for prints in ("print('scoring', end='')", "print('x' * 3_000_000)", "os.write(1, b'raw, no newline')"):
        chatty = tmp_path / "chatty.py"
        chatty.write_text(
            f"import os\ndef score(completions, **kwargs):\n    {prints}\n    return [0.5] * len(completions)\n"
        )
        rewarder = _rewarder({"task": 0.0, "function": f"{chatty}:score"}, execute_code=True)
        result = rewarder(rows, [1, 1])
        assert result.values == [0.5, 0.5] and result.reasons == {}, prints
    # A Fraction and a bool are numbers, as TRL takes them (only an int or a float was: others scored 0 as "not a
    # number").
    typed = tmp_path / "typed.py"
    typed.write_text(
        "from fractions import Fraction\ndef score(completions, **kwargs):\n    return [Fraction(1, 4), True]\n"
    )
    result = _rewarder({"task": 0.0, "function": f"{typed}:score"}, execute_code=True)(rows, [1, 1])
    assert result.values == [0.25, 1.0] and result.reasons == {}


@pytest.mark.skipif(__import__("shutil").which("bwrap") is None, reason="the strict sandbox needs bubblewrap")
def test_a_qa_reward_function_gets_the_prompt_the_model_was_given(tmp_path, monkeypatch):
    """Generative qa rows hold a question, not a prompt: the function got an internal error (KeyError 'prompt')."""
    from finetune.recipe.schema import RewardSection
    from finetune.tasks import get_task
    from finetune.tasks.rewards import Rewarder

    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    module = tmp_path / "qa_rewards.py"
    module.write_text("def score(prompts, completions, **kwargs):\n    return [float(len(p)) for p in prompts]\n")
    task = get_task("qa", "generative")
    rewarder = Rewarder(task, RewardSection(task=0.0, function=f"{module}:score"), EvalSection(execute_code=True))
    rows = [{"question": "Where?", "answer": "here", "prediction": "here"}]
    assert rewarder(rows, [1]).values == [float(len("Question: Where?\nAnswer:"))]


@pytest.mark.skipif(__import__("shutil").which("bwrap") is None, reason="the strict sandbox needs bubblewrap")
def test_a_failing_or_overflowing_function_is_said_once_and_scores_0(tmp_path, monkeypatch, caplog):
    """A value float32 cannot hold ended the run as 'diverged'; a function failing on every call trained on nothing
    without a word on the console."""
    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    module = tmp_path / "edge.py"
    module.write_text(
        "def huge(prompts, completions, **kwargs):\n    return [1e39, 0.5]\n"
        "def boom(prompts, completions, **kwargs):\n    raise RuntimeError('my bug')\n"
    )
    rows = [
        {"prompt": "p", "completion": "c", "prediction": "x"},
        {"prompt": "q", "completion": "c", "prediction": "y"},
    ]
    result = _rewarder({"task": 0.0, "function": f"{module}:huge"}, execute_code=True)(rows, [1, 1])
    assert result.values == [0.0, 0.5] and result.reasons == {"function_out_of_range": 1}
    rewarder = _rewarder({"task": 0.0, "function": f"{module}:boom"}, execute_code=True)
    with caplog.at_level("WARNING", logger="finetune.tasks.rewards"):
        for _ in range(2):
            assert rewarder(rows, [1, 1]).values == [0.0, 0.0]
    said = [r.getMessage() for r in caplog.records if "my bug" in r.getMessage()]
    assert len(said) == 1 and "its term is 0" in said[0]


def test_the_plan_names_every_reward_term():
    from finetune.flows.plan import reward_terms
    from finetune.recipe.schema import RewardSection

    assert reward_terms(RewardSection()) == "1 x the task's own score"
    terms = reward_terms(RewardSection(task=0.5, length_target=40, pattern="```", function="r.py:f"))
    assert (
        terms
        == "0.5 x the task's own score + 0.1 x closeness to 40 tokens + 0.1 x matching '```' + 1 x r.py:f (in the sandbox)"
    )


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("missing_module_xyz:score", "cannot find module"),
        ("{dir}/rewards.py:nothing", "defines no function 'nothing'"),
        ("{dir}/broken.py:score", "not valid Python"),
        (
            "{dir}/rewards.py:json",
            "a module imported there, not a function",
        ),  # `import json` there: a module, never callable
        (
            "{dir}/rewards.py:weight",
            "a value assigned there (a number, text or collection), not a function",
        ),  # trained on reward 0
        ("{dir}/rewards.py:terms", "a value assigned there (a number, text or collection), not a function"),
    ],
)
def test_reward_function_that_cannot_load_is_refused_before_training(
    tiny_models, tmp_path, write_recipe, function, words
):
    (tmp_path / "rewards.py").write_text(
        "import json\n\nweight = 5\nterms = [1, 2]\n\n\ndef score(**kwargs):\n    return []\n"
    )
    (tmp_path / "broken.py").write_text("def score(:\n")
    recipe = _recipe(tiny_models["gpt2"], tmp_path)
    recipe["train"]["grpo"]["reward"] = {"function": function.format(dir=tmp_path)}
    recipe["eval"]["execute_code"] = True
    result = invoke("validate", str(write_recipe(recipe)))
    assert result.exit_code == 2, result.output
    assert "train.grpo.reward.function" in result.output and words in result.output


def test_reward_function_needs_the_code_opt_in(tiny_models, tmp_path, write_recipe):
    (tmp_path / "rewards.py").write_text("def score(**kwargs):\n    return []\n")
    recipe = _recipe(tiny_models["gpt2"], tmp_path)
    recipe["train"]["grpo"]["reward"] = {"function": f"{tmp_path}/rewards.py:score"}
    result = invoke("run", str(write_recipe(recipe)), "--dry-run")
    assert result.exit_code == 2 and "eval.execute_code" in result.output, result.output


def test_the_environment_opt_in_is_checked_before_the_run_directory_is_made(
    tiny_models, tmp_path, write_recipe, monkeypatch
):
    """Without FINETUNE_ALLOW_CODE_EXECUTION the run was refused after it had written its directory (labelled
    'codegen:' on a copywriting recipe), and the retry with the variable set was refused as an unfinished run."""
    monkeypatch.delenv("FINETUNE_ALLOW_CODE_EXECUTION", raising=False)
    (tmp_path / "rewards.py").write_text("def score(**kwargs):\n    return []\n")
    recipe = _recipe(tiny_models["gpt2"], tmp_path)
    recipe["train"]["grpo"]["reward"] = {"function": f"{tmp_path}/rewards.py:score"}
    recipe["eval"]["execute_code"] = True
    result = invoke("run", str(write_recipe(recipe)), "--no-estimate")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("error: train.grpo.reward.function: your reward function runs in the code sandbox")
    assert "FINETUNE_ALLOW_CODE_EXECUTION=1" in said and not Path(recipe["output"]["dir"]).exists()
    # The sandbox itself, the other precondition, likewise before anything is written.
    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    monkeypatch.setattr("finetune.tasks.sandbox.bubblewrap", lambda: None)
    result = invoke("run", str(write_recipe(recipe)), "--no-estimate")
    assert result.exit_code == 2 and "bubblewrap" in result.output, result.output
    assert not Path(recipe["output"]["dir"]).exists()


def test_codegen_problems_whose_reference_fails_its_tests_are_named(monkeypatch):
    """A GRPO codegen problem whose own reference solution fails its tests (here: a test without `check`) trained at
    reward 0 at every step with nothing said; its task id is named in the data report now."""
    import json
    from pathlib import Path

    from datasets import Dataset

    from finetune.recipe.schema import build_recipe
    from finetune.tasks.codegen import CodegenTask

    monkeypatch.setenv("FINETUNE_ALLOW_CODE_EXECUTION", "1")
    source = Path(__file__).resolve().parents[2] / "data" / "code_rl" / "train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:3]]
    raw = {
        "task": "codegen",
        "model": {"name_or_path": "x"},
        "data": {"train": "t", "eval": "e"},
        "train": {"objective": "grpo"},
        "eval": {"execute_code": True, "sandbox": "basic"},
    }
    recipe = build_recipe(raw)
    assert CodegenTask().unreachable_rewards(Dataset.from_list(rows), recipe) == []
    rows[1]["test"] = "def other():\n    assert True\n"
    notes = CodegenTask().unreachable_rewards(Dataset.from_list(rows), recipe)
    assert len(notes) == 1 and notes[0].startswith("1 of 3 training problems' reference completions fail their own")
    assert rows[1]["task_id"] in notes[0]
