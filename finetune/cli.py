"""The `finetune` command line: thin commands over the flows (finetune/flows/); known errors become one line and an exit code."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from finetune import __version__, files
from finetune.errors import DataError, FinetuneError, GateFailed, Interrupted, PeerLost, RecipeError
from finetune.files import json_text
from finetune.secrets import RedactingFilter, redact

if TYPE_CHECKING:
    from finetune.data.tables import Origins

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning of BERT, BART and GPT-style checkpoints from one YAML recipe.",
)
# The reader closed our output pipe (`finetune predict ... | head`): 128 + SIGPIPE, as a shell reports it.
PIPE_CLOSED = 141


class _Console(Console):
    """rich's Console, but a closed output pipe is a BrokenPipeError, as a plain write's is: the command then exits
    PIPE_CLOSED (rich's own handler exits 1, the code of a bug), and training, which catches it around its progress
    lines, stops at its next step with a checkpoint instead of losing the steps since the last one."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        files.quiet_stdout()
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output closed it")

    def print(self, *args, **kwargs) -> None:
        """A terminal that hung up (SIGHUP: a closed window, a dropped ssh session) fails every write with EIO: what
        the command says then reaches no one, and must not turn its exit code into an internal error's."""
        try:
            super().print(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in files.TERMINAL_GONE:
                raise
            self.quiet = True


def _open_closed_streams() -> None:
    """A command started with stdin, stdout or stderr closed (`>&-`, a daemon or cron job): Python has None there,
    and the first `isatty()` was a traceback, exit 1, before any command ran. Each is opened on /dev/null, and on
    its own descriptor: a closed 1 or 2 would otherwise be the next file opened (a checkpoint), and what was meant
    for the terminal written into it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:  # closed: the lowest free descriptor, which is this one when those below it are open
            opened = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
        setattr(sys, name, open(fd, mode, encoding="utf-8", errors="replace", closefd=False))


_open_closed_streams()
# FORCE_COLOR=0 (or false) asks for no colour where tools share the convention; rich read any value as "force".
# NO_COLOR beside FORCE_COLOR (a CI runner forcing colour for every tool, the job asking none of this one): none,
# as the narrower ask; rich kept bold and underline under NO_COLOR while FORCE_COLOR made it write escapes to a log.
if os.environ.get("FORCE_COLOR", "").strip().lower() in {"0", "false", "no", "off"} or (
    os.environ.get("NO_COLOR") and "FORCE_COLOR" in os.environ
):
    del os.environ["FORCE_COLOR"]


def _visible(text: str) -> str:
    """Control characters a path or value may hold (an escape sequence in a folder's name) shown as escapes, not
    sent to the terminal, where they recoloured or rewrote what followed."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


# No emoji or markup in what we print of user data: `name:split` must stay as typed. Interactive (a live progress
# bar) only on a real terminal: rich counts one whenever FORCE_COLOR is set (common in CI), and a piped log then held
# 100 KB of redraws on one line and no step lines at all.
console = _Console(emoji=False, force_interactive=sys.stdout.isatty())
err_console = _Console(stderr=True, emoji=False, force_interactive=sys.stderr.isatty())
_debug = {"on": False}
# Conditions of the machine a user can fix (full disk, quota, read-only filesystem): exit 2 with the path, never
# "internal error".
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _disk_full(exc: BaseException) -> bool:
    """A full disk or file-size limit reported by a library in its own words (safetensors: "No space left on
    device (os error 28)"), or raised while it handled one (datasets' Arrow writer, closed after ENOSPC, fails with
    "I/O operation on closed file": the OSError is in the exception's context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
            return True
        if any(f"(os error {code})" in text for code in MACHINE_ERRNOS) or "No space left on device" in text:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _quiet_libraries() -> None:
    """Library chatter (load reports, progress bars) is noise in a terminal and in CI logs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _debug["on"]:
        return
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    # A HOME it cannot write: matplotlib says so in six lines and uses a temporary folder, which is all plots need.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    # Deprecation notices from inside the libraries are for their maintainers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


# Data files by their suffix: a missing one is refused as missing, never looked for on the hub.
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz")


def _is_local(reference: str, data: bool = False) -> bool:
    """A reference on this machine: `pkg:`, an existing path (`DIR::FILE.gguf` by its directory), a path written as
    one, or (data) a file name; anything else may be a hub id."""
    if reference.startswith("pkg:") or reference.startswith(("/", "./", "../", "~")):
        return True
    path = Path(reference.split("::", 1)[0]).expanduser()
    return path.exists() or (data and path.suffix.lower() in _DATA_SUFFIXES)


def _hub_references(raw: dict) -> list[str]:
    """What a raw recipe names that may live on the hub: the model, an earlier adapter, data, the retrieval model."""

    def section(parent: dict, name: str) -> dict:
        value = parent.get(name)
        return value if isinstance(value, dict) else {}

    model, data = section(raw, "model"), section(raw, "data")
    retrieval = section(data, "retrieval")
    found = [r for r in (model.get("name_or_path"), model.get("adapter")) if isinstance(r, str) and not _is_local(r)]
    for key in ("train", "eval", "knowledge_base"):
        items = data.get(key)
        for item in [items] if isinstance(items, str) else items if isinstance(items, list) else []:
            if isinstance(item, str) and not _is_local(item, data=True):
                found.append(item)
    embedding = retrieval.get("model")
    if data.get("knowledge_base") and isinstance(embedding, str) and not _is_local(embedding):
        found.append(embedding)
    return found


def _offline_unless_hub(*sources: str | Path | None, overrides: list[str] | None = None) -> None:
    """Offline by default: when everything a command's recipes (or runs' recipes) name is on this machine (a
    checkpoint directory, `pkg:`, local data), HF_HUB_OFFLINE=1, so that no library reaches for the network, with
    or without the Makefile. A hub id keeps the hub reachable; HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set by the
    user is left as it is. Called before the libraries load (they read it once, on import)."""
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return
    from finetune.recipe.schema import apply_overrides, read_recipe_file

    for source in sources:
        if source is None:
            continue
        path = Path(source).expanduser()
        try:
            raw = apply_overrides(
                read_recipe_file(path / "recipe.yaml" if path.is_dir() else path), list(overrides or [])
            )
        except Exception:  # the command itself reports an unreadable recipe; nothing is decided here
            return
        if not isinstance(raw, dict) or _hub_references(raw):
            return
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module in ("huggingface_hub.constants", "datasets.config"):  # already imported (in-process callers)
        if module in sys.modules:
            setattr(sys.modules[module], "HF_HUB_OFFLINE", True)  # noqa: B010 (the module is known only by name)


# Stopped outside training, 128 + the signal as a shell reports a killed command: Ctrl-C, SIGTERM (a preempted job,
# `timeout`), SIGHUP (a closed terminal or a dropped ssh session).
INTERRUPTED = 130
TERMINATED = 143
HUNG_UP = 129
# The signals that stop a command as Ctrl-C does, with a line saying so; inside training the loop's own handler
# (training.loop.StopSignals) takes them: it checkpoints and exits 75.
_STOPPING = (signal.SIGTERM, signal.SIGHUP)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C raises KeyboardInterrupt: what is being written is
    cleaned up on the way out (atomic writes drop their temporary file) and the command says why it stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise _Terminated(signum)


def _default_sigterm_in_child() -> None:
    """A forked worker (a featurising worker, a data loader, a pool of the objective) must not inherit the handler:
    whoever stops it with SIGTERM needs it to end at once, as the kernel's default does; a Python handler runs only
    when the worker's main thread next runs Python, and a worker blocked in C never did (its pool waited for ever)."""
    for sig in _STOPPING:
        if signal.getsignal(sig) is _raise_terminated:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except ValueError:  # not the main thread of the child: nothing can be set there
                return


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Not in a process of a multi-process run, where SIGTERM is the launcher stopping the others after one failed:
    their exit codes must not hide that process's own (`launch.worst_exit_code`: 137 for kill -9); nor where SIGTERM
    is ignored (`trap '' TERM`, `nohup` for SIGHUP)."""
    from finetune.launch import inside_launched_process

    if threading.current_thread() is not threading.main_thread() or inside_launched_process():
        yield
        return
    previous = {
        sig: signal.signal(sig, _raise_terminated) for sig in _STOPPING if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handled(command):
    """Run a command: user errors -> one line on stderr and their exit code; a bug -> exit 1."""

    # How a stopped training command continues; said only where it applies (an export has nothing to continue).
    resumable = {
        "run_command": " (`finetune run ... --resume auto` continues the run from its last checkpoint)",
        "sweep_command": " (the same `finetune sweep` command continues the study)",
    }.get(command.__name__, "")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _terminate_as_interrupt():
                result = command(*args, **kwargs)
                sys.stdout.flush()  # a closed pipe shows here, where it is handled below, not at exit
            return result
        except typer.Exit:
            raise
        except FinetuneError as exc:
            if _debug["on"]:  # the original error, chained, for what was turned into one line
                exc.__suppress_context__ = False
                traceback.print_exception(exc)
            # A stop the user asked for, saved to resume (exit 75), is no error of theirs or ours.
            label = "[yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[red]error:[/]"
            err_console.print(
                f"{label} {escape(_visible(redact(str(exc))))}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:  # a path the user gave
            where = f" {exc.filename}" if exc.filename else ""
            err_console.print(
                f"[red]error:[/] cannot use{escape(where)}: {escape(exc.strerror or str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (_Terminated), outside training's steps
            signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
            name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
            kept = (
                f" outside training's steps: no checkpoint was written, and a file being written was not put in place "
                f"(an output folder may be incomplete){resumable}"
                if resumable
                else ": a file being written was not put in place"
            )
            err_console.print(f"stopped by {name}{kept}", highlight=False, soft_wrap=True)
            if signum == signal.SIGHUP:
                raise typer.Exit(HUNG_UP) from None
            if signum == signal.SIGTERM:
                raise typer.Exit(TERMINATED) from None
            raise typer.Exit(INTERRUPTED) from None
        except BrokenPipeError:  # the reader stopped reading (`| head`): not an error of ours, nothing to show
            files.quiet_stdout()
            raise typer.Exit(PIPE_CLOSED) from None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # a path the user gave
                err_console.print(
                    f"[red]error:[/] cannot use {escape(str(exc.filename or ''))}: a name in the path is too long",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
            if exc.errno not in MACHINE_ERRNOS:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            remedy = (
                "write somewhere writable (output.dir, --output) and run again"
                if exc.errno == errno.EROFS
                else "free space (a smaller file for a file-size limit) and run again"
            )
            # Without a file named, the write may have been to standard output, which a shell redirect may have sent
            # to a file of its own: finetune cannot take back what reached it.
            left = (
                "Nothing half-written was left"
                if exc.filename
                else "None of finetune's own files was left half-written (what went to standard output may be cut short)"
            )
            err_console.print(
                f"[red]error:[/] cannot write{escape(where)}: {escape(exc.strerror or str(exc))}. {left}; "
                f"{remedy}{resumable}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except Exception as exc:  # a bug, not a user mistake, unless a peer of a multi-process run was lost
            if _debug["on"]:
                raise
            if _disk_full(exc):  # safetensors' writer reports a full disk as its own error, not an OSError
                err_console.print(
                    f"[red]error:[/] cannot write: {escape(str(exc)[:300])}. Nothing half-written was left; free space "
                    f"and run again{resumable}",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
            if _peer_lost(exc):
                err_console.print(
                    f"[red]error:[/] another process or node of this run was lost ({escape(redact(str(exc))[:300])}); "
                    "this one stopped. Start the same command on every node with --resume auto to continue from "
                    "the last checkpoint",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(PeerLost.exit_code) from None
            err_console.print(
                f"[red]internal error:[/] {type(exc).__name__}: {escape(redact(str(exc)))}\n(run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _peer_lost(exc: BaseException) -> bool:
    """A collective that failed because a peer went away: torch's distributed errors (NCCL, the store), or gloo's
    broken connection or timeout, which reach Python as a plain RuntimeError naming gloo."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "gloo" in text
        and any(word in text for word in ("Connection closed", "Connection reset", "Timed out", "timed out", "peer"))
    )


def _version(value: bool) -> None:
    if value:
        console.print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    _debug["on"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


Overrides = Annotated[list[str] | None, typer.Argument(help="section.key=value overrides (values parsed as YAML).")]
AllowCode = Annotated[
    bool,
    typer.Option(
        "--allow-code-execution",
        help="Codegen: run generated code in the sandbox (same as eval.execute_code=true; also needs "
        "FINETUNE_ALLOW_CODE_EXECUTION=1 in the environment).",
    ),
]


def _with_code_opt_in(overrides: list[str] | None, allow: bool) -> list[str]:
    return [*(overrides or []), *(["eval.execute_code=true"] if allow else [])]


@app.command("run")
@_handled
def run_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and stop before training.")] = False,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            min=1,
            help="Processes (GPUs, or CPU processes) to launch through accelerate "
            "(default: distributed.num_processes of the recipe).",
        ),
    ] = None,
    nnodes: Annotated[
        int | None,
        typer.Option(
            "--nnodes",
            min=1,
            help="Machines taking part (each runs this same command; default: what Slurm, SkyPilot or PBS set, else 1).",
        ),
    ] = None,
    node_rank: Annotated[
        int | None, typer.Option("--node-rank", min=0, help="This machine's rank among --nnodes (0: the first).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option("--rdzv-endpoint", help="HOST:PORT of the first node, where the nodes meet (several nodes)."),
    ] = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", min=0, help="Elastic restarts of the node's processes after a failure.")
    ] = 0,
    allow_code_execution: AllowCode = False,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue from a checkpoint: 'auto' (the newest usable one in the run directory, if any) or a path."
        ),
    ] = None,
    force_resume: Annotated[
        bool,
        typer.Option(
            "--force-resume", help="Resume even though the recipe, data or process count changed (not exact)."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace the run already in output.dir (its checkpoints, adapter and results)."
        ),
    ] = False,
    estimate: Annotated[
        bool | None,
        typer.Option(
            "--estimate/--no-estimate",
            help="Measure a few training steps and evaluation batches here for the plan's time and memory "
            "estimate (default: with --dry-run; a real run measures only when asked, as it costs its own time).",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the plan (--dry-run, with its estimate) or metrics.json to stdout as JSON."),
    ] = False,
) -> None:
    """Validate, train with LoRA through accelerate, evaluate, and write the run directory."""
    _offline_unless_hub(recipe, overrides=overrides)
    # Imported here, not at the top: `finetune --help` and recipe mistakes answer before torch loads.
    from finetune.evaluation.scoring import print_metrics
    from finetune.flows.resolve import resolve
    from finetune.launch import Topology, follow_launcher, inside_launched_process, processes_wanted, relaunch

    if force_resume and resume is None:  # it would change nothing, silently
        raise RecipeError("--force-resume goes with --resume (auto or a checkpoint)")
    overrides = _with_code_opt_in(overrides, allow_code_execution)
    if num_processes:  # the flag wins over the recipe's count, so the rules judge the count that runs
        from finetune.flows.resolve import too_many_processes

        problems = too_many_processes(num_processes, "--num-processes")
        if problems:
            raise RecipeError("; ".join(problems))
        overrides = [o for o in overrides or [] if o.partition("=")[0].strip() != "distributed.num_processes"]
        overrides.append(f"distributed.num_processes={num_processes}")
    resolved = resolve(recipe, overrides)  # the file read once, every rule, once, before starting processes
    loaded = resolved.recipe
    _quiet_libraries()
    num_processes = num_processes or processes_wanted(loaded.distributed.num_processes)
    if inside_launched_process():
        follow_launcher()
        topology = Topology(per_node=num_processes)
    else:
        nodes = loaded.distributed.nnodes
        topology = Topology.find(
            num_processes, nnodes, node_rank, rdzv_endpoint, recipe_nodes=None if nodes == "auto" else nodes
        )
    launch = topology.world_size > 1 and not inside_launched_process()
    if launch and topology.node_rank == 0:
        # Decided here, before any process starts (else the main process refuses, or finds nothing to resume, and
        # the others report a lost peer); the first node only, as its main process alone writes the directory.
        from finetune.flows.train import check_output
        from finetune.outputs.lock import RunLock
        from finetune.outputs.rundir import RunDir

        where = RunDir(Path(loaded.output.dir).expanduser())
        check_output(
            where,
            None if dry_run else RunLock(where.path),
            resume=resume,
            overwrite=overwrite,
            inputs=resolved.input_paths(),
        )
        # A finished run asked to resume on this machine alone: nothing to train; this process shows its metrics, as
        # one process would (other nodes, started by their own launchers, would wait for processes never started).
        finished = resume == "auto" and where.is_finished()
        launch = not (finished and topology.nodes == 1)
    if launch:
        args = [
            "run",
            str(recipe),
            *(overrides or []),
            *(["--dry-run"] if dry_run else []),
            *(["--resume", resume] if resume is not None else []),
            *(["--force-resume"] if force_resume else []),
            *(["--overwrite"] if overwrite else []),
            *({True: ["--estimate"], False: ["--no-estimate"], None: []}[estimate]),
            *(["--json"] if as_json else []),
        ]
        if topology.nodes > 1:  # the rendezvous waits, silently, until every node has come
            err_console.print(
                f"node {topology.node_rank} of {topology.nodes}: waiting for every node to meet at "
                f"{topology.address}:{topology.port} (start the same command on each, with its own --node-rank)",
                highlight=False,
                soft_wrap=True,
            )
        # The launcher waits in C++ (the rendezvous, its processes), where a Python handler never runs: SIGTERM
        # (and SIGHUP) must stop it as the kernel does (torch's agent installs its own once it starts the processes).
        if threading.current_thread() is threading.main_thread():
            for sig in _STOPPING:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
        raise typer.Exit(relaunch(topology, args, loaded.distributed.strategy, max_restarts))
    from finetune.flows.train import run

    document = run(
        resolved,
        err_console if as_json else console,
        dry_run=dry_run,
        resume=resume,
        force_resume=force_resume,
        overwrite=overwrite,
        estimate=dry_run if estimate is None else estimate,
    )
    if document is None:
        return
    if as_json:
        if _is_main_process():
            print(json_text(document, indent=2))
        if not dry_run:
            _exit_on_failed_gates(document)
        return
    if dry_run:
        return
    if _is_main_process():
        print_metrics(console, document, title=f"metrics ({loaded.output.dir})")
        from finetune.flows.export import export_hint

        out = loaded.output.dir
        word = files.shell_word(out)
        hints = [f"finetune eval {word}", f"finetune predict {word} --input FILE.jsonl", export_hint(resolved, word)]
        console.print(
            f"results in {out}/: metrics.json, predictions.jsonl, adapter/, README.md (the model card)\n"
            f"next: {'  |  '.join(h for h in hints if h)}",
            highlight=False,
            soft_wrap=True,
        )
    _exit_on_failed_gates(document)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _exit_on_failed_gates(document: dict) -> None:
    from finetune.evaluation.scoring import failed_gates

    failed = failed_gates(document)
    if failed:
        raise GateFailed(f"quality gate(s) failed: {', '.join(failed)}")


