"""`finetune detect` and `finetune train-detector`: a run's watermark read back from texts."""

from __future__ import annotations

import logging
import random

from transformers import AutoTokenizer

from finetune import files
from finetune.data.tables import Origins
from finetune.errors import DataError, RecipeError
from finetune.flows import detector as synthid_detector
from finetune.flows.evaluate import watermark_detector
from finetune.flows.resolve import Resolved, resolve_run
from finetune.flows.session import (
    open_session,
)
from finetune.outputs.rundir import RunDir
from finetune.recipe.schema import WatermarkSection
from finetune.training.loop import make_accelerator
from finetune.watermark import learned
from finetune.watermark import marking as watermark

log = logging.getLogger("finetune")


def detect(
    run_path: str,
    rows: list[dict],
    origins: Origins,
    field: str = "prediction",
    key: int | None = None,
    message: str | None = None,
) -> tuple[list[dict], dict]:
    """Watermark scores for texts (`field` of each row), with the run's tokenizer and key; rows keep their fields.
    A learned watermark's rows carry the decoded message, its bit accuracy against the run's message (or
    `message`) and the binomial test's p-value."""
    if key is not None:  # refused before the run is read
        watermark.check_key(key, "--key")
    resolved, run = resolve_run(run_path)
    recipe = resolved.recipe
    settings = recipe.eval.watermark
    if learned.is_learned(settings):
        assert settings is not None
        if key is not None:  # the mirror of --message on a keyed watermark, below: never silently ignored
            raise RecipeError(
                f"--key: {run_path} carries a learned watermark, which its extractor reads back as a message, with "
                "no key; to test for another message than the run's own, give it with --message"
            )
        _check_rows(rows, origins, field)
        return _detect_learned(resolved, run, settings, rows, field, message)
    if message is not None:
        raise RecipeError(f"--message: {run_path} carries no learned watermark (eval.watermark.method learned)")
    if key is not None:
        settings = (settings or WatermarkSection(key=key)).model_copy(update={"key": key})
    if settings is None or not isinstance(settings.key, int):
        raise RecipeError(
            f"{run_path}: no watermark key: the run was not watermarked (eval.watermark) or its "
            f"adapter/{watermark.KEY_FILE} is gone; give --key"
        )
    _check_rows(rows, origins, field)
    if watermark.gated(settings):  # the model's entropies choose the tokens to count
        session = open_session(resolved, adapter_dir=run.adapter, splits=(), with_lora=False)
        detector = watermark_detector(
            session, session.model, settings, make_accelerator(recipe.train, resolved.precision)
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(run.adapter))
        detector = watermark.Detector(
            tokenizer, resolved.model_config, settings, bayesian=_trained_detector(run, settings)
        )
    # The prompt each text answers: the task's field, or the recipe's column for it.
    prompt_fields = ("prompt", recipe.data.columns.get("prompt", "prompt"))
    scored, without_prompt = [], 0
    for row in rows:
        prompt = next((row[f] for f in prompt_fields if isinstance(row.get(f), str)), None)
        without_prompt += prompt is None
        scored.append({**row, **detector.score(row[field], prompt or "").as_dict()})
    flagged = sum(r["watermarked"] for r in scored)
    summary = {
        "rows": len(scored),
        "watermarked": flagged,
        "fraction": flagged / len(scored) if scored else 0.0,
        "unscored": sum(r["z_score"] is None for r in scored),
        "z_threshold": settings.z_threshold,
        "false_positive_rate": watermark.false_positive_rate(settings.z_threshold),
    }
    if watermark.gated(settings):
        summary["without_prompt"] = without_prompt
    if detector.bayesian is not None:  # its probabilities beside the verdicts, and what its training measured
        trained = files.read_json(run.detector / synthid_detector.REPORT_FILE)
        summary["bayesian"] = {
            "probability_above_half": sum((r.get("probability") or 0) > 0.5 for r in scored),
            **{k: v for k, v in trained.items() if k.startswith("validation_")},
        }
    return scored, summary


