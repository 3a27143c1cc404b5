"""Benchmark of the ``exact`` verifier on a normally trained 784-50-50-10 MNIST network.

Trains the zoo model ``mnist_fc_small`` on the ``mnist5k`` training split with a plain, seeded Adam loop (the
weights are cached in ``~/.cache/robustkit/benchmarks/``), then runs ``exact`` (60 s per sample) on the first
100 test points at eps 0.02 and 0.1 and prints one row per eps: how many samples were verified, falsified
(clean-misclassified points included, and counted apart), timed out or left unknown, the median and maximum
seconds per sample, and how many ``symbolic`` verifies for comparison.

Exits with status 1 when a sample is left undecided (timeout or unknown) or takes more than 60 s.

    python benchmarks/exact.py
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.data import load_dataset
from robustkit.models import build_model
from robustkit.verifiers import Status, verify
from robustkit.verifiers.exact import ExactVerifier

MODEL = "mnist_fc_small"
SEED = 0
EPOCHS = 5
BATCH = 64
LEARNING_RATE = 1e-3
TIME_LIMIT = 60.0
EPS_VALUES = (0.02, 0.1)
CACHE = Path.home() / ".cache" / "robustkit" / "benchmarks"

logger = logging.getLogger("benchmarks.exact")


def trained_model() -> nn.Module:
    """``mnist_fc_small`` after a seeded Adam run on mnist5k (from the cache when it has been trained before).

    The cache key holds the training settings and a digest of the training split, so a change of the data
    (or of its order, which the seeded shuffling depends on) trains afresh.
    """
    model = build_model(MODEL, seed=SEED)
    train = load_dataset("mnist5k").train
    digest = hashlib.sha256(train.x.numpy().tobytes() + train.y.numpy().tobytes()).hexdigest()[:12]
    path = CACHE / f"{MODEL}-mnist5k-{digest}-seed{SEED}-adam{LEARNING_RATE:g}-e{EPOCHS}-b{BATCH}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(train.x[batch]), train.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.numel()
        logger.info("epoch %d: training loss %.4f", epoch + 1, total / len(train))
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--samples", type=int, default=100, help="first n test points (default 100)")
    parser.add_argument("--attack-steps", type=int, default=ExactVerifier().attack_steps,
                        help="PGD steps before the MILPs (0: the MILP alone decides)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-sample progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    torch.manual_seed(SEED)
    # one intra-op thread: the tensors are small, and a second thread that waits for a busy core made PGD and
    # the relaxations 60x slower on a shared 2-core machine; HiGHS runs its own threads
    torch.set_num_threads(1)
    model = trained_model()
    test = load_dataset("mnist5k").test.subset(0, args.samples)
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    print(f"{MODEL} on mnist5k, first {len(test)} test points, clean accuracy {accuracy:.1%}; "
          f"exact with time_limit={TIME_LIMIT:g}s (falsified includes clean-misclassified points)")
    header = (f"{'eps':>6} {'verified':>9} {'falsified':>10} {'(clean)':>8} {'timeout':>8} {'unknown':>8} "
              f"{'median s':>9} {'max s':>7} {'symbolic':>9} {'wall s':>7}")
    print(header)
    failed = False
    for eps in EPS_VALUES:
        start = time.perf_counter()
        exact = ExactVerifier(time_limit=TIME_LIMIT, attack_steps=args.attack_steps)
        result = verify(model, test.x, test.y, eps, method=exact)
        wall = time.perf_counter() - start
        symbolic = verify(model, test.x, test.y, eps, method="symbolic").count(Status.VERIFIED)
        undecided = result.count(Status.TIMEOUT) + result.count(Status.UNKNOWN)
        slowest = float(result.time_s.max())
        clean = int((result.prediction != test.y).sum())
        print(f"{eps:>6g} {result.count(Status.VERIFIED):>9} {result.count(Status.FALSIFIED):>10} {clean:>8} "
              f"{result.count(Status.TIMEOUT):>8} {result.count(Status.UNKNOWN):>8} "
              f"{float(result.time_s.median()):>9.3f} {slowest:>7.2f} {symbolic:>9} {wall:>7.1f}")
        falsified = [i for i, s in enumerate(result.status) if s is Status.FALSIFIED]
        if falsified and result.counterexample is not None:
            points = result.counterexample[falsified]
            inside = bool(((points - test.x[falsified]).abs().amax(dim=(1, 2, 3)) <= eps + 1e-6).all())
            with torch.no_grad():
                wrong = bool((model(points).argmax(1) != test.y[falsified]).all())
            if not (inside and wrong):
                print(f"eps {eps:g}: a counterexample is outside the box or not misclassified")
                failed = True
        if undecided or slowest > TIME_LIMIT:
            print(f"eps {eps:g}: {undecided} samples undecided, the slowest took {slowest:.1f} s")
            failed = True
    if failed:
        print("FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
