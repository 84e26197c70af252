"""Where a whole command's peak resident memory is: RSS sampled from a thread, the Python stack at each new high.

Runs a Python module (`-m finetune run ...`) or script (`bench/peer_sft_trl.py ...`) in this process, with a
sampler thread that reads /proc/self/status every `--every` seconds. The kernel's own high-water mark (VmHWM)
is read too, so a spike shorter than the sampling period is still counted: each time VmHWM rises by more than
`--step` MiB the main thread's stack is recorded, and each sample is attributed to a phase, the function that
the driver function (`--driver`, e.g. flows/train.py's `_run`) called and that is still running. Written as JSON:
the peak, the phase holding it with its stack and the malloc heap's bytes in use and free-but-kept (glibc), the highest RSS of each phase in the order they ran, and the
timeline (for a plot).

    python bench/rss_trace.py [--output F] [--driver FILE:FUNCTION] -m finetune run RECIPE ...
    python bench/rss_trace.py [--output F] --driver peer_sft_trl.py:main bench/peer_sft_trl.py RECIPE ...
"""

from __future__ import annotations

import argparse
import ctypes
import json
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType

MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33+): the heap's bytes in use and free, all arenas together."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2():
    try:
        function = ctypes.CDLL(None).mallinfo2
    except AttributeError:  # not glibc, or older than 2.33
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _mallinfo2()


def heap_mib() -> dict[str, float] | None:
    """The malloc heap: in use, free but kept (what the process holds without using), mmapped blocks; MiB."""
    if MALLINFO2 is None:
        return None
    info = MALLINFO2()
    return {
        "in_use": round(info.uordblks / MIB, 1),
        "free_kept": round(info.fordblks / MIB, 1),
        "mmapped": round(info.hblkhd / MIB, 1),
    }


def status_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from the kernel's own accounting."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, number, _ = line.split()
                values[key] = int(number) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def stack_of(frame: FrameType | None) -> list[str]:
    """The stack, outermost call first, as `file:line function` (files under the repository made relative)."""
    root = str(Path(__file__).resolve().parent.parent) + "/"
    lines = []
    for summary in traceback.extract_stack(frame):
        lines.append(f"{summary.filename.removeprefix(root)}:{summary.lineno} {summary.name}")
    return lines


def phase_of(stack: list[str], driver_file: str, driver_function: str) -> str:
    """The callee of the driver function that is running now (the driver's own line when it runs itself);
    `before` while the driver has not started (imports, argument parsing), `after` once it has returned."""
    for index, line in enumerate(stack):
        where, function = line.rsplit(" ", 1)
        if function == driver_function and where.split(":")[0].endswith(driver_file):
            if index + 1 < len(stack):
                callee = stack[index + 1].rsplit(" ", 1)[1]
                return f"{callee} (from {where.split('/')[-1]})"
            return f"{driver_function} itself ({where.split('/')[-1]})"
    return "outside the driver"


class Sampler(threading.Thread):
    def __init__(self, every: float, step_mib: float, driver: str, main_id: int) -> None:
        super().__init__(daemon=True)
        self.every, self.step_mib, self.main_id = every, step_mib, main_id
        self.driver_file, self.driver_function = driver.rsplit(":", 1)
        self.start_time = time.perf_counter()
        self.timeline: list[tuple[float, float, str]] = []
        self.highs: list[dict] = []
        self.phases: dict[str, dict] = {}
        self.stop_event = threading.Event()
        self.entered_driver = False

    def sample(self) -> None:
        rss, hwm = status_mib()
        frame = sys._current_frames().get(self.main_id)
        stack = stack_of(frame)
        phase = phase_of(stack, self.driver_file, self.driver_function)
        if phase == "outside the driver":
            phase = "after the driver" if self.entered_driver else "before the driver (imports, arguments)"
        else:
            self.entered_driver = True
        now = time.perf_counter() - self.start_time
        self.timeline.append((round(now, 3), round(rss, 1), phase))
        record = self.phases.setdefault(phase, {"first_s": round(now, 3), "max_rss_mib": 0.0, "hwm_rise_mib": 0.0})
        record["last_s"] = round(now, 3)
        record["max_rss_mib"] = max(record["max_rss_mib"], round(rss, 1))
        previous = self.highs[-1]["hwm_mib"] if self.highs else 0.0
        if hwm - previous >= self.step_mib:
            record["hwm_rise_mib"] = round(record["hwm_rise_mib"] + hwm - previous, 1)
            self.highs.append(
                {
                    "t_s": round(now, 3),
                    "hwm_mib": round(hwm, 1),
                    "rss_mib": round(rss, 1),
                    "phase": phase,
                    "heap_mib": heap_mib(),
                    "stack": stack[-25:],
                }
            )

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="/tmp/rss_trace.json")
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--step", type=float, default=20.0, help="MiB of VmHWM rise that records a stack")
    parser.add_argument("--driver", default="flows/train.py:_run", help="FILE:FUNCTION whose callees are the phases")
    parser.add_argument("-m", dest="module", help="run this module (as python -m)")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script and its arguments, or the module's arguments")
    args = parser.parse_args()

    sampler = Sampler(args.every, args.step, args.driver, threading.get_ident())
    sampler.start()
    code: object = 0
    try:
        if args.module:
            sys.argv = [args.module, *args.target]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args.target)
            runpy.run_path(args.target[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sampler.stop_event.set()
        sampler.join()
        sampler.sample()
        rss, hwm = status_mib()
        peak = max(sampler.highs, key=lambda high: high["hwm_mib"]) if sampler.highs else None
        document = {
            "command": sys.argv,
            "exit_code": code,
            "vm_hwm_mib": round(hwm, 1),
            "sampled_max_rss_mib": max(r for _, r, _ in sampler.timeline),
            "peak": peak,
            "phases": sampler.phases,
            "highs": sampler.highs,
            "timeline": sampler.timeline,
        }
        Path(args.output).write_text(json.dumps(document, indent=1) + "\n")
        print(
            f"VmHWM {hwm:.0f} MiB; peak in {peak['phase'] if peak else '?'}; written to {args.output}", file=sys.stderr
        )
        for name, record in sampler.phases.items():
            print(
                f"  {record['first_s']:8.1f}-{record['last_s']:8.1f} s  max RSS {record['max_rss_mib']:7.0f} MiB  "
                f"HWM +{record['hwm_rise_mib']:6.0f}  {name}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
