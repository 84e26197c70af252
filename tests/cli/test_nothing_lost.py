"""Nothing a user or an earlier run made is lost without consent: run, eval, merge and predict."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import classification_recipe, write_jsonl
from helpers import invoke


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` and its sha256: what must stay byte-for-byte intact."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def finished_run(tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, out, epochs=1))
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    return recipe, out


def test_a_second_run_into_a_run_is_refused_and_overwrite_replaces_it(finished_run, tmp_path):
    recipe, out = finished_run
    before = snapshot(out)
    again = invoke("run", recipe)
    assert again.exit_code == 2
    assert "already holds a finished run" in again.output and "--resume auto" in again.output
    assert "--overwrite" in again.output and snapshot(out) == before
    dry = invoke("run", recipe, "--dry-run")
    assert dry.exit_code == 2 and snapshot(out) == before
    (out / "notes.txt").write_text("mine")  # the user's own file inside the run: --overwrite replaces only the run's
    # adapter/'s listing of what finetune wrote, edited (or copied from elsewhere) to name files outside adapter/:
    # each was removed by --overwrite, an absolute path too.
    outside = tmp_path / "victim.txt"
    outside.write_text("mine")
    with (out / "adapter" / ".finetune-files").open("a") as listing:
        listing.write(f"../notes.txt\n../../victim.txt\n{outside}\n")
    replaced = invoke("run", recipe, "--overwrite", "train.seed=5")
    assert replaced.exit_code == 0, replaced.output
    assert outside.read_text() == "mine"
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").is_file()
    assert "seed: 5" in (out / "recipe.yaml").read_text()


def test_resume_auto_on_a_finished_run_says_so(finished_run):
    recipe, out = finished_run
    before = snapshot(out)
    result = invoke("run", recipe, "--resume", "auto")
    assert result.exit_code == 0 and "is a finished run; nothing to resume" in result.output
    assert snapshot(out) == before
    empty = invoke("run", recipe, "--resume", "")
    assert empty.exit_code == 2 and "--resume: give 'auto' or a checkpoint path" in empty.output
    # Its metrics are judged by this recipe's gates (a CI caching runs/ reported the gates it trained with), and a
    # changed recipe is refused as any resume is (it returned the old metrics, exit 0).
    gated = invoke("run", recipe, "--resume", "auto", 'eval.gates={accuracy: ">=0.9999"}')
    assert gated.exit_code == 4 and "accuracy>=0.9999" in gated.output, gated.output
    changed = invoke("run", recipe, "--resume", "auto", "train.lr=0.1")
    assert changed.exit_code == 2 and "train.lr" in changed.output, changed.output
    assert snapshot(out) == before
    # Without checkpoints (removed to save space, or never kept) the adapter's recorded identity is compared: any
    # recipe passed, exit 0, on the old metrics.
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert invoke("run", recipe, "--resume", "auto").exit_code == 0
    changed = invoke("run", recipe, "--resume", "auto", "train.lr=0.1")
    assert changed.exit_code == 2 and "train.lr" in changed.output, changed.output
    assert snapshot(out) == before
    # A damaged metrics.json: named, not an internal error.
    for damaged in ('{"schema": 1, "metrics": ', "[1, 2]"):
        (out / "metrics.json").write_text(damaged)
        result = invoke("run", recipe, "--resume", "auto")
        assert result.exit_code == 2 and "metrics.json: damaged" in " ".join(result.output.split()), result.output


def test_a_forced_resume_that_cannot_load_removes_nothing(finished_run):
    """--force-resume past a changed LoRA layout was refused only after the run's adapter, metrics and card were
    removed and its recipe.yaml replaced."""
    recipe, out = finished_run
    before = snapshot(out)
    step = sorted((out / "checkpoints").iterdir())[-1]
    result = invoke("run", recipe, "--resume", step, "--force-resume", "lora.r=2", "lora.alpha=4")
    assert result.exit_code == 2 and "has shape (4, 16), the model (2, 16)" in result.output, result.output
    assert snapshot(out) == before


def test_a_forced_resume_of_a_finished_run_gating_what_it_never_reported_is_a_recipe_error(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """A finished run reporting accuracy alone, resumed by force with a recipe gating macro_f1: the gate "failed"
    (exit 4, a quality verdict on a metric the run never computed); it is this recipe's error (exit 2)."""
    run = tmp_path / "run"
    recipe = classification_recipe(tiny_models["bert"], topic_data, run, epochs=1)
    recipe["eval"] = {"metrics": ["accuracy"]}
    path = write_recipe(recipe)
    assert invoke("run", path).exit_code == 0
    before = snapshot(run)
    forced = invoke(
        "run",
        path,
        "--resume",
        "auto",
        "--force-resume",
        "eval.metrics=[accuracy,macro_f1]",
        'eval.gates.macro_f1=">=0.1"',
    )
    assert forced.exit_code == 2, forced.output
    assert "reports no macro_f1 (it reports accuracy)" in " ".join(forced.output.split()), forced.output
    assert snapshot(run) == before


