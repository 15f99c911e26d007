"""Compatibility module: CAGrad's and Nash-MTL's solvers, which now live apart.

`cagrad_weights` is in `gradbalance.solvers.cagrad` and `nash_bargaining` (with
`CVXPY_SOLVERS`) in `gradbalance.solvers.nash`; both are also exported by `gradbalance.solvers`.
This module re-exports them for code that imports ``gradbalance.solvers.conic``.
"""

from __future__ import annotations

from gradbalance.solvers.cagrad import cagrad_weights
from gradbalance.solvers.nash import CVXPY_SOLVERS, nash_bargaining

__all__ = ["CVXPY_SOLVERS", "cagrad_weights", "nash_bargaining"]
