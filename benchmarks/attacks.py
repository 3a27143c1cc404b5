"""Benchmark of the attacks on an adversarially trained network: strength, cost and speed.

Trains ``mnist_small`` with Madry's PGD training on the ``mnist5k`` training split at eps 0.1 (a plain, seeded
loop: Adam lr 1e-3, batch 50, 10 epochs, each batch replaced by its adversarial version from
``robustkit.attacks.PGD`` with 8 steps of 2.5 * eps / 8 from a random start), caching the weights in
``~/.cache/robustkit/benchmarks/``, and prints its clean and PGD accuracy. Then, on the 1,000 test images at the
training eps, it compares

* ``pgd`` (cross-entropy, 40 steps) with 1 restart and with 10 restarts,
* ``cw-linf`` (its defaults: 40 steps of the margin loss, 1 restart),
* ``interval``, the interval attack (its defaults),
* foolbox's ``LinfPGD`` through the ``foolbox`` adapter (its defaults: 40 steps, random start),

printing robust accuracy, the samples each attack breaks that PGD with 10 restarts does not, the gradient steps
per sample (forward passes that needed an input gradient, counted by a hook on the model) and the time.

Targets (exit status 1 if one is missed):

1. the interval attack's robust accuracy is strictly lower than that of PGD with 10 restarts;
2. ``pgd`` and foolbox's ``LinfPGD`` (called directly) with the same 40 steps of 0.01 and no random start agree
   within one percentage point of robust accuracy;
3. PGD throughput: 40 steps (no early stop) on a batch of 256 correctly classified test images run at >= 80% of
   the speed of a plain loop of 40 forward+backward passes to the input on the same batch (medians of
   ``--repeats`` interleaved runs after a warm-up).

Everything runs with ``--threads`` torch threads (default 1: other processes may share the cores, and
oversubscribed OpenMP threads make times erratic); the load average is printed.

    python benchmarks/attacks.py [--threads 1] [--repeats 7] [--retrain]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from robustkit.attacks import Attack

EPS = 0.1
SEED = 0
EPOCHS = 10
BATCH = 50
LEARNING_RATE = 1e-3
TRAIN_STEPS = 8
TRAIN_STEP_SIZE = 2.5 * EPS / TRAIN_STEPS
EVAL_BATCH = 250
SPEED_BATCH = 256
SPEED_STEPS = 40
AGREEMENT_STEP = 0.01
CACHE = Path.home() / ".cache" / "robustkit" / "benchmarks"


def weights_path() -> Path:
    return CACHE / (f"mnist_small-mnist5k-madry-eps{EPS:g}-steps{TRAIN_STEPS}-seed{SEED}-adam{LEARNING_RATE:g}"
                    f"-e{EPOCHS}-b{BATCH}.pt")


def train(retrain: bool) -> Path:
    """Madry PGD training of mnist_small (cached)."""
    from robustkit.attacks import PGD
    from robustkit.data import load_dataset
    from robustkit.io import torch_save_atomic
    from robustkit.models import build_model

    path = weights_path()
    if path.is_file() and not retrain:
        print(f"using cached weights {path}", flush=True)
        return path
    model = build_model("mnist_small", seed=SEED)
    data = load_dataset("mnist5k").train
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    attack = PGD(steps=TRAIN_STEPS, step_size=TRAIN_STEP_SIZE, random_start=True, early_stop=False)
    order_generator = torch.Generator().manual_seed(SEED)
    attack_generator = torch.Generator().manual_seed(SEED + 1)
    for epoch in range(EPOCHS):
        started, total, count = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(data), generator=order_generator)
        for start in range(0, len(data), BATCH):
            batch = order[start:start + BATCH]
            x, y = data.x[batch], data.y[batch]
            model.eval()  # the attack expects eval mode; mnist_small has no layer that behaves differently
            x_adv = attack(model, x, y, eps=EPS, generator=attack_generator).x_adv
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        print(f"  epoch {epoch + 1}/{EPOCHS}: adversarial loss {total / count:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    torch_save_atomic(model.state_dict(), path)
    return path


class GradientCounter:
    """Counts the samples of every forward pass whose output needs a gradient (one gradient step each)."""

    def __init__(self, model: nn.Module) -> None:
        self.samples = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if output.requires_grad:
            self.samples += int(output.shape[0])


@dataclass
class Outcome:
    label: str
    success: Tensor
    time_s: float
    gradient_steps: int


def run_attack(label: str, attack: Attack, model: nn.Module, x: Tensor, y: Tensor, counter: GradientCounter) -> Outcome:
    generator = torch.Generator().manual_seed(SEED)
    counter.samples = 0
    started = time.perf_counter()
    parts = []
    for start in range(0, len(y), EVAL_BATCH):
        result = attack(model, x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH], eps=EPS,
                        generator=generator)
        parts.append(result.success)
    return Outcome(label, torch.cat(parts), time.perf_counter() - started, counter.samples)


def foolbox_pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Robust accuracy under foolbox's own LinfPGD (40 steps of 0.01, no random start), called directly."""
    from robustkit.attacks.foolbox_adapter import import_foolbox

    foolbox = import_foolbox()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device="cpu")
        attack = foolbox.attacks.LinfPGD(abs_stepsize=AGREEMENT_STEP, steps=40, random_start=False)
        success = torch.cat([
            attack(fmodel, x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH], epsilons=EPS)[2]
            for i in range(0, len(y), EVAL_BATCH)
        ])
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return 1 - float(success.float().mean())


