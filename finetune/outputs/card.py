"""The run's model card (README.md) and pictures."""

from __future__ import annotations

import math
from pathlib import Path

from finetune.files import shell_word, write_text_atomic
from finetune.outputs import plots
from finetune.outputs.rundir import RunDir
from finetune.recipe.schema import Recipe, WatermarkSection
from finetune.secrets import redact


def write_pictures(run: RunDir, document: dict) -> list[str]:
    """training_curves.png from the log and, for classification, confusion_matrix.png (bounded) with the whole
    matrix in confusion_matrix.csv. Returns the file names."""
    written = []
    if run.train_log.is_file() and plots.training_curves(run.train_log, run.curves, run.eval_log):
        written.append(run.curves.name)
    matrix = document.get("details", {}).get("confusion_matrix")
    if matrix:
        plots.confusion_matrix(matrix["labels"], matrix["matrix"], run.confusion)
        plots.confusion_csv(matrix["labels"], matrix["matrix"], run.confusion_csv)
        written += [run.confusion.name, run.confusion_csv.name]
    return written


def watermark_section(recipe: Recipe, document: dict) -> list[str]:
    """What a watermarked run's card says: method, strength, how detectable, and how to measure its cost."""
    mark = recipe.eval.watermark
    if mark is None:
        return []
    detected = document["metrics"].get("watermark_detected")
    if mark.method == "learned":
        return learned_watermark_section(mark, document["metrics"])
    false_positives = 0.5 * math.erfc(mark.z_threshold / math.sqrt(2))  # the one-sided normal tail
    if mark.method == "synthid":
        how = (
            f"synthid: tournament sampling with {mark.depth} layers, contexts of {mark.ngram_len - 1} tokens; "
            "detected by the z-score of the mean g-value"
        )
    else:
        how = (
            f"kirchenbauer: green-list ratio {mark.greenlist_ratio:g}, bias {mark.bias:g} added to green logits, "
            f"context {mark.context_width} token; detected by the z-score of the green-token count"
        )
        if mark.entropy_threshold > 0:
            how += (
                f", both only where the model's next-token entropy is at least {mark.entropy_threshold:g} nats "
                "(detection loads the model to find them)"
            )
    return [
        "## Watermark",
        "",
        f"Every generation is watermarked ({how}). `finetune detect` flags a text when its z-score exceeds "
        f"{mark.z_threshold:g} (false-positive rate about {false_positives:.1e} on "
        f"unwatermarked text)"
        + (f"; it flagged {detected:.0%} of this run's evaluation outputs." if detected is not None else "."),
        "The key is in `adapter/watermark.key` (readable by its owner only); whoever holds it can detect, and forge, "
        "the mark.",
        "",
        WATERMARK_COST_UNMEASURED,
        "",
    ]


def learned_watermark_section(mark: WatermarkSection, metrics: dict) -> list[str]:
    """A learned watermark's card: the message it carries, how it is read, what was read back here."""
    accuracy, detected = metrics.get("watermark_bit_accuracy"), metrics.get("watermark_detected")
    measured = (
        f"; on this run's evaluation outputs {accuracy:.1%} of the bits were read back and {detected:.0%} of the "
        "texts flagged."
        if accuracy is not None and detected is not None
        else "."
    )
    return [
        "## Watermark",
        "",
        f"Every generation carries a learned {mark.bits}-bit message (gated cross-attention blocks in the top "
        f"{mark.embedder_layers} decoder layers, read back from the text by a jointly trained extractor). "
        f"`finetune detect` flags a text when a binomial test of its matching bits gives p < {mark.p_threshold:g}"
        + measured,
        "The message and the key are in `adapter/watermark.message` and `adapter/watermark.key` (readable by their "
        "owner only). Merge and export refuse this run: the blocks cannot live in a merged checkpoint or a GGUF file.",
        "",
        WATERMARK_COST_UNMEASURED,
        "",
    ]


# The card's quality-cost line: this placeholder until `finetune eval RUN eval.watermark=null` measures it.
WATERMARK_COST_UNMEASURED = (
    "Quality cost: not measured yet. `finetune eval RUN eval.watermark=null` scores the same "
    "model unwatermarked and writes the difference here."
)

WATERMARK_COST_MEASURED = "Quality cost, measured by `finetune eval RUN eval.watermark=null`"


def record_watermark_cost(run: RunDir, cost: dict, evaluation_dir: Path) -> bool:
    """Put the measured cost in the card, in place of the cost line finetune wrote there (the placeholder or an
    earlier measurement). A card without such a line (edited by hand) is left as it is: False."""
    if not run.card.is_file() or not cost:
        return False
    lines = run.card.read_text(encoding="utf-8").split("\n")
    mine = [
        i
        for i, line in enumerate(lines)
        if line == WATERMARK_COST_UNMEASURED or line.startswith(WATERMARK_COST_MEASURED)
    ]
    if not mine:
        return False
    shown = ", ".join(
        f"{name} {c['watermarked']:.4f} watermarked vs {c['unwatermarked']:.4f} unwatermarked ({c['difference']:+.4f})"
        for name, c in cost.items()
    )
    where = evaluation_dir.relative_to(run.path) if evaluation_dir.is_relative_to(run.path) else evaluation_dir
    lines[mine[0]] = f"{WATERMARK_COST_MEASURED} (`{where}`): {shown}."
    write_text_atomic(run.card, "\n".join(lines))
    return True