def test_a_checkpoint_the_disk_had_no_room_for_leaves_nothing_half_written(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    """A full disk while a checkpoint was written left its `.partial-step-N` (13 MB in the tester's run) though the
    error said nothing half-written was left, and its bytes then counted against the space `--resume auto` needs."""
    from finetune.training import checkpoint

    run = tmp_path / "run"
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, run, epochs=1, checkpoint_every=5))
    written = checkpoint._save_tensors

    def full_at_the_second(tensors, path):
        if "step-00000010" in str(path) and path.name == "optimizer.safetensors":
            raise OSError(28, "No space left on device", str(path))
        written(tensors, path)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_save_tensors", full_at_the_second)
        stopped = invoke("run", recipe)
    assert stopped.exit_code == 2 and "Nothing half-written was left" in " ".join(stopped.output.split())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005"], stopped.output
    # A write stopped by kill -9 (nothing could remove it then) is removed by the resume that trains its step again.
    planted = run / "checkpoints" / ".partial-step-00000010"
    planted.mkdir()
    (planted / "trainable.safetensors").write_bytes(b"x" * 1000)
    resumed = invoke("run", recipe, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert not any(p.name.startswith(".partial-") for p in (run / "checkpoints").iterdir())


def test_a_users_folder_is_never_written_into(tiny_models, topic_data, write_recipe, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "recipe.yaml").write_text("my recipe")
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, folder))
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        result = invoke("run", recipe, *extra)
        assert result.exit_code == 2 and "holds no finetune run" in result.output
    assert snapshot(folder) == {
        "README.md": hashlib.sha256(b"my notes").hexdigest(),
        "recipe.yaml": hashlib.sha256(b"my recipe").hexdigest(),
    }


def test_a_run_that_fails_before_training_leaves_no_directory(tiny_models, topic_data, write_recipe, tmp_path):
    out = tmp_path / "new-run"
    recipe = classification_recipe(tiny_models["bert"], topic_data, out)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])  # no label column: found while reading the data
    recipe["data"]["train"] = str(bad)
    result = invoke("run", write_recipe(recipe))
    assert result.exit_code == 3 and not out.exists()


def test_eval_keeps_the_runs_results_and_says_where_its_own_went(finished_run, tmp_path):
    recipe, out = finished_run
    before = snapshot(out)
    first = invoke("eval", out)
    assert first.exit_code == 0, first.output
    second = invoke("eval", out, "--checkpoint", next((out / "checkpoints").iterdir()))
    assert second.exit_code == 0, second.output
    evals = sorted((out / "evals").iterdir())
    assert len(evals) == 2 and all((e / "metrics.json").is_file() for e in evals)
    assert str(evals[0]) in first.output.replace("\n", "") or str(evals[1]) in first.output.replace("\n", "")
    after = {k: v for k, v in snapshot(out).items() if not k.startswith("evals/")}
    assert after == before  # metrics.json, predictions.jsonl, adapter: untouched
    metrics = json.loads((out / "metrics.json").read_text())
    assert "training" in metrics
    # The base model's evaluation may not land on the run.
    onto_run = invoke("eval", recipe, "--output", out)
    assert onto_run.exit_code == 2 and "finetune run" in onto_run.output
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("evals/")} == before
    # An unknown gate metric is refused before any model loads, with a suggestion.
    gate = invoke("eval", out, "--gate", "acuracy>=0.5")
    assert gate.exit_code == 2 and "did you mean 'accuracy'" in gate.output
    # Another run's adapter (another task) and a checkpoint that is not there: refused, naming them (was a crash).
    other = tmp_path / "other"
    shutil.copytree(out / "adapter", other)
    meta = json.loads((other / "finetune.json").read_text())
    (other / "finetune.json").write_text(json.dumps({**meta, "task": "copywriting"}))
    foreign = invoke("eval", out, "--checkpoint", other)
    assert foreign.exit_code == 2 and "trained for task copywriting, not classification" in foreign.output
    missing = invoke("eval", out, "--checkpoint", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    # The same task's adapter from outside the run: not filed in the run's evals/ as one of its own checkpoints.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "adapter", elsewhere)
    outside = invoke("eval", out, "--checkpoint", elsewhere)
    assert outside.exit_code == 2 and "is not inside the run" in " ".join(outside.output.split()), outside.output


def test_merge_writes_only_somewhere_new(finished_run, tmp_path):
    _, out = finished_run
    before = snapshot(out)
    existing = tmp_path / "taken.txt"
    existing.write_text("keep")
    refused = invoke("merge", out, "--output", existing)
    assert refused.exit_code == 2 and existing.read_text() == "keep"
    for inside in (out / "adapter" / "base", out):
        refused = invoke("merge", out, "--output", inside, "--overwrite")
        assert refused.exit_code == 2 and "run" in refused.output
    assert snapshot(out) == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine")
    assert invoke("merge", out, "--output", full).exit_code == 2 and (full / "x").read_text() == "mine"
    merged = invoke("merge", out, "--output", tmp_path / "merged")
    assert merged.exit_code == 0 and (tmp_path / "merged" / "config.json").is_file()
    # --overwrite replaces only an earlier merged checkpoint, never the user's folder
    assert invoke("merge", out, "--output", full, "--overwrite").exit_code == 2 and (full / "x").read_text() == "mine"
    assert invoke("merge", out, "--output", tmp_path / "merged").exit_code == 2
    # Folders of the user's under the names a merge once staged in are never touched.
    for name in (".merged.old", ".merged.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    assert invoke("merge", out, "--output", tmp_path / "merged", "--overwrite").exit_code == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    (tmp_path / "plain").mkdir()  # the merged folder has the modes of any new folder (not a temporary one's 0700)
    assert (tmp_path / "merged").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert all((tmp_path / name / "mine.txt").read_text() == "mine" for name in (".merged.old", ".merged.partial"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == [
        ".merged.old",
        ".merged.partial",
    ]
    # A file the user added to the merged folder since: --overwrite (which replaces the folder whole) refuses.
    (tmp_path / "merged" / "NOTES.md").write_text("mine")
    refused = invoke("merge", out, "--output", tmp_path / "merged", "--overwrite")
    assert refused.exit_code == 2 and "NOTES.md was not written by finetune" in " ".join(refused.output.split())
    assert (tmp_path / "merged" / "NOTES.md").read_text() == "mine"


def test_predict_passes_fields_through_and_takes_a_labelled_file(finished_run, tmp_path):
    _, out = finished_run
    eval_rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    labelled = write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"id": f"r{i}", "text": r["text"], "label": r["label"], "source": "held-out"}
            for i, r in enumerate(eval_rows)
        ],
    )
    result = invoke("predict", out, "--input", labelled)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(eval_rows))]
    assert all(r["source"] == "held-out" for r in rows)
    assert list(rows[0])[:4] == ["id", "text", "label", "source"]  # the input's fields first, in order
    # predict on the eval rows answers what evaluation answered.
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in eval_rows]
    # A field predict writes, already in the input (an earlier model's answer): refused, never replaced or kept in
    # place of the new answer; --output is not written.
    earlier = write_jsonl(tmp_path / "earlier.jsonl", [{"text": "rain", "prediction": "mine"}])
    refused = invoke("predict", out, "--input", earlier, "--output", tmp_path / "new.jsonl")
    assert refused.exit_code == 3 and "earlier.jsonl:1: field 'prediction' is what predict writes" in " ".join(
        refused.output.split()
    )
    assert not (tmp_path / "new.jsonl").exists()
    # A row missing the field predict reads, a field of two types, a directory as input: each named as such.
    # Each named at its line, which a blank line sets apart from the row's number.
    gap = tmp_path / "gap.jsonl"
    gap.write_text('{"text": "a"}\n\n{"txt": "x"}\n')
    missing = invoke("predict", out, "--input", gap)
    assert missing.exit_code == 3 and "gap.jsonl:3: no field 'text'; the row has: txt" in missing.output
    mixed = invoke("predict", out, "--input", "-", input='\n{"text": "a"}\n{"text": 5}\n')
    assert mixed.exit_code == 3 and "stdin:3: field 'text' is int, but str at stdin:2" in mixed.output
    empty = invoke("predict", out, "--input", "-", input='{"text": "a"}\n\n{"text": null}\n')  # the task's own check
    assert empty.exit_code == 3 and "error: stdin:3: field 'text' must be text" in empty.output, empty.output
    folder = invoke("predict", out, "--input", tmp_path)
    assert folder.exit_code == 3 and "a directory, not an input file" in folder.output
    # --output: a new file; its own earlier file again only with --overwrite; never once the user changed it.
    written = tmp_path / "new.jsonl"
    assert invoke("predict", out, "--input", labelled, "--output", written).exit_code == 0
    again = invoke("predict", out, "--input", labelled, "--output", written)
    assert again.exit_code == 2 and "--overwrite to replace it" in again.output
    assert invoke("predict", out, "--input", labelled, "--output", written, "--overwrite").exit_code == 0
    written.write_text(written.read_text() + '{"mine": 1}\n')
    edited = invoke("predict", out, "--input", labelled, "--output", written, "--overwrite")
    assert edited.exit_code == 2 and "or was changed since" in " ".join(edited.output.split())
    assert written.read_text().endswith('{"mine": 1}\n')