@app.command("sweep")
@_handled
def sweep_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file, with a sweep section.")],
    overrides: Overrides = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print sweep.json to stdout instead of a table (the trials' output: stderr)."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start the sweep in output.dir again instead of continuing it (only what a sweep wrote goes).",
        ),
    ] = False,
    allow_code_execution: AllowCode = False,
) -> None:
    """Search the settings of the recipe's sweep section with Optuna, every trial a normal run; name the best and the
    cheapest trial that pass the gates, and write best.yaml. The same command again continues the sweep."""
    _offline_unless_hub(recipe, overrides=overrides)
    # Imported here, not at the top: `finetune --help` and recipe mistakes answer before torch loads.
    from finetune.flows.sweep import show_sweep, sweep

    overrides = _with_code_opt_in(overrides, allow_code_execution)
    _quiet_libraries()
    document = sweep(recipe, overrides, err_console if as_json else console, overwrite=overwrite)
    if as_json:
        print(json_text(document, indent=2))
    else:
        show_sweep(console, document)
    if not document["best_passed"]:
        gates = ", ".join(document["gates"])
        what = f"no trial passed the gates ({gates})" if gates else "no trial finished"
        raise GateFailed(f"{what}; see {document['directory']}/sweep.json")


@app.command("eval")
@_handled
def eval_command(
    source: Annotated[str | None, typer.Argument(help="A recipe (base model) or a run directory.")] = None,
    overrides: Overrides = None,
    checkpoint: Annotated[str | None, typer.Option(help="Evaluate this checkpoint or adapter directory.")] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="METRIC>=VALUE, or METRIC>=VALUE@95 (the bound of its 95% interval must pass); repeatable. "
            "Exit 4 on failure.",
        ),
    ] = None,
    output: Annotated[str | None, typer.Option(help="Write metrics.json and predictions.jsonl here.")] = None,
    predictions: Annotated[str | None, typer.Option(help="Re-score a predictions.jsonl without a model.")] = None,
    task: Annotated[str | None, typer.Option(help="The task of --predictions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout instead of a table.")] = False,
    compare: Annotated[
        str | None,
        typer.Option(
            help="A baseline run (or metrics.json): exit 4 when a metric regresses beyond --tolerance; a paired test "
            "per metric (McNemar / paired bootstrap) over the rows both evaluated."
        ),
    ] = None,
    level: Annotated[
        float | None,
        typer.Option(min=50, max=99.99, help="Confidence level (%) of --compare's paired tests (default 95)."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(min=0, help="Absolute drop allowed by --compare (a rise, for eval_loss; default 0.01)."),
    ] = None,
    allow_different_data: Annotated[
        bool,
        typer.Option(
            "--allow-different-data",
            help="Let --compare compare against a baseline evaluated on other data (refused otherwise, exit 2); "
            "a warning says so.",
        ),
    ] = False,
    junit: Annotated[
        str | None,
        typer.Option(help="Write gates and comparisons as JUnit XML to this file (- for stdout; the table: stderr)."),
    ] = None,
    allow_code_execution: AllowCode = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Let --output replace an earlier evaluation there.")
    ] = False,
    all_checkpoints: Annotated[
        bool, typer.Option("--all-checkpoints", help="Score every checkpoint and the final adapter, one row per step.")
    ] = False,
    sandbox: Annotated[
        str | None,
        typer.Option(help="Codegen: strict (bubblewrap, default) or basic isolation (same as eval.sandbox=...)."),
    ] = None,
) -> None:
    """Evaluate a run, a checkpoint or a base model; or re-score saved predictions."""
    _offline_unless_hub(source, overrides=overrides)
    _quiet_libraries()
    from finetune.evaluation.compare import Baseline, junit_xml, read_baseline, write_junit
    from finetune.evaluation.scoring import dumps, print_checkpoints, print_metrics
    from finetune.flows.evaluate import evaluate, evaluate_all_checkpoints, rescore
    from finetune.outputs import rundir

    partners = {
        "--tolerance": tolerance is not None,
        "--level": level is not None,
        "--allow-different-data": allow_different_data,
    }
    if not compare and any(partners.values()):  # they would change nothing, silently
        given = [flag for flag, set_ in partners.items() if set_]
        raise RecipeError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --compare BASELINE")
    tolerance = 0.01 if tolerance is None else tolerance
    level = 95.0 if level is None else level
    baseline = (
        Baseline(compare, read_baseline(compare), tolerance, allow_different_data, level / 100) if compare else None
    )
    if sandbox not in (None, "strict", "basic"):
        raise RecipeError(f"--sandbox: {sandbox!r} is not strict or basic")
    overrides = _with_code_opt_in(overrides, allow_code_execution) + ([f"eval.sandbox={sandbox}"] if sandbox else [])
    # Where the JUnit report may go, decided before any work: never over a file finetune did not write (a later
    # --junit replaces its own earlier report), an input of this command, or into a run.
    inputs = tuple(Path(p).expanduser() for p in (source, predictions, compare) if p)
    junit_to_stdout = junit == "-"  # the XML is the output; the table, for whoever watches, goes to stderr
    if junit_to_stdout and as_json:
        raise RecipeError("--junit - and --json both print to stdout: give --junit a file")
    junit_path = (
        rundir.claim_output(junit, key="--junit", what=rundir.JUNIT, directory=False, overwrite=True, inputs=inputs)
        if junit and not junit_to_stdout
        else None
    )
    if predictions:
        from finetune.recipe.schema import EvalSection
        from finetune.tasks import TASKS

        if not task:
            raise RecipeError(f"--predictions needs --task ({', '.join(TASKS)})")
        if task not in TASKS:
            raise RecipeError(f"--task: unknown task {task!r} (tasks: {', '.join(TASKS)})")
        if source:
            raise RecipeError("give either a recipe/run or --predictions, not both")
        if checkpoint or all_checkpoints:  # they would change nothing, silently: saved predictions have no model
            raise RecipeError("--predictions re-scores saved predictions: leave out --checkpoint and --all-checkpoints")
        settings = EvalSection(execute_code=allow_code_execution, sandbox=sandbox or "strict")
        target = (
            rundir.claim_output(
                output, key="--output", what=rundir.EVALUATION, directory=True, overwrite=overwrite, inputs=inputs
            )
            if output
            else None
        )
        document = rescore(predictions, task, gate, settings, baseline)
        if target is not None:
            from finetune.files import write_json

            rundir.write_evaluation(target, lambda folder: write_json(folder / "metrics.json", document), overwrite)
    else:
        if not source:
            raise RecipeError("give a recipe, a run directory, or --predictions FILE --task T")
        if task:  # the recipe or run decides the task: --task would change nothing, silently
            raise RecipeError("--task goes with --predictions (a recipe or run names its own task)")
        if all_checkpoints:
            if checkpoint:
                raise RecipeError("--all-checkpoints scores every checkpoint; leave out --checkpoint")
            document = evaluate_all_checkpoints(
                source, gates=gate, output=output, overrides=overrides, overwrite=overwrite
            )
        else:
            document = evaluate(
                source,
                checkpoint=checkpoint,
                gates=gate,
                output=output,
                overrides=overrides,
                baseline=baseline,
                overwrite=overwrite,
            )
    if junit_path is not None:
        write_junit(document, junit_path)
        rundir.record_file(junit_path, rundir.JUNIT)
    if (document.get("comparison") or {}).get("same_data") is False:
        unlike = (
            f"the baseline {compare} was evaluated on different data than this evaluation (--allow-different-data): "
            "its metrics are not like for like"
        )
        if as_json:  # with the document's other warnings, where a CI job parsing it looks
            document.setdefault("warnings", []).append(unlike)
        else:
            err_console.print(f"[bold red]warning:[/] {escape(unlike)}", highlight=False, soft_wrap=True)
    written_to = document.pop("written_to", None)
    if as_json:
        print(dumps(document))
    else:
        table = err_console if junit_to_stdout else console
        if "checkpoints" in document:
            print_checkpoints(table, document["checkpoints"])
        print_metrics(table, document)
        if document.get("watermark_cost"):
            cost = ", ".join(f"{name} {c['difference']:+.4f}" for name, c in document["watermark_cost"].items())
            table.print(
                f"watermark cost (the run's watermarked metrics minus these): {cost}", highlight=False, soft_wrap=True
            )
        if written_to:
            table.print(f"metrics.json and predictions.jsonl written to {written_to}", highlight=False, soft_wrap=True)
    if junit_to_stdout:
        sys.stdout.write(junit_xml(document))
        sys.stdout.flush()
    _exit_on_failed_gates(document)


