"""Before a run writes anything: is the output directory ours to write, writable, with room; may it resume?"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from finetune import files
from finetune.data.tables import data_file_hashes
from finetune.errors import RecipeError
from finetune.outputs import manifest as provenance
from finetune.outputs.lock import LOCK_NAME
from finetune.recipe.schema import Recipe, flat_settings
from finetune.secrets import redact_tree

# A checkpoint of a LoRA run is small; this floor is checked before anything is
# loaded, and the exact size (from the trainable parameters) once LoRA is applied.
MIN_FREE_BYTES = 64 << 20


def output_decision(
    run: RunDir,
    *,
    resume: str | None,
    overwrite: bool,
    owner: Path | None = None,
    inputs: tuple[Path, ...] = (),
    writes: bool = True,
) -> str:
    """What a run does with its output directory, or a RecipeError when it may not write there.

    Never without consent: a directory holding a run is continued (--resume) or
    replaced (--overwrite); a non-empty directory that is not a run is never written into; nor is a directory
    inside another run (that run's --overwrite would reach it), but for a run's own part (`owner`: the run whose
    knowledge-base retriever this is).
    """
    if resume is not None and not resume.strip():
        raise RecipeError("--resume: give 'auto' or a checkpoint path (an empty value is not a fresh start)")
    if resume is not None and overwrite:
        raise RecipeError("--resume and --overwrite are exclusive: continue the run, or replace it")
    if resume not in (None, "auto") and not Path(resume).expanduser().exists():  # before anything loads
        raise RecipeError(f"--resume {resume}: no such checkpoint directory (use --resume auto or a step-N directory)")
    problem = output_dir_problem(run, owner, writes)
    if problem is not None:
        raise RecipeError(problem)
    where = run.path
    if run.is_empty():
        return f"{where} (new)"
    kind = "a finished run" if run.is_finished() else "an unfinished run"
    if resume is not None:
        if not (resume == "auto" and run.is_finished()):  # a finished run resumed trains nothing, replaces nothing
            foreign = _foreign_files(run, run.adapter)
            if foreign:
                raise RecipeError(
                    f"--resume: {foreign[0]} was not written by finetune and the resumed run replaces adapter/ "
                    "whole when it finishes; nothing was removed. Move it out of the run first."
                )
        return f"{where} ({kind}: continued from its checkpoint)"
    if overwrite:
        # Never an input of this run the overwrite would remove (its recipe file: the model card's `finetune run
        # RUN/recipe.yaml`, or its starting adapter); one it keeps (a file of the user's inside) is no reason.
        removed = [r.parent.resolve() / r.name for r in _removals(run)[0]]  # a link removed, not its target
        roots = {run.path.resolve(), Path(os.path.abspath(run.path))}
        for source in inputs:
            # As resolved and as written: a link the overwrite removes may be the way the input is reached.
            places = {source.expanduser().resolve(), Path(os.path.abspath(source.expanduser()))}
            if any(_removed_with(place, roots, removed) for place in places):
                raise RecipeError(
                    f"--overwrite: {source} is an input of this run and lies inside {where}, which the overwrite "
                    "replaces; nothing was removed. Copy it out of the run first, or choose another output.dir."
                )
        return f"{where} ({kind}: replaced, as --overwrite asks)"
    raise RecipeError(
        f"output.dir: {where} already holds {kind}. Use --resume auto to continue it, --overwrite to replace it, "
        "or choose another output.dir."
    )


def _removed_with(place: Path, roots: set[Path], removed: list[Path]) -> bool:
    """Whether an --overwrite removing `removed` takes the input at `place`: the input removed, inside a folder
    removed, or a folder of the run whose files go one by one (model.adapter: the run's adapter/); a folder around
    the whole run (a model beside its runs/) is not."""
    inside = any(place == root or root in place.parents for root in roots)
    return any(place == r or r in place.parents or (inside and place in r.parents) for r in removed)


def output_dir_problem(run: RunDir, owner: Path | None = None, writes: bool = True) -> str | None:
    """What makes `run.path` no place for a run whatever --resume or --overwrite say (`validate` checks it too):
    a file; a folder inside another run (but its own part: `owner`); a non-empty folder holding no run."""
    where = run.path
    dangling = next((p for p in (where, *where.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir said "File exists", and the lock "a file, not a directory"
        return (
            f"output.dir: {dangling} is a symbolic link to {os.readlink(dangling)}, which does not exist; create "
            "that folder, or choose another output.dir"
        )
    if where.exists() and not where.is_dir():
        return f"output.dir: {where} is a file, not a directory"
    blocking = next((p for p in where.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # no folder can be made there: found by run only when it tried
        return f"output.dir: {where} lies under {blocking}, which is a file, not a directory"
    # The folder that would hold the run (or its first missing parent) must be writable: `validate` passed what `run`
    # refused only when it tried to create it. (os.access: what this user may do there, a read-only mount included.)
    # A run already there is judged by what it is asked to do (a finished one resumed writes nothing).
    # `writes` False: a dry run, which writes nothing (a plan made on a read-only mount, or for another machine).
    existing = next(p for p in (where, *where.parents) if p.exists())
    if writes and run.is_empty() and not os.access(existing, os.W_OK | os.X_OK):
        return f"output.dir: {where} cannot be written: {existing} is not writable (permissions, or a read-only filesystem)"
    resolved = where.expanduser().resolve()
    # A sweep's trials (`trials/N`) are its own: a run there replaced a trial that sweep.json still described.
    sweep = next((p for p in (resolved, *resolved.parents) if made_by_finetune(p, SWEEP)), None)
    if sweep is not None and (sweep == resolved or resolved.is_relative_to(sweep / "trials")):
        # Its own: the sweep's trials (owner: the sweep), and a trial's own part (a knowledge-base trial's retriever,
        # owner: the trial).
        mine = owner is not None and owner.expanduser().resolve().is_relative_to(sweep)
        if not mine:
            inside = "is" if sweep == resolved else "lies inside"
            return (
                f"output.dir: {where} {inside} the finetune sweep {sweep}, whose trials are its own (`finetune sweep` "
                "continues or, with --overwrite, restarts them). Choose a path outside it (its best.yaml writes to "
                "best/)."
            )
    around = next((p for p in resolved.parents if RunDir(p).holds_run()), None)
    if around is not None and (owner is None or around != owner.expanduser().resolve()):
        return (
            f"output.dir: {where} lies inside the finetune run {around}; a run never writes inside another run "
            "(its --overwrite would reach it). Choose a path outside any run."
        )
    if not run.is_empty() and not run.holds_run():
        return (
            f"output.dir: {where} is not empty and holds no finetune run; finetune never writes into another "
            "folder's files. Choose a new or empty output.dir."
        )
    return None


def claim(run: RunDir) -> bool:
    """Create the run directory with its marker; fail before loading anything if it is not writable or full.

    Returns whether the directory was created here (so a failure before training can remove it again).
    """
    created = not run.path.exists()
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        check_free_space(run.path, MIN_FREE_BYTES)
        files.write_text_atomic(run.marker, "a finetune run directory\n")
    except OSError as exc:
        release(run, created)
        raise RecipeError(f"output.dir: {run.path} is not writable: {exc.strerror or exc}") from exc
    except RecipeError:  # too little space: nothing left behind, so the retry is not refused as an unfinished run
        release(run, created)
        raise
    return created


def release(run: RunDir, created: bool) -> None:
    """Undo `claim` after a failure before training: remove the directory if this run made it and wrote nothing else."""
    if created and run.path.is_dir() and {p.name for p in run.path.iterdir()} <= {RUN_MARKER, LOCK_NAME}:
        shutil.rmtree(run.path, ignore_errors=True)


def clear_previous_run(run: RunDir, parts: tuple[Path, ...] = ()) -> list[str]:
    """--overwrite: remove what an earlier run wrote (the user asked for it), keeping the marker.

    Only what finetune wrote goes: the names a run writes at its top level; inside `evals/` only the evaluations
    finetune recorded (their marker; anything else there stays); inside `checkpoints/` only its checkpoints; inside
    `adapter/` only the files the run listed there (`ADAPTER_FILES`, written as soon as it saved the adapter; an
    adapter without the list, from an older version, is finetune's whole, and an `adapter/` holding no saved adapter
    is the user's). A run lying inside, or anything
    else inside `adapter/` or `checkpoints/` (which the new run replaces whole), refuses the overwrite before
    anything is removed. `parts`: runs the earlier run kept inside as its own (a knowledge-base run's retriever)
    that the new run makes none of: cleared by the same rules, their folders removed when nothing of the user's
    stays; a folder there that is not a run is the user's. Every refusal comes before anything is removed.
    Returns what stayed."""
    own_parts = _own_parts(parts)
    plans = [_removals(run), *(_removals(part) for part in own_parts)]
    for removals, _ in plans:
        for path in removals:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for cleared in (run, *own_parts):
        for folder in (cleared.evals, cleared.checkpoints, cleared.adapter):
            if folder.is_dir() and not folder.is_symlink():
                _remove_empty_folders(folder)
    for part in own_parts:
        if not any(p.name not in (RUN_MARKER, LOCK_NAME) for p in part.path.iterdir()):
            shutil.rmtree(part.path)
    return [kept for _, stayed in plans for kept in stayed]


def _own_parts(parts: tuple[Path, ...]) -> list[RunDir]:
    """The runs among `parts` (a folder there that is not a run is the user's)."""
    return [RunDir(p) for p in parts if not p.is_symlink() and RunDir(p).marker.is_file()]


def not_written_by_finetune(run: RunDir, parts: tuple[Path, ...] = ()) -> list[Path]:
    """What in `run` finetune did not write (what `--overwrite` keeps), its `parts` (clear_previous_run's) taken as
    the run's own and looked into by the same rule; refuses as `clear_previous_run` does (a run inside, a file of
    the user's in a folder the run replaces whole)."""
    own = _own_parts(parts)
    names = {part.path.name for part in own}
    found = [run.path / name for name in _removals(run)[1] if name not in names]
    return found + [part.path / name for part in own for name in _removals(part)[1]]


def _removals(run: RunDir) -> tuple[list[Path], list[str]]:
    """What --overwrite removes from `run` and what stays (clear_previous_run's rules); refuses, removing nothing."""
    removals: list[Path] = []
    kept: list[str] = []
    for path in sorted(run.path.iterdir()):
        if path.name in (RUN_MARKER, LOCK_NAME):  # the marker stays; the lock is this run's own, held
            continue
        if path.name in ADAPTER_STAGING:  # what a kill left of the final adapter's replacement: finetune's own
            removals.append(path)
            continue
        if path.name not in RUN_OUTPUT_NAMES:
            kept.append(path.name)
            continue
        if path.is_symlink() or not path.is_dir():
            removals.append(path)
            continue
        nested = next(path.rglob(RUN_MARKER), None)
        if nested is not None:
            raise RecipeError(
                f"--overwrite: {run.path} holds another finetune run at {nested.parent}; nothing was removed. Move "
                "it out of this run first."
            )
        ours = _own_entries(run, path)
        if ours is None:
            removals.append(path)
            continue
        removals.extend(ours)
        foreign = _foreign_files(run, path, ours)
        if foreign and path != run.evals:
            raise RecipeError(
                f"--overwrite: {foreign[0]} was not written by finetune and the new run replaces "
                f"{path.name}/ whole; nothing was removed. Move it out of the run first."
            )
        kept.extend(str(p.relative_to(run.path)) for p in foreign)
    return removals, kept


# Where outputs/adapter.AdapterSaver builds the final adapter and moves the previous one aside (files.replace_directory).
ADAPTER_STAGING = ("adapter.partial", "adapter.old")

# Written into a finished run's adapter/: every file the run put there, so --overwrite removes those and no other.
ADAPTER_FILES = ".finetune-files"


def record_adapter_files(adapter: Path, coming: Sequence[str] = ()) -> None:
    """List the files of a run's adapter/ and those it is about to write there (`coming`): once just after it is
    saved, again after the last file goes in. A listed file that never came is skipped where the list is read."""
    there = {str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file() and p.name != ADAPTER_FILES}
    files.write_text_atomic(adapter / ADAPTER_FILES, "\n".join(sorted(there | set(coming))) + "\n")


def _foreign_files(run: RunDir, folder: Path, ours: list[Path] | None = None) -> list[Path]:
    """The files inside one of a run's folders that finetune did not write (`_own_entries`'s rule), sorted."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    ours = _own_entries(run, folder) if ours is None else ours
    if ours is None:
        return []
    return sorted(p for p in folder.rglob("*") if not p.is_dir() and not any(p == o or o in p.parents for o in ours))


def _own_entries(run: RunDir, folder: Path) -> list[Path] | None:
    """What finetune wrote inside one of a run's folders, or None where the whole folder is its own."""
    if folder == run.evals:  # recorded evaluations, and one a kill stopped while it was written (write_evaluation)
        return [
            p
            for p in folder.iterdir()
            if p.is_dir() and (made_by_finetune(p, EVALUATION) or _STAGED_EVALUATION.fullmatch(p.name))
        ]
    if folder == run.checkpoints:
        # training/checkpoint.py's PREFIX and STAGING_PREFIX (outputs/ sits below training/ and cannot import it)
        return [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(("step-", ".partial-"))]
    if folder == run.adapter and (folder / ADAPTER_FILES).is_file():
        listed = (folder / ADAPTER_FILES).read_text(encoding="utf-8").splitlines()
        return [folder / name for name in listed if _listed_inside(folder, name)] + [folder / ADAPTER_FILES]
    if folder == run.adapter and not (folder / ADAPTER_META).is_file():
        # No adapter was ever saved there (its listing is written just after the save): a folder the user made.
        return []
    return None


def _listed_inside(folder: Path, name: str) -> bool:
    """Whether a name in adapter/'s listing is a file inside that folder: a listing edited or copied from elsewhere
    (`../notes.txt`, an absolute path, a folder linked out) would have --overwrite remove files outside the run. A
    listed link is the link's own entry (removing it leaves its target: adapter/base/ links the base weights)."""
    path = folder / name
    inside = bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts
    exists = path.is_symlink() or path.is_file()  # a link whose target is gone is still the link finetune made
    return inside and exists and _is_within(path.parent.resolve(), folder.resolve())


# write_evaluation's staging folder in RUN/evals/ (staging_beside's name for a `<time>-<label>` evaluation).
_STAGED_EVALUATION = re.compile(r"\.\d{8}-\d{6}-.+\.partial-\w+")


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


# --------------------------------------------------------------------------- the one write policy

# Written into every directory a command other than `run` makes (merged checkpoint, evaluation, detector): what
# it is, so that --overwrite can tell finetune's own output from a user's folder.
OUTPUT_MARKER = ".finetune-output"
# `finetune data --tokens FILE`: JSON Lines, one training row each, with these fields and no record of its own.
TOKEN_FILE = "token file"
# `finetune eval`'s output directory (its own, or one in RUN/evals/).
EVALUATION = "evaluation"
# `finetune sweep`'s folder (flows/sweep.py); its trials' runs in trials/N are the sweep's own.
SWEEP = "sweep"
TOKEN_FILE_FIELDS = ("row", "input_ids", "labels")


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _runs_around(target: Path) -> Path | None:
    """The run directory that `target` is, lies in, or holds (one level down), if any."""
    for candidate in (target, *target.parents):
        if RunDir(candidate).holds_run():
            return candidate
    if target.is_dir():
        for child in target.iterdir():
            if child.is_dir() and not child.is_symlink() and RunDir(child).holds_run():
                return child
    return None


# What `finetune predict --output` writes (a JSON Lines file, recorded beside it by `record_file`).
PREDICTIONS = "predictions"
# `finetune eval --junit FILE`: recorded the same way; a later --junit replaces finetune's own report (CI reruns).
JUNIT = "JUnit report"


def record_file(path: Path, what: str) -> None:
    """Record that finetune wrote the file `path` as a `what`, where its content cannot hold the record (predictions
    are JSON Lines of the user's own fields): a hidden file beside it with the kind and the file's SHA-256, so that
    a file edited since (part the user's now) is no longer finetune's to replace."""
    record = {"written_by": what, "sha256": files.sha256_file(path)}
    files.write_text_atomic(_record_of(path), json.dumps(record) + "\n")


def _record_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.finetune")


def made_by_finetune(target: Path, what: str) -> bool:
    """Whether `target` is a `what` that finetune wrote and recorded (a directory's marker, a file's own record or
    the record beside it)."""
    if target.is_dir():
        marker = target / OUTPUT_MARKER
        return marker.is_file() and marker.read_text(encoding="utf-8").partition("\n")[0].strip() == what
    if _record_of(target).is_file():
        try:
            record = json.loads(_record_of(target).read_text(encoding="utf-8"))
            return record.get("written_by") == what and record.get("sha256") == files.sha256_file(target)
        except (OSError, ValueError, AttributeError):
            return False
    if target.suffix == ".json":
        try:
            return json.loads(target.read_text(encoding="utf-8")).get("written_by") == what
        except (OSError, ValueError, AttributeError):
            return False
    if target.suffix == ".jsonl" and what == TOKEN_FILE:  # `finetune data --tokens`: recognised by its lines' shape
        try:
            with open(target, encoding="utf-8") as handle:
                first = json.loads(handle.readline() or "{}")
            return isinstance(first, dict) and set(first) == set(TOKEN_FILE_FIELDS)
        except (OSError, ValueError):
            return False
    if target.suffix == ".gguf":
        try:
            from gguf import GGUFReader

            return "finetune.version" in GGUFReader(str(target)).fields
        except Exception:  # not a GGUF file at all
            return False
    return False


def claim_output(
    target: str | Path,
    *,
    key: str,
    what: str,
    directory: bool,
    overwrite: bool,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """The one policy for where a command may write its `--output` (eval, merge, export, data, train-detector).

    Allowed: a new path, an empty directory, or, with --overwrite, a `what` that finetune itself wrote and recorded.
    Refused (RecipeError, exit 2, naming the path and what is there): an input of the same command or a folder
    holding one; a run directory, anything inside one or a folder holding one (a run's own evaluations go to
    RUN/evals/); the wrong kind (a file for a directory); anything else already there.
    Returns the expanded path. `run`'s own output.dir goes through `output_decision`.
    """
    path = Path(target).expanduser()
    where = path.resolve()
    for source in inputs:
        source = source.expanduser().resolve()
        if _is_within(source, where) or _is_within(where, source):
            how = "is" if source == where else "holds" if _is_within(source, where) else "lies inside"
            raise RecipeError(f"{key}: {path} {how} {source}, an input of this command; write elsewhere")
    run = _runs_around(where)
    if run is not None:
        raise RecipeError(
            f"{key}: {path} is, holds or lies inside the finetune run {run}; a run's files are never replaced by "
            "another command (evaluations of a run go to RUN/evals/). Choose a path outside any run."
        )
    if not path.exists():
        if path.is_symlink():
            raise RecipeError(f"{key}: {path} is a link to a missing place; remove it or choose another path")
        return path
    if directory and not path.is_dir():
        raise RecipeError(f"{key}: {path} is a file; give a new or empty directory")
    if not directory and path.is_dir():
        raise RecipeError(f"{key}: {path} is a directory; give a file path")
    if path.is_dir() and not any(path.iterdir()):
        return path
    if not path.is_dir() and not path.is_file():
        raise RecipeError(f"{key}: {path} is not a regular file (a device, pipe or socket); choose a file path")
    if not made_by_finetune(path, what):
        raise RecipeError(
            f"{key}: {path} exists and is not {_a(what)} that finetune wrote (or was changed since); finetune never "
            "replaces what it did not make. Choose a new path."
        )
    if not overwrite:
        raise RecipeError(f"{key}: {path} holds an earlier {what}; choose a new path, or --overwrite to replace it")
    foreign = _unlisted_files(path) if path.is_dir() else []
    if foreign:
        raise RecipeError(
            f"{key}: {foreign[0]} was not written by finetune, and --overwrite would replace {path} whole; nothing "
            "was removed. Move it out first."
        )
    return path


def _a(what: str) -> str:
    """`what` with its article: 'an evaluation', 'predictions'."""
    if what.endswith("s"):
        return what
    return f"an {what}" if what[0] in "aeiou" else f"a {what}"


def mark_output(directory: Path, what: str, listed: bool = False) -> None:
    """Record that finetune wrote `directory` as a `what` (what `claim_output` checks before --overwrite); `listed`:
    with every file it holds now, for an output replaced whole (a file added since is the user's)."""
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()) if listed else []
    files.write_text_atomic(directory / OUTPUT_MARKER, "\n".join([what, *names]) + "\n")


def _unlisted_files(directory: Path) -> list[Path]:
    """Files in a finetune output folder that its marker does not list (none where it lists nothing: an older
    marker, or a kind that is not replaced whole)."""
    listed = set((directory / OUTPUT_MARKER).read_text(encoding="utf-8").splitlines()[1:])
    if not listed:
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name != OUTPUT_MARKER and str(p.relative_to(directory)) not in listed
    )


# Of a name's 255 bytes, what the staging name keeps of its target's: the rest is ".", ".partial-" and tempfile's 8.
_STAGING_NAME_BYTES = 255 - 1 - len(".partial-") - 8


def staging_beside(target: Path, directory: bool) -> Path:
    """A new, empty folder (or file) beside `target` to build an output in before it is renamed into place: made
    fresh under a name no one else holds, so nothing already there, a user's folder included, is ever replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # The target's name, cut where a long one (up to the 255 bytes a name may have) would push the staging name over:
    # a legal --output was refused with the hidden staging name's "name too long".
    name = target.name.encode()[:_STAGING_NAME_BYTES].decode(errors="ignore")
    prefix = f".{name}.partial-"
    if directory:
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(handle)
        made = Path(name)
    # tempfile makes them private (0700, 0600); the output gets the modes any new file or folder gets here.
    mask = os.umask(0)
    os.umask(mask)
    made.chmod((0o777 if directory else 0o666) & ~mask)
    return made


def publish_directory(staging: Path, target: Path, what: str) -> None:
    """Move a finished staging directory into place (`claim_output` allowed `target`): recorded with its files,
    then renamed; an earlier output of the same kind is replaced only once the new one is complete."""
    mark_output(staging, what, listed=True)
    # Aside under a fresh name (empty: a directory renamed onto it replaces it), never a user's folder.
    aside = staging_beside(target, directory=True)
    files.replace_directory(staging, target, aside)


# Every file an evaluation folder may get (metrics.json, which the others describe, is written last).
EVALUATION_FILES = ("predictions.jsonl", "checkpoints.json", "checkpoints.png", "metrics.json")


def write_evaluation(target: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """An evaluation's files, whole or not at all. `write` fills a fresh folder beside `target`, which is then
    renamed into place where `target` is new or empty; over an earlier evaluation (`claim_output` allowed the
    --overwrite) its files are moved in one by one, metrics.json last, and the earlier evaluation's files the new
    one lacks removed, so the user's own files there stay (metrics.json, which a reader reads first, stays the
    earlier one until the last move; the files beside it may be new by then). A failure or a signal while the files
    are written leaves `target` as it was (before: an interrupted evaluation left metrics.json without its
    predictions, or an --overwrite had already deleted the earlier evaluation).

    Without `overwrite`, a `target` another process filled while this one evaluated (two jobs given one --output)
    is refused, nothing written: the second one's files were moved in over the first's, and both said they wrote."""
    staging = staging_beside(target, directory=True)
    taken = RecipeError(
        f"--output: {target} was written by another process while this evaluation ran; nothing was written "
        "(choose a new path, or --overwrite to replace it)"
    )
    try:
        write(staging)
        written = {p.name for p in staging.iterdir()}
        unknown = written - set(EVALUATION_FILES)
        assert not unknown, f"an evaluation wrote files EVALUATION_FILES does not name: {sorted(unknown)}"
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            mark_output(staging, EVALUATION)
            try:  # atomic: onto a missing or empty folder only
                staging.rename(target)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise taken from None
                raise
            return
        if not overwrite:
            raise taken
        for name in EVALUATION_FILES:
            if name in written:
                os.replace(staging / name, target / name)
            else:
                (target / name).unlink(missing_ok=True)
        mark_output(target, EVALUATION)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_free_space(path: Path, needed: int, what: str = "a run starts only with") -> None:
    """Refused (exit 2) before anything is written where `path` has less than `needed` bytes free; `what` says
    what needs them (the floor any run keeps, or its checkpoints)."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise RecipeError(f"output.dir: {path} has {free / 2**20:.0f} MiB free; {what} {needed / 2**20:.0f} MiB")


def checkpoint_bytes(model: torch.nn.Module, keep: int, held: int = 0) -> int:
    """Disk for `keep` checkpoints plus the one being written: trainable weights, two Adam moments, the adapter copy;
    `held`: bytes the run's checkpoints already take (a resume's), which pruning reuses, so not needed again."""
    one = 4 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return max((keep + 1) * one - held, one) + MIN_FREE_BYTES


# The version of how training batches are drawn for a (seed, epoch) (training/loop.py, LengthGroupedBatches): a
# checkpoint resumed with another order would skip other rows than it trained on. 2: the short batch stays last.
# 3: retrieval rows sharing a positive passage are kept out of each other's batch (loop.keep_apart).
BATCH_ORDER = 3
BATCH_ORDER_KEY = "order of training batches"  # its name in a resume identity
# Where each version after the first changed the batches: a checkpoint written under an older version resumes under
# a newer one for every task it did not change (a classification checkpoint of version 2 draws the batches of 3).
_ORDER_CHANGED: dict[int, tuple[str, ...] | None] = {3: ("retrieval",)}  # None: every task


def same_batch_order(saved: object, now: object, task: object) -> bool:
    """Whether a checkpoint recording batch order `saved` draws `task`'s batches as order `now` does."""
    if saved == now:
        return True
    if not (isinstance(saved, int) and isinstance(now, int) and 2 <= saved < now <= BATCH_ORDER):
        return False
    for version in range(saved + 1, now + 1):
        changed = _ORDER_CHANGED.get(version)
        if changed is None or task in changed:
            return False
    return True


# How a resume identity names a data file's hash, and a local first-stage model's (training/checkpoint.check_identity
# reads the prefixes: a hash an older checkpoint did not keep is unknown, not changed).
DATA_FILE = "data file "
MODEL_FILES = "model files "
HASHED = (DATA_FILE, MODEL_FILES)


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{files.sha256_file(path)}\n".encode())
    return digest.hexdigest()


def base_model_hash(reference: str) -> str | None:
    """A local base model's files as one sha256 (a checkpoint folder, or a single GGUF file); None for a hub id or an
    installed package's model. Replaced under the same path (a merged checkpoint rewritten with `merge --overwrite`,
    say), it is not the model a run's checkpoints and adapter were trained on."""
    if reference.startswith("pkg:"):
        return None
    path = Path(reference).expanduser()
    if path.is_dir():
        return _folder_hash(path)
    return files.sha256_file(path) if path.is_file() else None


def resume_identity(recipe: Recipe, world_size: int) -> dict:
    """What must not change between a checkpoint and the run resuming from it, for the result to be exact.

    Evaluation settings, logging and checkpoint cadence may change freely.
    """
    free_sections = ("output.", "eval.")
    free_keys = {
        "data.eval",
        "data.max_eval_samples",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.nonfinite",
        "train.report_to",
        "distributed.nnodes",  # how the processes are laid out; their count (world_size) is bound below
        "distributed.num_processes",  # likewise (--num-processes sets it: the count that runs is bound below)
    }
    # Evaluation during training decides early stopping and the kept weights: those settings must match too.
    bound = {"eval.every", "eval.best_metric", "eval.during_max_samples", "eval.keep"}
    identity = {
        f"recipe {k}": v
        for k, v in flat_settings(recipe).items()
        if k in bound or (not k.startswith(free_sections) and k not in free_keys)
    }
    # data.retrieval.answer_from says where the extractive knowledge-base reader takes its answer from: how it
    # decodes, as eval.n_best does; no training step depends on it, so a checkpoint resumes under either value.
    retrieval = identity.get("recipe data.retrieval")
    if isinstance(retrieval, dict):
        identity["recipe data.retrieval"] = {k: v for k, v in retrieval.items() if k != "answer_from"}
    # A learned watermark trains with the run (its blocks, extractor, their lr and losses): its settings bind, all
    # but what only marks and detects afterwards (the message, the key it may be drawn from, the threshold).
    mark = recipe.eval.watermark
    if mark is not None and mark.method == "learned":
        settings = mark.model_dump(mode="json", exclude={"key", "message", "p_threshold"})
        identity["recipe eval.watermark (learned)"] = settings
    training_files = data_file_hashes(recipe.data, ("train", "knowledge_base"))
    identity.update({f"{DATA_FILE}{name}": digest for name, digest in training_files.items()})
    base = recipe.model.name_or_path
    if (digest := base_model_hash(base)) is not None:  # the weights every step trained on, under their path
        identity[f"{MODEL_FILES}{base}"] = digest
    first_stage = recipe.data.retrieval.model
    if first_stage is not None and Path(first_stage).expanduser().is_dir():
        # A reranker's candidates and a knowledge-base reader's contexts come from it: replaced under the same path
        # (another retriever's adapter), the rows a checkpoint trained on are not the ones it would resume on.
        identity[f"{MODEL_FILES}{first_stage}"] = _folder_hash(Path(first_stage).expanduser())
    versions = provenance.library_versions()
    identity.update({f"version of {lib}": versions.get(lib) for lib in ("torch", "transformers", "peft")})
    identity["number of processes"] = world_size
    identity[BATCH_ORDER_KEY] = BATCH_ORDER
    return redact_tree(identity)  # it is written into every checkpoint


ADAPTER_META = "finetune.json"
# Written first into every run directory: what tells a run (finished or not) from a user's own folder.
RUN_MARKER = ".finetune-run"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    manifest = property(lambda self: self.path / "manifest.json")
    adapter = property(lambda self: self.path / "adapter")
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics = property(lambda self: self.path / "metrics.json")
    predictions = property(lambda self: self.path / "predictions.jsonl")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    eval_log = property(lambda self: self.path / "eval_log.jsonl")
    data_report = property(lambda self: self.path / "data_report.json")
    card = property(lambda self: self.path / "README.md")
    curves = property(lambda self: self.path / "training_curves.png")
    confusion = property(lambda self: self.path / "confusion_matrix.png")
    confusion_csv = property(lambda self: self.path / "confusion_matrix.csv")  # the whole matrix, any class count

    evals = property(lambda self: self.path / "evals")
    lora_init = property(lambda self: self.path / "lora_init")  # PiSSA/OLoRA: the adapter as initialised
    trackers = property(lambda self: self.path / "trackers")  # experiment trackers' own files (TensorBoard)
    detector = property(lambda self: self.path / "watermark_detector")  # `finetune train-detector`
    # Preference objectives: the reference policy's log-probabilities, computed once before training, read on resume.
    reference_logps = property(lambda self: self.path / "reference_logps.json")
    marker = property(lambda self: self.path / RUN_MARKER)

    def is_run(self) -> bool:
        """A run that saved its trained adapter beside its recipe (finished, or stopped in its final writes:
        `is_finished` says which)."""
        return self.recipe.is_file() and (self.adapter / ADAPTER_META).is_file()

    def is_finished(self) -> bool:
        """A run that finished its outputs: metrics.json is the last thing it writes (`--resume auto` has nothing
        to train)."""
        return self.is_run() and self.metrics.is_file()

    def holds_run(self) -> bool:
        """A run, finished or not (older runs have no marker: their recipe beside a log, checkpoints or adapter)."""
        if self.marker.is_file():
            return True
        return self.recipe.is_file() and any(p.exists() for p in (self.train_log, self.checkpoints, self.adapter))

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def resumed_elsewhere(self, recipe_file: Path) -> Path | None:
        """The run whose own recipe.yaml `recipe_file` is, where this run directory (its output.dir, relative to the
        working directory) is another: `finetune run RUN/recipe.yaml --resume auto` from another directory, or
        after the run was moved, started a new run from the beginning elsewhere instead of resuming RUN."""
        folder = recipe_file.expanduser().resolve().parent
        if recipe_file.name != "recipe.yaml" or not RunDir(folder).holds_run():
            return None
        return None if self.path.expanduser().resolve() == folder else folder

    def contains(self, other: Path) -> bool:
        """Whether `other` is this run directory or lies inside it."""
        here, there = self.path.resolve(), other.expanduser().resolve()
        return there == here or here in there.parents


# Everything a run writes at its top level (RunDir's layout, the marker aside): what --overwrite may remove.
# Anything else there is the user's.
RUN_OUTPUT_NAMES = frozenset(
    getattr(RunDir("."), name).name
    for name, member in vars(RunDir).items()
    if isinstance(member, property) and name != "marker"
)
