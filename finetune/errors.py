"""User-facing errors. Each carries its exit code, the table in README.md "Exit codes"."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


class FinetuneError(Exception):
    """A problem the user can fix; shown as one line (with any problems found beside it listed under it), never as a
    traceback."""

    exit_code = 1

    def __init__(self, message: str = "", problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class RecipeError(FinetuneError):
    """Usage or recipe problem (exit 2). May carry several problems at once."""

    exit_code = 2


class DataError(FinetuneError):
    """Missing file, bad row, wrong column, empty data, label out of range (exit 3)."""

    exit_code = 3


class GateFailed(FinetuneError):
    """A quality gate failed (exit 4)."""

    exit_code = 4


class TrainingDiverged(FinetuneError):
    """NaN or infinite loss (exit 5)."""

    exit_code = 5


class OutputsNotFinite(TrainingDiverged):
    """The evaluated model's outputs are NaN or infinite (exit 5): its predictions would be argmaxes of NaN."""


class PeerLost(FinetuneError):
    """Another process or node of a multi-process run was lost, so this one stopped (exit 76)."""

    exit_code = 76


class WorkerKilled(FinetuneError):
    """A worker process this one started was killed by a signal: 128 + its number, as a shell reports a killed
    command (137: kill -9, often the out-of-memory killer)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Interrupted(FinetuneError):
    """SIGTERM/SIGINT after a resumable checkpoint was saved (exit 75)."""

    exit_code = 75


# Names users bring from transformers/peft/other tools, mapped to ours.
_KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "lr_scheduler_type": "scheduler",
    "output_dir": "dir",
    "model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
    "max_seq_length": "max_length",
    "dtype": "precision",
    "mixed_precision": "precision",
}


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """` (did you mean 'x'?)` for the nearest valid name, or "" when none is close."""
    names = [str(c) for c in choices]
    alias = _KNOWN_ALIASES.get(str(name))
    close = [alias] if alias in names else difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# A value quoted in a message: long strings and collections cut in the middle with "...", so a huge value (a
# pasted file, a list of millions) costs a line, not its whole rendering.
_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 200
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxdict = 10
_BRIEF.maxlevel = 3


_BRIEF_CHARS = 400  # at most 10**3 strings of 200 characters are rendered (maxlevel 3), then cut to this


def brief(value: object) -> str:
    """`repr(value)`, cut to a few hundred characters for a message ("got ...")."""
    text = _BRIEF.repr(value)
    if len(text) <= _BRIEF_CHARS:
        return text
    half = _BRIEF_CHARS // 2
    return f"{text[:half]}...{text[-half:]}"