@app.command("predict")
@_handled
def predict_command(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory.")],
    input: Annotated[
        str,
        typer.Option(
            "--input", help="A file of inputs (JSONL; .csv, .tsv, .json, .parquet by suffix), or - for JSONL on stdin."
        ),
    ] = "-",
    knowledge_base: Annotated[
        str | None, typer.Option("--knowledge-base", help="qa: answer from these passages instead of the run's own.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="Write the predictions to this new JSONL file instead of stdout.")
    ] = None,
    message: Annotated[
        str | None,
        typer.Option("--message", help="A learned watermark: mark with this message (default: the run's own)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier --output file that predict wrote (only that).")
    ] = False,
) -> None:
    """Classify / generate / answer for new inputs; JSONL in, JSONL out (stdout, or --output)."""
    _offline_unless_hub(run_dir)
    _quiet_libraries()
    from finetune.files import write_jsonl
    from finetune.flows.evaluate import predict
    from finetune.outputs.rundir import PREDICTIONS, claim_output, record_file

    target = None
    if output is not None:  # checked before any model loads
        inputs = (Path(run_dir), *([Path(input)] if input != "-" else []))
        target = claim_output(
            output, key="--output", what=PREDICTIONS, directory=False, overwrite=overwrite, inputs=inputs
        )
    rows, origins = _read_input_rows(input)
    predicted = predict(run_dir, rows, origins, knowledge_base=knowledge_base, message=message)
    if target is not None:
        write_jsonl(target, predicted)
        record_file(target, PREDICTIONS)  # what a later --overwrite may replace
        err_console.print(f"{len(predicted)} predictions written to {target}", highlight=False, soft_wrap=True)
        return
    for row in predicted:
        print(json_text(row))


@app.command("validate")
@_handled
def validate_command(
    arguments: Annotated[
        list[str],
        typer.Argument(
            help="Recipe files to check, and section.key=value overrides (values parsed as YAML) applied to each, "
            "as `run RECIPE KEY=VALUE...` applies them.",
            metavar="RECIPE... [KEY=VALUE...]",
        ),
    ],
) -> None:
    """Check recipes: every rule `run` checks before it loads weights, every problem at once."""
    # An argument naming no file but holding `=` is an override, as run's KEY=VALUE arguments are; so is a dotted
    # key without one (`train.epochs`), which run refuses as a malformed override and validate must too.
    overrides = [
        a
        for a in arguments
        if ("=" in a or (re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", a) and Path(a).suffix not in (".yaml", ".yml")))
        and not Path(a).expanduser().exists()
    ]
    recipes = [Path(a) for a in arguments if a not in overrides]
    if not recipes:
        raise RecipeError("validate: give at least one recipe file (then any section.key=value overrides)")
    _offline_unless_hub(*recipes, overrides=overrides)
    _quiet_libraries()
    from finetune.flows.resolve import validate_recipe_file

    worst = 0
    for path in recipes:
        try:
            summary = validate_recipe_file(path, overrides)
            console.print(f"[green]ok[/]   {escape(str(path))}: {escape(summary)}", highlight=False, soft_wrap=True)
        except FinetuneError as exc:
            if _debug["on"]:  # the original error, chained, for what was turned into one line
                exc.__suppress_context__ = False
                traceback.print_exception(exc)
            err_console.print(f"[red]fail[/] {escape(_visible(redact(str(exc))))}", highlight=False, soft_wrap=True)
            worst = max(worst, exc.exit_code)
    if worst:
        raise typer.Exit(worst)


@app.command("merge")
@_handled
def merge_command(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory.")],
    output: Annotated[str, typer.Option("--output", help="A new or empty directory for the merged checkpoint.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output (never a run).")] = False,
) -> None:
    """Merge the adapter into the base weights and save a plain transformers checkpoint."""
    _offline_unless_hub(run_dir)
    _quiet_libraries()
    from finetune.flows.export import merge

    written = merge(run_dir, output, overwrite=overwrite)
    console.print(f"merged checkpoint written to {written}", highlight=False, soft_wrap=True)


@app.command("data")
@_handled
def data_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help="Where the report file goes (default data_report.json; with --json: none)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a summary.")] = False,
    tokens: Annotated[
        str | None,
        typer.Option(
            "--tokens",
            help="Also write every training row's input_ids and labels (-100 where no loss falls), before packing, "
            "one JSON line each in the training file's order (with its row number there).",
        ),
    ] = None,
) -> None:
    """The data report: rows, label balance, lengths, duplicates, train/eval overlap, QA spans, the loss mask."""
    _offline_unless_hub(recipe, overrides=overrides)
    from finetune.flows.resolve import resolve

    resolved = resolve(recipe, overrides)
    _quiet_libraries()
    from finetune.data.report import warnings
    from finetune.files import write_json
    from finetune.flows.train import report_data
    from finetune.outputs.rundir import TOKEN_FILE, claim_output

    what = "data report"
    if output is None and not as_json:  # --json prints the report: a file only where --output asks for one
        output = "data_report.json"
    target = None
    if output is not None:
        target = claim_output(
            output, key="--output", what=what, directory=False, overwrite=overwrite, inputs=resolved.input_paths()
        )
    token_file = None
    if tokens is not None:
        token_file = claim_output(
            tokens, key="--tokens", what=TOKEN_FILE, directory=False, overwrite=overwrite, inputs=resolved.input_paths()
        )
        if target is not None and token_file.resolve() == target.resolve():
            raise RecipeError(f"--tokens: {tokens} is also --output; give the token file its own path")
    report = report_data(resolved, token_file)
    if target is not None:
        write_json(target, {**report, "written_by": what})
    if as_json:
        print(json_text(report, indent=2))
        return
    for split, info in report["splits"].items():
        console.print(
            f"{split}: {info['rows']} rows; tokens {info['token_length']}; truncated {info['truncated']}, "
            f"dropped {info['dropped']} (max_length {info['max_length']})",
            highlight=False,
            soft_wrap=True,
        )
        for note in info.get("notes", []):
            console.print(f"  {note}", highlight=False, soft_wrap=True)
    for line in warnings(report) or ["no duplicates, overlap, rare classes or empty texts found"]:
        console.print(f"- {line}", highlight=False, soft_wrap=True)
    example = report.get("loss_mask_example")
    if example:
        console.print("loss mask of the first training example (⟦trained⟧):", highlight=False)
        console.print(example.get("rendered") or example, highlight=False, soft_wrap=True, markup=False)
    console.print(f"report written to {target}", highlight=False, soft_wrap=True)
    if token_file is not None:
        console.print(f"training tokens and labels written to {token_file}", highlight=False, soft_wrap=True)