def test_an_unwritable_output_is_a_usage_error(finished_run, tmp_path):
    _, out = finished_run
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke("eval", out, "--output", locked / "evaluation")
        if result.exit_code != 0:  # root ignores directory modes; then the write simply succeeds
            assert result.exit_code == 2 and "cannot use" in result.output and "Traceback" not in result.output
        (tmp_path / "report.xml").write_text("a file, not a folder")
        junit = invoke("eval", out, "--junit", tmp_path / "report.xml" / "x.xml")
        assert junit.exit_code == 2 and "Traceback" not in junit.output
    finally:
        locked.chmod(0o700)


def test_overwrite_reaches_only_what_the_run_wrote(finished_run, tmp_path):
    """A user's files inside the run's own folders, and a run put inside it, are never removed by --overwrite: a
    run there (or in any folder of a run) is refused as output.dir; a file in adapter/ (which the new run replaces
    whole) refuses the overwrite with nothing removed; evaluations finetune recorded go, a user's file in evals/
    stays."""
    recipe, out = finished_run
    assert (out / "adapter" / ".finetune-files").is_file()
    inner = invoke("run", recipe, f"output.dir={out / 'evals' / 'inner'}")
    assert inner.exit_code == 2 and "lies inside the finetune run" in inner.output
    assert not (out / "evals" / "inner").exists()

    evaluated = invoke("eval", str(out))
    assert evaluated.exit_code in (0, 4), evaluated.output
    (out / "evals" / "mine.txt").write_text("mine")
    (out / "adapter" / "user_extra.txt").write_text("mine")
    before = snapshot(out)
    refused = invoke("run", recipe, "--overwrite")
    assert refused.exit_code == 2 and "user_extra.txt was not written by finetune" in refused.output
    assert snapshot(out) == before  # nothing removed

    (out / "adapter" / "user_extra.txt").unlink()
    replaced = invoke("run", recipe, "--overwrite", "train.seed=5")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "evals" / "mine.txt").read_text() == "mine"
    assert [p.name for p in (out / "evals").iterdir()] == ["mine.txt"]  # the recorded evaluation went
    assert "seed: 5" in (out / "recipe.yaml").read_text()


def test_overwrite_refuses_a_run_put_inside_the_run(finished_run):
    """A run a user moved into another run's folder: --overwrite of the outer run removes nothing."""
    recipe, out = finished_run
    planted = out / "checkpoints" / "kept-run"
    planted.mkdir(parents=True)
    (planted / ".finetune-run").write_text("a finetune run directory\n")
    (planted / "notes.txt").write_text("mine")
    before = snapshot(out)
    refused = invoke("run", recipe, "--overwrite")
    assert refused.exit_code == 2 and "holds another finetune run" in refused.output
    assert snapshot(out) == before


