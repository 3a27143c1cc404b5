"""Benchmark of the bound methods: speed, peak memory and tightness at batch 50, and speed at batches 1 and 5.

Trains the zoo networks ``mnist_small`` (conv) and ``mnist_fc`` (784-100-100-10) briefly on the ``mnist5k``
training split with a plain, seeded Adam loop (weights cached in ``~/.cache/robustkit/benchmarks/``), then,
for eps in {0.02, 0.1} and every registered verifier except ``exact`` (it has its own benchmark,
``benchmarks/exact.py``), plus ``crown-crown`` (crown with crown's own per-layer intermediate bounds, where
registered), measures on batches of 50 test points:

* samples/s of ``margin_bounds`` without gradients ("forward");
* samples/s of ``margin_bounds`` plus the backward pass of the robust loss cross_entropy(-margin_bounds, y)
  ("forward+backward", for methods whose bounds are differentiable);
* peak memory of each measurement;
* the mean lower bound of the worst margin min_{j != y} f_y - f_j, and each method's time relative to
  ``interval`` in the same run;
* tightness: the fraction of samples where ``symbolic``'s bound >= ``interval``'s and ``crown``'s >=
  ``symbolic``'s (up to a float tolerance of 1e-5 * (1 + |bound|)).

Times are medians over ``--repeats`` batches (samples 0-49, 50-99, ...) after ``--warmup`` runs on the first;
a method that takes less than 50 ms per batch is timed over as many calls of each batch as fill 50 ms (the
time per call is their mean), so that scheduler ticks of a few milliseconds do not decide the comparison.
The forward pass is also timed at batches of 1 and 5 (the sizes branch and bound and alpha-crown's inner loop
call the engine with): samples/s at each size and its share of the batch-50 speed.

With ``--baseline DIR`` (a checkout of another revision, e.g. ``git worktree add /tmp/base HEAD~3``), every
measurement of a method that revision has is repeated with that revision's package, alternating with this
one's, and the table gains the time ratio (this / baseline): how a change moved each method's speed, measured
under the same load. In the forward mode the pair is measured in ``--baseline-rounds`` alternating rounds (default
3) and the ratio is that of each side's fastest round (its median over the batches): on a virtual machine, one
pair of measurements taken a minute apart differed by up to 30% between two idle runs of identical code, and
the machine switches between speed states for minutes (see ``_time_ratio``).

Peak memory is honest per measurement: every measurement runs in a fresh Python process. After the imports,
the model and the data are loaded, the process resets the kernel's high-water mark of its resident set
(``/proc/self/clear_refs``, Linux >= 4.0) and notes its resident size; the peak is the high-water mark after
the warm-up and the repeats minus that size, i.e. what the measurement itself added. Where the reset is not
available it falls back to ``ru_maxrss`` minus the size at that point (which can under-count).

Exits with status 1 if a target is missed: ``symbolic`` on mnist_small at eps 0.02 >= 20 samples/s forward
and >= 8 samples/s forward+backward; ``interval`` >= 2000 samples/s forward (every model and eps); peak
memory of ``symbolic`` < 4 GiB (every model, eps and mode); ``crown`` at batch 5 >= 60% of its batch-50
samples/s (every model and eps); with ``--baseline``, no method more than 5% slower than the baseline in the
forward mode at batch 50 (medians; noisy on a busy machine, so read the load figures with it).

The machine's load average is printed (at the start and its range during the run): other busy processes
distort the times (see ``--threads``).

    python benchmarks/bounds.py [--repeats 5] [--warmup 1] [--threads N] [--retrain] [--baseline DIR]
        [--baseline-rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import finish, hardware

MODELS = ("mnist_small", "mnist_fc")
EPS_VALUES = (0.02, 0.1)
BATCH = 50
SEED = 0
EPOCHS = 3
LEARNING_RATE = 1e-3
SMALL_BATCHES = (1, 5)
EXCLUDED = ("exact",)
# extra configurations measured beside the registered methods: label -> (method, options)
VARIANTS = {"crown-crown": ("crown", {"intermediate": "crown"})}
BATCH5_SHARE = 0.6  # crown at batch 5 must reach this share of its batch-50 samples/s
SLOWER_LIMIT = 1.05  # with --baseline: at most 5% slower
CACHE = Path.home() / ".cache" / "robustkit" / "benchmarks"
GIB = 1 << 30
MIB = 1 << 20
TOLERANCE = 1e-5
MIN_TIMED_S = 0.05  # each timed batch repeats a fast call until it lasts this long (its time is the mean per call)

# (model, eps, method, mode) -> minimum samples/s
SPEED_TARGETS = {
    ("mnist_small", 0.02, "symbolic", "forward"): 20.0,
    ("mnist_small", 0.02, "symbolic", "backward"): 8.0,
    **{(model, eps, "interval", "forward"): 2000.0 for model in MODELS for eps in EPS_VALUES},
}
MEMORY_TARGETS = {"symbolic": 4 * GIB}


# ------------------------------------------------------------------------------------------------ training


def weights_path(model: str) -> Path:
    return CACHE / f"{model}-mnist5k-seed{SEED}-adam{LEARNING_RATE:g}-e{EPOCHS}-b{BATCH}.pt"


def train(model_name: str, retrain: bool) -> Path:
    """The cached weights of ``model_name`` after a seeded Adam run on mnist5k (trained now if missing)."""
    import torch
    import torch.nn.functional as F

    from robustkit.data import load_dataset
    from robustkit.io import torch_save_atomic
    from robustkit.models import build_model

    path = weights_path(model_name)
    if path.is_file() and not retrain:
        return path
    model = build_model(model_name, seed=SEED)
    data = load_dataset("mnist5k").train
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(data.x[batch]), data.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch_save_atomic(model.state_dict(), path)
    return path


def clean_accuracy(model_name: str, weights: Path) -> float:
    import torch

    from robustkit.data import load_dataset
    from robustkit.models import load_model

    test = load_dataset("mnist5k").test
    model = load_model(model_name, weights, device="cpu")
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())


# ------------------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _reset_peak() -> tuple[str, int]:
    """Reset the resident high-water mark if the kernel allows it; return (how, baseline bytes)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM", _status_kib("VmRSS") * 1024
    except OSError:
        return "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(how: str) -> int:
    if how == "VmHWM":
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement (model, eps, method, mode) in this fresh process."""
    import torch
    import torch.nn.functional as F

    from robustkit.data import load_dataset
    from robustkit.models import load_model
    from robustkit.verifiers import get_verifier

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    test = load_dataset("mnist5k").test
    model = load_model(job["model"], job["weights"], device="cpu", input_shape=(1, 28, 28), num_classes=10)
    verifier = get_verifier(job["method"], **job.get("options", {}))
    eps, batch, backward = job["eps"], job["batch"], job["mode"] == "backward"
    batches = [(test.x[i * batch:(i + 1) * batch], test.y[i * batch:(i + 1) * batch]) for i in range(job["repeats"])]
    torch.manual_seed(0)

    def once(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not backward:
            with torch.no_grad():
                return verifier.margin_bounds(model, x, y, eps)
        model.zero_grad(set_to_none=True)
        margins = verifier.margin_bounds(model, x, y, eps)
        if not margins.requires_grad:
            return None
        F.cross_entropy(-margins, y).backward()
        return margins.detach()

    how, baseline = _reset_peak()
    warm = 0.0
    for _ in range(job["warmup"]):
        start = time.perf_counter()
        if once(*batches[0]) is None:
            return {"measured": False, "threads": torch.get_num_threads()}
        warm = time.perf_counter() - start
    # a call of a few milliseconds is timed over enough calls to last MIN_TIMED_S, so that one scheduler tick
    # does not decide the median
    calls = max(1, min(1000, math.ceil(MIN_TIMED_S / warm))) if warm > 0 else 1
    times, worst = [], []
    for x, y in batches:
        start = time.perf_counter()
        for _ in range(calls):
            margins = once(x, y)
        times.append((time.perf_counter() - start) / calls)
        if margins is None:
            return {"measured": False, "threads": torch.get_num_threads()}
        worst.extend(margins.scatter(1, y[:, None], float("inf")).min(1).values.tolist())
    return {
        "measured": True, "times": times, "peak_bytes": max(_peak(how) - baseline, 0), "peak_method": how,
        "worst_margins": worst, "threads": torch.get_num_threads(),
    }


def _time_ratio(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> float:
    """This revision's time over the baseline's (> 1: slower) from alternating rounds of each: the fastest
    round's median per side (NaN when a side was never measured). Noise on a shared or virtual machine only
    ever adds time, and this one switches between speed states for minutes: the same crown call took 23 ms in
    one process and 34 ms in the next, for either revision. A ratio of medians is then decided by which state
    each round fell in; the fastest round of each side is what both revisions cost when nothing interferes."""
    def fastest(runs: list[dict[str, Any]]) -> float:
        found = [statistics.median(run["times"]) for run in runs if run["measured"]]
        return min(found) if found else float("nan")

    return fastest(mine) / fastest(theirs)


def measure(job: dict[str, Any], package: str | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter (importing robustkit from the checkout ``package`` if given)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = os.pathsep.join([package, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"measurement {job} failed:\n{finished.stderr.strip()}")
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------------------------- report


def tightness(first: list[float], second: list[float]) -> float:
    """Fraction of samples where ``second`` >= ``first`` up to the float tolerance."""
    pairs = list(zip(first, second, strict=True))
    return sum(b >= a - TOLERANCE * (1 + abs(a)) for a, b in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train again instead of using cached weights")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per measurement (default: torch's own choice, one per core); on a "
                             "machine shared with other busy processes, fewer threads than cores avoids the "
                             "large, erratic slow-downs of oversubscribed OpenMP barriers")
    parser.add_argument("--baseline", help="a checkout of another revision to measure every method against")
    parser.add_argument("--baseline-rounds", type=int, default=3,
                        help="alternating rounds of this revision and the baseline per forward measurement "
                             "(default 3); the ratio is that of each side's fastest round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0 or args.baseline_rounds < 1:
        parser.error("--repeats and --baseline-rounds must be >= 1, --warmup >= 0 and --threads >= 0")

    from robustkit.reports.tables import format_table
    from robustkit.verifiers import VERIFIERS

    configs = {m: (m, {}) for m in VERIFIERS if m not in EXCLUDED}
    configs.update({label: config for label, config in VARIANTS.items() if config[0] in VERIFIERS})
    methods = list(configs)
    baseline_methods = _registered(args.baseline) if args.baseline else []
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    weights = {}
    for model in MODELS:
        weights[model] = train(model, args.retrain)
        print(f"{model}: Adam lr {LEARNING_RATE:g}, {EPOCHS} epochs, batch {BATCH}, seed {SEED} on mnist5k; "
              f"clean test accuracy {clean_accuracy(model, weights[model]):.1%} ({weights[model]})", flush=True)

    results: dict[tuple[str, float, str, str], dict[str, Any]] = {}
    small: dict[tuple[str, float, str, int], dict[str, Any]] = {}
    baseline: dict[tuple[str, float, str, str], dict[str, Any]] = {}
    ratios: dict[tuple[str, float, str, str], float] = {}
    for model in MODELS:
        for eps in EPS_VALUES:
            for method in methods:
                name, options = configs[method]
                for mode in ("forward", "backward"):
                    job = {"model": model, "weights": str(weights[model]), "method": name, "options": options,
                           "eps": eps, "mode": mode, "batch": BATCH, "repeats": args.repeats,
                           "warmup": args.warmup, "threads": args.threads}
                    results[model, eps, method, mode] = measure(job)
                    if method in baseline_methods:
                        key = (model, eps, method, mode)
                        baseline[key] = measure(job, args.baseline)
                        # the target's ratio: alternating rounds (this, baseline, this, baseline, ...), the
                        # fastest round of each side (one pair minutes apart can be 30% off)
                        mine, theirs = [results[key]], [baseline[key]]
                        for _ in range(1, args.baseline_rounds if mode == "forward" else 1):
                            mine.append(measure(job))
                            theirs.append(measure(job, args.baseline))
                        ratios[key] = _time_ratio(mine, theirs)
                    loads.append(os.getloadavg()[0])
                    print(f"  measured {model} eps {eps:g} {method} {mode} ({time.perf_counter() - started:.0f} s "
                          f"into the run, load {loads[-1]:.1f})", file=sys.stderr, flush=True)
                for size in SMALL_BATCHES:
                    job = {"model": model, "weights": str(weights[model]), "method": name, "options": options,
                           "eps": eps, "mode": "forward", "batch": size, "repeats": max(args.repeats, 50 // size),
                           "warmup": max(args.warmup, 1), "threads": args.threads}
                    small[model, eps, method, size] = measure(job)
                    loads.append(os.getloadavg()[0])

    def speed(key: tuple[str, float, str, str], table: dict[Any, dict[str, Any]] | None = None) -> float | None:
        result = (results if table is None else table)[key]
        return BATCH / statistics.median(result["times"]) if result["measured"] else None

    def small_speed(key: tuple[str, float, str, int]) -> float:
        return key[3] / statistics.median(small[key]["times"])

    rows = []
    for model in MODELS:
        for eps in EPS_VALUES:
            for method in methods:
                forward, backward = (model, eps, method, "forward"), (model, eps, method, "backward")
                cells = [model, f"{eps:g}", method]
                for key in (forward, backward):
                    cells.append(f"{speed(key):,.1f}" if speed(key) is not None else "n/a")
                for key in (forward, backward):
                    result = results[key]
                    cells.append(f"{result['peak_bytes'] / MIB:,.1f}" if result["measured"] else "n/a")
                cells.append(f"{statistics.fmean(results[forward]['worst_margins']):.4g}")
                for mode in ("forward", "backward"):
                    own, base = speed((model, eps, method, mode)), speed((model, eps, "interval", mode))
                    cells.append(f"{base / own:.1f}x" if own and base else "n/a")
                for size in SMALL_BATCHES:
                    value = small_speed((model, eps, method, size))
                    cells.append(f"{value:,.1f} ({value / (speed(forward) or 1):.0%})")
                if args.baseline:
                    for mode in ("forward", "backward"):
                        key = (model, eps, method, mode)
                        ratio = ratios.get(key, float("nan"))
                        cells.append(f"{ratio:.2f}" if math.isfinite(ratio) else "n/a")
                rows.append(cells)
    threads = next(iter(results.values()))["threads"]
    how = next(iter(results.values()))["peak_method"]
    print()
    print(hardware(threads))
    print(f"batch {BATCH}; medians of {args.repeats} batches after {args.warmup} warm-up run(s); peak memory = "
          f"{how} high-water mark minus the resident size before the measurement, each in a fresh process")
    print(format_table(
        ["model", "eps", "method", "fwd samples/s", "fwd+bwd samples/s", "fwd peak MiB", "fwd+bwd peak MiB",
         "mean margin lb", "fwd time vs interval", "fwd+bwd time vs interval",
         *(f"fwd samples/s at batch {size} (share)" for size in SMALL_BATCHES),
         *(["fwd time vs baseline", "fwd+bwd time vs baseline"] if args.baseline else [])],
        rows,
    ))

    pairs = [(a, b) for a, b in (("interval", "symbolic"), ("symbolic", "crown"), ("crown", "alpha-crown"),
                                 ("interval", "crown-crown")) if a in methods and b in methods]
    if pairs:
        print()
        print(f"tightness on the {args.repeats * BATCH} test samples (worst-margin lower bound, tolerance "
              f"{TOLERANCE:g} * (1 + |bound|))")
        tight_rows = []
        for model in MODELS:
            for eps in EPS_VALUES:
                cells = [model, f"{eps:g}"]
                for first, second in pairs:
                    lower = results[model, eps, first, "forward"]["worst_margins"]
                    higher = results[model, eps, second, "forward"]["worst_margins"]
                    cells.append(f"{100 * tightness(lower, higher):.1f}%")
                tight_rows.append(cells)
        print(format_table(["model", "eps", *(f"{b} >= {a}" for a, b in pairs)], tight_rows))

    failures = []
    for (model, eps, method, mode), minimum in SPEED_TARGETS.items():
        if (model, eps, method, mode) not in results:
            failures.append(f"{method} is not registered: cannot check its target")
            continue
        value = speed((model, eps, method, mode))
        label = "forward" if mode == "forward" else "forward+backward"
        if value is None or value < minimum:
            failures.append(f"{method} {label} on {model} eps {eps:g}: {value or 0:,.1f} samples/s < {minimum:,.0f}")
    for model in MODELS:
        for eps in EPS_VALUES:
            if "crown" in methods:
                share = small_speed((model, eps, "crown", 5)) / (speed((model, eps, "crown", "forward")) or 1)
                if share < BATCH5_SHARE:
                    failures.append(f"crown at batch 5 on {model} eps {eps:g}: {share:.0%} of its batch-50 samples/s "
                                    f"< {BATCH5_SHARE:.0%}")
    for key, ratio in ratios.items():
        if key[3] == "forward" and math.isfinite(ratio) and ratio > SLOWER_LIMIT:
            failures.append(f"{key[2]} on {key[0]} eps {key[1]:g} is {ratio:.2f}x the baseline's time "
                            f"(> {SLOWER_LIMIT:g})")
    for method, limit in MEMORY_TARGETS.items():
        for key, result in results.items():
            if key[2] == method and result["measured"] and result["peak_bytes"] >= limit:
                failures.append(f"{method} peak memory {result['peak_bytes'] / GIB:.2f} GiB >= {limit / GIB:g} GiB "
                                f"({key[0]} eps {key[1]:g} {key[3]})")
    print()
    if not finish(loads, started, failures):
        return 1
    print("all targets met: symbolic on mnist_small eps 0.02 >= 20 samples/s forward and >= 8 forward+backward; "
          "interval >= 2000 samples/s forward; symbolic peak memory < 4 GiB; crown at batch 5 >= "
          f"{BATCH5_SHARE:.0%} of batch 50" + (f"; no method slower than {SLOWER_LIMIT:g}x the baseline"
                                                if args.baseline else ""))
    return 0


def _registered(package: str) -> list[str]:
    """The verifiers registered in the checkout ``package`` (asked in a fresh interpreter)."""
    env = dict(os.environ, PYTHONPATH=package)
    code = "from robustkit.verifiers import VERIFIERS; print(' '.join(VERIFIERS))"
    # run from inside the checkout: with -c, the working directory comes first on sys.path
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                           cwd=package)
    return [m for m in found.stdout.split() if m not in EXCLUDED]


if __name__ == "__main__":
    sys.exit(main())
