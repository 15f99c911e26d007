"""Invalid method options (and out-of-range KPIs) raise `GradBalanceError` subclasses that are
also `ValueError` (or `TypeError` for a wrong type), so ``except gb.GradBalanceError`` catches
every error a user can trigger (issue 12)."""

from __future__ import annotations

import math

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import (
    DTP,
    DWA,
    FAMO,
    MGDA,
    RLW,
    AlignedMTL,
    CAGrad,
    Fixed,
    GradDrop,
    GradNorm,
    GradVac,
    MoCo,
    NashMTL,
    Uncertainty,
    UPGrad,
)
from gradbalance.methods._inner_optim import check_options
from gradbalance.methods._options import check_group_options, finite_float, per_task

TASKS = ("a", "b")

VALUE_CASES = [
    (lambda: DTP(alpha=0.0), "alpha"),
    (lambda: DTP(eps=0.5), "eps"),
    (lambda: DTP(gamma=-1.0), "gamma"),
    (lambda: DTP(gamma=[1.0, -1.0]).bind(TASKS), "gamma"),
    (lambda: DTP(gamma={"a": 1.0}).bind(TASKS), "gamma"),
    (lambda: Fixed([]), "empty"),
    (lambda: Fixed([1.0, -1.0]), "non-negative"),
    (lambda: Fixed([1.0, math.nan]), "finite"),
    (lambda: Fixed([1.0, 2.0, 3.0]).bind(TASKS), "3 entries"),
    (lambda: Fixed({"a": 1.0, "c": 2.0}).bind(TASKS), "unknown"),
    (lambda: Uncertainty(task_types="ranking").bind(TASKS), "task type"),
    (lambda: Uncertainty(init=[0.0, math.inf]).bind(TASKS), "finite"),
    (lambda: Uncertainty(init=[0.0, 0.0, 0.0]).bind(TASKS), "3 entries"),
    (lambda: Uncertainty(lr=-1.0), "lr"),
    (lambda: Uncertainty(weight_decay=-1.0), "weight_decay"),
    (lambda: GradNorm(alpha=-1.0), "alpha"),
    (lambda: GradNorm(lr=0.0), "lr"),
    (lambda: GradNorm(weight_optimizer="rmsprop"), "weight_optimizer"),
    (lambda: GradNorm(betas=(1.0, 0.9)), "betas"),
    (lambda: GradNorm(eps=0.0), "eps"),
    (lambda: DWA(temperature=0.0), "temperature"),
    (lambda: DWA(window=0), "window"),
    (lambda: MoCo(beta=1.5), "beta"),
    (lambda: MoCo(gamma=0.0), "gamma"),
    (lambda: MoCo(rho=-1.0), "rho"),
    (lambda: MGDA(normalization="l1"), "normalization"),
    (lambda: AlignedMTL(scale="max"), "scale"),
    (lambda: AlignedMTL(pref=[1.0, -1.0]), "pref"),
    (lambda: CAGrad(c=-0.5), "c must"),
    (lambda: CAGrad(rescale=3), "rescale"),
    (lambda: FAMO(gamma=math.inf), "gamma"),
    (lambda: GradDrop(leak=1.5), "leak"),
    (lambda: GradVac(beta=2.0), "beta"),
    (lambda: GradVac(eps=-1.0), "eps"),
    (lambda: NashMTL(solver="simplex"), "solver"),
    (lambda: NashMTL(cvxpy_solver="ECOS"), "cvxpy_solver"),
    (lambda: NashMTL(update_weights_every=0), "update_weights_every"),
    (lambda: NashMTL(max_iter=0), "max_iter"),
    (lambda: NashMTL(tol=0.0), "tol"),
    (lambda: NashMTL(on_failure="ignore"), "on_failure"),
    (lambda: RLW(distribution="cauchy"), "distribution"),
    (lambda: RLW(concentration=0.0), "concentration"),
    (lambda: UPGrad(pref=[]), "pref"),
    (lambda: UPGrad(tol=-1.0), "tol"),
    (lambda: per_task([1.0], TASKS, "gamma", float), "gamma"),
    (lambda: finite_float(math.nan), "finite"),
    (lambda: check_group_options(0.0, 0.0), "lr"),
    (lambda: check_options("weight_optimizer", "adam", 1.0, (0.9, 0.999), -1.0), "eps"),
]


@pytest.mark.parametrize("make, match", VALUE_CASES)
def test_option_errors_are_gradbalance_value_errors(make, match):
    with pytest.raises(gb.errors.GradBalanceError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, gb.OptionError)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Fixed("1, 2"), "sequence"),
        (lambda: MoCo(normalize=1), "normalize"),
        (lambda: GradDrop(sum_batch=1), "sum_batch"),
    ],
)
def test_option_type_errors_are_gradbalance_type_errors(make, match):
    with pytest.raises(gb.errors.GradBalanceError, match=match) as info:
        make()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_option_error_through_the_balancer_leaves_nothing_half_built():
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(gb.GradBalanceError, match="alpha"):
        gb.GradBalancer(torch.optim.SGD([theta], lr=0.1), method="dtp", alpha=2.0)


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan])
def test_kpi_out_of_range_is_a_gradbalance_error(bad):
    theta = torch.zeros(2, requires_grad=True)
    opt = gb.GradBalancer(torch.optim.SGD([theta], lr=0.1), method="dtp")
    losses = {"a": theta[0].pow(2) + 1.0, "b": theta[1].pow(2) + 1.0}
    with pytest.raises(gb.errors.GradBalanceError, match="task 'b'") as info:
        opt.backward(losses, kpis={"a": 0.5, "b": bad})
    assert isinstance(info.value, ValueError)
    assert theta.grad is None