def test_an_evaluation_is_written_whole_or_not_at_all(finished_run, tmp_path, monkeypatch):
    """An evaluation stopped while it writes (Ctrl-C, SIGTERM, a full disk) leaves no half folder, and an --overwrite
    stopped there keeps the earlier evaluation whole; a finished --overwrite keeps the user's own file there.
    (Before: metrics.json without predictions.jsonl; the earlier files deleted before the new ones were written.)"""
    from finetune import files

    _, out = finished_run
    target = tmp_path / "evaluation"
    assert invoke("eval", out, "--output", target).exit_code == 0
    (target / "notes.txt").write_text("mine")
    before = snapshot(target)
    real_write_json = files.write_json

    def stopped_at_metrics(path, data):
        if path.name == "metrics.json":
            raise KeyboardInterrupt
        real_write_json(path, data)

    monkeypatch.setattr(files, "write_json", stopped_at_metrics)
    stopped = invoke("eval", out, "--output", target, "--overwrite")
    assert stopped.exit_code == 130, stopped.output
    assert snapshot(target) == before and not list(tmp_path.glob("*.partial-*"))
    new = tmp_path / "new"
    assert invoke("eval", out, "--output", new).exit_code == 130 and not new.exists()
    assert invoke("eval", out).exit_code == 130 and not list((out / "evals").iterdir())  # RUN/evals/<time>-adapter
    monkeypatch.setattr(files, "write_json", real_write_json)
    again = invoke("eval", out, "--output", target, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (target / "notes.txt").read_text() == "mine" and (target / "predictions.jsonl").is_file()


def test_overwrite_never_replaces_an_input_of_the_run(finished_run, tmp_path):
    """`finetune run RUN/recipe.yaml --overwrite` (the error's advice after the model card's reproduce command)
    replaced the run whose recipe it was reading; a run started from its own adapter would delete that adapter."""
    _, out = finished_run
    before = snapshot(out)
    again = invoke("run", out / "recipe.yaml", "--overwrite")
    assert again.exit_code == 2, again.output
    assert "is an input of this run and lies inside" in again.output and snapshot(out) == before
    card = (out / "README.md").read_text()
    reproduce = card.split("## Reproduce", 1)[1].split("```")[1].strip().split("   #")[0]
    assert reproduce == f"finetune run {out / 'recipe.yaml'} output.dir={out}-again"
    rerun = invoke(*reproduce.split()[1:])
    assert rerun.exit_code == 0, rerun.output
    assert snapshot(out) == before
    # The run's own adapter as the starting adapter of the run replacing it: deleted, then trained from (a DPO run
    # whose reference policy was itself scored 0 ever after).
    recipe, _ = finished_run
    own = invoke("run", recipe, f"model.adapter={out}", "--overwrite")
    assert own.exit_code == 2 and "is an input of this run and lies inside" in own.output, own.output
    assert snapshot(out) == before
    # An input the overwrite keeps (a file of the user's inside the run) is no reason to refuse it.
    shutil.copyfile(out / "recipe.yaml", out / "my.yaml")
    kept = invoke("run", out / "my.yaml", "--overwrite")
    assert kept.exit_code == 0, kept.output
    assert (out / "my.yaml").read_bytes() == (out / "recipe.yaml").read_bytes()


def test_junit_reports_replace_only_finetunes_own(finished_run, tmp_path):
    """`--junit FILE` wrote over any file: a user's notes, the recipe the command read. Now the write policy
    decides: a new file, or finetune's own earlier report (CI reruns need no --overwrite); --predictions --output
    goes through it too (it wrote metrics.json into any folder)."""
    recipe, out = finished_run
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    refused = invoke("eval", out, "--junit", notes)
    assert refused.exit_code == 2 and "notes.txt exists and is not a JUnit report" in " ".join(refused.output.split())
    assert notes.read_text() == "mine"
    onto_recipe = invoke("eval", recipe, "--junit", recipe, "--output", tmp_path / "e")
    assert onto_recipe.exit_code == 2 and "an input of this command" in onto_recipe.output
    report = tmp_path / "reports" / "gates.xml"
    for _ in range(2):  # the second replaces finetune's own first report
        written = invoke("eval", out, "--gate", "accuracy>=0", "--junit", report)
        assert written.exit_code == 0, written.output
        assert report.read_text().startswith("<?xml") and "accuracy&gt;=0" in report.read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    rescored = invoke("eval", "--predictions", out / "predictions.jsonl", "--task", "classification", "--output", mine)
    assert rescored.exit_code == 2 and (mine / "metrics.json").read_text() == "{}"
    into = tmp_path / "rescored"
    assert (
        invoke(
            "eval", "--predictions", out / "predictions.jsonl", "--task", "classification", "--output", into
        ).exit_code
        == 0
    )
    assert "accuracy" in (into / "metrics.json").read_text()


def test_predict_rows_naming_a_field_two_ways_are_refused_at_the_row(tiny_models, topic_data, write_recipe, tmp_path):
    """A run whose recipe maps `text` to the file's `sentence`: an input naming it `sentence` on line 1 and `text` on
    line 2 said line 2's text was "no value (missing or null)". A row holding both reads `sentence` (its `text` is
    another field, passed through)."""
    data = {}
    for split, path in topic_data.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        data[split] = write_jsonl(tmp_path / f"{split}.jsonl", [{"sentence": r["text"], "y": r["label"]} for r in rows])
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "run", epochs=1)
    recipe["data"]["columns"] = {"text": "sentence", "label": "y"}
    assert invoke("run", write_recipe(recipe)).exit_code == 0
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"sentence": "rain today"}, {"text": "sun today"}])
    refused = invoke("predict", tmp_path / "run", "--input", mixed)
    said = " ".join(refused.output.split())
    assert refused.exit_code == 3 and "mixed.jsonl:2: field 'text' is named 'text' here and 'sentence' at" in said
    assert "mixed.jsonl:1 (the recipe's column for it is 'sentence')" in said, said
    both = write_jsonl(tmp_path / "both.jsonl", [{"sentence": "rain today", "text": "a note"}])
    answered = invoke("predict", tmp_path / "run", "--input", both)
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.stdout.splitlines()[0])["text"] == "a note"


