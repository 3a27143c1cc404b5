"""Benchmark of the VNN-LIB front end on a VNN-COMP-shaped MNIST network, through the commands a user runs.

A 784-256-256-10 ReLU network (``mnist_fc256``, the shape of VNN-COMP's ``mnist-net_256x2``) trained normally
on mnist5k (``robustkit train --trainer standard``, 10 epochs; trained into ``--model-dir`` when missing) is
exported with ``robustkit vnnlib-export --all-points`` to ONNX plus one VNN-LIB robustness property per test
point and eps (the first ``--n`` mnist5k test points, ``--eps``, ``--timeout`` seconds each), and the whole
benchmark is decided by ``robustkit vnnlib --instances`` in a subprocess.

Printed per eps: sat / unsat / unknown / timeout / error counts, decided within the timeout, the mean and
median seconds per instance and the total wall time; then the peak memory of the subprocesses (their largest
resident set). Every sat is re-checked here too: the counterexample of a single-instance run
(``robustkit vnnlib NETWORK PROPERTY --out``) must lie in the property's box and violate it on the network.

Exits with status 1 when a target is missed: at least ``--n - 1`` of ``--n`` decided within the timeout per eps;
peak memory < 8 GiB; every re-checked counterexample valid.

    python benchmarks/vnnlib.py [--n 30] [--eps 0.03,0.05] [--timeout 120] [--workers 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import finish, hardware

MODEL_DIR = Path("/work/models/fc256-std")
MEMORY_TARGET_GB = 8.0


def robustkit(*args: str, threads: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "robustkit", "--threads", str(threads), *args]
    print("+ robustkit", " ".join(args), flush=True)
    return subprocess.run(command, check=True, text=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="test points per eps (default 30)")
    parser.add_argument("--eps", default="0.03,0.05", help="comma-separated radii (default 0.03,0.05)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per instance (default 120)")
    parser.add_argument("--workers", type=int, default=1, help="robustkit vnnlib --workers (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help=f"trained model (default {MODEL_DIR})")
    parser.add_argument("--out", type=Path, help="benchmark folder (default: a temporary one)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from robustkit.reports.tables import format_table
    from robustkit.vnnlib import read_property

    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    failures: list[str] = []
    print(hardware(args.threads))
    checkpoint = args.model_dir / "model.pt"
    if not checkpoint.is_file():
        robustkit("-q", "train", "--trainer", "standard", "--model", "mnist_fc256", "--eps", "0", "--epochs", "10",
                  "--out", str(args.model_dir), threads=args.threads)
    folder = args.out or Path(tempfile.mkdtemp(prefix="vnnlib-bench-"))
    robustkit("vnnlib-export", "--model", "mnist_fc256", "--checkpoint", str(checkpoint), "--n-examples",
              str(args.n), "--eps", args.eps, "--timeout", f"{args.timeout:g}", "--out", str(folder / "bench"),
              "--all-points", threads=args.threads)
    clock = time.perf_counter()
    robustkit("vnnlib", "--instances", str(folder / "bench" / "instances.csv"), "--out", str(folder / "results.csv"),
              "--workers", str(args.workers), threads=args.threads)
    wall = time.perf_counter() - clock
    loads.append(os.getloadavg()[0])
    with open(folder / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    network = folder / "bench" / "onnx" / "mnist_fc256.onnx"
    from robustkit.models import load_model

    model = load_model(str(network), device="cpu")
    table = []
    for eps in args.eps.split(","):
        mine = [r for r in rows if r["vnnlib"].endswith(f"_eps_{float(eps):g}.vnnlib")]
        counts = {word: sum(r["result"] == word for r in mine) for word in ("sat", "unsat", "unknown", "timeout",
                                                                             "error")}
        seconds = [float(r["seconds"]) for r in mine]
        decided = sum(r["result"] in ("sat", "unsat") and float(r["seconds"]) <= args.timeout for r in mine)
        table.append([eps, str(len(mine)), str(counts["sat"]), str(counts["unsat"]), str(counts["unknown"]),
                      str(counts["timeout"]), str(counts["error"]), f"{decided}/{len(mine)}",
                      f"{statistics.mean(seconds):.2f}", f"{statistics.median(seconds):.2f}"])
        if decided < len(mine) - 1:
            failures.append(f"eps {eps}: {decided} of {len(mine)} decided within {args.timeout:g} s")
        for row in (r for r in mine if r["result"] == "sat"):
            prop = folder / "bench" / row["vnnlib"]
            result_file = folder / f"{prop.stem}.result"
            robustkit("-q", "vnnlib", str(network), str(prop), "--timeout", f"{args.timeout:g}", "--out",
                      str(result_file), threads=args.threads)
            text = result_file.read_text()
            if text.split()[0] != "sat":
                continue  # a second run that did not find one is no invalid counterexample
            values = {name: float(value) for name, value in re.findall(r"\(([XY]_\d+)\s+([^()\s]+)\)", text)}
            x = np.array([values[f"X_{i}"] for i in range(784)])
            with torch.no_grad():
                y = model(torch.tensor(x, dtype=torch.float32).view(1, 1, 28, 28)).double().numpy()[0]
            if not read_property(prop).is_counterexample(x, y):
                failures.append(f"{row['vnnlib']}: the counterexample does not violate the property (INVALID)")
    print(f"\n{args.n} mnist5k test points per eps (misclassified ones included: trivially sat); timeout "
          f"{args.timeout:g} s; {args.workers} worker(s); {wall:.0f} s wall for all instances")
    print(format_table(["eps", "instances", "sat", "unsat", "unknown", "timeout", "error", "decided", "mean s",
                        "median s"], table))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak memory of the commands {peak:.2f} GiB; results in {folder}")
    if peak >= MEMORY_TARGET_GB:
        failures.append(f"peak memory {peak:.2f} GiB >= {MEMORY_TARGET_GB:g}")
    if not finish(loads, started, failures):
        return 1
    print(f"all targets met: at least {args.n - 1} of {args.n} decided within {args.timeout:g} s per eps, memory "
          f"< {MEMORY_TARGET_GB:g} GiB, every counterexample valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