@app.command("detect")
@_handled
def detect_command(
    run_dir: Annotated[str, typer.Argument(help="The watermarked run (its tokenizer and key).")],
    input: Annotated[str, typer.Option("--input", help="A JSONL file of texts, or - for stdin.")] = "-",
    field: Annotated[str, typer.Option("--field", help="The field holding each text.")] = "prediction",
    key: Annotated[int | None, typer.Option("--key", help="The watermark key (default: the run's own).")] = None,
    message: Annotated[
        str | None,
        typer.Option("--message", help="A learned watermark: the message to test for (default: the run's own)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (rows and summary) on stdout.")] = False,
) -> None:
    """Score texts for the run's watermark: per-row z-score, p-value and verdict, and how many look watermarked."""
    _offline_unless_hub(run_dir)
    _quiet_libraries()
    from finetune.flows.watermark import detect

    rows, origins = _read_input_rows(input)
    scored, summary = detect(run_dir, rows, origins, field=field, key=key, message=message)
    if as_json:
        print(json_text({"rows": scored, "summary": summary}))
        return
    for row in scored:
        print(json_text(row))
    if "p_threshold" in summary:  # a learned watermark: bits read back, a binomial test per text
        accuracy = summary["watermark_bit_accuracy"]
        err_console.print(
            f"{summary['watermarked']} of {summary['rows']} rows carry {summary['message']} message "
            f"(p < {summary['p_threshold']:g}; false-positive rate {summary['false_positive_rate']:.1e}); "
            f"bit accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}",
            highlight=False,
            soft_wrap=True,
        )
        return
    notes = []
    if summary["unscored"]:
        notes.append(f"{summary['unscored']} had no token to test (too short, or the model was sure of every token)")
    if summary.get("without_prompt"):
        notes.append(
            f"{summary['without_prompt']} were scored without their prompt (no 'prompt' field), so with "
            "entropies from the text alone"
        )
    if "bayesian" in summary:
        bayes = summary["bayesian"]
        notes.append(
            f"the trained Bayesian detector gives {bayes['probability_above_half']} a probability above 0.5 "
            f"(on its held-out texts it flagged {bayes['validation_true_positive_rate']:.0%} of marked and "
            f"{bayes['validation_false_positive_rate']:.0%} of unmarked)"
        )
    err_console.print(
        f"{summary['watermarked']} of {summary['rows']} rows look watermarked (z > {summary['z_threshold']:g}; "
        f"false-positive rate about {summary['false_positive_rate']:.1e})" + "".join(f"; {n}" for n in notes),
        highlight=False,
        soft_wrap=True,
    )


