"""`finetune merge` and `finetune export`: a run's adapter merged into its base, as transformers or GGUF files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from finetune.errors import RecipeError
from finetune.flows.resolve import resolve_run
from finetune.flows.session import (
    Session,
    open_session,
)
from finetune.outputs import adapter as adapter_files
from finetune.outputs import card, rundir
from finetune.outputs.gguf import QUANTS, export_arch, write_gguf

log = logging.getLogger("finetune")


def merge(run_path: str, output: str, overwrite: bool = False) -> Path:
    """The adapter merged into the base weights, saved as a plain transformers checkpoint (safetensors).

    The output must be new or an empty directory (or, with --overwrite, an earlier merged checkpoint); it is written
    beside it and renamed into place, so a failure leaves nothing half-written.
    """
    resolved, run = resolve_run(run_path)
    target = rundir.claim_output(
        output,
        key="--output",
        what=MERGED,
        directory=True,
        overwrite=overwrite,
        inputs=(run.path, *resolved.input_paths()),
    )
    session = open_session(resolved, adapter_dir=run.adapter, splits=(), with_lora=False)
    merged = _merged(session)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    session.tokenizer.save_pretrained(str(staging))
    for name in adapter_files.TASK_STATE_FILES:  # multi-label thresholds travel with the merged model
        if (run.adapter / f"{name}.json").is_file():
            shutil.copyfile(run.adapter / f"{name}.json", staging / f"{name}.json")
    rundir.publish_directory(staging, target, MERGED)
    return target


def _merged(session: Session) -> PreTrainedModel:
    """The base model with the session's trained adapter folded into its weights."""
    assert isinstance(session.model, PeftModel), "opened with the run's adapter"
    return session.model.merge_and_unload()


MERGED = "merged checkpoint"
GGUF = "GGUF file"


def export(run_path: str, output: str, *, format: str, quant: str = "f16", overwrite: bool = False) -> Path:
    """`finetune export`: `hf` writes what merge writes; `gguf` a merged GGUF file for llama.cpp/Ollama."""
    if format == "hf":
        return merge(run_path, output, overwrite=overwrite)
    if format != "gguf":
        raise RecipeError(f"--format: {format!r} is not gguf or hf")
    if quant not in QUANTS:
        raise RecipeError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    resolved, run = resolve_run(run_path)
    if Path(output).suffix != ".gguf":
        raise RecipeError(f"--output: {output} must be a .gguf file")
    target = rundir.claim_output(
        output,
        key="--output",
        what=GGUF,
        directory=False,
        overwrite=overwrite,
        inputs=(run.path, *resolved.input_paths()),
    )
    meta = adapter_files.read_adapter_meta(run.adapter)
    export_arch(meta["family"], resolved.model_config.model_type)  # refused before any weights load
    session = open_session(resolved, adapter_dir=run.adapter, splits=(), with_lora=False)
    merged = _merged(session)
    card_text = run.card.read_text(encoding="utf-8") if run.card.is_file() else ""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    staging.unlink(missing_ok=True)
    write_gguf(
        merged,
        session.tokenizer,
        staging,
        quant=quant,
        name=run.path.resolve().name,
        description=card_text,
        generation=meta.get("generation", {}),
    )
    staging.replace(target)
    card.add_run_elsewhere(run, target)
    return target
