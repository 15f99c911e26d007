"""Balancing methods: one module per method, all behind `Method` and one registry.

``gb.methods.available()`` lists the registered names, ``gb.methods.get(name, **kwargs)`` builds
one, and every class is importable from here (``gb.methods.Equal()``).
"""

from gradbalance.methods.aligned_mtl import AlignedMTL
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
from gradbalance.methods.cagrad import CAGrad
from gradbalance.methods.describe import MethodInfo, MethodTable, describe
from gradbalance.methods.dtp import DTP
from gradbalance.methods.dwa import DWA
from gradbalance.methods.equal import Equal
from gradbalance.methods.famo import FAMO
from gradbalance.methods.fixed import Fixed
from gradbalance.methods.gls import GLS
from gradbalance.methods.graddrop import GradDrop
from gradbalance.methods.gradnorm import GradNorm
from gradbalance.methods.gradvac import GradVac
from gradbalance.methods.imtl_g import IMTLG
from gradbalance.methods.imtl_l import IMTLL
from gradbalance.methods.mean import Mean
from gradbalance.methods.mgda import MGDA, MGDAUB
from gradbalance.methods.moco import MoCo
from gradbalance.methods.nash_mtl import NashMTL
from gradbalance.methods.pcgrad import PCGrad
from gradbalance.methods.registry import available, get, get_class, register
from gradbalance.methods.rlw import RLW
from gradbalance.methods.uncertainty import Uncertainty
from gradbalance.methods.upgrad import UPGrad

__all__ = [
    "DTP",
    "DWA",
    "FAMO",
    "FEATURES",
    "GLS",
    "GRAMIAN",
    "IMTLG",
    "IMTLL",
    "JACOBIAN",
    "KPIS",
    "LAST_SHARED_GRAMIAN",
    "LOSSES",
    "MGDA",
    "MGDAUB",
    "RLW",
    "AlignedMTL",
    "CAGrad",
    "Equal",
    "Fixed",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "Mean",
    "Method",
    "MethodInfo",
    "MethodTable",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "StepInputs",
    "UPGrad",
    "Uncertainty",
    "available",
    "describe",
    "get",
    "get_class",
    "register",
]
