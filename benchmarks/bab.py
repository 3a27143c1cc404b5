"""Benchmark of complete verification: how much of the band between proven and broken ``bab`` decides.

For each ``--eps`` a MixTrain-trained ``mnist_small`` (the paper-like run of ``benchmarks/alpha_crown.py``,
trained there with ``robustkit train`` when ``/work/models/mix-eps<eps>/model.pt`` is missing) is evaluated on
the first ``--n`` points of the real MNIST test set:

1. the attacks' per-sample worst case (PGD and cw-linf, ``--pgd-steps`` x ``--restarts``, and AutoAttack's
   standard ensemble unless ``--no-autoattack``) and alpha-crown (the registered defaults) bracket the model;
2. every sample in the band (clean-correct, not verified by alpha-crown, not broken) is decided by ``bab``
   with ``--time-limit`` seconds per sample, once per ``--branching`` heuristic (default: babsr and fsb,
   compared on the same samples).

Printed per eps and heuristic: verified / falsified / timeout / memory / unknown counts on the band, the mean
and median seconds per band sample and the undecided share of all N points (neither verified nor falsified
by anything). Every bab counterexample is re-checked (inside the eps-ball and [0, 1], misclassified by a
forward pass) and no sample bab verifies may be broken by an attack.

Exits with status 1 when a target is missed: undecided <= 2% of the N points (with the first heuristic),
peak memory (this process's maximum resident set) < 8 GiB, no unsound or invalid answer.

    python benchmarks/bab.py [--eps 0.1,0.3] [--n 200] [--time-limit 60] [--branching babsr,fsb]
        [--no-autoattack] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from alpha_crown import DATA_DIR, MODELS_DIR, train
from machine import finish, hardware

UNDECIDED_TARGET = 0.02
MEMORY_TARGET_GB = 8.0


def peak_gb() -> float:
    """This process's peak resident set size in GiB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--eps", default="0.1,0.3", help="comma-separated L-inf radii (default 0.1,0.3)")
    parser.add_argument("--n", type=int, default=200, help="first N test points (default 200)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="bab seconds per sample (default 60)")
    parser.add_argument("--branching", default="babsr,fsb", help="heuristics to compare (default babsr,fsb)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"MNIST test files (default {DATA_DIR})")
    parser.add_argument("--pgd-steps", type=int, default=100, help="attack steps (default 100)")
    parser.add_argument("--restarts", type=int, default=5, help="attack restarts (default 5)")
    parser.add_argument("--no-autoattack", action="store_true", help="leave AutoAttack out of the attacks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from robustkit.attacks import WorstCase
    from robustkit.data import load_dataset
    from robustkit.models import load_model
    from robustkit.reports.tables import format_table
    from robustkit.verifiers import Status, get_verifier

    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    failures: list[str] = []
    heuristics = [name.strip() for name in args.branching.split(",") if name.strip()]
    test = load_dataset("mnist", data_dir=args.data_dir).test.subset(0, args.n)
    x, y, n = test.x, test.y, len(test)
    print(hardware(torch.get_num_threads()))
    for eps in (float(value) for value in args.eps.split(",")):
        path = MODELS_DIR / f"mix-eps{eps:g}" / "model.pt"
        if not path.is_file():
            train(path, eps, args.threads)
        model = load_model("mnist_small", path, device="cpu", input_shape=(1, 28, 28), num_classes=10)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        members = [("pgd", {"steps": args.pgd_steps, "restarts": args.restarts}),
                   ("cw-linf", {"steps": args.pgd_steps, "restarts": args.restarts})]
        if not args.no_autoattack:
            members.append(("autoattack", {}))
        attacked = WorstCase(attacks=members)(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
        broken = attacked.success | ~clean
        relaxed = get_verifier("alpha-crown").verify(model, x, y, eps).verified
        band = (~broken & ~relaxed).nonzero().flatten().tolist()
        loads.append(os.getloadavg()[0])
        rows = []
        for heuristic in heuristics:
            verifier = get_verifier("bab", time_limit=args.time_limit, branching=heuristic)
            counts = dict.fromkeys([s.value for s in Status], 0)
            seconds, proven, refuted = [], set(), set()
            for index in band:
                result = verifier.verify(model, x[index:index + 1], y[index:index + 1], eps)
                status = result.status[0]
                counts[status.value] += 1
                seconds.append(float(result.time_s[0]))
                if status is Status.VERIFIED:
                    proven.add(index)
                elif status is Status.FALSIFIED:
                    point = result.counterexample
                    inside = bool(((point - x[index:index + 1]).abs() <= eps + 1e-6).all()
                                  and (point >= 0).all() and (point <= 1).all())
                    with torch.no_grad():
                        wrong = int(model(point).argmax(1)) != int(y[index])
                    if not (inside and wrong):
                        failures.append(f"eps {eps:g} #{index}: bab's counterexample is not valid (INVALID)")
                    refuted.add(index)
                loads.append(os.getloadavg()[0])
            unsound = [i for i in proven if bool(broken[i])]
            if unsound:
                failures.append(f"eps {eps:g}: bab verified attackable samples {unsound} (UNSOUND)")
            undecided = len(band) - len(proven) - len(refuted)
            share = undecided / n
            rows.append([f"{eps:g}", heuristic, f"{float(clean.float().mean()):.1%}",
                         f"{float(relaxed.float().mean()):.1%}", f"{float((~broken).float().mean()):.1%}",
                         str(len(band)), str(counts["verified"]), str(counts["falsified"]), str(counts["timeout"]),
                         str(counts["memory"] + counts["unknown"]),
                         f"{statistics.mean(seconds):.1f}" if seconds else "-",
                         f"{statistics.median(seconds):.1f}" if seconds else "-", f"{share:.1%}"])
            if heuristic == heuristics[0] and share > UNDECIDED_TARGET:
                failures.append(f"eps {eps:g}: {undecided} of {n} points undecided ({share:.1%} > "
                                f"{UNDECIDED_TARGET:.0%}) with {heuristic}")
        print(f"\nmnist_small MixTrain ({path}); first {n} MNIST test points; eps {eps:g}; bab {args.time_limit:g} s "
              f"per sample; attacks PGD/cw-linf {args.pgd_steps}x{args.restarts}"
              f"{'' if args.no_autoattack else ' + AutoAttack'}")
        print(format_table(["eps", "branching", "clean", "alpha-crown", "attacks leave", "band", "verified",
                            "falsified", "timeout", "memory/unknown", "mean s", "median s", "undecided"], rows),
              flush=True)
    peak = peak_gb()
    print(f"peak memory {peak:.2f} GiB")
    if peak >= MEMORY_TARGET_GB:
        failures.append(f"peak memory {peak:.2f} GiB >= {MEMORY_TARGET_GB:g}")
    if not finish(loads, started, failures):
        return 1
    print(f"all targets met: at most {UNDECIDED_TARGET:.0%} undecided, memory < {MEMORY_TARGET_GB:g} GiB, every "
          "answer sound and every counterexample valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
