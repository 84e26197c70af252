"""The command line at its seams: help and debug flags as users type them, a full disk, a closed pipe."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from finetune.cli import HUNG_UP, PIPE_CLOSED, TERMINATED, app
from tests.conftest import REPO

runner = CliRunner()


@pytest.mark.unit
@pytest.mark.parametrize("args", [["-h"], ["run", "-h"], ["eval", "-h"], ["predict", "-h"]])
def test_short_help_everywhere(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "validate", str(missing), "--debug"], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "No such option" not in done.stderr and "missing.yaml" in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG])
def test_a_full_disk_is_exit_2_naming_the_file(monkeypatch, tmp_path, code):
    import finetune.flows.resolve as resolve

    def full(*args, **kwargs):
        raise OSError(code, "No space left on device", str(tmp_path / "report.json"))

    monkeypatch.setattr(resolve, "resolve", full)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    assert "report.json" in result.output and "internal error" not in result.output


@pytest.mark.unit
def test_a_full_disk_in_a_librarys_own_words_is_exit_2(monkeypatch, tmp_path):
    import finetune.flows.resolve as resolve

    class SafetensorError(Exception):  # safetensors raises its own type, not an OSError
        pass

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, ... }) No space left on device (os error 28)"
        )

    monkeypatch.setattr(resolve, "resolve", full)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "internal error" not in result.output and "cannot write" in result.output


@pytest.mark.unit
def test_an_error_raised_while_a_library_handled_a_full_disk_is_exit_2(monkeypatch, tmp_path):
    """datasets' Arrow writer, closed after ENOSPC, raised "I/O operation on closed file": an internal error."""
    import finetune.flows.resolve as resolve

    def full(*args, **kwargs):
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise ValueError("I/O operation on closed file") from None

    monkeypatch.setattr(resolve, "resolve", full)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "internal error" not in result.output and "cannot write" in result.output


@pytest.mark.unit
def test_a_full_disk_with_no_file_named_claims_nothing_of_standard_output(monkeypatch, tmp_path):
    """A write with no file named may have gone to standard output (`predict > file` on a full disk): the file the
    shell made holds what reached it, so "nothing half-written was left" was untrue there."""
    import finetune.flows.resolve as resolve

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resolve, "resolve", full)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")], env={"COLUMNS": "400"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Nothing half-written was left" not in said, said
    assert "what went to standard output may be cut short" in said


@pytest.mark.unit
def test_a_closed_pipe_is_no_internal_error(monkeypatch, tmp_path):
    import finetune.flows.resolve as resolve

    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(resolve, "resolve", closed)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")])
    assert result.exit_code == PIPE_CLOSED and "internal error" not in result.output


@pytest.mark.unit
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, TERMINATED), (signal.SIGHUP, HUNG_UP)])
def test_a_stop_signal_outside_training_says_so_and_exits_128_plus_it(sent, code, monkeypatch, tmp_path):
    """A preempted job's SIGTERM, or a closed terminal's SIGHUP, while loading, evaluating or saving: one line and
    128 + the signal (each was silent), and the process's own handler is back afterwards."""
    import finetune.flows.resolve as resolve

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), sent)
        time.sleep(30)  # the handler raises before this ends

    monkeypatch.setattr(resolve, "resolve", stopped)
    before = signal.getsignal(sent)
    result = runner.invoke(app, ["data", str(tmp_path / "r.yaml")])
    assert result.exit_code == code and f"stopped by {sent.name}" in result.output, result.output
    assert "internal error" not in result.output and signal.getsignal(sent) is before


@pytest.mark.unit
def test_sighup_during_training_asks_for_a_checkpointed_stop():
    """Training lost every step since its last checkpoint on SIGHUP: it stops as on SIGTERM (exit 75, resumable)."""
    from finetune.training.loop import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        assert stop.asked and stop.name() == "SIGHUP"
        stop.received = None  # handled: nothing is raised again on the way out


