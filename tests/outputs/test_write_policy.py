"""The one write policy (`rundir.claim_output`): what a command's --output may replace, and what it never touches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.outputs.rundir import (
    RUN_MARKER,
    RunDir,
    claim_output,
    clear_previous_run,
    mark_output,
    output_decision,
    record_adapter_files,
    staging_beside,
)
from tests.cli.test_nothing_lost import finished_run, invoke, snapshot  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit


def claim(target, *, directory=True, overwrite=False, inputs=(), what="evaluation"):
    return claim_output(target, key="--output", what=what, directory=directory, overwrite=overwrite, inputs=inputs)


def a_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / RUN_MARKER).write_text("a finetune run directory\n")
    return path


def test_new_paths_and_empty_folders_are_allowed(tmp_path):
    assert claim(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert claim(tmp_path / "empty") == tmp_path / "empty"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_or_file_is_never_replaced_even_with_overwrite(tmp_path, overwrite):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"--output: .*mine exists and is not an evaluation that finetune wrote"):
        claim(folder, overwrite=overwrite)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"mine": 1}))
    with pytest.raises(RecipeError, match="not a data report that finetune wrote"):
        claim(report, directory=False, overwrite=overwrite, what="data report")


def test_finetunes_own_output_needs_overwrite(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    mark_output(folder, "evaluation")
    with pytest.raises(RecipeError, match="holds an earlier evaluation; choose a new path, or --overwrite"):
        claim(folder)
    assert claim(folder, overwrite=True) == folder
    # ... but only as the same kind of output
    with pytest.raises(RecipeError, match="not a merged checkpoint that finetune wrote"):
        claim(folder, overwrite=True, what="merged checkpoint")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"written_by": "data report"}))
    assert claim(report, directory=False, overwrite=True, what="data report") == report


def test_runs_are_never_an_output(tmp_path):
    run = a_run(tmp_path / "runs" / "a")
    for target in (run, run / "evals" / "x", tmp_path / "runs"):  # the run, inside it, a folder holding it
        with pytest.raises(RecipeError, match="finetune run"):
            claim(target, overwrite=True)


def test_an_input_of_the_command_is_never_an_output(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_text('{"text": "a", "label": "b"}\n')
    for target, directory in ((train, False), (data, True)):
        with pytest.raises(RecipeError, match="an input of this command"):
            claim(target, directory=directory, overwrite=True, inputs=(train,))


def test_kinds_links_and_special_files_are_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RecipeError, match="is a file; give a new or empty directory"):
        claim(tmp_path / "f")
    (tmp_path / "d").mkdir()
    with pytest.raises(RecipeError, match="is a directory; give a file path"):
        claim(tmp_path / "d", directory=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match="link to a missing place"):
        claim(tmp_path / "dangling", directory=False)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RecipeError, match="not a regular file"):
        claim(tmp_path / "fifo", directory=False, overwrite=True)


def test_a_run_is_never_written_inside_another_but_its_own_parts(tmp_path):
    outer = Path(a_run(tmp_path / "run"))
    with pytest.raises(RecipeError, match="lies inside the finetune run"):
        output_decision(RunDir(outer / "evals" / "x"), resume=None, overwrite=False)
    with pytest.raises(RecipeError, match="lies inside the finetune run"):
        output_decision(RunDir(outer / "deep" / "er"), resume=None, overwrite=True, owner=tmp_path / "other")
    assert "(new)" in output_decision(RunDir(outer / "retriever"), resume=None, overwrite=False, owner=outer)


def test_overwrite_removes_the_listed_adapter_files_recorded_evaluations_and_checkpoints_only(tmp_path):
    run = RunDir(a_run(tmp_path / "run"))
    (run.adapter / "base").mkdir(parents=True)
    (run.adapter / "adapter_model.safetensors").write_bytes(b"x")
    (run.adapter / "base" / "config.json").write_text("{}")
    record_adapter_files(run.adapter)
    (run.checkpoints / "step-00000002").mkdir(parents=True)
    (run.checkpoints / "step-00000002" / "checkpoint.json").write_text("{}")
    (run.evals / "20261206-adapter").mkdir(parents=True)
    mark_output(run.evals / "20261206-adapter", "evaluation")
    (run.evals / "notes.md").write_text("mine")
    kept = clear_previous_run(run)
    assert kept == [str(Path("evals") / "notes.md")]
    assert sorted(p.name for p in run.path.iterdir()) == sorted([RUN_MARKER, "evals"])
    assert [p.name for p in run.evals.iterdir()] == ["notes.md"]


def test_a_file_listed_before_it_was_written_is_the_runs_own(tmp_path):
    """A run killed after the adapter's list but before the evaluation's files (thresholds.json) went in, or after
    they went in but before the list was written again: either way --overwrite takes its folder as the run's."""
    for written in (False, True):
        run = RunDir(a_run(tmp_path / f"run-{written}"))
        run.adapter.mkdir()
        (run.adapter / "adapter_model.safetensors").write_bytes(b"x")
        record_adapter_files(run.adapter, coming=["thresholds.json"])
        if written:
            (run.adapter / "thresholds.json").write_text("{}")
        (run.path / "metrics.json").write_text("{}")
        assert clear_previous_run(run) == []
        assert not run.adapter.exists()


@pytest.mark.parametrize("where", ["adapter/mine.txt", "checkpoints/mine/keep.txt"])
def test_a_users_file_in_a_folder_the_run_replaces_whole_refuses_the_overwrite(tmp_path, where):
    run = RunDir(a_run(tmp_path / "run"))
    run.adapter.mkdir()
    (run.adapter / "adapter_model.safetensors").write_bytes(b"x")
    record_adapter_files(run.adapter)
    (run.checkpoints / "step-00000001").mkdir(parents=True)
    (run.path / where).parent.mkdir(parents=True, exist_ok=True)
    (run.path / where).write_text("mine")
    (run.path / "metrics.json").write_text("{}")
    before = sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*"))
    with pytest.raises(RecipeError, match="was not written by finetune"):
        clear_previous_run(run)
    assert sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*")) == before