def _check_rows(rows: list[dict], origins: Origins, field: str) -> None:
    """Rows to score, each with its text as text; a row that is not is named at its line (`origins`: where the
    input's rows are)."""
    if not rows:
        raise DataError(f"{origins.sources[0].name}: no input rows (nothing to score)")
    for number, row in enumerate(rows):
        if field not in row:
            raise DataError(
                f"{origins.place(number)}: no field {field!r} (the row has: {', '.join(row) or 'nothing'}); name the "
                "field holding the text with --field"
            )
        if not isinstance(row[field], str):
            raise DataError(f"{origins.place(number)}: field {field!r} must be text, got {type(row[field]).__name__}")


def _detect_learned(
    resolved: Resolved,
    run: RunDir,
    settings: WatermarkSection,
    rows: list[dict],
    field: str,
    message: str | None,
) -> tuple[list[dict], dict]:
    """The run's extractor reads each text's bits; each is tested against the run's message or `message`."""
    if message is not None:
        learned.check_message(message, settings.bits, "--message")
    session = open_session(resolved, adapter_dir=run.adapter, splits=(), with_lora=False)
    found = learned.find(session.model)
    assert found is not None  # the session attaches the run's trained watermark or refuses
    expected = message if message is not None else found.message_text()
    detector = learned.BitDetector(session.tokenizer, found, expected, settings.p_threshold)
    scored = [{**row, **detector.score(row[field]).as_dict()} for row in rows]
    accuracies = [r["bit_accuracy"] for r in scored if r["bit_accuracy"] is not None]
    flagged = sum(r["watermarked"] for r in scored)
    summary = {
        "rows": len(scored),
        "watermarked": flagged,
        "fraction": flagged / len(scored) if scored else 0.0,
        "unscored": len(scored) - len(accuracies),
        "bits": settings.bits,
        "watermark_bit_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "p_threshold": settings.p_threshold,
        "false_positive_rate": detector.false_positive_rate(),
        # Whether the p-values are taken against what the extractor reads from unmarked text (runs saved since
        # the calibration), or against a fair 1/2 a bit (earlier runs).
        "calibrated": detector.calibrated,
        # The smallest p-value any text can reach (every bit matching): at or above p_threshold, this message
        # cannot flag anything, since the extractor reads most of it from unmarked text as well.
        "least_p_value": detector.least_p_value(),
        "message": "given (--message)" if message is not None else "the run's",
    }
    return scored, summary


def _trained_detector(run: RunDir, settings: WatermarkSection):
    """The run's trained SynthID Bayesian detector (`finetune train-detector`), if there is one."""
    directory = run.detector
    if settings.method != "synthid" or not directory.is_dir():
        return None
    from transformers import BayesianDetectorModel

    return BayesianDetectorModel.from_pretrained(str(directory)).eval()


def train_watermark_detector(run_path: str, samples: int, overwrite: bool = False) -> dict:
    """Train the SynthID Bayesian detector of a run on its own marked and unmarked generations of its training
    prompts; the weights go to RUN/watermark_detector/ (written beside, then renamed into place)."""
    resolved, run = resolve_run(run_path, splits=("train",))
    recipe = resolved.recipe
    settings = recipe.eval.watermark
    if settings is None or settings.method != "synthid":
        raise RecipeError(
            f"{run_path}: train-detector is for synthid watermarks; a kirchenbauer watermark's z-test needs no training"
            if settings
            else f"{run_path}: the run was not watermarked"
        )
    target = run.detector
    if target.exists() and not overwrite:
        raise RecipeError(f"{target}: a trained detector is already there; --overwrite replaces it")
    session = open_session(resolved, adapter_dir=run.adapter, splits=("train",), with_lora=False)
    prompts = list(session.features["train"].prompts or [])
    random.Random(recipe.train.seed).shuffle(prompts)
    model, report = synthid_detector.train_for_model(
        session, prompts[:samples], make_accelerator(recipe.train, resolved.precision)
    )
    synthid_detector.save(model, report, target)
    return {"written_to": str(target), **report}
