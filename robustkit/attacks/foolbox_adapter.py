"""``foolbox``: run any attack of Foolbox 3 (Rauber et al., *Foolbox Native: Fast adversarial attacks to
benchmark the robustness of machine learning models in PyTorch, TensorFlow, and JAX*, JOSS 2020) by its class
name, on the same model and data as robustkit's own attacks.

Threat model: the foolbox attack's own distance: L-inf attacks (``LinfPGD``, ``LinfDeepFoolAttack``, ...)
give ``threat == "linf"``, L2 attacks (``L2CarliniWagnerAttack``, ``L2DeepFoolAttack``, ...) ``"l2"``; L1 and
L0 attacks are refused because robustkit's balls are L-inf and L2. x is (B, *shape) in [0, 1]; eps is the
radius in that norm. Fixed-epsilon attacks (PGD, FGSM, ...) run at eps; minimal-norm attacks (DeepFool,
Carlini-Wagner, FMN, ...) are called with ``epsilons=eps`` as well, so foolbox stops early once a sample is
broken within eps and the point we take is its perturbation clipped to the ball (foolbox's second output).

Options: ``attack`` is the class name in ``foolbox.attacks`` (default ``LinfPGD``: 40 steps of 0.01/0.3 * eps
with a random start, as robustkit's ``pgd``); ``options`` are that class's own keyword arguments. They are
given as a mapping and stored as a tuple of ``(name, value)`` pairs sorted by name, so the attack stays
hashable and its ``repr`` identifies it: ``FoolboxAttack(attack='LinfPGD', options=(('steps', 10),), ...)``.
For the attacks whose distance is a choice (``InversionAttack``, ``GaussianBlurAttack``, ...) pass
``distance="linf"`` or ``"l2"``. ``restarts`` re-runs the attack on the samples still robust (default 1).

Foolbox is imported on first use, with ``GIT_PYTHON_REFRESH=quiet`` set first (foolbox imports GitPython,
which otherwise warns when no ``git`` executable exists). Randomness (e.g. PGD's random start) comes from the
global torch and numpy generators inside foolbox; the adapter seeds them from the ``generator`` it is given
and restores their state afterwards, so the same generator seed gives the same result. The base class freezes
the parameters (foolbox's ``PyTorchModel`` would otherwise accumulate ``.grad`` on them) and restores
``requires_grad``, ``.grad`` and modes afterwards.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> attack = FoolboxAttack(attack="LinfPGD", options={"steps": 5})
>>> attack.threat
'linf'
>>> result = attack(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import InputError

__all__ = ["FoolboxAttack", "foolbox_attack_names", "import_foolbox"]

Options = tuple[tuple[str, Any], ...]

_SEED_LIMIT = 2**62


def import_foolbox() -> ModuleType:
    """The ``foolbox`` module, imported with ``GIT_PYTHON_REFRESH=quiet``; an :class:`InputError` if missing."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    try:
        with warnings.catch_warnings():
            # foolbox 3.3 imports scipy.ndimage.filters; that deprecation notice is not the user's to act on
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox
    except ImportError as exc:
        raise InputError(
            f"the foolbox attack needs the foolbox package (pip install 'foolbox>=3.3'): cannot import it ({exc})"
        ) from None
    return foolbox


def foolbox_attack_names() -> list[str]:
    """Every concrete attack class (and alias) that ``foolbox.attacks`` offers, sorted."""
    foolbox = import_foolbox()
    base = foolbox.attacks.base.Attack
    return sorted(
        name for name, value in vars(foolbox.attacks).items()
        if inspect.isclass(value) and issubclass(value, base) and not inspect.isabstract(value)
    )


def _attack_class(foolbox: ModuleType, name: str) -> type[Any]:
    value = getattr(foolbox.attacks, name, None)
    if inspect.isclass(value) and issubclass(value, foolbox.attacks.base.Attack) and not inspect.isabstract(value):
        return value
    names = foolbox_attack_names()
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else ""
    raise InputError(f"unknown foolbox attack {name!r}.{hint} Classes in foolbox.attacks: {', '.join(names)}.")


