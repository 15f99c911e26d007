"""Balancing methods: one module per method, all behind `Method` and one registry.

``gb.methods.available()`` lists the registered names, ``gb.methods.get(name, **kwargs)`` builds
one, and every class is importable from here (``gb.methods.Equal()``).
"""

from gradbalance.methods.base import (
    FEATURES,
    GRAMIAN,
    JACOBIAN,
    KPIS,
    LAST_SHARED_GRAMIAN,
    LOSSES,
    Method,
    StepInputs,
)
from gradbalance.methods.dtp import DTP
from gradbalance.methods.dwa import DWA
from gradbalance.methods.equal import Equal
from gradbalance.methods.fixed import Fixed
from gradbalance.methods.gradnorm import GradNorm
from gradbalance.methods.mean import Mean
from gradbalance.methods.mgda import MGDA, MGDAUB
from gradbalance.methods.registry import available, get, get_class, register
from gradbalance.methods.uncertainty import Uncertainty

__all__ = [
    "DTP",
    "DWA",
    "FEATURES",
    "GRAMIAN",
    "JACOBIAN",
    "KPIS",
    "LAST_SHARED_GRAMIAN",
    "LOSSES",
    "MGDA",
    "MGDAUB",
    "Equal",
    "Fixed",
    "GradNorm",
    "Mean",
    "Method",
    "StepInputs",
    "Uncertainty",
    "available",
    "get",
    "get_class",
    "register",
]
