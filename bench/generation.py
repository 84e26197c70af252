"""Generation speed: `finetune eval` against transformers' `generate`, side by side, in one invocation.

Three contenders answer the recipe's held-out prompts (the same token ids: finetune's own encoding of the eval
split, chat template included) with greedy decoding, each as a fresh process, so the wall time is the whole
process (imports, model load, generation; for finetune also the recipe, the data and the eval loss):

- `finetune`: `finetune eval RECIPE --output DIR` (the base model, the recipe's settings);
- `generate_one`: transformers' `model.generate` one prompt at a time, float32;
- `generate_batched`: `model.generate` on batches of `--batch` prompts in file order, left padding, float32.

Each answer is cut at the recipe's stop strings (the peers stop on them too, through generate's `stop_strings`);
tokens are counted the same way for all three, by re-tokenising the final answers. Reported per contender:
whole-process seconds, tokens/s, peak RSS, and for the peers the seconds spent inside `generate`; the ratios of
finetune's tokens/s to each peer's; how many of finetune's answers equal each peer's, word for word (greedy
float32 decoding one prompt at a time is the reference text). Rounds alternate the order, so drift on a shared
machine hits every contender; the medians, the machine's description and the last round's answers of each
contender go to bench/results/generation.json.

    python bench/generation.py [--recipe R] [--rounds N] [--batch 16] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# bench/bench.py, beside this file (the script's own folder is on sys.path): the same process measurement.
from bench import device_description, measure  # noqa: E402


def prompt_spec(recipe: str, overrides: list[str]) -> dict:
    """The eval prompts as finetune encodes them, and the decoding settings both sides use."""
    from finetune.flows.resolve import resolve_source
    from finetune.flows.session import open_data

    resolved, _ = resolve_source(recipe, overrides)
    data = open_data(resolved, splits=("eval",))
    settings = resolved.recipe.eval
    if settings.temperature != 0 or settings.watermark is not None:
        raise SystemExit("bench/generation.py compares greedy decoding: eval.temperature=0, no eval.watermark")
    tokenizer = data.tokenizer
    return {
        "model": resolved.model_path,
        "prompts": data.features["eval"].prompts,
        "stops": data.task.stops(settings),
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }


# --------------------------------------------------------------------------- the peers (run as fresh processes)


def peer(mode: str, spec_path: Path, batch: int) -> None:
    """transformers' generate as its documentation writes it: float32, greedy, left padding for a batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    size = 1 if mode == "generate_one" else batch
    prompts = spec["prompts"]
    texts: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        inputs = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=spec["max_new_tokens"],
                eos_token_id=spec["eos_token_id"],
                pad_token_id=spec["pad_token_id"],
                **({"stop_strings": spec["stops"], "tokenizer": tokenizer} if spec["stops"] else {}),
            )
        texts += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    generate_s = time.perf_counter() - started
    print(json.dumps({"texts": [cut_at_stops(t, spec["stops"]) for t in texts], "generate_s": generate_s}))


def cut_at_stops(text: str, stops: list[str]) -> str:
    positions = [text.find(s) for s in stops if s and s in text]
    return text[: min(positions)] if positions else text


# --------------------------------------------------------------------------- the parent


def run_contender(name: str, recipe: str, overrides: list[str], spec_path: Path, batch: int, scratch: Path) -> dict:
    if name == "finetune":
        out = scratch / "finetune-eval"
        command = [sys.executable, "-m", "finetune", "eval", recipe, *overrides, "--output", str(out), "--overwrite"]
        command += ["eval.gates={}"]  # a failed quality gate exits 4; speed is measured here, not quality
        wall, rss, _ = measure(command)
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return {"process_seconds": wall, "peak_rss_mib": rss, "texts": [r["prediction"] for r in rows]}
    command = [sys.executable, __file__, "--peer", name, "--spec", str(spec_path), "--batch", str(batch)]
    wall, rss, stdout = measure(command)
    report = json.loads(stdout.strip().splitlines()[-1])
    return {
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "generate_seconds": report["generate_s"],
        "texts": report["texts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/copywriting/smollm2-copy.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="the batched peer's batch size")
    parser.add_argument("--peer", choices=["generate_one", "generate_batched"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS / "generation.json")
    parser.add_argument(
        "--contenders", default="finetune,generate_one,generate_batched", help="a comma-separated subset, in order"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every contender (KEY=VALUE)")
    args = parser.parse_args()
    if args.peer:
        peer(args.peer, args.spec, args.batch)
        return

    from transformers import AutoTokenizer

    from finetune.files import write_json

    spec = prompt_spec(args.recipe, args.overrides)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    names = args.contenders.split(",")
    rounds: list[dict] = []
    answers: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for index in range(args.rounds):
            order = names if index % 2 == 0 else names[::-1]
            results = {}
            for name in order:
                result = run_contender(name, args.recipe, args.overrides, spec_path, args.batch, Path(tmp))
                texts = result.pop("texts")
                result["tokens"] = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
                result["tokens_per_s"] = result["tokens"] / result["process_seconds"]
                results[name] = (result, texts)
                print(f"round {index + 1} {name}: {result}", file=sys.stderr)
            reference = results["generate_one"][1] if "generate_one" in results else None
            for result, texts in results.values():
                if reference is not None:
                    result["answers_equal_to_generate_one"] = sum(a == b for a, b in zip(texts, reference))
            rounds.append({name: result for name, (result, _) in results.items()})
            answers = {name: texts for name, (_, texts) in results.items()}  # the last round's, to diff by hand

    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    medians = {
        name: {key: median(name, key) for key in rounds[0][name] if isinstance(rounds[0][name][key], (int, float))}
        for name in names
    }
    speed = {name: medians[name]["tokens_per_s"] for name in names}
    ratios = {
        f"finetune_over_{peer}": speed["finetune"] / speed[peer]
        for peer in ("generate_one", "generate_batched")
        if "finetune" in speed and peer in speed
    }
    document = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_description(),
        "recipe": args.recipe,
        "overrides": args.overrides,
        "prompts": len(spec["prompts"]),
        "max_new_tokens": spec["max_new_tokens"],
        "batched_peer_batch": args.batch,
        "rounds": rounds,
        "medians": medians,
        "ratios": ratios,
        "answers": answers,
    }
    write_json(args.output, document)
    print(json.dumps({"medians": medians, "ratios": document["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