def test_predict_message_on_a_run_without_a_learned_watermark_names_the_flag(finished_run, tmp_path):
    """It leaked an internal override the user never gave: `override "eval.watermark.message='<redacted>'"`."""
    _, out = finished_run
    result = invoke("predict", out, "--input", "-", "--message", "0101", input='{"text": "rain"}\n')
    assert result.exit_code == 2 and "--message:" in result.output and "carries no learned watermark" in result.output
    assert "override" not in result.output


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda a: a.joinpath("adapter_model.safetensors").write_bytes(b"\x10"), "damaged or truncated"),
        (lambda a: a.joinpath("adapter_model.safetensors").unlink(), "missing from the adapter"),
        (lambda a: a.joinpath("finetune.json").write_text('{"ta'), "not a readable JSON file"),
        (lambda a: a.joinpath("adapter_config.json").unlink(), "missing from the adapter"),
    ],
    ids=["truncated weights", "weights deleted", "truncated finetune.json", "adapter_config.json deleted"],
)
def test_a_damaged_adapter_is_named_by_every_command_that_reads_it(finished_run, tmp_path, damage, named):
    """A damaged adapter was an internal error from inside peft or safetensors (exit 1, "a bug")."""
    _, run = finished_run
    damage(run / "adapter")
    commands = {
        "eval": ["eval", str(run), "--output", str(tmp_path / "ev")],
        "predict": ["predict", str(run), "--input", "-"],
        "merge": ["merge", str(run), "--output", str(tmp_path / "merged")],
    }
    for name, command in commands.items():
        result = invoke(*command, input='{"text": "rain and wind"}\n')
        assert result.exit_code == 3, (name, result.output)
        assert named in result.output and "internal error" not in result.output, (name, result.output)
    assert not (tmp_path / "merged").exists()


def test_a_run_under_another_model_is_refused_naming_both(finished_run, tiny_models, tmp_path):
    """`eval RUN model.name_or_path=OTHER` was an internal error from peft (no modules matched); a recipe.yaml
    edited to another base of the same shapes made predict and merge use it, silently."""
    import yaml

    _, run = finished_run
    result = invoke("eval", run, f"model.name_or_path={tiny_models['llama']}", "--output", tmp_path / "ev")
    assert result.exit_code == 2, result.output
    assert "the run's adapter" in result.output and "not on model.name_or_path" in result.output
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    recorded["model"]["name_or_path"] = str(tiny_models["gpt2"])  # edited to another base: refused, not used
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    for command in (["predict", run, "--input", "-"], ["merge", run, "--output", tmp_path / "merged"]):
        refused = invoke(*command, input='{"text": "rain"}\n')
        assert refused.exit_code == 2 and "not on model.name_or_path" in refused.output, refused.output
    # The base moved (a copy elsewhere, another machine): the same architecture and sizes are used, said in the log.
    moved = tmp_path / "moved-bert"
    shutil.copytree(tiny_models["bert"], moved)
    recorded["model"]["name_or_path"] = str(moved)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    assert invoke("predict", run, "--input", "-", input='{"text": "rain"}\n').exit_code == 0


def test_a_resume_path_that_does_not_exist_is_refused_before_anything_loads(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """It printed the whole plan (the model loaded, the data tokenised) before saying so."""
    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    result = invoke("run", recipe, "--resume", tmp_path / "bogus")
    assert result.exit_code == 2 and "no such checkpoint directory" in result.output, result.output
    assert "plan" not in result.output.lower() and not (tmp_path / "run").exists()


def test_a_run_recorded_before_a_newer_rule_stays_usable(finished_run, tmp_path):
    """Rules on settings nothing reads, or metrics never reported, are for recipes about to train: a run whose
    recipe.yaml names such a setting (recorded before the rule existed) was refused by predict, merge and eval."""
    import yaml

    _, run = finished_run
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    recorded["eval"].update(temperature=0.7, gates={"watermark_detected": ">=0.1"})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    assert invoke("predict", run, "--input", "-", input='{"text": "rain"}\n').exit_code == 0
    assert invoke("merge", run, "--output", tmp_path / "merged").exit_code == 0
    evaluated = invoke("eval", run, "--output", tmp_path / "ev")  # runs; the recorded gate fails as "missing"
    assert evaluated.exit_code == 4 and "watermark_detected" in evaluated.output, evaluated.output
    # A recipe about to train is still refused, for those very settings.
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**recorded, "output": {"dir": str(tmp_path / "again")}}))
    validated = invoke("validate", tmp_path / "again.yaml")
    assert validated.exit_code == 2 and "eval.temperature: read only by" in validated.output, validated.output
    assert "watermark_detected is reported only with eval.watermark" in validated.output


def test_eval_of_a_run_on_an_eval_file_not_the_runs_says_so(finished_run, tmp_path):
    """A relative data.eval read from another directory (a same-named file there) was scored without a word."""
    import yaml

    _, run = finished_run
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    rows = [json.loads(line) for line in Path(recorded["data"]["eval"]).read_text().splitlines()]
    write_jsonl(elsewhere / "eval.jsonl", rows[:5])
    result = invoke("eval", run, f"data.eval={elsewhere / 'eval.jsonl'}", "--output", tmp_path / "ev")
    assert result.exit_code == 0  # another name: asked for, no warning
    Path(recorded["data"]["eval"]).write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    result = invoke("eval", run, "--output", tmp_path / "ev2")
    assert result.exit_code == 0 and "is not the one the run read" in " ".join(result.output.split()), result.output


