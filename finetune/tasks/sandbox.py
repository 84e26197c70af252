"""Running untrusted generated code: one isolated, limited, killable process per sample.

Levels (`eval.sandbox`):

- strict (default): bubblewrap namespaces. Read-only root filesystem, a private
  /tmp, an empty working directory that is the only writable place, no network
  (own network namespace), own PID namespace (every process the sample starts
  dies with it), a cleared environment. Run as root, each worker also gets its
  own unprivileged uid so the process limit applies. If bubblewrap is missing
  or cannot create namespaces, nothing runs: the command fails closed.
- basic (explicit choice only): the same limits, working directory, scrubbed
  environment and process-group kill, without namespaces (no network or
  filesystem isolation).

Inside, a small harness applies the resource limits (address space, CPU time,
file size, processes, open files, no core dumps) to itself before it runs the
program, and reports success only by printing a per-run secret token after the
program finished: a sample that exits early (`sys.exit(0)`, `os._exit(0)`),
dies on a signal or prints its own verdict has failed. The parent owns the
verdict and kills the whole process group at the wall-clock limit.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import RecipeError

OPT_IN_ENV = "FINETUNE_ALLOW_CODE_EXECUTION"
_UID_BASE = 61000  # per-worker uids when started as root (none of them owns any file)

_HARNESS = r"""
import os, resource, sys
def _limit(name, value):
    resource.setrlimit(name, (value, value))
def _main():
    token = sys.stdin.readline().strip()
    memory, cpu, fsize, nproc = (int(x) for x in sys.argv[1:5])
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_CPU, cpu)
    _limit(resource.RLIMIT_FSIZE, fsize)
    _limit(resource.RLIMIT_NPROC, nproc)
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_CORE, 0)
    out = os.dup(1)
    source = open("program.py", encoding="utf-8").read()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as exc:
        try:
            sys.stderr.write("%s: %s\n" % (type(exc).__name__, str(exc)[:300]))
            sys.stderr.flush()
        finally:
            os._exit(1)
    os.write(out, ("\n" + token + "\n").encode())
    os._exit(0)
_main()
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 32


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str = ""


def require_opt_in(execute_code: bool) -> None:
    """Generated code runs only when the recipe (or flag) and the environment both say so."""
    missing = []
    if not execute_code:
        missing.append("eval.execute_code: true (or --allow-code-execution)")
    if os.environ.get(OPT_IN_ENV) != "1":
        missing.append(f"the environment variable {OPT_IN_ENV}=1")
    if missing:
        raise RecipeError(
            "codegen: scoring runs generated code, which needs two opt-ins; missing: " + " and ".join(missing)
        )


def bubblewrap() -> str | None:
    return shutil.which("bwrap")


def check_level(level: str) -> None:
    """Fail closed: the strict level needs a working bubblewrap."""
    if level != "strict":
        return
    if bubblewrap() is None:
        raise RecipeError(
            "eval.sandbox=strict needs bubblewrap (`bwrap`), which is not installed; install it "
            "(Debian/Ubuntu: apt-get install bubblewrap) or choose eval.sandbox=basic (no network or filesystem isolation)"
        )
    outcome = run_programs(["pass"], level, Limits(timeout_s=30))[0]
    if not outcome.passed:
        raise RecipeError(
            f"eval.sandbox=strict: bubblewrap cannot create its namespaces here ({outcome.detail.strip()[:200]}); "
            "allow user namespaces or choose eval.sandbox=basic"
        )


def run_programs(programs: list[str], level: str, limits: Limits, workers: int | None = None) -> list[Outcome]:
    """Run each program in its own sandbox, in parallel across cores; outcomes in input order."""
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(programs) or 1))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(program: str) -> Outcome:
        slot = slots.get()
        try:
            return _run_one(program, level, limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))


def _interpreter() -> tuple[str, bool]:
    """(python for the samples, whether to run them under their own uid).

    As root, samples run under an unprivileged uid (the kernel does not apply
    the process limit to root), so the interpreter must be reachable by any
    user; a Python installed under a private home falls back to the system one.
    """
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and _world_executable(Path(candidate)):
            return candidate, True
    return sys.executable, False