@app.command("train-detector")
@_handled
def train_detector_command(
    run_dir: Annotated[str, typer.Argument(help="A run watermarked with method synthid.")],
    samples: Annotated[
        int, typer.Option("--samples", min=2, help="Training prompts to generate from (marked and unmarked each).")
    ] = 200,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run's trained detector.")] = False,
) -> None:
    """Train SynthID's Bayesian detector for the run (its weights go to RUN/watermark_detector/); detect then uses it."""
    _offline_unless_hub(run_dir)
    _quiet_libraries()
    from finetune.flows.watermark import train_watermark_detector

    report = train_watermark_detector(run_dir, samples, overwrite=overwrite)
    console.print(
        f"trained on {report['train_texts']} texts ({report['prompts']} prompts, marked and unmarked); on "
        f"{report['validation_texts']} held-out texts: {report['validation_true_positive_rate']:.0%} of marked and "
        f"{report['validation_false_positive_rate']:.0%} of unmarked flagged; written to {report['written_to']}",
        highlight=False,
        soft_wrap=True,
    )


def _read_input_rows(input: str) -> tuple[list[dict], Origins]:
    """JSONL rows from a file or stdin (-), each a JSON object, and each one's line; a bad line is named."""
    from finetune.data.tables import read_input_rows

    if input != "-":
        if Path(input).expanduser().is_dir():
            raise DataError(f"{input}: a directory, not an input file (give a JSONL file, or - for stdin)")
        if not Path(input).expanduser().is_file():
            raise DataError(f"{input}: input file not found")
        return read_input_rows(Path(input).expanduser(), input)
    return read_input_rows(None, "stdin")


