"""`finetune merge` and `finetune export`: a run's adapter merged into its base, as transformers or GGUF files."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from finetune.errors import GateFailed, RecipeError
from finetune.flows.resolve import Resolved, resolve_run
from finetune.flows.session import (
    Session,
    SessionData,
    load_task_model,
    open_data,
    open_session,
)
from finetune.outputs import adapter as adapter_files
from finetune.outputs import card, rundir
from finetune.outputs.gguf import QUANTS, export_arch, write_gguf
from finetune.outputs.gguf.architectures import check_config
from finetune.outputs.gguf.parity import Parity, check_parity, eval_texts, require_llama_cpp
from finetune.outputs.gguf.vocab import read_vocabulary
from finetune.watermark import learned

log = logging.getLogger("finetune")


def merge(run_path: str, output: str, overwrite: bool = False) -> Path:
    """The adapter merged into the base weights, saved as a plain transformers checkpoint (safetensors).

    The output must be new or an empty directory (or, with --overwrite, an earlier merged checkpoint); it is written
    beside it and renamed into place, so a failure leaves nothing half-written.
    """
    resolved, run = resolve_run(run_path)
    learned.refuse_export(resolved.recipe.eval.watermark, f"{run_path}")
    _refuse_unmergeable(resolved, run_path)
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
    staging = rundir.staging_beside(target, directory=True)
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        session.tokenizer.save_pretrained(str(staging))
        for name in adapter_files.TASK_STATE_FILES:  # multi-label thresholds travel with the merged model
            if (run.adapter / f"{name}.json").is_file():
                shutil.copyfile(run.adapter / f"{name}.json", staging / f"{name}.json")
        rundir.publish_directory(staging, target, MERGED)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failure (a full disk) leaves nothing half-written behind
        raise
    return target


def export_hint(resolved: Resolved, run_path: str) -> str | None:
    """The export the end of `finetune run` suggests (`run_path` as the shell needs it written): a GGUF file where this run's model exports to one, else the
    merged transformers checkpoint; None where merge and export both refuse the run (a retrieval or rerank run, a
    learned watermark). The end of a BERT run suggested a GGUF export that exits 2."""
    if learned.is_learned(resolved.recipe.eval.watermark) or resolved.task.not_mergeable:
        return None
    try:
        export_arch(resolved.family.name, resolved.model_config.model_type, resolved.task.head)
    except RecipeError:
        return f"finetune export {run_path} --format hf --output merged/"
    return f"finetune export {run_path} --format gguf --output model.gguf"


def _refuse_unmergeable(resolved: Resolved, run_path: str) -> None:
    if resolved.task.not_mergeable:
        raise RecipeError(f"{run_path}: {resolved.task.not_mergeable}")


def _merged(session: Session) -> PreTrainedModel:
    """The base model with the session's trained adapter folded into its weights."""
    assert isinstance(session.model, PeftModel), "opened with the run's adapter"
    return session.model.merge_and_unload()


MERGED = "merged checkpoint"
GGUF = "GGUF file"


# --verify: at most this many eval prompts, continued by at most this many tokens (the run's own
# eval.max_new_tokens when smaller), so that a check on a real checkpoint takes minutes, not the whole eval.
VERIFY_PROMPTS = 64
VERIFY_NEW_TOKENS = 64


@dataclass(frozen=True)
class Exported:
    path: Path
    parity: Parity | None = None  # --verify's comparison through llama.cpp


def export(
    run_path: str, output: str, *, format: str, quant: str = "f16", overwrite: bool = False, verify: bool = False
) -> Exported:
    """`finetune export`: `hf` writes what merge writes; `gguf` a merged GGUF file for llama.cpp/Ollama, and with
    `verify` that file loaded in llama.cpp against the merged model on the run's eval data (GateFailed, exit 4,
    when it falls short; the file stays: it was written as asked)."""
    if format == "hf":
        if verify:
            raise RecipeError("--verify: checks a GGUF file through llama.cpp; it has no meaning with --format hf")
        if quant != "f16":  # the default: a transformers checkpoint keeps the model's own dtype
            raise RecipeError(
                f"--quant {quant}: quantises a GGUF file; --format hf writes the merged model in its own dtype"
            )
        return Exported(merge(run_path, output, overwrite=overwrite))
    if format != "gguf":
        raise RecipeError(f"--format: {format!r} is not gguf or hf")
    if quant not in QUANTS:
        raise RecipeError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    if verify:
        require_llama_cpp()
    resolved, run = resolve_run(run_path)
    learned.refuse_export(resolved.recipe.eval.watermark, f"{run_path}")
    _refuse_unmergeable(resolved, run_path)
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
    # What llama.cpp cannot run as trained (architecture, config, tokenizer) is refused before any weights load.
    config = resolved.model_config
    check_config(export_arch(meta["family"], config.model_type, resolved.task.head), config)
    data = open_data(resolved, splits=("eval",) if verify else (), adapter_dir=run.adapter, machine=False)
    read_vocabulary(data.tokenizer, config.vocab_size)
    model, _ = load_task_model(resolved, data.tokenizer, data.state, adapter_dir=run.adapter, with_lora=False)
    assert isinstance(model, PeftModel), "opened with the run's adapter"
    merged = model.merge_and_unload()
    card_text = card.card_of_the_run(run)
    staging = rundir.staging_beside(target, directory=False)
    try:
        write_gguf(
            merged,
            data.tokenizer,
            staging,
            quant=quant,
            name=run.path.resolve().name,
            description=card_text,
            generation=meta.get("generation", {}),
        )
    except BaseException:
        staging.unlink(missing_ok=True)  # a refusal or a failure leaves nothing behind
        raise
    staging.replace(target)
    try:  # the run's card says where it went; a run on a read-only filesystem keeps its card as it is
        card.add_run_elsewhere(run, target)
    except OSError as exc:
        log.warning("the run's model card was not updated with the export (%s)", exc.strerror or exc)
    if not verify:
        return Exported(target)
    parity = _verify(data, merged, target, quant)
    if failures := parity.failures():
        raise GateFailed(f"--verify: {target} differs from the merged model in llama.cpp: {'; '.join(failures)}")
    return Exported(target, parity)


def _verify(data: SessionData, merged: PreTrainedModel, target: Path, quant: str) -> Parity:
    """The exported file in llama.cpp against the merged model, on the run's eval rows and prompts."""
    features = data.features["eval"]
    if not features.prompts:
        raise RecipeError("--verify: the run's eval data gives no prompts to continue")
    rows = features.rows.select(range(min(VERIFY_PROMPTS, len(features.rows))))
    return check_parity(
        target,
        merged,
        data.tokenizer,
        quant=quant,
        texts=eval_texts(rows),
        prompts=features.prompts[:VERIFY_PROMPTS],
        max_new_tokens=min(VERIFY_NEW_TOKENS, data.resolved.recipe.eval.max_new_tokens),
    )
