"""Benchmark of torch's thread settings on an idle and on a busy machine: what ``--threads`` should default to.

Runs robustkit's own commands, each in a fresh process (the OpenMP wait policy is read once, when torch
loads), under every setting and two machine states:

* settings: ``--threads 1``, and ``--threads C`` (C = the usable cores) with GNU OpenMP's default wait
  (``GOMP_SPINCOUNT=300000``: an idle thread spins that many times before it sleeps) and with
  ``OMP_WAIT_POLICY=PASSIVE`` (it sleeps at once), and robustkit's default (no ``--threads``, no environment
  variable: the policy of :mod:`robustkit.threads`); and C copies of the command at once with one thread each
  (what ``bench --jobs C`` does with cells), whose times are per copy (wall time / C);
* states: idle, and with ``--busy`` (default 2) CPU-bound background processes (``while True: pass``)
  started before the measurement and stopped after it;
* workloads: ``train-standard`` (``robustkit train --trainer standard --model mnist_small --epochs 1`` on 1,500
  training samples, no monitoring), ``train-mixtrain`` (the same with ``--trainer mixtrain --k 5``, symbolic),
  ``verify-crown`` (``robustkit verify --method crown`` on 100 test points at eps 0.1) and ``attack-pgd``
  (``robustkit attack --attack pgd`` with its defaults, 100 points); both on an ``mnist_small`` trained first
  (untimed, 2 standard epochs on mnist5k), since untrained networks have other unstable-neuron counts; and, when
  asked for (``--workloads bench-quick``: minutes per run), ``bench-quick``, the whole ``robustkit bench --preset
  quick`` (the reliability issue's target: its default within 1.3x of the best setting on a busy machine).

Each (state, workload, setting) is run ``--repeats`` times, interleaved; the table shows the median wall time,
the median CPU time (user + system of the child) and the wall time relative to the best single-command setting
in the same state and workload. Exits with status 1 if the default is more than 1.3x the best setting on any row (the
target of the reliability issue for a busy machine), or if a command fails.

    python benchmarks/threads.py [--repeats 3] [--busy-repeats N] [--busy 2] [--states idle,busy]
        [--workloads train-standard,train-mixtrain,verify-crown,attack-pgd,bench-quick]
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

from robustkit.threads import usable_cores

LIMIT = 1.3  # the default may take at most this multiple of the best setting's wall time
BUSY_LOOP = "while True: pass"

WORKLOADS = {
    "train-standard": ["train", "--trainer", "standard", "--model", "mnist_small", "--eps", "0.1", "--epochs", "1",
                       "--n-train", "1500", "--val-size", "0"],
    "train-mixtrain": ["train", "--trainer", "mixtrain", "--model", "mnist_small", "--eps", "0.1", "--epochs", "1",
                       "--k", "5", "--n-train", "1500", "--val-size", "0"],
    "verify-crown": ["verify", "--model", "mnist_small", "--checkpoint", "{checkpoint}", "--method", "crown",
                     "--eps", "0.1", "--n-examples", "100"],
    "attack-pgd": ["attack", "--model", "mnist_small", "--checkpoint", "{checkpoint}", "--attack", "pgd",
                   "--eps", "0.1", "--n-examples", "100"],
    "bench-quick": ["bench", "--preset", "quick"],
}
DEFAULT_WORKLOADS = ("train-standard", "train-mixtrain", "verify-crown", "attack-pgd")
PREPARE = ["train", "--trainer", "standard", "--model", "mnist_small", "--eps", "0.1", "--epochs", "2",
           "--val-size", "0"]


def settings(cores: int) -> dict[str, tuple[list[str], dict[str, str], int]]:
    """label -> (global CLI options, extra environment, copies run at once)."""
    found: dict[str, tuple[list[str], dict[str, str], int]] = {"default": ([], {}, 1)}
    # one thread has no OpenMP team to wait for: its wait policy does not matter
    found["1 thread"] = (["--threads", "1"], {}, 1)
    if cores > 1:
        # GNU OpenMP's own default: spin 300,000 times before sleeping (robustkit leaves an explicit setting alone)
        found[f"{cores} threads, spin"] = (["--threads", str(cores)], {"GOMP_SPINCOUNT": "300000"}, 1)
        found[f"{cores} threads, passive"] = (["--threads", str(cores)], {"OMP_WAIT_POLICY": "PASSIVE"}, 1)
        found[f"{cores} copies at once, 1 thread each"] = (["--threads", "1"], {}, cores)
    return found


def run_once(workload: list[str], options: list[str], env_extra: dict[str, str], folder: Path,
             out: Path | None = None, copies: int = 1) -> tuple[float, float]:
    """Wall and CPU seconds of one command (its output folder, by default a new one in ``folder``, goes with
    ``folder``); with ``copies`` > 1, that many run at once and the times are per copy (wall / copies: the
    throughput of running several cells at once, as ``bench --jobs`` does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    commands = [[sys.executable, "-m", "robustkit", "--quiet", *options, *workload, "--out",
                 str(out or folder / f"run-{time.monotonic_ns()}-{copy}")] for copy in range(copies)]
    before = os.times()
    started = time.perf_counter()
    running = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for command in commands]
    errors = [process.communicate()[1] for process in running]
    wall = time.perf_counter() - started
    after = os.times()
    for command, process, error in zip(commands, running, errors, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}: {error.strip()[-500:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall / copies, cpu / copies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (default 3), interleaved")
    parser.add_argument("--busy-repeats", type=int, default=None,
                        help="runs per setting in the busy state (default: --repeats)")
    parser.add_argument("--busy", type=int, default=2, help="busy background processes in the loaded state (default 2)")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated subset of "
                        + ", ".join(WORKLOADS) + f" (default {','.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--states", default="idle,busy", help="idle, busy or both (default)")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    if any(s not in ("idle", "busy") for s in states):
        parser.error("--states takes idle, busy or both")

    cores = usable_cores()
    options = settings(cores)
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    results: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="robustkit-threads-") as tmp:
        folder = Path(tmp)
        if any("{checkpoint}" in WORKLOADS[w] for w in chosen):
            print("  training the mnist_small that verify-crown and attack-pgd use (untimed)", file=sys.stderr,
                  flush=True)
            run_once(PREPARE, ["--threads", str(cores)], {}, folder, out=folder / "model")  # one copy
        checkpoint = str(folder / "model" / "model.pt")
        for state in states:
            hogs = []
            if state == "busy":
                hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
                time.sleep(2.0)
            try:
                for workload in chosen:
                    repeats = args.busy_repeats or args.repeats if state == "busy" else args.repeats
                    for repeat in range(repeats):
                        for label, (flags, env_extra, copies) in options.items():
                            try:
                                command = [part.replace("{checkpoint}", checkpoint) for part in WORKLOADS[workload]]
                                timing = run_once(command, flags, env_extra, folder, copies=copies)
                            except RuntimeError as exc:
                                failures.append(str(exc))
                                continue
                            results.setdefault((state, workload, label), []).append(timing)
                            loads.append(os.getloadavg()[0])
                            print(f"  {state} {workload} {label}: {timing[0]:.1f} s wall, {timing[1]:.1f} s CPU "
                                  f"(repeat {repeat + 1}, {time.perf_counter() - started:.0f} s into the run, "
                                  f"load {loads[-1]:.1f})", file=sys.stderr, flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()

    print()
    print(hardware(cores).replace(f"with {cores} thread(s)", "with the threads of each row"))
    print(f"medians of {args.repeats} runs per row ({args.busy_repeats or args.repeats} when busy); busy = "
          f"{args.busy} CPU-bound background processes; "
          "wall time includes the process start (about 2 s of imports)")
    header = ["state", "workload", "setting", "wall s", "CPU s", "wall vs best"]
    rows = []
    for state in states:
        for workload in chosen:
            medians = {label: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
                       for (s, w, label), runs in results.items() if s == state and w == workload}
            if not medians:
                continue
            # the copies row is a throughput (several commands at once), not a setting of one command
            best = min(wall for label, (wall, _) in medians.items() if "copies" not in label)
            for label, (wall, cpu) in medians.items():
                rows.append([state, workload, label, f"{wall:.1f}", f"{cpu:.1f}", f"{wall / best:.2f}x"])
            if "default" in medians and medians["default"][0] > LIMIT * best:
                failures.append(f"default on {workload} ({state}): {medians['default'][0]:.1f} s > {LIMIT:g} x the "
                                f"best setting's {best:.1f} s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print()
    return 0 if finish(loads, started, failures) else 1


if __name__ == "__main__":
    sys.exit(main())
