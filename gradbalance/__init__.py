"""gradbalance: gradient balancing for multi-task learning with PyTorch.

Examples:
    >>> import torch, gradbalance as gb
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = gb.GradBalancer(torch.optim.Adam(model.parameters()), method="equal")
    >>> out = model(torch.randn(8, 3))
    >>> opt.zero_grad()
    >>> w = opt.backward({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].abs().mean()})
    >>> opt.step()
"""

from gradbalance import callbacks, data, engine, losses, methods, metrics, models, solvers
from gradbalance.balancer import GradBalancer
from gradbalance.errors import (
    GradBalanceError,
    LossError,
    MissingInputError,
    NonFiniteError,
    OptionError,
    OptionTypeError,
    SolverError,
    TaskMismatchError,
    UnreachedParameterError,
)

__version__ = "0.1.0"

__all__ = [
    "GradBalanceError",
    "GradBalancer",
    "LossError",
    "MissingInputError",
    "NonFiniteError",
    "OptionError",
    "OptionTypeError",
    "SolverError",
    "TaskMismatchError",
    "UnreachedParameterError",
    "__version__",
    "callbacks",
    "data",
    "engine",
    "losses",
    "methods",
    "metrics",
    "models",
    "solvers",
]