def test_an_evaluation_written_elsewhere_does_not_lock_the_run(finished_run, tmp_path):
    """eval RUN --output DIR took the run's lock although it writes nothing there: a read-only run, or two gate
    jobs on one run, were refused."""
    from finetune.outputs.lock import RunLock

    _, run = finished_run
    with RunLock(run, command="finetune run other.yaml"):
        elsewhere = invoke("eval", run, "--output", tmp_path / "ev")
        assert elsewhere.exit_code in (0, 4), elsewhere.output
        inside = invoke("eval", run)  # into the run's evals/: one writer per run directory
        assert inside.exit_code == 2 and "in use by another finetune process" in inside.output, inside.output


def test_a_run_refused_for_space_leaves_nothing_that_refuses_the_retry(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    """The marker was written before the free-space check: the retry, with space freed, was refused as an
    unfinished run."""
    import collections

    from finetune.outputs import rundir

    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", epochs=1))
    usage = collections.namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(rundir.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
        full = invoke("run", recipe)
    assert full.exit_code == 2 and "MiB free" in full.output, full.output
    assert not (tmp_path / "run").exists()
    assert invoke("run", recipe).exit_code in (0, 4)


def test_weights_files_follow_the_users_umask(tiny_models, topic_data, write_recipe, tmp_path):
    """safetensors writes 0600 whatever the umask: the adapter, checkpoints and merged model were unreadable to the
    user's group, every other file not."""
    previous = os.umask(0o022)
    try:
        recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", epochs=1))
        assert invoke("run", recipe).exit_code in (0, 4)
        assert invoke("merge", tmp_path / "run", "--output", tmp_path / "merged").exit_code == 0
    finally:
        os.umask(previous)
    weights = [*(tmp_path / "run").rglob("*.safetensors"), *(tmp_path / "merged").rglob("*.safetensors")]
    weights = [w for w in weights if not w.is_symlink()]
    assert weights and all(w.stat().st_mode & 0o777 == 0o644 for w in weights), [
        (str(w), oct(w.stat().st_mode)) for w in weights
    ]


def test_a_damaged_checkpoint_is_not_scored(finished_run, tmp_path):
    """eval --checkpoint scored a checkpoint whose bytes differ from its recorded sha256 (--resume refused the same
    one), and one damaged checkpoint refused the whole --all-checkpoints table."""
    _, run = finished_run
    steps = sorted((run / "checkpoints").iterdir())
    weights = next(steps[0].glob("adapter/adapter_model.safetensors"))
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    one = invoke("eval", run, "--checkpoint", steps[0], "--output", tmp_path / "one")
    assert one.exit_code == 3 and "damaged" in one.output, one.output
    table = invoke("eval", run, "--all-checkpoints", "--output", tmp_path / "all")
    assert table.exit_code in (0, 4) and f"{steps[0].name} left out" in " ".join(table.output.split()), table.output


def test_an_interrupted_run_s_checkpoints_are_scored(finished_run, tmp_path):
    """A run stopped before its final adapter: --all-checkpoints was refused as "not a finished run directory", when
    choosing a checkpoint to resume from or keep is what the table is for. Its last checkpoint's metrics, said;
    no gate judges a run without kept weights."""
    _, run = finished_run
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    plain = invoke("eval", run, "--output", tmp_path / "p")  # it said "no trained adapter here (finetune.json missing)"
    assert plain.exit_code == 2 and "did not finish" in plain.output and "--all-checkpoints" in plain.output
    table = invoke("eval", run, "--all-checkpoints", "--json")
    assert table.exit_code == 0, table.output
    document = json.loads(table.stdout)
    assert [row["weights"] for row in document["checkpoints"]] == steps
    assert document["metrics"] == document["checkpoints"][-1]["metrics"]
    assert any("did not finish" in w and steps[-1] in w for w in document["warnings"]), document["warnings"]
    assert len(list((run / "evals").iterdir())) == 1
    gated = invoke("eval", run, "--all-checkpoints", "--gate", "accuracy>=0.1", "--output", tmp_path / "g")
    assert gated.exit_code == 2 and "no kept weights" in gated.output and not (tmp_path / "g").exists(), gated.output
    for step in steps:
        shutil.rmtree(run / "checkpoints" / step)
    empty = invoke("eval", run, "--all-checkpoints", "--output", tmp_path / "e")
    assert empty.exit_code == 2 and "nothing to score" in empty.output, empty.output


def test_eval_of_a_run_still_training_names_the_process_training_it(finished_run):
    """`finetune eval RUN` while another process trains it said "the run did not finish: continue it with --resume
    auto", which that process's lock would refuse too."""
    from finetune.outputs.lock import RunLock

    _, run = finished_run
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()
    lock = RunLock(run, command="finetune run recipe.yaml")
    lock.acquire()
    try:
        result = invoke("eval", run)
    finally:
        lock.release()
    assert result.exit_code == 2 and "in use by another finetune process" in " ".join(result.output.split())
    assert "finetune run recipe.yaml" in result.output, result.output


def test_a_checkpoint_pruned_while_the_table_is_made_is_not_named_as_evaluated(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    """Training still writing the run prunes its last checkpoint while --all-checkpoints scores the ones before: the
    document named the pruned checkpoint as the weights evaluated, and its metrics (the one scored before it) came
    without intervals."""
    from finetune.flows import evaluate

    run = tmp_path / "run"
    recipe = classification_recipe(tiny_models["bert"], topic_data, run, epochs=1, checkpoint_every=5)
    assert invoke("run", write_recipe(recipe)).exit_code == 0
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()
    steps = sorted((run / "checkpoints").iterdir())
    assert len(steps) >= 2, steps
    opened = evaluate.open_session

    def prune_the_last(resolved, **kwargs):
        if kwargs["adapter_dir"] == steps[0] / "adapter":
            shutil.rmtree(steps[-1])
        return opened(resolved, **kwargs)

    monkeypatch.setattr(evaluate, "open_session", prune_the_last)
    table = invoke("eval", run, "--all-checkpoints", "--json")
    assert table.exit_code == 0, table.output
    document = json.loads(table.stdout)
    assert [row["weights"] for row in document["checkpoints"]] == [s.name for s in steps[:-1]]
    assert document["evaluated"] == str(steps[-2] / "adapter"), document["evaluated"]
    assert any(steps[-2].name in w and "did not finish" in w for w in document["warnings"]), document["warnings"]
    assert any(f"{steps[-1].name} left out" in w for w in document["warnings"]), document["warnings"]
    assert "intervals" in document, sorted(document)


def test_a_stop_while_the_card_is_written_resumes_to_a_whole_run(
    tiny_models, topic_data, write_recipe, tmp_path, monkeypatch
):
    """metrics.json came before the card and pictures: a run stopped between them was "finished", and --resume
    auto never wrote the card it announced."""
    from finetune.outputs import card

    recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run", epochs=1))
    with monkeypatch.context() as patch:
        patch.setattr(card, "write_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
        stopped = invoke("run", recipe)
    assert stopped.exit_code == 2 and not (tmp_path / "run" / "metrics.json").exists(), stopped.output
    # A file of the user's in the adapter/ the resumed run would replace whole: refused, nothing removed (it was
    # lost, exit 0), both beside the saved adapter and in an adapter/ folder the user made where none was saved.
    adapter = tmp_path / "run" / "adapter"
    (adapter / "NOTES.md").write_text("mine")
    before = snapshot(tmp_path / "run")
    refused = invoke("run", recipe, "--resume", "auto")
    assert refused.exit_code == 2 and "NOTES.md was not written by finetune" in refused.output, refused.output
    assert snapshot(tmp_path / "run") == before
    saved = tmp_path / "saved-adapter"
    adapter.rename(saved)
    adapter.mkdir()
    (adapter / "NOTES.md").write_text("mine")
    assert invoke("run", recipe, "--resume", "auto").exit_code == 2 and (adapter / "NOTES.md").read_text() == "mine"
    assert invoke("run", recipe, "--overwrite").exit_code == 2 and (adapter / "NOTES.md").read_text() == "mine"
    shutil.rmtree(adapter)
    saved.rename(adapter)
    (adapter / "NOTES.md").unlink()
    resumed = invoke("run", recipe, "--resume", "auto")
    assert resumed.exit_code in (0, 4), resumed.output
    assert (tmp_path / "run" / "README.md").is_file() and (tmp_path / "run" / "metrics.json").is_file()


def test_an_evaluations_predictions_keep_the_rows_ids(finished_run, tmp_path):
    """Classification and copywriting predictions dropped `id`, which --compare matches rows by."""
    import yaml

    _, run = finished_run
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    rows = [json.loads(line) for line in Path(recorded["data"]["eval"]).read_text().splitlines()]
    with_ids = write_jsonl(tmp_path / "ids.jsonl", [{**row, "id": f"row-{i}"} for i, row in enumerate(rows)])
    assert invoke("eval", run, f"data.eval={with_ids}", "--output", tmp_path / "ev").exit_code in (0, 4)
    predicted = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in predicted] == [f"row-{i}" for i in range(len(rows))]


def test_what_eval_is_asked_now_is_judged_though_the_recorded_recipe_is_spared(finished_run, tmp_path):
    """The exemption of a finished run's recipe.yaml covered the overrides given now: eval.temperature on a
    classification run was ignored, and a watermark gate failed as "missing" only after the model ran."""
    _, run = finished_run
    asked = invoke("eval", run, "eval.temperature=0.7", "--output", tmp_path / "ev")
    assert asked.exit_code == 2 and "eval.temperature: read only by the generation tasks" in asked.output, asked.output


def test_a_gate_on_the_other_label_modes_metric_is_refused_before_anything_loads(finished_run, monkeypatch):
    """`eval RUN --gate micro_f1>=...` on a single-label run loaded and evaluated the model, then failed the gate as
    "missing" (exit 4); the same gate in a recipe is refused (exit 2). Now refused alike, by what the run's data
    decided, before any weights load."""
    from finetune.flows import evaluate as evaluate_flow

    _, out = finished_run
    monkeypatch.setattr(evaluate_flow, "open_session", lambda *a, **k: pytest.fail("the model was loaded"))
    for args in (("--gate", "micro_f1>=0.1"), ("--all-checkpoints", "--gate", "hamming_loss<=0.5")):
        result = invoke("eval", out, *args)
        assert result.exit_code == 2, result.output
        assert "is not reported when the labels are single" in result.output
    assert not (out / "evals").exists()


def test_validate_refuses_an_output_dir_run_cannot_create(tiny_models, topic_data, write_recipe, tmp_path):
    """validate passed a recipe whose output.dir lay in a folder nobody may write to; run refused it (exit 2)."""
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes whatever the modes: a read-only filesystem is what stops it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(locked)]).returncode == 0
        if not mounted:
            pytest.skip("cannot mount a read-only filesystem here")
    else:
        locked.chmod(0o500)
    try:
        recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, locked / "run", epochs=1))
        for command in ("validate", "run"):
            result = invoke(command, recipe)
            assert result.exit_code == 2, result.output
            assert f"{locked} is not writable" in result.output
        planned = invoke("run", recipe, "--dry-run", "--no-estimate")  # writes nothing: a plan for another machine
        assert planned.exit_code == 0, planned.output
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)])
        locked.chmod(0o700)


