"""The reference side of ``benchmarks/attacks.py``'s agreement check: a throwaway virtual environment with an
independent implementation of APGD, and the worker that runs it there.

The reference is ``pyautoattack`` (PyPI, 0.2.0), the packaging of Croce and Hein's own AutoAttack code: its
``APGDAttack`` (``loss="ce"``) is AutoAttack's APGD-CE and its ``APGDAttack_targeted`` the APGD-T of the
standard version (the targeted DLR loss, the 9 most likely other classes in turn, 100 iterations each). Of the
candidates that install here, it is the one that is AutoAttack itself: ``torchattacks`` (3.5.1) carries a copy
of the same APGD/APGD-T code, but pins ``requests~=2.25.1`` and needs ``torchvision``; the Adversarial
Robustness Toolbox's ``AutoProjectedGradientDescent`` is a separate re-implementation whose targeted mode takes
one given target per sample and ascends the untargeted DLR ratio (no targeted DLR loss, no sweep over the top
classes), so it is not APGD-T. robustkit's attacks are written from the papers; nothing of the reference is
copied into robustkit, and the reference is never a project dependency: it lives only in the environment that
:func:`ensure_environment` creates (``python -m venv``, then ``pip install torch==<this torch> numpy
pyautoattack==0.2.0``; the torch wheel comes from the machine's local wheel folder where pip has one).

The worker runs there without robustkit: ``python apgd_reference.py MODEL.pt POINTS.pt OUT.pt`` loads the
model as TorchScript (``torch.jit.load``), the points (``x``, ``y``, ``eps``, ``batch``, ``threads``) with
``torch.load``, runs both attacks batch by batch (seed 0, one restart) and saves, per attack, whether each
adversarial example is still classified correctly (``<name>_robust``), its L-inf distance (``<name>_linf``) and
the time (``<name>_time_s``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import venv
from pathlib import Path

REFERENCE = "pyautoattack==0.2.0"
ATTACKS = ("apgd-ce", "apgd-t")


def environment_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def ensure_environment(folder: Path, torch_version: str) -> Path:
    """The virtual environment's interpreter, creating the environment (and installing the reference) if needed."""
    python = environment_python(folder)
    marker = folder / ".robustkit-reference"
    wanted = f"{REFERENCE} torch=={torch_version}"
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"creating the reference environment {folder} ({wanted})", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    # the version without its local suffix (2.13.0+cpu -> 2.13.0): pip matches the local wheel to it
    command = [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version.split('+')[0]}", "numpy",
               REFERENCE]
    subprocess.run(command, check=True)
    marker.write_text(wanted)
    return python


def run_reference(python: Path, model_file: Path, points_file: Path, out_file: Path) -> None:
    """Run the worker in the reference environment (its own interpreter, no robustkit on its path)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([str(python), str(Path(__file__).resolve()), str(model_file), str(points_file), str(out_file)],
                   check=True, env=env, cwd=out_file.parent)


def worker(model_file: str, points_file: str, out_file: str) -> None:
    """APGD-CE and APGD-T of the reference on the saved points (runs inside the reference environment)."""
    import torch
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    points = torch.load(points_file)
    torch.set_num_threads(int(points["threads"]))
    model = torch.jit.load(model_file).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y, eps, batch = points["x"], points["y"], float(points["eps"]), int(points["batch"])
    attacks = {
        "apgd-ce": APGDAttack(model, n_iter=100, norm="Linf", n_restarts=1, eps=eps, seed=0, loss="ce",
                              device="cpu"),
        "apgd-t": APGDAttack_targeted(model, n_iter=100, norm="Linf", n_restarts=1, eps=eps, seed=0,
                                      n_target_classes=9, device="cpu"),
    }
    saved: dict[str, object] = {}
    for name, attack in attacks.items():
        started = time.perf_counter()
        robust, linf = [], []
        for start in range(0, len(y), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            adv = attack.perturb(xb, yb).detach()
            with torch.no_grad():
                robust.append(model(adv).argmax(1) == yb)
            linf.append((adv - xb).abs().flatten(1).amax(1))
        saved[f"{name}_robust"] = torch.cat(robust)
        saved[f"{name}_linf"] = torch.cat(linf)
        saved[f"{name}_time_s"] = time.perf_counter() - started
        print(f"  reference {name}: robust accuracy {float(saved[f'{name}_robust'].float().mean()):.1%} "
              f"({saved[f'{name}_time_s']:.0f} s)", file=sys.stderr, flush=True)
    torch.save(saved, out_file)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python apgd_reference.py MODEL.pt POINTS.pt OUT.pt (inside the reference environment)")
    worker(*sys.argv[1:])
