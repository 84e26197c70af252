"""One writer per run directory: a second RunLock is refused naming the holder, in this process or another; a
holder killed with SIGKILL leaves a stale file the next writer simply takes over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from finetune.errors import RecipeError
from finetune.outputs.lock import LOCK_NAME, RunLock

# A second process that takes the lock; prints READY once it holds it, then waits for a signal.
HOLDER = r"""
import sys, time
from finetune.outputs.lock import RunLock
lock = RunLock(sys.argv[1], command="finetune run holder.yaml").acquire()
print("READY", flush=True)
time.sleep(600)
"""

# A second process that tries the lock once: exit 0 when it got it, 2 (the RecipeError's code) with the message.
TRY = r"""
import sys
from finetune.errors import RecipeError
from finetune.outputs.lock import RunLock
try:
    with RunLock(sys.argv[1]):
        pass
except RecipeError as exc:
    print(exc, flush=True)
    sys.exit(exc.exit_code)
"""


def start_holder(directory):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        pytest.fail(f"the holder never took the lock: {process.communicate()[1][-2000:]}")
    return process


def try_lock(directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(directory)], capture_output=True, text=True, timeout=120)


@pytest.mark.unit
def test_a_second_lock_in_the_same_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "runs" / "x"
    with RunLock(run, command="finetune run r.yaml") as first:
        assert first.created_directory and (run / LOCK_NAME).is_file()
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RecipeError) as refused:
            RunLock(run).acquire()
        message = str(refused.value)
        assert refused.value.exit_code == 2
        assert message.startswith(f"output.dir: {run} is in use by another finetune process (pid {os.getpid()} ")
        assert f"on host {socket.gethostname()}, since {holder['since']}" in message
        assert "finetune run r.yaml" in message and message.endswith("wait for it to finish or stop it")
        with pytest.raises(RecipeError, match=f"pid {os.getpid()} "):
            RunLock(run).refuse_if_held()  # the early look names the holder too
        # The refused attempts touched nothing: the holder's note is intact.
        assert json.loads((run / LOCK_NAME).read_text()) == holder
    # Release removes the lock file and nothing else.
    assert sorted(p.name for p in run.iterdir()) == []
    RunLock(run).refuse_if_held()  # free: nothing to say, and nothing created
    RunLock(tmp_path / "never-made").refuse_if_held()
    assert sorted(p.name for p in run.iterdir()) == [] and not (tmp_path / "never-made").exists()


@pytest.mark.unit
def test_release_then_reacquire_and_release_keeps_the_run_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".finetune-run").write_text("a finetune run directory\n")
    (run / "train_log.jsonl").write_text("{}\n")
    lock = RunLock(run, label="RUN").acquire()
    assert not lock.created_directory and lock.held
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and not (run / LOCK_NAME).exists()
    again = RunLock(run).acquire()  # a new object
    assert again.held
    with pytest.raises(RecipeError, match=r"^RUN: .* is in use"):
        lock.acquire()  # the released object is refused like any other while `again` holds it
    again.release()
    assert lock.acquire().held  # and the first one takes it back
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == [".finetune-run", "train_log.jsonl"]


@pytest.mark.unit
def test_a_file_in_place_of_the_directory_is_a_recipe_error(tmp_path):
    target = tmp_path / "run"
    target.write_text("not a directory")
    with pytest.raises(RecipeError, match="is a file, not a directory"):
        RunLock(target).acquire()


@pytest.mark.unit
def test_a_symlink_in_place_of_the_lock_file_is_refused_and_its_target_untouched(tmp_path):
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    run.mkdir()
    target.write_text("keep me")
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(RecipeError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_another_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        refused = try_lock(run)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"in use by another finetune process (pid {holder.pid} on host {socket.gethostname()}, since " in (
            refused.stdout
        )
        assert "finetune run holder.yaml" in refused.stdout
        # And this process is refused too (a lock between processes, not only within one).
        with pytest.raises(RecipeError, match=f"pid {holder.pid} "):
            RunLock(run).acquire()
        with pytest.raises(RecipeError, match=f"pid {holder.pid} "):
            RunLock(run).refuse_if_held()
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
    assert try_lock(run).returncode == 0


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The file is still there, naming the dead holder: no one cleaned up. It is stale: nobody is refused.
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid
    RunLock(run).refuse_if_held()
    with RunLock(run, command="finetune run next.yaml") as lock:
        assert lock.holder()["pid"] == os.getpid() and lock.holder()["command"] == "finetune run next.yaml"
    assert try_lock(run).returncode == 0


@pytest.mark.slow
def test_racing_processes_get_exactly_one_holder(tmp_path):
    """Six processes start at once on one new directory: exactly one holds it, the others are refused."""
    run, stop = tmp_path / "runs" / "new", tmp_path / "stop"
    script = r"""
import pathlib, sys, time
from finetune.errors import RecipeError
from finetune.outputs.lock import RunLock
start = float(sys.argv[3])
while time.time() < start:
    pass
try:
    lock = RunLock(sys.argv[1]).acquire()
except RecipeError:
    sys.exit(2)
while not pathlib.Path(sys.argv[2]).exists():  # hold it until every other racer has tried
    time.sleep(0.05)
lock.release()
"""
    start = time.time() + 4
    racers = [
        subprocess.Popen([sys.executable, "-c", script, str(run), str(stop), str(start)], stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    deadline = time.time() + 300
    try:
        while sum(r.poll() is not None for r in racers) < len(racers) - 1 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.touch()
        errors = [racer.communicate(timeout=120)[1][-1000:] for racer in racers]
    codes = sorted(r.returncode for r in racers)
    assert codes == [0] + [2] * (len(racers) - 1), errors


@pytest.mark.unit
def test_commands_reading_a_run_refuse_one_another_process_holds(tmp_path):
    """predict, merge, export and the watermark's detector read a run through resolve_run: while another process
    trains, resumes or evaluates into it (its adapter and card may be replaced under them), they are refused
    naming it, before they read anything."""
    from finetune.flows.resolve import resolve_run

    run = tmp_path / "runs" / "x"
    busy = r"is in use by another finetune process .*finetune run r.yaml --resume"
    with RunLock(run, command="finetune run r.yaml --resume auto"), pytest.raises(RecipeError, match=busy):
        resolve_run(run)
    with pytest.raises(RecipeError, match="not a finished run directory"):  # free: read as it is
        resolve_run(run)
