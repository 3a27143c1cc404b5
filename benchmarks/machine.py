"""What the benchmarks print about the machine they ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform


def hardware(threads: int) -> str:
    """The CPU model, its logical and usable cores, torch's version and thread count, and Python's version."""
    import torch

    from robustkit.threads import cpu_model, usable_cores

    model, usable = cpu_model(), usable_cores()
    return (f"CPU: {model}; {os.cpu_count()} logical cores ({usable} usable); torch {torch.__version__} with "
            f"{threads} thread(s); Python {platform.python_version()}")


def finish(loads: list[float], started: float, failures: list[str]) -> bool:
    """Print the load average over the run, its length and the missed targets; True when none was missed."""
    import time

    print(f"load average (1 min) {loads[0]:.2f} at the start, {min(loads):.2f} to {max(loads):.2f} during the run "
          f"on {os.cpu_count()} cores; total {time.perf_counter() - started:.0f} s")
    if failures:
        print("TARGETS MISSED:")
        for failure in failures:
            print(f"  {failure}")
    return not failures