@app.command("export")
@_handled
def export_command(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory.")],
    output: Annotated[str, typer.Option("--output", help="FILE.gguf (gguf), or a new or empty directory (hf).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf (llama.cpp, Ollama, LM Studio; the decoders docs/export.md lists, others refused naming "
            "them) or hf.",
        ),
    ] = "gguf",
    quant: Annotated[
        str, typer.Option("--quant", help="gguf: f16 (default), bf16 or q8_0 (gguf-py's quantiser).")
    ] = "f16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (never a run).")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="gguf: load the file in llama.cpp (llama-cpp-python) and compare it with the merged model on the "
            "run's eval data: tokenization, greedy continuations (f16), next-token agreement; exit 4 if it falls short.",
        ),
    ] = False,
) -> None:
    """Export the merged model: a GGUF file for llama.cpp/Ollama, or a plain transformers checkpoint."""
    _offline_unless_hub(run_dir)
    _quiet_libraries()
    from finetune.flows.export import export

    exported = export(run_dir, output, format=format, quant=quant, overwrite=overwrite, verify=verify)
    console.print(f"exported {format} to {exported.path}", highlight=False, soft_wrap=True)
    if exported.parity is not None:
        parity = exported.parity
        console.print(
            f"llama.cpp parity ({parity.quant}): tokenization {parity.texts_identical}/{parity.texts} identical, "
            f"greedy continuations {parity.continuations_identical}/{parity.prompts} identical "
            f"({parity.continuations_near_tie} more parted at a near-tie), next token {parity.next_token:.1%} of "
            f"{parity.positions} positions",
            highlight=False,
            soft_wrap=True,
        )


