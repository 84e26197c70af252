"""finetune against the peer (HF Trainer + DataCollatorWithPadding + peft LoRA), side by side, in one invocation.

Both contenders train the same model on the same data with the same recipe
settings, each as a fresh process (so wall time includes imports, loading,
training and evaluation), alternating order round by round so drift on a noisy
machine hits both. Reported per contender: whole-process wall time, real
(non-padding) training tokens/s, peak resident memory, accuracy, and model
FLOPs utilisation against a peak measured here, in the precision used (a 2048² matmul), and for finetune
also against the model's shape limit: its own training matmuls at their real shapes, timed alone
(bench/shapes.py).

    python bench/bench.py [--recipe R] [--rounds N] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def measured_peak_flops(dtype_name: str, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a large matmul in `dtype_name` on this machine (the denominator of MFU)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run `command` under a helper that reports its own child's peak RSS (ru_maxrss of one child)."""
    helper = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - start\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss_mib': rss, 'stdout': p.stdout}))\n"
    )
    result = subprocess.run([sys.executable, "-c", helper, *command], capture_output=True, text=True, cwd=ROOT, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        sys.exit(f"{' '.join(command)} failed ({report['rc']}):\n{result.stderr[-3000:]}")
    return report["wall"], report["rss_mib"], report["stdout"]


def run_finetune(recipe: str, overrides: list[str], scratch: Path) -> dict:
    out = scratch / "finetune-run"
    # --overwrite: every round replaces the previous round's scratch run.
    wall, rss, _ = measure(
        [sys.executable, "-m", "finetune", "run", recipe, *overrides, f"output.dir={out}", "--overwrite"]
    )
    document = json.loads((out / "metrics.json").read_text())
    return {
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "accuracy": document["metrics"]["accuracy"],
        "train_seconds": document["training"]["train_seconds"],
        "tokens_per_s": document["training"]["tokens_per_s"],
    }


def run_peer(recipe: str, overrides: list[str]) -> dict:
    wall, rss, stdout = measure([sys.executable, str(ROOT / "bench" / "peer_trainer.py"), recipe, *overrides])
    report = json.loads(stdout.strip().splitlines()[-1])
    return {
        "process_seconds": wall,
        "peak_rss_mib": rss,
        "accuracy": report["accuracy"],
        "train_seconds": report["train_seconds"],
        "tokens_per_s": report["tokens_per_s"],
    }


def device_description() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        model = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = model[0] if model else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/classification/minilm-topics.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both contenders")
    args = parser.parse_args()

    from shapes import shape_limit  # bench/shapes.py, beside this file

    from finetune.flows.resolve import resolve
    from finetune.outputs.manifest import library_versions

    precision = resolve(args.recipe, args.overrides).precision
    peaks = {"fp32": measured_peak_flops("fp32")}
    if precision == "bf16":
        peaks["bf16"] = measured_peak_flops("bf16")
    # The model's own matmuls at their real shapes, timed alone: the limit MFU is also reported against.
    limit = shape_limit(args.recipe, args.overrides)
    per_token, model_facts = limit["model"]["flops_per_token"], limit["model"]

    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.rounds):
            order = ["finetune", "peer"] if number % 2 == 0 else ["peer", "finetune"]
            results = {}
            for name in order:
                results[name] = (
                    run_finetune(args.recipe, args.overrides, Path(scratch))
                    if name == "finetune"
                    else run_peer(args.recipe, args.overrides)
                )
                print(f"round {number + 1} {name}: {json.dumps(results[name])}", flush=True)
            rounds.append(results)

    summary = {}
    for name, peak in (("finetune", peaks.get(precision if precision == "bf16" else "fp32")), ("peer", peaks["fp32"])):
        values = {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
        values["mfu"] = per_token * values["tokens_per_s"] / peak
        if name == "finetune":  # the shapes are finetune's steps (its batches, precision and head)
            values["mfu_shape_limit"] = per_token * values["tokens_per_s"] / limit["shape_limit_flops"]
        summary[name] = values
    per_round = [r["peer"]["process_seconds"] / r["finetune"]["process_seconds"] for r in rounds]
    ratios = {
        "process_speedup": summary["peer"]["process_seconds"] / summary["finetune"]["process_seconds"],
        # The judged form: summed wall time over the rounds, and how far single rounds stray from it.
        "summed_process_speedup": sum(r["peer"]["process_seconds"] for r in rounds)
        / sum(r["finetune"]["process_seconds"] for r in rounds),
        "process_speedup_per_round": {"min": min(per_round), "max": max(per_round)},
        "peak_rss_ratio": summary["finetune"]["peak_rss_mib"] / summary["peer"]["peak_rss_mib"],
        "train_tokens_per_s_ratio": summary["finetune"]["tokens_per_s"] / summary["peer"]["tokens_per_s"],
        "accuracy_difference": summary["finetune"]["accuracy"] - summary["peer"]["accuracy"],
    }
    document = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "recipe": args.recipe,
        "overrides": args.overrides,
        "precision": {"finetune": precision, "peer": "fp32"},
        "device": device_description(),
        "versions": library_versions(),
        "measured_peak_flops": peaks,
        "model": model_facts,
        "shape_limit": limit,
        "rounds": rounds,
        "median": summary,
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = (
        RESULTS / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{'gpu' if 'gpu' in document['device'] else 'cpu'}.json"
    )
    target.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"median": summary, "ratios": ratios}, indent=2))
    print(f"written to {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
