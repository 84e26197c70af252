"""Small helpers shared by the test modules (imported by name, like conftest: `from helpers import invoke`)."""

from __future__ import annotations

from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()

# Wide enough that rich tables and panels never wrap a line the tests look for.
WIDE = {"COLUMNS": "400"}


def invoke(*args, input=None, env=None):
    """Run the `finetune` CLI in this process; every argument is passed as a string."""
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def invoke_wide(*args, input=None):
    """`invoke` with a 400-column terminal (the plan table and other output unwrapped)."""
    return invoke(*args, input=input, env=WIDE)