# Process-wide settings of the libraries underneath, read once when torch first uses them: set by `main` before any
# command imports torch, inherited by the processes accelerate's launcher starts (they run `python -m finetune`, so
# `main` again); a value the user has set wins. oneDNN (torch's bf16 matmuls on CPU) and ideep (torch's layer over
# it) each keep up to 1,024 entries by shape, never freed, and generative batches bring a new width almost every step:
# ~28 matmul kernels a width, which every layer of the step reuses. Both must be capped (each holds the other's
# kernels). At 128 the shipped SmolLM2 QA recipe's `finetune run` peaked at 2,104 and 2,140 MiB against 2,599 and
# 2,343 MiB uncapped, run alternately, at 293.0 and 294.5 training tokens/s against 296.7 and 270.0; at 64 it was
# 8% slower (evicted kernels made again, ~31 ms a width). docs/performance.md, 2026-12-06 evening. The numbers a
# run produces (loss, adapter bytes, metrics) are the same.
CACHE_CAPACITY = "128"
RUNTIME_DEFAULTS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": CACHE_CAPACITY, "LRU_CACHE_CAPACITY": CACHE_CAPACITY}


def set_runtime_defaults() -> None:
    """Put RUNTIME_DEFAULTS in this process's environment (and so its children's) where the user has not."""
    for key, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _utf8_streams() -> None:
    """Standard streams in UTF-8 whatever the locale (LANG=C in a CI container): data, predictions and JSON are
    UTF-8, and an ASCII stdout made a non-ASCII prediction an internal error (UnicodeEncodeError)."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding and encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")


def main() -> None:
    set_runtime_defaults()
    _utf8_streams()
    # --debug is a root option; accept it anywhere on the line, as users type it (`finetune run r.yaml --debug`).
    if "--debug" in sys.argv[2:]:
        sys.argv.remove("--debug")
        sys.argv.insert(1, "--debug")
    if "--debug" not in sys.argv[1:2]:
        # Libraries' own progress bars (transformers' GGUF conversion uses tqdm directly, beyond its logging's
        # switch) are noise in a terminal and in CI logs; tqdm reads this when it is first imported, which is later.
        os.environ.setdefault("TQDM_DISABLE", "1")
    discarded = _stdout_discarded()
    try:
        app()
    except SystemExit as done:
        code = done.code
        try:  # what is still buffered is written here, where a closed pipe can be told from a bug
            sys.stdout.flush()
        except BrokenPipeError:
            files.quiet_stdout()
            code = PIPE_CLOSED
        # Typer's help and click point stdout at /dev/null and exit 1 when the reader closed the pipe
        # (`finetune --help | head -1`): that exit is the closed pipe's, not a bug's.
        if code == 1 and not discarded and _stdout_discarded():
            code = PIPE_CLOSED
        raise SystemExit(code) from None


def _stdout_discarded() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):  # stdout is no file (a test runner's buffer)
        return False


if __name__ == "__main__":
    main()
