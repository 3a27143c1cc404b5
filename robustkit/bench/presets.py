"""Built-in benchmark configurations (TOML, the same format as ``--config`` files).

* ``paper`` (the default): the MixTrain paper's comparison on the embedded data: mnist5k, mnist_small, eps 0.1,
  trainers standard, pgd (Madry, 40 steps), verifiable (symbolic), verifiable (interval) and mixtrain; evaluated with
  40-step PGD with 10 restarts, cw-linf, the interval attack with its defaults, AutoAttack (the ``AutoAttack`` column,
  part of the per-sample worst case), the interval, symbolic and crown verifiers, then the complete stage (``complete
  = "auto"``: bab where robustkit has it, else exact) with at most 2 s per sample of each cell's undecided band and at
  most 30 s per cell (``complete_cell_budget``: the band of a standard- or PGD-trained net is most of the test set,
  which 2 s per sample would take half an hour to decide; the samples not reached stay undecided; on 2 cores the
  band's chunks run in two evaluation workers, so 30 s reach about as many samples as 60 s did in one process; a
  cell's band is the gap between its worst-case attack accuracy and its best relaxation's verified accuracy). Measured
  on 2 idle AMD EPYC cores, every stage included: 27 min 23 s with ``[run] jobs = "auto"`` (two cells at a time there,
  one torch thread each; cells 4 min 2 s, 10 min 47 s, 24 min 41 s, 5 min 16 s and 7 min 15 s for standard, pgd,
  verifiable (symbolic), verifiable (interval) and MixTrain) against 42 min 37 s one cell at a time (``--jobs 1``: 3
  min 4 s, 9 min 53 s, 18 min 32 s, 4 min 20 s, 6 min 44 s); with two CPU-bound background processes on the same
  machine (auto then runs one cell at a time with one torch thread; measured before the evaluation workers) 1 h 19 min
  36 s (5 min 34 s, 15 min 25 s, 40 min 15 s, 7 min 47 s, 10 min 1 s). AutoAttack runs in robustkit's ``fast`` version
  (APGD-CE and APGD-T, 25 iterations each) by default: the standard ensemble took 41 minutes of one thread on the
  PGD-trained model's 1,000 test images (shared 2-core machine), per robust cell; set ``autoattack = "standard"`` in a
  config file for the leaderboard protocol. Adam with lr 0.002 for every trainer; the full verifiable training gets 8
  epochs and MixTrain (k = 3 points of each batch of 50) 13, both at 1.2 x eps: the budgets that show the paper's
  trade-off here.
* ``quick``: the same shape on the small fully connected net and a subset of the data, in a few minutes at
  most (used by the test suite); AutoAttack in robustkit's ``fast`` version (APGD-CE and APGD-T, 25 iterations
  each): measured 0.4 to 0.5 s of CPU time per cell on its 60 test samples, 2.2 s per run (AMD EPYC, one thread),
  so the test suite, which runs the preset about twice, pays about 5 s for the AutoAttack column. Its complete
  stage, at most 0.5 s per sample and 20 s per cell, took bab 0 to 4 s per cell on bands of 0 to 9 samples (20
  over the 5 cells, 6 of them left undecided; AMD EPYC); the split of a band depends on the machine's speed.
"""

from __future__ import annotations

PAPER = """
seed = 0

[run]
jobs = "auto"

[grid]
datasets = ["mnist5k"]
models = ["mnist_small"]
eps = [0.1]
trainers = ["standard", "pgd", "verifiable-symbolic", "verifiable-interval", "mixtrain"]

[data]
n_test = 1000
val_size = 100

[training]
batch_size = 50
lr = 0.002
lr_schedule = "step"

[trainers.standard]
trainer = "standard"
epochs = 10

[trainers.pgd]
trainer = "pgd"
steps = 40
epochs = 10

[trainers.verifiable-symbolic]
trainer = "verifiable"
method = "symbolic"
epochs = 8
warmup_epochs = 1
ramp_epochs = 3
eps_factor = 1.2

[trainers.verifiable-interval]
trainer = "verifiable"
method = "interval"
epochs = 30
warmup_epochs = 1
ramp_epochs = 15
kappa_start = 1.0
kappa_end = 0.5

[trainers.mixtrain]
trainer = "mixtrain"
k = 3
epochs = 13
warmup_epochs = 1
ramp_epochs = 3
eps_factor = 1.2

[evaluation]
pgd_steps = 40
pgd_restarts = 10
cw_steps = 40
interval_attack = {}
autoattack = "fast"
verifiers = ["interval", "symbolic", "crown"]
complete = "auto"
complete_time_limit = 2.0
complete_cell_budget = 30.0
eps_sweep = [0.02, 0.05, 0.1, 0.15, 0.2]
sweep_n = 200
"""

QUICK = """
seed = 0

[grid]
datasets = ["mnist5k"]
models = ["mnist_fc_small"]
eps = [0.1]
trainers = ["standard", "pgd", "verifiable-symbolic", "verifiable-interval", "mixtrain"]

[data]
n_train = 500
n_test = 60
val_size = 30

[training]
batch_size = 50
lr = 0.003
lr_schedule = "constant"
epochs = 2

[trainers.standard]
trainer = "standard"

[trainers.pgd]
trainer = "pgd"
steps = 3

[trainers.verifiable-symbolic]
trainer = "verifiable"
method = "symbolic"
ramp_epochs = 1

[trainers.verifiable-interval]
trainer = "verifiable"
method = "interval"
ramp_epochs = 1
kappa_start = 1.0
kappa_end = 0.5

[trainers.mixtrain]
trainer = "mixtrain"
ramp_epochs = 1
schedule_size = 30

[evaluation]
pgd_steps = 10
pgd_restarts = 1
cw_steps = 10
interval_attack = { inner_steps = 5, iterations = 1, restarts = 1 }
autoattack = "fast"
verifiers = ["interval", "symbolic", "crown"]
complete = "auto"
complete_time_limit = 0.5
complete_cell_budget = 20.0
eps_sweep = [0.05, 0.2]
sweep_n = 30
"""

PRESETS: dict[str, str] = {"paper": PAPER, "quick": QUICK}