@pytest.mark.slow
@pytest.mark.parametrize("arguments", [["--version"], ["--help"], ["run", "--help"], ["validate", "RECIPE"]])
def test_a_reader_closing_the_pipe_early_is_141_for_every_printing_command(arguments, tmp_path):
    """rich (tables, validate's lines, --version) and Typer's help exit 1 on a closed pipe, the code of a bug:
    finetune's own consoles and its entry point say 141, as `predict | head` always did."""
    recipe = REPO / "recipes" / "classification" / "minilm-topics.yaml"
    command = [sys.executable, "-m", "finetune", *[str(recipe) if a == "RECIPE" else a for a in arguments]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line is written
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == PIPE_CLOSED and "Traceback" not in error, error


@pytest.mark.slow
@pytest.mark.parametrize("closed", ["1", "2", "0 1 2"])
def test_a_command_started_with_its_streams_closed_runs(closed, tmp_path):
    """`finetune ... >&-` (a daemon, a cron job): Python had None for the closed stream and the console's first
    isatty() was a traceback, exit 1, before any command ran. A refusal still has its own exit code."""
    recipe = REPO / "recipes" / "classification" / "minilm-topics.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    redirections = " ".join(f"{fd}>&-" for fd in closed.split())

    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = f'exec "$0" -m finetune "$@" {redirections}'
        return subprocess.run(["bash", "-c", command, sys.executable, *arguments], env=env, cwd=REPO, timeout=120)

    assert run("validate", str(recipe)).returncode == 0
    refused = run("validate", str(tmp_path / "missing.yaml"))
    assert refused.returncode == 2, refused


@pytest.mark.slow
def test_no_colour_and_no_terminal_control_from_a_users_text(tmp_path):
    """FORCE_COLOR=0 turned colour on (rich reads any value as force), and an escape sequence in a path's name went
    to the terminal raw in the error that named it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORCE_COLOR": "0"}
    env.pop("NO_COLOR", None)
    odd = tmp_path / "x\x1b[31mred.yaml"
    for command in (["validate", str(odd)], ["eval", str(odd)]):
        done = subprocess.run(
            [sys.executable, "-m", "finetune", *command], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
        )
        assert done.returncode == 2, done
        assert "\x1b" not in done.stderr and "x\\x1b[31mred.yaml" in done.stderr, done.stderr


@pytest.mark.slow
def test_no_colour_wins_over_a_runners_force_colour():
    """NO_COLOR=1 beside a runner's FORCE_COLOR=1: `--help` wrote bold escapes into the log."""
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "eval", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0 and "Usage" in done.stdout and "\x1b" not in done.stdout, done.stdout[:300]


@pytest.mark.unit
@pytest.mark.parametrize("where", ["a launched process", "SIGTERM ignored"])
def test_sigterm_is_left_alone_in_a_launched_process_and_where_it_is_ignored(where, monkeypatch):
    """In a process of a multi-process run SIGTERM is the launcher stopping the others after one failed: their 143
    would hide that one's own code (137 for kill -9). A process started with SIGTERM ignored keeps ignoring it."""
    from finetune.cli import _terminate_as_interrupt

    if where == "a launched process":
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    installed = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.append(sig) or real(sig, handler))
    with _terminate_as_interrupt():
        assert installed == []


@pytest.mark.unit
def test_a_forked_worker_has_the_default_sigterm(monkeypatch):
    """A pool's worker inherited the handler and, blocked in C, never ran it when its pool ended it with SIGTERM:
    the pool waited forever (a bad row found in a data worker hung the run)."""
    from finetune.cli import _raise_terminated, _terminate_as_interrupt

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with _terminate_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is _raise_terminated
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once, whatever happens
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.unit
def test_a_worker_forked_while_training_has_the_default_sigterm():
    """StopSignals only notes SIGTERM: a worker that inherited it would outlive its pool's SIGTERM."""
    from finetune.training.loop import StopSignals

    with StopSignals():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.unit
def test_a_signal_ignored_at_start_stays_ignored_while_training():
    """A background job (`finetune run R &` in a script) starts with SIGINT ignored: training's handler
    replaced that, so a Ctrl-C meant for the foreground stopped the run."""
    from finetune.training.loop import StopSignals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stops._note  # not ignored: noted, as before
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_streams_are_utf8_whatever_the_locale():
    """LANG=C in a CI container: an ASCII stdout made a non-ASCII prediction an internal error."""
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}
    code = "from finetune.cli import _utf8_streams; _utf8_streams(); import sys; print(sys.stdin.readline().strip() + ' \\u00e7')"
    done = subprocess.run([sys.executable, "-c", code], input="ça".encode(), capture_output=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.decode() == "ça ç\n", done.stderr.decode()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (
            ["eval", "--predictions", "p.jsonl", "--task", "classification", "--tolerance", "0.1"],
            "--tolerance goes with --compare",
        ),
        (
            ["eval", "--predictions", "p.jsonl", "--task", "classification", "--level", "90"],
            "--level goes with --compare",
        ),
        (["run", "r.yaml", "--force-resume"], "--force-resume goes with --resume"),
        (["eval", "runs/x", "--task", "qa"], "--task goes with --predictions"),
        (["eval", "--predictions", "p.jsonl", "--task", "qa", "--checkpoint", "c"], "leave out --checkpoint"),
    ],
)
def test_a_flag_without_its_partner_is_refused(arguments, words, tmp_path):
    """They changed nothing, silently."""
    with contextlib.chdir(tmp_path):
        result = runner.invoke(app, arguments)
    assert result.exit_code == 2 and words in result.output, result.output


class _HungUpTerminal:
    """A terminal after SIGHUP: every write fails with EIO (not EPIPE)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def isatty(self) -> bool:
        return False


@pytest.mark.unit
def test_a_hung_up_terminal_neither_hides_the_stop_nor_becomes_an_internal_error():
    """A closed terminal fails writes with EIO: the progress bar's closing raised it over the checkpointed stop
    (exit 1, a traceback, not 75), and the stop's own message raised it over 129."""
    from finetune.cli import _Console
    from finetune.training.loop import TrainPlan, progress_bar

    console = _Console(file=_HungUpTerminal(), force_terminal=False)
    console.print("stopped by SIGHUP")  # said to no one, and no error
    assert console.quiet
    plan = TrainPlan(80, 10, 10, 10, 0, 1, 1)
    bar = progress_bar(_Console(file=_HungUpTerminal(), force_terminal=False), plan, True)
    with bar:
        bar.update(0, None)
        bar.update(1, None, 1e-3)  # the first line: the terminal is gone
    assert bar.closed and not bar.enabled
