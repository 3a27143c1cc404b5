"""robustkit: train, attack and formally verify neural networks for L-inf adversarial robustness.

The package keeps its import light: ``import robustkit`` loads no torch. The areas live in subpackages:
``robustkit.data`` (datasets), ``robustkit.models`` (zoo and model loading), ``robustkit.verifiers``,
``robustkit.attacks``, ``robustkit.trainers``, ``robustkit.bench`` and ``robustkit.reports``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