def test_an_output_dir_through_a_dangling_link_is_named_as_one(tiny_models, topic_data, write_recipe, tmp_path):
    """A symbolic link to a folder that does not exist, as output.dir or above it: "is not writable: File exists"."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    for out in (tmp_path / "runs", tmp_path / "runs" / "r"):
        recipe = write_recipe(classification_recipe(tiny_models["bert"], topic_data, out, epochs=1))
        for command in ("validate", "run"):
            result = invoke(command, recipe)
            assert result.exit_code == 2, result.output
            assert f"{tmp_path / 'runs'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in " ".join(
                result.output.split()
            ), result.output
    assert not (tmp_path / "gone").exists()


def test_overwrite_of_a_run_inside_its_models_folder_is_no_overwrite_of_the_model(
    tiny_models, topic_data, write_recipe, tmp_path
):
    """The model's folder holding the run (runs/ beside a cloned checkpoint) is an input around the run, not in it:
    --overwrite replaces the run and leaves the model."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["bert"], model)
    before = snapshot(model)
    out = model / "runs" / "r"
    recipe = write_recipe(classification_recipe(model, topic_data, out, epochs=1))
    assert invoke("run", recipe).exit_code == 0
    again = invoke("run", recipe, "--overwrite")
    assert again.exit_code == 0, again.output
    assert {k: v for k, v in snapshot(model).items() if not k.startswith("runs/")} == before