def write_model_card(
    run: RunDir,
    recipe: Recipe,
    document: dict,
    manifest: dict,
    reports: dict,
    data_findings: list[str],
    loader: str,
) -> None:
    """README.md of the run: metrics, gates, data (files, lengths, the data report's findings), training, use.

    `loader` is the call that loads `adapter/` in another program (peft's Auto class for the task's head, or
    sentence-transformers for a trained retriever)."""
    lines = [
        f"# {run.path.name}",
        "",
        f"LoRA adapter for **{recipe.task}** on `{recipe.model.name_or_path}`, trained with finetune.",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in document["metrics"].items()],
        "",
    ]
    if document["gates"]:
        lines += ["| gate | value | result |", "|---|---|---|"]
        for name, result in document["gates"].items():
            value = "missing" if result["value"] is None else f"{result['value']:.4f}"
            lines.append(f"| `{name}` | {value} | {'pass' if result['passed'] else 'FAIL'} |")
        lines.append("")
    pictures = [p.name for p in (run.curves, run.confusion) if p.is_file()]
    if pictures:
        lines += [" ".join(f"![{name}]({name})" for name in pictures), ""]
    lines += ["## Data", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{f}` | `{h}` |" for f, h in manifest["data_files"].items()]
    lines += ["", "| split | rows | truncated | dropped | p50 / p95 / max tokens |", "|---|---|---|---|---|"]
    for split, r in reports.items():
        pct = r["token_length"]
        lines.append(
            f"| {split} | {r['rows']} | {r['truncated']} | {r['dropped']} | "
            f"{pct.get('p50', '-')} / {pct.get('p95', '-')} / {pct.get('max', '-')} |"
        )
    notes = [f"- {split}: {note}" for split, r in reports.items() for note in r.get("notes", [])]
    notes += [f"- data report: {finding}" for finding in data_findings]
    if notes:
        lines += ["", *notes]
    lines += ["", "Duplicates, train/eval overlap, label balance and lengths in full: `data_report.json`."]
    lora, train = recipe.lora, recipe.train
    lines += watermark_section(recipe, document)
    lines += [
        "",
        "## Training",
        "",
        f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={lora.targets}",
        f"- {train.epochs} epochs, batch {train.batch_size} x {train.grad_accum} accumulation, lr {train.lr}, "
        f"{train.scheduler} schedule, warmup {train.warmup}, seed {train.seed}, precision {manifest['hardware']['mixed_precision']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()),
        "",
        "## Use",
        "",
        "```",
        f"finetune predict {shell_word(run.path)} --input inputs.jsonl",
        f"finetune merge {shell_word(run.path)} --output merged/   # a plain transformers checkpoint",
        "```",
        "",
        f"`adapter/` loads with {loader}; `adapter/finetune.json` holds the task, label order and generation settings.",
        "",
        "## Reproduce",
        "",
        "```",
        f"finetune run {shell_word(run.recipe)} {shell_word(f'output.dir={run.path}-again')}   # the same recipe, "
        "into a new run directory",
        "```",
        "",
        "## Limitations",
        "",
        "Metrics are measured on the evaluation split above only; they say nothing about data from another "
        "distribution. The adapter inherits the biases and licence of the base model.",
        "",
    ]
    write_text_atomic(run.card, redact("\n".join(lines)))


RUN_ELSEWHERE = "## Run it elsewhere"


def card_of_the_run(run: RunDir) -> str:
    """The run's model card without its section on an exported GGUF (which names one export's file): what a GGUF
    carries as its description (a second export carried the first one's path)."""
    if not run.card.is_file():
        return ""
    return run.card.read_text(encoding="utf-8").split(f"\n{RUN_ELSEWHERE}\n")[0].rstrip("\n") + "\n"


def add_run_elsewhere(run: RunDir, gguf_file: Path) -> None:
    """The model card's section on an exported GGUF: llama.cpp and Ollama commands, and a Modelfile."""
    if not run.card.is_file():
        return
    card = card_of_the_run(run).rstrip("\n")  # one section, for the newest export
    path = gguf_file.resolve()
    section = [
        "",
        RUN_ELSEWHERE,
        "",
        f"Exported as GGUF: `{path}`.",
        "",
        "llama.cpp:",
        "",
        "```",
        f'llama-cli -m {path} -p "Your prompt"',
        "```",
        "",
        "Ollama (save the Modelfile below beside the file, then):",
        "",
        "```",
        f"ollama create {run.path.resolve().name} -f Modelfile",
        f"ollama run {run.path.resolve().name}",
        "```",
        "",
        "Modelfile:",
        "",
        "```",
        f"FROM {path}",
        "```",
        "",
    ]
    write_text_atomic(run.card, card + "\n" + "\n".join(section))
