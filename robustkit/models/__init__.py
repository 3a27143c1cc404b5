"""The model zoo (:data:`MODELS`, :func:`build_model`) and model loading (:func:`load_model`).

>>> from robustkit.models import build_model, count_parameters
>>> count_parameters(build_model("mnist_small"))
166406
"""

from robustkit.models.loading import build_network, fit_problem, load_model, spec_kind
from robustkit.models.zoo import MODELS, ModelSpec, build_model, count_parameters

__all__ = [
    "MODELS", "ModelSpec", "build_model", "build_network", "count_parameters", "fit_problem", "load_model", "spec_kind",
]