def _world_executable(path: Path) -> bool:
    path = path.resolve()
    if not path.is_file() or not path.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _scratch_base(uid: int | None) -> str:
    """Where a sample's directory goes: the temporary directory (TMPDIR), unless the sample's own uid could not
    reach it (a private TMPDIR inside a 0700 directory); then the shared /tmp or /var/tmp, never a silent
    failure of every sample."""
    base = Path(tempfile.gettempdir()).resolve()
    if uid is None or _traversable(base):
        return str(base)
    for shared in (Path("/tmp"), Path("/var/tmp")):
        if shared.is_dir() and _traversable(shared) and shared.stat().st_mode & 0o1000:  # world-writable, sticky
            return str(shared)
    raise RecipeError(
        f"eval.sandbox: the samples' user cannot reach the temporary directory {base} (a parent is "
        "not world-searchable); set TMPDIR to a directory like /tmp"
    )


def _run_one(program: str, level: str, limits: Limits, slot: int) -> Outcome:
    python, own_uid = _interpreter()
    uid = _UID_BASE + slot if own_uid else None
    root = Path(tempfile.mkdtemp(prefix="finetune-sandbox-", dir=_scratch_base(uid)))
    try:
        root.chmod(0o711)  # the sample's uid may pass through to its working directory, nothing more
        workdir = root / "work"
        workdir.mkdir()
        (workdir / "program.py").write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
        output = root / "stdout"  # outside the sample's reach
        token = secrets.token_hex(16)
        nproc = limits.processes if uid is not None else _processes_of_user() + limits.processes
        command = [
            python,
            "-I",
            "-c",
            _HARNESS,
            str(limits.memory_mb << 20),
            str(int(limits.timeout_s) + 1),
            str(limits.file_mb << 20),
            str(nproc),
        ]
        if level == "strict":
            command = _bubblewrap_command(workdir) + command
        with open(output, "wb") as stdout, open(root / "stderr", "wb") as stderr:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=_clean_environment(workdir),
                    stdin=subprocess.PIPE,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    user=uid,
                    group=uid,
                    extra_groups=[] if uid is not None else None,
                )
            except OSError as error:  # the sandbox itself cannot start: the sample fails, nothing runs unconfined
                return Outcome(False, "failed", f"could not start {command[0]}: {error}")
            assert process.stdin is not None  # stdin=subprocess.PIPE
            try:
                process.stdin.write((token + "\n").encode())
                process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                code = process.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process)
            if timed_out:
                process.wait()
        if timed_out:
            return Outcome(False, "timeout", f"killed after {limits.timeout_s:g} s")
        lines = _tail(output).splitlines()
        if code == 0 and lines and lines[-1].strip() == token:
            return Outcome(True, "passed")
        detail = _tail(root / "stderr").strip().splitlines()
        why = detail[-1] if detail else f"exit code {code}" if code else "exited before the tests finished"
        return Outcome(False, "failed", why)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bubblewrap_command(workdir: Path) -> list[str]:
    return [
        bubblewrap() or "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/dev/shm",
        "--bind",
        str(workdir),
        str(workdir),
        "--chdir",
        str(workdir),
        "--unshare-all",  # user, ipc, pid, net, uts, cgroup: no network, own PIDs
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        *_environment_arguments(workdir),
    ]


def _environment_arguments(workdir: Path) -> list[str]:
    arguments = []
    for key, value in _clean_environment(workdir).items():
        arguments += ["--setenv", key, value]
    return arguments


def _clean_environment(workdir: Path) -> dict[str, str]:
    """Nothing from the caller's environment (tokens, keys) reaches the sample."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, limit: int = 4096) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - limit))
        return handle.read().decode("utf-8", errors="replace")


def _processes_of_user() -> int:
    """How many processes this user already has: RLIMIT_NPROC counts them all."""
    uid = os.getuid()
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count
