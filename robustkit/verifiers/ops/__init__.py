"""Bound operators, one class per supported layer type, and their registry.

The contract every operator follows is in :mod:`robustkit.verifiers.ops.base`; the affine layers are in
:mod:`~robustkit.verifiers.ops.affine`, each non-linear layer family in its own file, and
:mod:`~robustkit.verifiers.ops.registry` maps ``torch.nn`` types (and traced functions, ONNX nodes) to them.
"""

from robustkit.verifiers.ops.affine import (
    BatchNorm2dOp,
    ChannelAffineOp,
    Conv2dOp,
    FlattenOp,
    IdentityOp,
    LinearOp,
    NormalizeOp,
    PoolOp,
    ScalarAffineOp,
)
from robustkit.verifiers.ops.base import (
    BACKWARD,
    NAIVE,
    SYMBOLIC,
    AddOp,
    AffineOp,
    BoundOp,
    Box,
    NonlinearOp,
    NotApplicable,
    Relaxation,
    backward_through,
    numel,
)
from robustkit.verifiers.ops.maxpool import MaxPool2dOp
from robustkit.verifiers.ops.registry import OPERATORS, register_operator, unregister_operator
from robustkit.verifiers.ops.relu import LeakyReLUOp, ReLUOp
from robustkit.verifiers.ops.sigmoid import SigmoidOp, SShapedOp, TanhOp

__all__ = [
    "BACKWARD", "NAIVE", "OPERATORS", "SYMBOLIC", "AddOp", "AffineOp", "BatchNorm2dOp", "BoundOp", "Box",
    "ChannelAffineOp", "Conv2dOp", "FlattenOp", "IdentityOp", "LeakyReLUOp", "LinearOp", "MaxPool2dOp",
    "NonlinearOp", "NormalizeOp", "NotApplicable", "PoolOp", "ReLUOp", "Relaxation", "SShapedOp", "ScalarAffineOp",
    "SigmoidOp", "TanhOp", "backward_through", "numel", "register_operator", "unregister_operator",
]
