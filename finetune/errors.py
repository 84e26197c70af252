"""User-facing errors. Each carries the exit code documented in PRODUCT.md."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix; shown as one line, never as a traceback."""

    exit_code = 1


class RecipeError(FinetuneError):
    """Usage or recipe problem (exit 2). May carry several problems at once."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class DataError(FinetuneError):
    """Missing file, bad row, wrong column, empty data, label out of range (exit 3)."""

    exit_code = 3


class GateFailed(FinetuneError):
    """A quality gate failed (exit 4)."""

    exit_code = 4


class TrainingDiverged(FinetuneError):
    """NaN or infinite loss (exit 5)."""

    exit_code = 5


class Interrupted(FinetuneError):
    """SIGTERM/SIGINT after a resumable checkpoint was saved (exit 75)."""

    exit_code = 75
