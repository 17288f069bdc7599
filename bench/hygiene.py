"""Benchmark hygiene: wait for an idle machine, time each repeat in its own process, report medians.

Issue 9, item 5: a timing means something only when nothing else shares the cores. So a
benchmark first waits until the 1-minute load average is below a threshold (giving up after a
timeout, and saying so in its JSON); every timed stage runs in a fresh Python process with a
fixed thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` in the
child), repeated, and is reported as the median with its min and max. Ratios (e.g. scoring time
over an epoch) are taken between medians of the same run.

Used by ``bench/trust.py``; nothing here knows about influence functions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class IdleWait:
    threshold: float = 0.5  # the 1-minute load average that counts as idle (2 cores: below a quarter of one busy core)
    timeout_s: float = 600.0  # give up waiting after this long and run anyway (recorded as idle=False)
    poll_s: float = 10.0  # seconds between checks

    def __post_init__(self):
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.timeout_s < 0 or self.poll_s <= 0:
            raise ValueError("timeout_s must be >= 0 and poll_s > 0")


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_until_idle(wait: IdleWait, read_load: Callable[[], float] = load_average,
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                    report: Callable[[str], None] | None = None) -> dict:
    """Wait until the 1-minute load average is below ``wait.threshold`` or ``wait.timeout_s`` passes.

    Returns what a results file should record: ``load_avg_at_start`` (when the benchmark began),
    ``load_avg_first`` (when the wait began), ``idle`` (whether the threshold was reached),
    ``waited_s`` and, when it was not reached, a ``note`` saying the timings were taken under load.
    """
    start = clock()
    first = load = read_load()
    while load >= wait.threshold and clock() - start < wait.timeout_s:
        if report is not None:
            report(f"load average {load:.2f} >= {wait.threshold}: waiting "
                   f"({clock() - start:.0f} of at most {wait.timeout_s:.0f} s)")
        sleep(wait.poll_s)
        load = read_load()
    idle = load < wait.threshold
    out = {"load_avg_at_start": load, "load_avg_first": first, "idle": idle, "waited_s": clock() - start,
           "idle_wait": asdict(wait)}
    if not idle:
        out["note"] = (f"the machine did not become idle within {wait.timeout_s:.0f} s (1-minute load average "
                       f"{load:.2f} >= {wait.threshold}): these timings were taken under load")
    return out


def summarize(values: Sequence[float]) -> dict:
    """``{"median", "min", "max", "n", "values"}`` of repeated measurements."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no measurements to summarize")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def thread_env(threads: int) -> dict:
    """The environment of a child process pinned to ``threads`` threads."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads)}


def run_child(argv: Sequence[str], threads: int, out: Path, cwd: Path | None = None) -> dict:
    """Run ``python argv... --threads T --out OUT`` in a fresh process; return the JSON it wrote to ``out``.

    The child sets ``torch.set_num_threads(T)`` itself; its own peak RSS is its to record. A
    child that fails raises RuntimeError with its exit status.
    """
    out.unlink(missing_ok=True)
    cmd = [sys.executable, *argv, "--threads", str(threads), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=cwd, env=thread_env(threads))
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode})")
    return json.loads(out.read_text())