def _norm_of(distance: Any, name: str) -> str:
    p = getattr(distance, "p", None)
    if p == math.inf:
        return "linf"
    if p == 2:
        return "l2"
    raise InputError(
        f"foolbox's {name} measures perturbations by the {distance}, but robustkit's threat models are the "
        "L-inf and L2 balls: choose an Linf... or L2... attack"
    )


def _normalise_options(options: Mapping[str, Any] | Options) -> Options:
    pairs = list(options.items()) if isinstance(options, Mapping) else list(options)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise InputError(f"foolbox options must be a mapping or (name, value) pairs, got {pair!r}")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"foolbox options repeat a name: {names}")
    return tuple(sorted(pairs, key=lambda pair: pair[0]))


@dataclass(frozen=True, kw_only=True)
class FoolboxAttack(Attack):
    """A foolbox attack by class name with its own options; see the module docstring."""

    name: ClassVar[str] = "foolbox"
    attack: str = "LinfPGD"
    options: Mapping[str, Any] | Options = ()
    restarts: int = 1
    _norm: str = field(init=False, repr=False, compare=False, default="linf")

    def __post_init__(self) -> None:
        if not isinstance(self.attack, str) or not self.attack:
            raise InputError(f"attack must be the name of a class in foolbox.attacks, got {self.attack!r}")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise InputError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        object.__setattr__(self, "options", _normalise_options(self.options))
        built = self.build()
        try:
            distance = built.distance
        except (ValueError, AttributeError):
            raise InputError(
                f"foolbox's {self.attack} has no distance of its own: pass options={{'distance': 'linf'}} "
                "(or 'l2')"
            ) from None
        object.__setattr__(self, "_norm", _norm_of(distance, self.attack))

    @property
    def threat(self) -> str:
        return self._norm

    @property
    def attempts(self) -> int:
        return self.restarts

    @property
    def option_dict(self) -> dict[str, Any]:
        """The foolbox class's keyword arguments."""
        return dict(self.options.items() if isinstance(self.options, Mapping) else self.options)

    def accepts(self, option: str) -> bool:
        """Whether the foolbox class takes the keyword argument ``option`` (e.g. ``steps``)."""
        parameters = inspect.signature(_attack_class(import_foolbox(), self.attack)).parameters
        return option in parameters

    def build(self) -> Any:
        """A fresh instance of the foolbox attack class with :attr:`options`."""
        foolbox = import_foolbox()
        cls = _attack_class(foolbox, self.attack)
        options = self.option_dict
        if isinstance(options.get("distance"), str):
            distances = {"linf": foolbox.distances.linf, "l2": foolbox.distances.l2}
            if options["distance"] not in distances:
                raise InputError(f"distance must be 'linf' or 'l2', got {options['distance']!r}")
            options["distance"] = distances[options["distance"]]
        try:
            return cls(**options)
        except TypeError as exc:
            accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
            raise InputError(
                f"foolbox's {self.attack} does not take these options ({exc}); it takes: {', '.join(accepted)}"
            ) from None
        except (ValueError, AssertionError, ImportError) as exc:
            raise InputError(f"cannot create foolbox's {self.attack} with options {options}: {exc}") from None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        if eps == 0:
            return x
        foolbox = import_foolbox()
        attack = self.build()
        seed = int(torch.randint(0, _SEED_LIMIT, (1,), generator=generator, device=generator.device))
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        numpy_state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.enable_grad():
                torch.manual_seed(seed)
                _, clipped, _ = attack(fmodel, x, y, epsilons=eps)
        except (ValueError, NotImplementedError) as exc:
            raise InputError(f"foolbox's {self.attack} cannot attack this model and data: {exc}") from None
        finally:
            np.random.set_state(numpy_state)
        result: Tensor = clipped.detach()
        return result