def test_overwrite_refuses_an_input_reached_through_a_link_it_removes(tmp_path):
    """RUN/adapter a link to another run's adapter, named as model.adapter: resolved, the input lay outside the run,
    and --overwrite went ahead (the new run's adapter then became its own starting adapter)."""
    from finetune.errors import RecipeError
    from finetune.outputs.rundir import RunDir, output_decision

    elsewhere = tmp_path / "sft" / "adapter"
    elsewhere.mkdir(parents=True)
    (elsewhere / "finetune.json").write_text("{}")
    run = RunDir(tmp_path / "dpo")
    run.path.mkdir()
    run.marker.write_text("a finetune run directory\n")
    run.recipe.write_text("task: copywriting\n")
    run.adapter.symlink_to(elsewhere)
    with pytest.raises(RecipeError, match="is an input of this run"):
        output_decision(run, resume=None, overwrite=True, inputs=(run.path / "adapter",))
    assert output_decision(run, resume=None, overwrite=True, inputs=(elsewhere,)).endswith("as --overwrite asks)")


def test_an_evals_link_planted_in_a_run_is_not_followed(finished_run, tmp_path):
    """`RUN/evals -> elsewhere`: `finetune eval RUN` wrote its evaluation into the folder the link named, outside
    the run. Refused (exit 2), naming the link; `--output DIR` still evaluates."""
    _, out = finished_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "evals").symlink_to(elsewhere)
    refused = invoke("eval", out)
    assert refused.exit_code == 2 and "is a link" in refused.output, refused.output
    assert not any(elsewhere.iterdir())
    assert invoke("eval", out, "--output", tmp_path / "ev").exit_code == 0


def test_a_run_with_relative_paths_is_evaluated_and_resumed_from_elsewhere_as_it_ran(
    tiny_models, topic_data, tmp_path, monkeypatch
):
    """A run whose recipe names its data and output.dir relative to where it ran: `finetune eval RUN` from another
    directory refused its own eval file as missing, and `finetune run RUN/recipe.yaml --resume auto` there trained
    a new run from the beginning in another folder (exit 0)."""
    project, elsewhere = tmp_path, tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = classification_recipe(tiny_models["bert"], topic_data, Path("runs/rel"), epochs=1)
    recipe["data"].update(train="data/train.jsonl", eval="data/eval.jsonl")
    (project / "rel.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(project)
    assert invoke("run", "rel.yaml").exit_code == 0
    run = project / "runs" / "rel"
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    monkeypatch.chdir(elsewhere)
    evaluated = invoke("eval", run, "--output", elsewhere / "ev")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((elsewhere / "ev" / "metrics.json").read_text())["metrics"]["accuracy"] == metrics["accuracy"]
    data = [f"data.{split}={project / 'data' / f'{split}.jsonl'}" for split in ("train", "eval")]
    resumed = invoke("run", run / "recipe.yaml", "--resume", "auto", *data)
    assert resumed.exit_code == 2 and f"give output.dir={run}" in " ".join(resumed.output.split()), resumed.output
    assert not (elsewhere / "runs").exists()
    # An output.dir given on the command line is the user's choice (the card's `output.dir=RUN-again`): taken.
    again = invoke(
        "run", run / "recipe.yaml", "--resume", "auto", *data, f"output.dir={elsewhere / 'again'}", "--dry-run"
    )
    assert again.exit_code == 0, again.output


def test_an_evaluation_of_a_read_only_run_points_at_output(finished_run, tmp_path, monkeypatch):
    """A run on a read-only mount: `finetune eval RUN` said only that the run is not writable; --output DIR, which
    writes nothing into the run, is the way, and is now named."""
    import errno

    from finetune.errors import RecipeError
    from finetune.flows import evaluate
    from finetune.outputs.lock import RunLock

    _, out = finished_run

    def read_only(self):  # as _open says it on a read-only mount (EROFS)
        raise RecipeError(f"{self.label}: {self.directory} is not writable: {os.strerror(errno.EROFS)}")

    monkeypatch.setattr(RunLock, "_open", read_only)
    monkeypatch.setattr(evaluate, "_writable", lambda path: False)
    refused = invoke("eval", out)
    words = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "is not writable" in words and "give --output DIR" in words, words
