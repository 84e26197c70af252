"""The run directory: atomic writes, manifest, adapter metadata, model card."""

from __future__ import annotations

import hashlib
import math
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from finetune.secrets import redact_tree
from finetune.secrets import redact
from finetune import plots

ADAPTER_META = "finetune.json"
# Written first into every run directory: what tells a run (finished or not) from a user's own folder.
RUN_MARKER = ".finetune-run"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    evals = property(lambda self: self.path / "evals")
    marker = property(lambda self: self.path / RUN_MARKER)

    def is_run(self) -> bool:
        """A finished run: its recipe and a trained adapter."""
        return self.recipe.is_file() and (self.adapter / ADAPTER_META).is_file()

    def holds_run(self) -> bool:
        """A run, finished or not (older runs have no marker: their recipe beside a log, checkpoints or adapter)."""
        if self.marker.is_file():
            return True
        return self.recipe.is_file() and any(p.exists() for p in (self.train_log, self.checkpoints, self.adapter))

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def contains(self, other: Path) -> bool:
        """Whether `other` is this run directory or lies inside it."""
        here, there = self.path.resolve(), other.expanduser().resolve()
        return there == here or here in there.parents


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    The file gets the user's umask (mkstemp alone would leave it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


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


def _hardware(accelerator) -> dict:
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


def build_manifest(recipe, data_hashes: dict, accelerator, extra: dict | None = None) -> dict:
    return redact_tree({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "seed": recipe.train.seed,
        "versions": library_versions(),
        "data_files": data_hashes,
        "git_commit": _git_commit(),
        "hardware": _hardware(accelerator),
        **(extra or {}),
    })


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_adapter_meta(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / ADAPTER_META).read_text(encoding="utf-8"))


def write_pictures(run: RunDir, document: dict) -> list[str]:
    """training_curves.png from the log and, for classification, confusion_matrix.png. Returns the file names."""
    written = []
    if run.train_log.is_file() and plots.training_curves(run.train_log, run.curves, run.eval_log):
        written.append(run.curves.name)
    matrix = document.get("details", {}).get("confusion_matrix")
    if matrix:
        plots.confusion_matrix(matrix["labels"], matrix["matrix"], run.confusion)
        written.append(run.confusion.name)
    return written


def _auto_peft_class(recipe) -> str:
    if recipe.task == "classification":
        return "AutoPeftModelForSequenceClassification"
    if recipe.task == "qa" and recipe.mode != "generative":
        return "AutoPeftModelForQuestionAnswering"
    return "AutoPeftModelForCausalLM (GPT) / AutoPeftModelForSeq2SeqLM (BART)"


def watermark_section(recipe, document: dict) -> list[str]:
    """What a watermarked run's card says: method, strength, how detectable, and how to measure its cost."""
    mark = recipe.eval.watermark
    if mark is None:
        return []
    detected = document["metrics"].get("watermark_detected")
    false_positives = 0.5 * math.erfc(mark.z_threshold / math.sqrt(2))  # the one-sided normal tail
    if mark.method == "synthid":
        how = (f"synthid: tournament sampling with {mark.depth} layers, contexts of {mark.ngram_len - 1} tokens; "
               "detected by the z-score of the mean g-value")
    else:
        how = (f"kirchenbauer: green-list ratio {mark.greenlist_ratio:g}, bias {mark.bias:g} added to green logits, "
               f"context {mark.context_width} token; detected by the z-score of the green-token count")
        if mark.entropy_threshold > 0:
            how += (f", both only where the model's next-token entropy is at least {mark.entropy_threshold:g} nats "
                    "(detection loads the model to find them)")
    return [
        "## Watermark",
        "",
        f"Every generation is watermarked ({how}). `finetune detect` flags a text when its z-score exceeds "
        f"{mark.z_threshold:g} (false-positive rate about {false_positives:.1e} on "
        f"unwatermarked text)" + (f"; it flagged {detected:.0%} of this run's evaluation outputs." if detected is not None else "."),
        "The key is in `adapter/watermark.key` (readable by its owner only); whoever holds it can detect, and forge, "
        "the mark.",
        "",
        WATERMARK_COST_UNMEASURED,
        "",
    ]


# The card's quality-cost line: this placeholder until `finetune eval RUN eval.watermark=null` measures it.
WATERMARK_COST_UNMEASURED = ("Quality cost: not measured yet. `finetune eval RUN eval.watermark=null` scores the same "
                             "model unwatermarked and writes the difference here.")
WATERMARK_COST_MEASURED = "Quality cost, measured by `finetune eval RUN eval.watermark=null`"


def record_watermark_cost(run: RunDir, cost: dict, evaluation_dir: Path) -> bool:
    """Put the measured cost in the card, in place of the cost line finetune wrote there (the placeholder or an
    earlier measurement). A card without such a line (edited by hand) is left as it is: False."""
    if not run.card.is_file() or not cost:
        return False
    lines = run.card.read_text(encoding="utf-8").split("\n")
    mine = [i for i, line in enumerate(lines)
            if line == WATERMARK_COST_UNMEASURED or line.startswith(WATERMARK_COST_MEASURED)]
    if not mine:
        return False
    shown = ", ".join(f"{name} {c['watermarked']:.4f} watermarked vs {c['unwatermarked']:.4f} unwatermarked "
                      f"({c['difference']:+.4f})" for name, c in cost.items())
    where = evaluation_dir.relative_to(run.path) if evaluation_dir.is_relative_to(run.path) else evaluation_dir
    lines[mine[0]] = f"{WATERMARK_COST_MEASURED} (`{where}`): {shown}."
    write_text_atomic(run.card, "\n".join(lines))
    return True


def write_model_card(run: RunDir, recipe, document: dict, manifest: dict, reports: dict,
                     data_findings: list[str]) -> None:
    """README.md of the run: metrics, gates, data (files, lengths, the data report's findings), training, use."""
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
        f"finetune predict {run.path} --input inputs.jsonl",
        f"finetune merge {run.path} --output merged/   # a plain transformers checkpoint",
        "```",
        "",
        f"`adapter/` loads with peft's `{_auto_peft_class(recipe)}.from_pretrained(\"{run.adapter}\")`; "
        "`adapter/finetune.json` holds the task, label order and generation settings.",
        "",
        "## Reproduce",
        "",
        "```",
        f"finetune run {run.recipe}",
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


def add_run_elsewhere(run: RunDir, gguf_file: Path) -> None:
    """The model card's section on an exported GGUF: llama.cpp and Ollama commands, and a Modelfile."""
    if not run.card.is_file():
        return
    card = run.card.read_text(encoding="utf-8")
    card = card.split(f"\n{RUN_ELSEWHERE}\n")[0].rstrip("\n")  # one section, for the newest export
    path = gguf_file.resolve()
    section = [
        "", RUN_ELSEWHERE, "",
        f"Exported as GGUF: `{path}`.", "",
        "llama.cpp:", "", "```", f'llama-cli -m {path} -p "Your prompt"', "```", "",
        "Ollama (save the Modelfile below beside the file, then):", "",
        "```", f"ollama create {run.path.resolve().name} -f Modelfile", f"ollama run {run.path.resolve().name}", "```", "",
        "Modelfile:", "", "```", f"FROM {path}", "```", "",
    ]
    write_text_atomic(run.card, card + "\n" + "\n".join(section))
