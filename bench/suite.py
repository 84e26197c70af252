"""`make bench`: every speed and memory comparison of issue 33 in one invocation, one results JSON, one table.

Runs, one after another as fresh processes, the three side-by-side benchmarks (each alternates its own contenders
round by round, so the ratios inside each are measured under the same load):

- `classification`: bench/bench.py — the MiniLM demo recipe against HF Trainer + peft, with MFU against the 2048²
  peak and the model's shape limit;
- `sft`: bench/sft_trl.py — the SmolLM2 generative QA recipe (1 epoch) against TRL's SFTTrainer + peft;
- `generation`: bench/generation.py — `finetune eval` against transformers' `generate`, one prompt at a time and
  batched at 16.

Then writes `bench/results/<time>-suite.json` (the machine's description, each part's result file and headline
figures, and each of issue 33's judged ratios with its target and whether it is met) and rewrites the table between
the `bench-suite` markers in bench/README.md from that JSON, so the table never holds a number no file backs.
`--from FILE ...` builds the suite JSON and the table from existing part results instead of running them.

    python bench/suite.py [--parts classification,sft,generation] [--rounds N] [--from FILE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- bench-suite:begin -->", "<!-- bench-suite:end -->"

# part -> (script, the suffix of the result file it writes); the one list of parts.
PARTS = {
    "classification": ("bench/bench.py", "-cpu.json"),
    "sft": ("bench/sft_trl.py", "-sft-trl.json"),
    "generation": ("bench/generation.py", "-generation.json"),
}


def run_part(part: str, rounds: int | None) -> Path:
    """Run one part's script (its own number of rounds unless given); its result is the newest file of its suffix
    written after the start."""
    script, suffix = PARTS[part]
    command = [sys.executable, script, *(["--rounds", str(rounds)] if rounds else [])]
    if part == "generation":  # it writes bench/results/generation.json unless told where
        command += ["--output", str(RESULTS / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}{suffix}")]
    started = time.time()
    print(f"bench suite: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    # bench.py names its file by the device: -cpu.json, or -gpu.json on a GPU machine.
    suffixes = (suffix, suffix.replace("-cpu", "-gpu"))
    written = [p for s in suffixes for p in RESULTS.glob(f"*{s}") if p.stat().st_mtime >= started]
    if not written:
        sys.exit(f"bench suite: {script} wrote no *{suffix} file into {RESULTS}")
    return max(written, key=lambda p: p.stat().st_mtime)


def part_of(path: Path) -> str:
    for part, (_, suffix) in PARTS.items():
        if path.name.endswith((suffix, suffix.replace("-cpu", "-gpu"))):
            return part
    sys.exit(f"bench suite: {path} is no part's result (names end in {', '.join(s for _, s in PARTS.values())})")


def judged(part: str, document: dict) -> list[dict]:
    """Issue 33's judged figures of one part's result: what, measured, target, met."""
    rows = []

    def row(what: str, value: float, target: float, higher: bool = True) -> None:
        met = value >= target if higher else value <= target
        rows.append(
            {"what": what, "measured": round(value, 3), "target": f"{'>=' if higher else '<='} {target}", "met": met}
        )

    if part == "classification":
        ratios, median = document["ratios"], document["median"]
        row("classification: training throughput vs HF Trainer + peft", ratios["train_tokens_per_s_ratio"], 2.5)
        row("classification: peak RSS vs HF Trainer + peft", ratios["peak_rss_ratio"], 1.0, higher=False)
        row("classification: accuracy minus the peer's", ratios["accuracy_difference"], 0.0)
        if "mfu_shape_limit" in median["finetune"]:
            row("classification: MFU vs the model's shape limit", median["finetune"]["mfu_shape_limit"], 0.5)
    elif part == "sft":
        # Files from before `--variant` existed hold the finetune ratios at the top level.
        ratios = document["ratios"].get("finetune", document["ratios"])
        median = document["median"]["finetune"]
        row("generative SFT: training throughput vs TRL SFTTrainer + peft", ratios["train_tokens_per_s_ratio"], 2.5)
        row("generative SFT: peak RSS vs TRL SFTTrainer + peft", ratios["peak_rss_ratio"], 1.0, higher=False)
        if "mfu_shape_limit" in median:
            row("generative SFT: MFU vs the model's shape limit", median["mfu_shape_limit"], 0.5)
    else:
        ratios = document["ratios"]
        row("finetune eval tokens/s vs generate one prompt at a time", ratios["finetune_over_generate_one"], 4.0)
        row("finetune eval tokens/s vs generate batched at 16", ratios["finetune_over_generate_batched"], 1.0)
    return rows


def machine(device: dict) -> str:
    return f"{device.get('cpu_count')}-core {device.get('cpu')} ({device.get('platform')}, {device.get('torch_threads')} torch threads)"


def table(suite: dict) -> str:
    devices = suite["device"] if isinstance(suite["device"], list) else [suite["device"]]
    lines = [
        f"Measured by `{suite['command']}` on {suite['created']}; machine: {'; '.join(map(machine, devices))}.",
        "",
        "| judged figure (issue 33) | measured | target | met | result file |",
        "|---|---|---|---|---|",
    ]
    for part in suite["parts"].values():
        for row in part["judged"]:
            met = "yes" if row["met"] else "**no**"
            lines.append(f"| {row['what']} | {row['measured']} | {row['target']} | {met} | `{part['file']}` |")
    return "\n".join(lines)


def write_table(text: str) -> None:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"bench suite: {README} has no {BEGIN} ... {END} block to fill")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="a comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--rounds", type=int, help="rounds of every part (default: each part's own)")
    parser.add_argument("--from", dest="existing", nargs="+", type=Path, help="existing part results to summarise")
    args = parser.parse_args()

    if args.existing:
        files = {part_of(path): path for path in args.existing}
    else:
        unknown = [p for p in args.parts.split(",") if p not in PARTS]
        if unknown:
            sys.exit(f"bench suite: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        files = {part: run_part(part, args.rounds) for part in args.parts.split(",")}

    parts, devices = {}, set()
    for part, path in files.items():
        document = json.loads(path.read_text())
        devices.add(json.dumps(document["device"], sort_keys=True))
        parts[part] = {"file": str(path.resolve().relative_to(ROOT)), "judged": judged(part, document)}
    suite = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        # One machine's figures only: parts measured elsewhere would make the table compare across machines.
        "device": json.loads(devices.pop()) if len(devices) == 1 else [json.loads(d) for d in sorted(devices)],
        "parts": parts,
    }
    target = RESULTS / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-suite.json"
    target.write_text(json.dumps(suite, indent=2) + "\n")
    write_table(table(suite))
    print(table(suite))
    print(f"\nwritten: {target.relative_to(ROOT)} and the table in {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
