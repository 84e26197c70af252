"""The process-wide library settings `finetune`'s entry point makes before torch loads (cli.RUNTIME_DEFAULTS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetune import cli

# Runs the package as `python -m finetune` does (the command accelerate's launcher gives every worker process), with
# the Typer app swapped for a probe that reports the environment the command would run in, and whether torch was
# already imported (a setting read when torch starts must be in place before).
PROBE = """
import json, os, runpy, sys
from finetune import cli
cli.app = lambda: print(json.dumps({
    "env": {key: os.environ.get(key) for key in cli.RUNTIME_DEFAULTS},
    "torch_imported": "torch" in sys.modules,
}))
runpy.run_module("finetune", run_name="__main__")
"""


def _probe(extra_env: dict[str, str]) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in cli.RUNTIME_DEFAULTS}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, **extra_env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_entry_point_sets_every_default_before_torch_is_imported() -> None:
    report = _probe({})
    assert report["env"] == cli.RUNTIME_DEFAULTS
    assert report["torch_imported"] is False


def test_a_users_own_setting_wins() -> None:
    key, other = sorted(cli.RUNTIME_DEFAULTS)
    report = _probe({key: "7"})
    assert report["env"][key] == "7"
    assert report["env"][other] == cli.RUNTIME_DEFAULTS[other]


# oneDNN's primitive cache honours the capacity: after more distinct bf16 matmul shapes than it holds, the first
# shape's kernel has been evicted and is made again (`cache_miss`); with oneDNN's own default (1,024) it is still there.
EVICTION = """
import os, sys, torch
from finetune import cli
if sys.argv[1] == "defaults":
    cli.set_runtime_defaults()
weight = torch.ones(64, 64, dtype=torch.bfloat16)
for rows in [8, *range(9, int(os.environ["SHAPES"]) + 9), 8]:  # fewer than 8 rows take another path than oneDNN
    torch.ones(rows, 64, dtype=torch.bfloat16) @ weight
"""


def _first_shape_made_again(mode: str, shapes: int) -> bool | None:
    env = {key: value for key, value in os.environ.items() if key not in cli.RUNTIME_DEFAULTS}
    env.update(ONEDNN_VERBOSE="2", SHAPES=str(shapes), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", EVICTION, mode], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = [line for line in done.stdout.splitlines() if "primitive,create:" in line and ",8x64:64x64," in line]
    if not made:  # this CPU's torch does not run bf16 matmuls through oneDNN
        return None
    # The first call made it; the last one either made it again or found it cached (in oneDNN, or in ideep before).
    return len(made) == 2 and "cache_miss" in made[-1]


def test_onednn_holds_no_more_kernels_than_the_default_capacity() -> None:
    shapes = int(cli.RUNTIME_DEFAULTS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]) + 8
    with_defaults = _first_shape_made_again("defaults", shapes)
    if with_defaults is None:
        pytest.skip("torch does not use oneDNN for bf16 matmuls on this CPU")
    assert with_defaults is True
    assert _first_shape_made_again("unset", shapes) is False


@pytest.mark.parametrize(("argv", "user", "expected"), [([], None, "1"), (["--debug"], None, None), ([], "0", "0")])
def test_library_progress_bars_are_off_unless_debug(argv, user, expected) -> None:
    """transformers' GGUF conversion draws its bars with tqdm directly (its logging switch misses it): off for the
    whole process, set before tqdm is first imported; --debug or the user's own TQDM_DISABLE keep them."""
    probe = (
        "import json, os, sys\nfrom finetune import cli\n"
        "cli.app = lambda: print(json.dumps({'tqdm': os.environ.get('TQDM_DISABLE'), 'imported': 'tqdm' in sys.modules}))\n"
        f"sys.argv = ['finetune', *{argv!r}, 'validate']\ncli.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | ({"TQDM_DISABLE": user} if user else {})
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"tqdm": expected, "imported": False}
