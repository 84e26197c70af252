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
  filesystem isolation). A child that starts its own session (`os.setsid()`)
  leaves the process group and can outlive the sample: only strict's PID
  namespace ends every process a sample starts. (Killing by the sample's uid
  would reach another finetune process's samples: the uids are per slot.)

Inside, a small harness applies the resource limits (address space, CPU time,
file size, processes, open files, no core dumps) to itself before it runs the
program, and reports success only by printing a per-run secret token after the
program finished: a sample that exits early (`sys.exit(0)`, `os._exit(0)`),
dies on a signal or prints its own verdict has failed. The parent owns the
verdict and kills the whole process group at the wall-clock limit.
"""

from __future__ import annotations

import json
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
    # A counted test (finetune's own tail, run after the sample) leaves (passed, total) behind for the verdict.
    try:
        sys.stdout.flush()  # what the program printed comes before the verdict
    except BaseException:
        pass
    counted = namespace.get("__finetune_tests__")
    verdict = token if counted is None else "%s %d %d" % (token, int(counted[0]), int(counted[1]))
    os.write(out, ("\n" + verdict + "\n").encode())
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
    tests: tuple[int, int] | None = None  # (passed, total) when the program counted its tests (counted_tests)
    output: str = ""  # what the program printed before the verdict (the last `output_bytes` of it)

    @property
    def score(self) -> float:
        """The share of tests passed: counted, or all-or-nothing."""
        if self.tests is not None and self.status == "passed":
            passed, total = self.tests
            return passed / total if total else 0.0
        return 1.0 if self.passed else 0.0

    @property
    def reason(self) -> str:
        """Why it scored what it did, in one word for counting: passed, partial, no_test_passed, timeout, or the
        exception's name
        (AssertionError, SyntaxError, MemoryError, ...), or `crashed` for a death without one (a signal, an exit)."""
        if self.status == "passed":
            score = self.score
            return "passed" if score == 1.0 else "partial" if score > 0 else "no_test_passed"
        if self.status == "timeout":
            return "timeout"
        name = self.detail.split(":", 1)[0].strip()
        return name if name.isidentifier() else "crashed"


def require_opt_in(
    execute_code: bool, what: str = "codegen: scoring runs generated code", environment: bool = True
) -> None:
    """Generated code (or a user's reward function: `what` runs) runs only when the recipe (or flag) and the
    environment both say so. `environment` False: the recipe's own opt-in alone (`validate`: the variable belongs
    to the machine that runs the recipe)."""
    missing = []
    if not execute_code:
        missing.append("eval.execute_code: true (or --allow-code-execution)")
    if environment and os.environ.get(OPT_IN_ENV) != "1":
        missing.append(f"the environment variable {OPT_IN_ENV}=1")
    if missing:
        raise RecipeError(f"{what}, which needs two opt-ins; missing: " + " and ".join(missing))


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


def run_programs(
    programs: list[str], level: str, limits: Limits, workers: int | None = None, output_bytes: int = 0
) -> list[Outcome]:
    """Run each program in its own sandbox, in parallel across cores; outcomes in input order (each with the last
    `output_bytes` of what it printed, for programs whose output is their result)."""
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(programs) or 1))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(program: str) -> Outcome:
        slot = slots.get()
        try:
            return _run_one(program, level, limits, slot, output_bytes)
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


def _run_one(program: str, level: str, limits: Limits, slot: int, output_bytes: int = 0) -> Outcome:
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
        text = _tail(output, 4096 + output_bytes)
        lines = text.rstrip("\n").splitlines()
        verdict = lines[-1].split() if lines else []
        if code == 0 and verdict and verdict[0] == token:
            tests = (int(verdict[1]), int(verdict[2])) if len(verdict) == 3 else None
            printed = text[: text.rstrip("\n").rfind("\n")] if output_bytes else ""
            return Outcome(True, "passed", tests=tests, output=printed[-output_bytes:] if output_bytes else "")
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


# The user's module runs with its standard output on /dev/null (fd 1 itself, so C-level writes too): the result
# line is the only thing written there. Sharing it, a print without a newline, or a few MB of printing (the output
# limit), turned the batch's rewards to 0 blamed on the function's result.
_CALL = """
import json, math, os, sys, types
_result = os.dup(1)
_quiet = os.open(os.devnull, os.O_WRONLY)
os.dup2(_quiet, 1)
_module = types.ModuleType({name!r})
_module.__file__ = {name!r} + ".py"
exec(compile({source!r}, {filename!r}, "exec"), _module.__dict__)
_values = list(getattr(_module, {function!r})(**json.loads({arguments!r})))
def _number(value):
    # Anything a number converts from (numpy's float32, a 0-d tensor, a bool), as TRL takes a reward: only an int or
    # a float was, and a float32 became "not a number" (reward 0). Text is no number, even "0.5".
    try:
        number = float(value.__float__())
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None
_line = json.dumps([_number(v) for v in _values])
sys.stdout.flush()
os.dup2(_result, 1)
os.write(1, (_line + "\\n").encode())
"""


def run_function(
    source: str, filename: str, function: str, arguments: dict, level: str, limits: Limits
) -> tuple[list[float | None] | None, Outcome]:
    """Call `function(**arguments)` of a user's module (its source) in one sandboxed process: its list of numbers
    (None where a value is not a finite number), or None when it failed (the outcome says why)."""
    program = _CALL.format(
        name=Path(filename).stem, source=source, filename=filename, function=function, arguments=json.dumps(arguments)
    )
    size = 64 + 32 * max((len(v) for v in arguments.values() if isinstance(v, list)), default=1)
    outcome = run_programs([program], level, limits, workers=1, output_bytes=size)[0]
    if not outcome.passed:
        return None, outcome
    try:
        values = json.loads(outcome.output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, Outcome(False, "failed", "BadOutput: the function's result is not a list of numbers")
    if not isinstance(values, list):
        return None, Outcome(False, "failed", "BadOutput: the function's result is not a list of numbers")
    return values, outcome
