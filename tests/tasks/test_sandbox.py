"""Hostile generated code: every sample must fail, leave nothing behind, and finish in bounded time."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from finetune.errors import RecipeError
from finetune.tasks import sandbox

strict_available = pytest.mark.skipif(
    sandbox.bubblewrap() is None, reason="bubblewrap is not installed (make install sets it up as root)"
)
LIMITS = sandbox.Limits(timeout_s=3, memory_mb=512)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_good_program_passes_and_a_failing_one_fails():
    outcomes = sandbox.run_programs(["assert 1 + 1 == 2", "assert 1 + 1 == 3"], "basic", LIMITS)
    assert [o.passed for o in outcomes] == [True, False]
    assert "AssertionError" in outcomes[1].detail


@strict_available
def test_strict_level_runs_ordinary_code():
    program = "import math, re, hashlib, collections\nassert math.gcd(12, 18) == 6\nprint('hello')"
    assert sandbox.run_programs([program], "strict", LIMITS)[0].passed


@strict_available
def test_hostile_samples_all_fail_and_leave_nothing_behind(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    # This test's own temporary directory (under TMPDIR, searchable by the samples' uid): nothing another run
    # made is looked at.
    private_tmp = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    private_tmp.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("FINETUNE_TEST_SECRET", "s3cr3t-value")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []

    def accept_loop(stop):
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=accept_loop, args=(stop,), daemon=True)
    thread.start()
    marker = "98765.4321"
    hostile = {
        "infinite loop": "while True:\n    pass",
        "memory hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))",
        "fork leaves a child": (
            "import os, time\n"
            f"if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '{marker}'])\n"
            "time.sleep(0.5)\nraise SystemExit(0)"
        ),
        "write outside": f"open({str(outside / 'written')!r}, 'w').write('x')",
        "os.system": f"import os\nassert os.system('echo pwned > {outside / 'system'}') == 0",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "environment secret": "import os\nassert os.environ['FINETUNE_TEST_SECRET'] == 's3cr3t-value'",
        "sys.exit(0) before the tests": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0) before the tests": "import os\nos._exit(0)\nassert False",
        "fake verdict on stdout": "print('passed')\nimport os\nos._exit(0)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
    }
    outcomes = sandbox.run_programs(list(hostile.values()), "strict", LIMITS)
    stop.set()
    thread.join()
    listener.close()

    results = {name: outcome for name, outcome in zip(hostile, outcomes)}
    assert not [name for name, o in results.items() if o.passed], results
    # Each sample fails for its own reason, not by running into the timeout: dropping one limit or one
    # isolation step changes that sample's reason, and this fails.
    reasons = {
        "infinite loop": ("killed after",),
        "memory hog": ("MemoryError",),
        "write outside": ("PermissionError", "Read-only file system", "FileNotFoundError"),
        "os.system": ("AssertionError",),
        "network": ("ConnectionRefusedError", "Network is unreachable"),
        "environment secret": ("KeyError: 'FINETUNE_TEST_SECRET'",),
        "sys.exit(0) before the tests": ("SystemExit: 0",),
        "os._exit(0) before the tests": ("exited before the tests finished",),
        "fake verdict on stdout": ("exited before the tests finished",),
        "fork bomb": ("BlockingIOError", "Resource temporarily unavailable"),
    }
    wrong = {
        name: results[name].detail
        for name, words in reasons.items()
        if not any(w in results[name].detail for w in words)
    }
    assert not wrong, wrong
    assert results["infinite loop"].status == "timeout"
    assert [name for name, o in results.items() if o.status == "timeout"] == ["infinite loop"]
    assert list(outside.iterdir()) == []
    assert accepted == []
    time.sleep(0.2)
    assert _processes_with(marker) == []
    assert list(private_tmp.iterdir()) == []  # the sandbox's scratch directories are gone
    private_tmp.rmdir()


@strict_available
def test_a_private_tmpdir_the_samples_cannot_reach_is_not_a_silent_failure(tmp_path, monkeypatch):
    private = tmp_path / "private"  # pytest's directories are 0700: another uid cannot pass through
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    outcomes = sandbox.run_programs(["assert 1 + 1 == 2", "assert False"], "strict", LIMITS)
    assert [o.passed for o in outcomes] == [True, False], outcomes


def test_basic_level_still_scrubs_the_environment_and_owns_the_verdict(monkeypatch):
    monkeypatch.setenv("FINETUNE_TEST_SECRET", "s3cr3t-value")
    programs = [
        "import os\nassert 'FINETUNE_TEST_SECRET' not in os.environ",
        "import os\nos._exit(0)",
        "while True:\n    pass",
    ]
    outcomes = sandbox.run_programs(programs, "basic", sandbox.Limits(timeout_s=2))
    assert [o.passed for o in outcomes] == [True, False, False]
    assert outcomes[2].status == "timeout"


def test_code_runs_only_with_both_opt_ins(monkeypatch):
    monkeypatch.delenv(sandbox.OPT_IN_ENV, raising=False)
    with pytest.raises(RecipeError, match="FINETUNE_ALLOW_CODE_EXECUTION=1"):
        sandbox.require_opt_in(True)
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "1")
    with pytest.raises(RecipeError, match="eval.execute_code"):
        sandbox.require_opt_in(False)
    sandbox.require_opt_in(True)


def test_strict_level_fails_closed_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox, "bubblewrap", lambda: None)
    with pytest.raises(RecipeError, match="eval.sandbox=basic"):
        sandbox.check_level("strict")
    sandbox.check_level("basic")  # an explicit choice of the weaker level is allowed


def test_strict_level_fails_closed_when_bubblewrap_cannot_run(monkeypatch, tmp_path):
    """bwrap is installed but cannot create namespaces (a container without user namespaces), or cannot be
    started at all: refused with the reason before any sample runs, never a fall back to the basic level."""
    monkeypatch.setattr(
        sandbox,
        "_bubblewrap_command",
        lambda workdir: ["/bin/sh", "-c", "echo 'bwrap: No permissions to create new namespace' >&2; exit 1", "sh"],
    )
    with pytest.raises(RecipeError, match="cannot create its namespaces here .*No permissions to create new namespace"):
        sandbox.check_level("strict")
    monkeypatch.setattr(sandbox, "_bubblewrap_command", lambda workdir: [str(tmp_path / "no-such-bwrap")])
    with pytest.raises(RecipeError, match="cannot create its namespaces here .*could not start"):
        sandbox.check_level("strict")


def test_samples_run_in_parallel():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core")
    start = time.monotonic()
    outcomes = sandbox.run_programs(["import time\ntime.sleep(1)"] * 4, "basic", LIMITS, workers=4)
    assert all(o.passed for o in outcomes)
    # Four 1-second samples one after another take at least 4 s: anything less means they overlapped.
    assert time.monotonic() - start < 4.0