def throughput(model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of 40-step PGD and of a plain loop of 40 forward+backward passes, on the same batch."""
    from robustkit.attacks import PGD

    attack = PGD(steps=SPEED_STEPS, early_stop=False)
    for p in model.parameters():
        p.requires_grad_(False)

    def plain() -> None:
        for _ in range(SPEED_STEPS):
            point = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(point), y)
            torch.autograd.grad(loss, point)

    def pgd() -> None:
        attack(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(SEED))

    pgd_times: list[float] = []
    plain_times: list[float] = []
    for repeat in range(repeats + 1):  # the first round is a warm-up
        for function, times in ((plain, plain_times), (pgd, pgd_times)):
            started = time.perf_counter()
            function()
            if repeat:
                times.append(time.perf_counter() - started)
    for p in model.parameters():
        p.requires_grad_(True)
    return statistics.median(pgd_times), statistics.median(plain_times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per throughput measurement (default 7)")
    parser.add_argument("--retrain", action="store_true", help="train again instead of using the cached weights")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    from robustkit.attacks import PGD, CWLinf, FoolboxAttack, IntervalAttack
    from robustkit.data import load_dataset
    from robustkit.models import load_model
    from robustkit.reports.tables import format_table

    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores; "
          f"load average {loads[0]:.2f}", flush=True)
    print(f"mnist_small, Madry PGD training on mnist5k at eps {EPS:g}: Adam lr {LEARNING_RATE:g}, batch {BATCH}, "
          f"{EPOCHS} epochs, {TRAIN_STEPS} PGD steps of {TRAIN_STEP_SIZE:g} from a random start, seed {SEED}",
          flush=True)
    weights = train(args.retrain)
    model = load_model("mnist_small", weights, device="cpu", input_shape=(1, 28, 28), num_classes=10)
    test = load_dataset("mnist5k").test
    x, y = test.x, test.y
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    counter = GradientCounter(model)

    attacks: list[tuple[str, Attack]] = [
        ("pgd (40 steps, 1 restart)", PGD()),
        ("pgd (40 steps, 10 restarts)", PGD(restarts=10)),
        ("cw-linf", CWLinf()),
        ("interval", IntervalAttack()),
        ("foolbox LinfPGD", FoolboxAttack(attack="LinfPGD")),
    ]
    outcomes = []
    for label, attack in attacks:
        outcomes.append(run_attack(label, attack, model, x, y, counter))
        loads.append(os.getloadavg()[0])
        print(f"  ran {label}", file=sys.stderr, flush=True)
    counter.handle.remove()
    pgd1 = outcomes[0]
    print(f"clean accuracy {float(clean.float().mean()):.1%}, PGD accuracy (40 steps, 1 restart) "
          f"{1 - float(pgd1.success.float().mean()):.1%} on the {len(y)} test images at eps {EPS:g}")

    reference = outcomes[1]
    rows = []
    for outcome in outcomes:
        extra = int((outcome.success & ~reference.success).sum())
        rows.append([
            outcome.label, f"{100 * (1 - float(outcome.success.float().mean())):.1f}%",
            str(int(outcome.success.sum())), str(extra), f"{outcome.gradient_steps / len(y):.1f}",
            f"{outcome.time_s:.1f}s", f"{1000 * outcome.time_s / len(y):.2f}ms",
        ])
    print()
    print(f"{len(y)} mnist5k test images, L-inf eps {EPS:g}; robust accuracy counts all of them (clean-misclassified "
          "ones count as broken); 'extra' = broken by the attack but not by pgd with 10 restarts")
    print(format_table(["attack", "robust acc", "broken", "extra", "grad steps/sample", "time", "time/sample"],
                       rows))

    interval = outcomes[3]
    interval_only = int((interval.success & ~reference.success).sum())
    pgd_only = int((reference.success & ~interval.success).sum())
    print(f"interval vs pgd x10: {interval_only} samples broken only by interval, {pgd_only} only by pgd x10")

    ours = PGD(steps=40, step_size=AGREEMENT_STEP, random_start=False)
    ours_acc = 1 - float(run_attack("agreement", ours, model, x, y, counter).success.float().mean())
    theirs_acc = foolbox_pgd_accuracy(model, x, y)
    print(f"agreement, 40 steps of {AGREEMENT_STEP:g} without random start: pgd {ours_acc:.1%}, foolbox LinfPGD "
          f"{theirs_acc:.1%} (difference {100 * abs(ours_acc - theirs_acc):.1f} points)")

    correct = clean.nonzero().squeeze(1)[:SPEED_BATCH]
    pgd_time, plain_time = throughput(model, x[correct], y[correct], args.repeats)
    ratio = plain_time / pgd_time
    print(f"throughput on {SPEED_BATCH} correctly classified images, medians of {args.repeats}: pgd {SPEED_STEPS} "
          f"steps {pgd_time * 1000:.0f} ms ({SPEED_BATCH * SPEED_STEPS / pgd_time:,.0f} sample-steps/s), plain loop "
          f"of {SPEED_STEPS} forward+backward {plain_time * 1000:.0f} ms; pgd runs at {ratio:.0%} of the plain speed")
    loads.append(os.getloadavg()[0])

    failures = []
    interval_acc = 1 - float(interval.success.float().mean())
    reference_acc = 1 - float(reference.success.float().mean())
    if not interval_acc < reference_acc:
        failures.append(f"interval attack {interval_acc:.1%} is not below pgd with 10 restarts {reference_acc:.1%}")
    if abs(ours_acc - theirs_acc) > 0.01:
        failures.append(f"pgd {ours_acc:.1%} and foolbox LinfPGD {theirs_acc:.1%} differ by more than 1 point")
    if ratio < 0.8:
        failures.append(f"pgd runs at {ratio:.0%} of the plain loop's speed (< 80%)")
    print(f"load average (1 min) {min(loads):.2f} to {max(loads):.2f} during the run; total "
          f"{time.perf_counter() - started:.0f} s")
    if failures:
        print("TARGETS MISSED:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print("all targets met: interval < pgd x10 robust accuracy; pgd and foolbox LinfPGD agree within 1 point; "
          "pgd >= 80% of the plain loop's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
