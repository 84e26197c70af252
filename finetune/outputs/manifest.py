"""manifest.json: what produced a run (command, seed, versions, data hashes, commit, hardware)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.outputs.lock import command_line
from finetune.recipe.schema import Recipe
from finetune.secrets import redact_tree

if TYPE_CHECKING:
    from accelerate import Accelerator


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("finetune", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _hardware(accelerator: Accelerator | None) -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(accelerator.device) if accelerator else "cpu",
        "num_processes": accelerator.num_processes if accelerator else 1,
        "mixed_precision": accelerator.mixed_precision if accelerator else "no",
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# manifest.json's record of the adapter a run started from (model.adapter -> its weights' sha256), which
# `finetune eval` compares: a preference run's reference policy is that adapter, loaded again by path.
START_ADAPTER = "model_adapter"
# The key under which a finished run records what a resume must match (outputs/rundir.resume_identity).
RESUME_IDENTITY = "resume_identity"


def read_manifest(path: Path) -> dict | None:
    """A run's manifest.json as written, or None where it is missing or damaged: each reader then takes the run at
    its word (it recorded nothing to compare), as runs from before a record was added are."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def build_manifest(
    recipe: Recipe, data_hashes: dict, accelerator: Accelerator | None, extra: dict | None = None
) -> dict:
    return redact_tree(
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(),
            # Where the command ran: a run's relative data paths are read from here by eval of the run from elsewhere.
            "working_directory": os.getcwd(),
            "seed": recipe.train.seed,
            "versions": library_versions(),
            "data_files": data_hashes,
            "git_commit": _git_commit(),
            "hardware": _hardware(accelerator),
            **(extra or {}),
        }
    )
