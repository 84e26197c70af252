"""Credentials never reach the run directory, checkpoints, logs or error messages."""

import sys

from conftest import classification_recipe
from typer.testing import CliRunner

from finetune.cli import app
from finetune.secrets import REDACTED, redact, redact_tree

SECRET = "hf_" + "Zq8" * 12


def test_redact_environment_values_token_shapes_and_url_passwords(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "plain-looking-value-42")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")  # not a secret name
    text = f"key plain-looking-value-42, {SECRET}, https://me:pa55word@example.org/x, falsefalse"
    assert redact(text) == f"key {REDACTED}, {REDACTED}, https://me:{REDACTED}@example.org/x, falsefalse"
    tree = {"token": "abc", "tokens_per_s": 12.5, "nested": [{"api_key": "k", "note": SECRET}]}
    assert redact_tree(tree) == {
        "token": REDACTED,
        "tokens_per_s": 12.5,
        "nested": [{"api_key": REDACTED, "note": REDACTED}],
    }


def test_no_file_a_run_writes_holds_a_secret(monkeypatch, tiny_models, topic_data, write_recipe, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    # A value with no token shape: only the variable's name (*_API_KEY) says it is a secret.
    shapeless = "plainvalue9137"
    monkeypatch.setenv("ACME_API_KEY", shapeless)
    out = tmp_path / "run"
    # The secrets reach the recipe (as a revision, ignored for a local model) and the command line.
    recipe = classification_recipe(tiny_models["bert"], topic_data, out, checkpoint_every=5)
    recipe["model"]["revision"] = SECRET
    path = write_recipe(recipe)
    override = f"model.revision={SECRET}/{shapeless}"
    monkeypatch.setattr(sys, "argv", ["finetune", "run", str(path), override])
    result = CliRunner().invoke(app, ["run", str(path), override])
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "progress.json" for p in written)
    for file in written:
        assert SECRET.encode() not in file.read_bytes(), file
        assert shapeless.encode() not in file.read_bytes(), file
    assert f"revision: {REDACTED}/{REDACTED}" in (out / "recipe.yaml").read_text()


def test_an_error_message_is_redacted(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-xyz")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "task: classification\nmodel: {name_or_path: ./s3cr3t-value-xyz}\ndata: {train: a.jsonl, eval_split: 0.1}\n"
    )
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2  # the model directory is missing: a recipe problem (the data file too)
    assert "s3cr3t-value-xyz" not in result.output and REDACTED in result.output


def test_log_records_are_redacted_and_still_emitted(monkeypatch, caplog):
    import logging

    from finetune.secrets import RedactingFilter

    monkeypatch.setenv("SERVICE_API_KEY", "plainvalue123")
    logger = logging.getLogger("finetune.test-redaction")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("calling with %s", "plainvalue123")
    assert [r.getMessage() for r in caplog.records] == ["calling with <redacted>"]
