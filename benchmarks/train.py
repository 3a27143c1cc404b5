"""Benchmark of the trainers: the cost of one epoch, and verified accuracy against training time.

Everything is ``mnist_small`` on the ``mnist5k`` training split (4,000 images) at eps 0.1, batch 50, Adam lr 1e-3,
seed 0, through the library's trainers (``robustkit.trainers``), so the times are those of ``robustkit train``.

(a) Speed: one epoch of each trainer, all in this one process, one after the other: ``standard``, ``pgd`` (40
    steps), ``verifiable --method symbolic`` and ``mixtrain`` (k = 5, its default adaptive schedule, whose
    end-of-epoch measurement counts as training time). Prints seconds per epoch (the trainers' own
    ``epoch_time_s``: training only, no monitoring) and the ratio to ``standard``.
(b) Quality against time: full short runs of ``mixtrain``, ``verifiable --method symbolic`` and ``pgd`` (40
    steps), monitored after every epoch on the 1,000 mnist5k test images (clean accuracy, 20-step PGD accuracy
    and symbolic-verified accuracy at eps 0.1; monitoring is not training time). A table per trainer: epoch,
    cumulative training time, clean, PGD and verified accuracy.

Targets (exit status 1 if one is missed):

1. a mixtrain epoch takes <= 4x a standard epoch;
2. a mixtrain epoch takes <= 1/8 of a verifiable-symbolic epoch;
3. a pgd (40 steps) epoch takes <= 50x a standard epoch (the aim is about 40x: 41 forward+backward passes);
4. mixtrain reaches >= 75% symbolic-verified accuracy with >= 90% clean accuracy (at the same epoch) within 15
   minutes of cumulative training time;
5. the pgd-trained network's symbolic-verified accuracy after its last epoch is < 10%;
6. mixtrain reaches the best verified accuracy of verifiable-symbolic training (V, first reached after time T)
   within T / 5 of training time.

``--quick`` is a smoke run of the script itself (the first 300 training images, 100 monitoring images, 1-2 epochs):
its numbers are not representative, so its targets are printed but do not set the exit status.
Everything runs with ``--threads`` torch threads (default 1: the cores may be shared, and oversubscribed OpenMP
threads make times erratic); the load average is printed, since other busy processes distort the times.

    python benchmarks/train.py [--threads 1] [--quick] [--skip-speed] [--skip-quality]
        [--mixtrain-epochs 20] [--verifiable-epochs 5] [--pgd-epochs 10] [--warmup-epochs 0] [--ramp-epochs 0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MODEL = "mnist_small"
EPS = 0.1
BATCH = 50
SEED = 0
PGD_STEPS = 40
K = 5
QUALITY_TIME_S = 15 * 60
QUALITY_VERIFIED = 0.75
QUALITY_CLEAN = 0.90
PGD_VERIFIED_MAX = 0.10
SPEEDUP = 5.0
TRAINERS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "pgd": ("pgd", {"steps": PGD_STEPS}),
    "verifiable": ("verifiable", {"method": "symbolic"}),
    "mixtrain": ("mixtrain", {"k": K}),
}


@dataclass(frozen=True)
class Target:
    """One target: what it claims, whether it was met, and the measured numbers behind it."""

    claim: str
    met: bool
    measured: str


def load_average() -> float:
    return os.getloadavg()[0]


def train(name: str, epochs: int, n_train: int | None, n_val: int, args: argparse.Namespace) -> Any:
    """Train a fresh ``mnist_small`` (seed 0) with the named benchmark trainer; returns the TrainResult."""
    from robustkit.data import load_dataset
    from robustkit.models import build_model
    from robustkit.trainers import TrainConfig, get_trainer

    data = load_dataset("mnist5k")
    trainer_name, options = TRAINERS[name]
    config = TrainConfig(
        epochs=epochs, batch_size=BATCH, lr=args.lr, eps=EPS, warmup_epochs=args.warmup_epochs,
        ramp_epochs=args.ramp_epochs, seed=SEED, val_size=n_val, device="cpu",
    )
    train_split = data.train if n_train is None else data.train.subset(0, n_train)

    def report(record: Any) -> None:
        verified = "" if math.isnan(record.verified_acc) else f", verified {record.verified_acc:.1%}"
        print(f"  {name} epoch {record.epoch}/{epochs}: {record.epoch_time_s:.1f}s (total {record.train_time_s:.1f}s)"
              f"{verified}", file=sys.stderr, flush=True)

    return get_trainer(trainer_name, **options).fit(
        build_model(MODEL, seed=SEED), train_split, data.test if n_val else None, config, on_epoch=report
    )


def speed(n_train: int | None, args: argparse.Namespace) -> dict[str, float]:
    """(a): seconds of one training epoch per trainer."""
    from robustkit.reports.tables import format_table

    seconds: dict[str, float] = {}
    for name in TRAINERS:
        result = train(name, 1, n_train, 0, args)
        seconds[name] = result.history[0].epoch_time_s
        print(f"  timed {name}: {seconds[name]:.1f}s (load {load_average():.2f})", file=sys.stderr, flush=True)
    rows = [
        [name, f"{seconds[name]:.2f}s", f"{seconds[name] / seconds['standard']:.1f}x"] for name in TRAINERS
    ]
    size = 4000 if n_train is None else n_train
    print(f"\n(a) one epoch on {size} mnist5k training images, batch {BATCH}, eps {EPS:g} "
          f"(pgd {PGD_STEPS} steps, verifiable symbolic, mixtrain k={K})")
    print(format_table(["trainer", "s/epoch", "vs standard"], rows))
    return seconds


def quality(
    epochs: dict[str, int], n_train: int | None, n_val: int, args: argparse.Namespace
) -> dict[str, list[Any]]:
    """(b): per-epoch histories monitored on the first ``n_val`` test images."""
    from robustkit.reports.tables import format_table

    histories: dict[str, list[Any]] = {}
    for name in ("mixtrain", "verifiable", "pgd"):
        histories[name] = list(train(name, epochs[name], n_train, n_val, args).history)
        rows = [
            [str(r.epoch), f"{r.train_time_s:.1f}s", f"{r.eps:g}", "-" if math.isnan(r.weight) else f"{r.weight:.3f}",
             f"{r.clean_acc:.1%}", f"{r.pgd_acc:.1%}", f"{r.verified_acc:.1%}"]
            for r in histories[name]
        ]
        print(f"\n(b) {name} {TRAINERS[name][1]}: accuracy on the first {n_val} mnist5k test images at eps {EPS:g} "
              "(PGD: 20 steps; verified: symbolic) against cumulative training time")
        print(format_table(["epoch", "train time", "eps", "a", "clean", "PGD", "verified"], rows), flush=True)
    return histories


def first_reaching(history: Sequence[Any], verified: float, clean: float = 0.0) -> Any | None:
    """The first epoch record with at least ``verified`` verified and ``clean`` clean accuracy."""
    return next((r for r in history if r.verified_acc >= verified and r.clean_acc >= clean), None)


def speed_targets(seconds: dict[str, float]) -> list[Target]:
    mix, std, ver, pgd = seconds["mixtrain"], seconds["standard"], seconds["verifiable"], seconds["pgd"]
    return [
        Target("mixtrain epoch <= 4x standard", mix <= 4 * std, f"{mix / std:.1f}x ({mix:.2f}s vs {std:.2f}s)"),
        Target("mixtrain epoch <= 1/8 of verifiable-symbolic", mix <= ver / 8,
               f"1/{ver / mix:.1f} ({mix:.2f}s vs {ver:.2f}s)"),
        Target(f"pgd({PGD_STEPS}) epoch <= 50x standard (aim ~40x)", pgd <= 50 * std, f"{pgd / std:.1f}x"),
    ]


def quality_targets(histories: dict[str, list[Any]]) -> list[Target]:
    mix, ver, pgd = histories["mixtrain"], histories["verifiable"], histories["pgd"]
    good = first_reaching(mix, QUALITY_VERIFIED, QUALITY_CLEAN)
    best_mix = max(mix, key=lambda r: r.verified_acc)
    reached = (
        f"epoch {good.epoch} at {good.train_time_s:.0f}s: verified {good.verified_acc:.1%}, clean {good.clean_acc:.1%}"
        if good is not None else
        f"best verified {best_mix.verified_acc:.1%} (clean {best_mix.clean_acc:.1%}) at {best_mix.train_time_s:.0f}s"
    )
    targets = [
        Target(f"mixtrain >= {QUALITY_VERIFIED:.0%} verified with >= {QUALITY_CLEAN:.0%} clean within "
               f"{QUALITY_TIME_S // 60} min", good is not None and good.train_time_s <= QUALITY_TIME_S, reached),
        Target(f"pgd-trained verifies < {PGD_VERIFIED_MAX:.0%}", pgd[-1].verified_acc < PGD_VERIFIED_MAX,
               f"{pgd[-1].verified_acc:.1%} after {pgd[-1].epoch} epochs"),
    ]
    best = max(r.verified_acc for r in ver)
    ver_time = next(r.train_time_s for r in ver if r.verified_acc >= best)
    mix_hit = first_reaching(mix, best)
    if best == 0:
        measured = "verifiable-symbolic training verified nothing: no accuracy to reach"
        met = False
    elif mix_hit is None:
        measured = f"verifiable: {best:.1%} at {ver_time:.0f}s; mixtrain never reached it"
        met = False
    else:
        ratio = ver_time / mix_hit.train_time_s
        measured = (f"verifiable: {best:.1%} at {ver_time:.0f}s; mixtrain at {mix_hit.train_time_s:.0f}s "
                    f"({ratio:.1f}x less)")
        met = ratio >= SPEEDUP
    targets.append(Target(f"mixtrain reaches verifiable-symbolic's verified accuracy in >= {SPEEDUP:g}x less time",
                          met, measured))
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 training images, 1-2 epochs")
    parser.add_argument("--skip-speed", action="store_true", help="skip (a), the one-epoch timings")
    parser.add_argument("--skip-quality", action="store_true", help="skip (b), the runs against training time")
    parser.add_argument("--mixtrain-epochs", type=int, default=20, help="epochs of mixtrain in (b) (default 20)")
    parser.add_argument("--verifiable-epochs", type=int, default=5, help="epochs of verifiable in (b) (default 5)")
    parser.add_argument("--pgd-epochs", type=int, default=10, help="epochs of pgd in (b) (default 10)")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="epochs at eps 0 in (b) (default 0)")
    parser.add_argument("--ramp-epochs", type=int, default=0, help="epochs of eps ramp in (b) (default 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    args = parser.parse_args(argv)
    if args.threads < 1 or min(args.mixtrain_epochs, args.verifiable_epochs, args.pgd_epochs) < 1:
        parser.error("--threads and the epoch counts must be >= 1")
    torch.set_num_threads(args.threads)
    n_train, n_val = (300, 100) if args.quick else (None, 1000)
    epochs = (
        {"mixtrain": 2, "verifiable": 1, "pgd": 1} if args.quick else
        {"mixtrain": args.mixtrain_epochs, "verifiable": args.verifiable_epochs, "pgd": args.pgd_epochs}
    )

    loads = [load_average()]
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores; "
          f"load average {loads[0]:.2f}" + ("; --quick: a smoke run, targets not enforced" if args.quick else ""),
          flush=True)
    targets: list[Target] = []
    if not args.skip_speed:
        targets += speed_targets(speed(n_train, args))
        loads.append(load_average())
    if not args.skip_quality:
        targets += quality_targets(quality(epochs, n_train, n_val, args))
        loads.append(load_average())

    print(f"\nload average (1 min) {min(loads):.2f} to {max(loads):.2f} during the run; total "
          f"{time.perf_counter() - started:.0f}s")
    for target in targets:
        print(f"{'PASS' if target.met else 'FAIL'}  {target.claim}: {target.measured}")
    missed = [t for t in targets if not t.met]
    if args.quick:
        print(f"{len(missed)} of {len(targets)} targets missed in this smoke run (not enforced with --quick)")
        return 0
    print(f"{len(missed)} of {len(targets)} targets missed" if missed else "all targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
