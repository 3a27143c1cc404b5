"""Benchmark of :mod:`robustkit.allocator`: glibc's default malloc against ``ROBUSTKIT_ALLOCATOR=kept``.

Runs robustkit's own commands, each in a fresh process, with the default (``system``: glibc serves large
tensors as fresh ``mmap`` pages, zero-filled by the kernel on first touch) and with ``ROBUSTKIT_ALLOCATOR=kept``
(freed memory stays in the heap for the next tensor), interleaved, ``--repeats`` times each:

* ``train-symbolic``: ``robustkit train --trainer verifiable --method symbolic`` on ``mnist_small``, one epoch
  of 500 training samples at eps 0.1 (the paper preset's longest cell trains this way);
* ``train-pgd``: ``--trainer pgd`` (40 steps), one epoch of 500 samples;
* ``verify-symbolic`` (300 test points), ``verify-crown`` (100) and ``attack-interval`` (the paper's interval
  attack, 100 points), at eps 0.1 on an ``mnist_small`` trained first (untimed, 2 standard epochs), since
  untrained networks have other unstable-neuron counts;
* on request only (minutes per run), ``train-symbolic-long``: three epochs of 1,500 samples with monitoring on
  100, where the heap's fragmentation under ``kept`` shows in the peak memory.

The table shows per workload and allocator the median wall time and the median peak resident memory of the
command, and kept's speed-up and memory ratio against the system allocator: the trade-off behind keeping
``kept`` opt-in. Exits with status 1 if a command fails.

    python benchmarks/allocator.py [--repeats 3] [--workloads train-symbolic,...,train-symbolic-long]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import finish, hardware

COMMON = ["--model", "mnist_small", "--eps", "0.1"]
WORKLOADS = {
    "train-symbolic": ["train", "--trainer", "verifiable", "--method", "symbolic", *COMMON, "--epochs", "1",
                       "--n-train", "500", "--val-size", "0"],
    "train-pgd": ["train", "--trainer", "pgd", *COMMON, "--epochs", "1", "--n-train", "500", "--val-size", "0"],
    "verify-symbolic": ["verify", *COMMON, "--checkpoint", "{checkpoint}", "--method", "symbolic",
                        "--n-examples", "300"],
    "verify-crown": ["verify", *COMMON, "--checkpoint", "{checkpoint}", "--method", "crown", "--n-examples", "100"],
    "attack-interval": ["attack", *COMMON, "--checkpoint", "{checkpoint}", "--attack", "interval",
                        "--n-examples", "100"],
    "train-symbolic-long": ["train", "--trainer", "verifiable", "--method", "symbolic", *COMMON, "--epochs", "3",
                            "--n-train", "1500", "--val-size", "100"],
}
DEFAULT_WORKLOADS = tuple(name for name in WORKLOADS if name != "train-symbolic-long")
PREPARE = ["train", "--trainer", "standard", "--model", "mnist_small", "--eps", "0.1", "--epochs", "2",
           "--val-size", "0"]
# the child reports its own peak resident memory (ru_maxrss, KiB on Linux) on its last stderr line
WRAPPER = ("import atexit, resource, runpy, sys; "
           "atexit.register(lambda: print('peak-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
           "file=sys.stderr)); sys.argv = ['robustkit', *sys.argv[1:]]; "
           "runpy.run_module('robustkit', run_name='__main__')")
ALLOCATORS = {"system": {}, "kept": {"ROBUSTKIT_ALLOCATOR": "kept"}}


def run_once(command: list[str], env_extra: dict[str, str], out: Path) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one command."""
    env = {k: v for k, v in os.environ.items() if k != "ROBUSTKIT_ALLOCATOR"}
    env.update(env_extra)
    full = [sys.executable, "-c", WRAPPER, "--quiet", *command]
    if command[0] == "train":
        full += ["--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak-kib ")]
    return wall, int(peak[-1].split()[1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per allocator and workload (default 3)")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated subset of "
                        + ", ".join(WORKLOADS) + f" (default {','.join(DEFAULT_WORKLOADS)})")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import torch

    print(hardware(torch.get_num_threads()))
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    failures: list[str] = []
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="robustkit-allocator-") as tmp:
        folder = Path(tmp)
        if any("{checkpoint}" in WORKLOADS[w] for w in chosen):
            print("  training the mnist_small the verify and attack workloads use (untimed)", file=sys.stderr,
                  flush=True)
            run_once(PREPARE, {}, folder / "model")
        checkpoint = str(folder / "model" / "model.pt")
        for workload in chosen:
            command = [part.replace("{checkpoint}", checkpoint) for part in WORKLOADS[workload]]
            for repeat in range(args.repeats):
                for label, env_extra in ALLOCATORS.items():
                    try:
                        found = run_once(command, env_extra, folder / f"{workload}-{label}-{repeat}")
                    except RuntimeError as error:
                        failures.append(str(error))
                        continue
                    results.setdefault((workload, label), []).append(found)
                    loads.append(os.getloadavg()[0])
                    print(f"  {workload} {label} run {repeat + 1}: {found[0]:.2f} s, {found[1]:.0f} MiB",
                          file=sys.stderr, flush=True)

    print(f"\n{'workload':<20} {'allocator':<9} {'wall s (median)':>16} {'peak MiB':>9} {'speed-up':>9} {'memory':>7}")
    for workload in chosen:
        medians = {label: (statistics.median(w for w, _ in runs), statistics.median(m for _, m in runs))
                   for label in ALLOCATORS if (runs := results.get((workload, label)))}
        for label, (wall, memory) in medians.items():
            ratios = ["", ""]
            if label == "kept" and "system" in medians:
                ratios = [f"{medians['system'][0] / wall:.2f}x", f"{memory / medians['system'][1]:.2f}x"]
            print(f"{workload:<20} {label:<9} {wall:>16.2f} {memory:>9.0f} {ratios[0]:>9} {ratios[1]:>7}")
    return 0 if finish(loads, started, failures) else 1


if __name__ == "__main__":
    sys.exit(main())