def test_overwriting_a_run_keeps_the_users_own_files(tmp_path):
    run = RunDir(a_run(tmp_path / "run"))
    (run.path / "metrics.json").write_text("{}")
    (run.path / "checkpoints").mkdir()
    (run.path / "my-notes.md").write_text("mine")
    kept = clear_previous_run(run)
    assert kept == ["my-notes.md"]
    assert sorted(p.name for p in run.path.iterdir()) == sorted([RUN_MARKER, "my-notes.md"])


@pytest.mark.slow
def test_data_report_never_over_its_own_data_or_a_run(finished_run, tmp_path):  # noqa: F811
    recipe, out = finished_run
    train = Path(yaml.safe_load(Path(recipe).read_text())["data"]["train"])
    before, run_before = train.read_bytes(), snapshot(out)
    for target in (train, out / "metrics.json", recipe):
        result = invoke("data", recipe, "--output", target, "--overwrite")
        assert result.exit_code == 2, result.output
        assert str(target.name) in result.output
    assert train.read_bytes() == before and snapshot(out) == run_before
    merged = invoke("merge", out, "--output", out / "merged")
    assert merged.exit_code == 2 and "an input of this command" in merged.output


def test_an_output_beside_an_input_is_named_as_it_lies(tmp_path):
    """A path inside an input was said to be 'is or holds' it."""
    from finetune.outputs.rundir import claim_output

    data = tmp_path / "data"
    data.mkdir()
    for target, how in ((data / "out.jsonl", "lies inside"), (tmp_path, "holds"), (data, "is")):
        with pytest.raises(RecipeError, match=f"--output: {target} {how} {data}, an input of this command"):
            claim_output(target, key="--output", what="predictions", directory=False, overwrite=False, inputs=(data,))


def test_replacing_a_folder_keeps_the_old_one_whole_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """`files.replace_directory`, under every output folder finetune replaces (the final adapter, merge/export, the
    watermark detector): a kill between its renames leaves the old folder whole beside the target."""
    from finetune import files

    target, staging, aside = tmp_path / "adapter", tmp_path / "adapter.partial", tmp_path / "adapter.old"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    renames = []
    real_rename = Path.rename

    def rename_then_die(self, other):
        renames.append(self)
        if self == staging:
            raise KeyboardInterrupt  # killed after the old folder moved aside, before the new one moved in
        return real_rename(self, other)

    monkeypatch.setattr(Path, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        files.replace_directory(staging, target, aside)
    assert renames == [target, staging]
    assert (aside / "weights").read_text() == "old" and (staging / "weights").read_text() == "new"
    monkeypatch.setattr(Path, "rename", real_rename)
    files.replace_directory(staging, target, aside)  # the next save
    assert (target / "weights").read_text() == "new" and not aside.exists() and not staging.exists()


@pytest.mark.parametrize("given", ["new", "empty"])
def test_two_evaluations_given_one_output_do_not_both_say_they_wrote(tmp_path, given):
    """Two CI jobs, one --output: both passed the check at their start, the second moved its files in over the
    first's (no --overwrite), and both said they wrote. The one that finds the folder taken writes nothing, exit 2."""
    from finetune.files import write_json
    from finetune.outputs import rundir

    target = tmp_path / "out"
    if given == "empty":
        target.mkdir()

    def meanwhile(folder):  # the other job finishes while this one writes
        rundir.write_evaluation(target, lambda f: write_json(f / "metrics.json", {"by": "first"}), overwrite=False)
        write_json(folder / "metrics.json", {"by": "second"})

    with pytest.raises(RecipeError, match="was written by another process while this evaluation ran"):
        rundir.write_evaluation(target, meanwhile, overwrite=False)
    assert json.loads((target / "metrics.json").read_text()) == {"by": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    # Asked to (--overwrite, allowed by claim_output), the later one replaces it.
    rundir.write_evaluation(target, lambda f: write_json(f / "metrics.json", {"by": "third"}), overwrite=True)
    assert json.loads((target / "metrics.json").read_text()) == {"by": "third"}


@pytest.mark.parametrize("directory", [True, False])
def test_a_long_legal_output_name_gets_its_staging_beside_it(tmp_path, directory):
    """A legal name of 238 to 255 bytes was refused: its hidden staging name (the name plus 18) was too long."""
    target = tmp_path / ("é" * 100 + "c" * 55)  # 255 bytes, a multi-byte character where the cut may fall
    made = staging_beside(target, directory=directory)
    assert made.parent == tmp_path and made.exists() and len(made.name.encode()) <= 255
    assert made.is_dir() == directory and made.name.startswith(".éé")


def test_a_sweeps_trials_and_their_own_parts_are_the_sweeps_alone(tmp_path):
    """A trial's knowledge-base retriever (owner: the trial) was refused as lying inside the sweep; anything else
    there (owner: none) is refused, the sweep itself too."""
    from finetune.outputs.rundir import SWEEP, output_dir_problem

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    mark_output(sweep, SWEEP)
    trial = sweep / "trials" / "0"
    assert output_dir_problem(RunDir(trial), owner=sweep) is None
    assert output_dir_problem(RunDir(trial / "retriever"), owner=trial) is None
    for where in (trial, sweep):
        assert "the finetune sweep" in (output_dir_problem(RunDir(where)) or "")
    assert output_dir_problem(RunDir(sweep / "best")) is None  # best.yaml's run writes there
