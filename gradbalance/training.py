"""A small, transparent training loop used by the command line and the examples.

gradbalance does not own your training loop: `gradbalance.GradBalancer` drops into any
loop. This module is the loop our demo, ``gradbalance train`` and the examples share, so that
their numbers come from one place. Read it as a reference for your own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradbalance.balancer import GradBalancer
from gradbalance.methods import FEATURES, KPIS
from gradbalance.runlog import RunLogger

__all__ = ["History", "fit", "progress"]

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
KpiFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, float]]


def progress(
    iterable: Iterable[Any], *, desc: str = "", total: int | None = None, enabled: bool = True
) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm progress bar when tqdm is installed and ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the examples/test extras
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@dataclass
class History:
    """What `fit` records.

    Attributes:
        tasks: task names.
        steps: one dict per step: ``step``, ``epoch``, ``loss/<task>``, ``weight/<task>``.
        epochs: one dict per epoch: ``epoch`` and the metrics `fit`'s ``evaluate`` returned.
        seconds_per_step: mean wall time of a training step (forward, balancing, step).
    """

    tasks: list[str]
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds_per_step: float = float("nan")

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics (empty before the first evaluation)."""
        return dict(self.epochs[-1]) if self.epochs else {}


def fit(
    model: nn.Module,
    balancer: GradBalancer,
    loader: Iterable[tuple[Tensor, Mapping[str, Tensor]]],
    loss_fns: Mapping[str, LossFn],
    *,
    epochs: int,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    kpi_fn: KpiFn | None = None,
    scheduler: Any = None,
    run_logger: RunLogger | None = None,
    show_progress: bool = True,
    desc: str = "",
) -> History:
    """Train ``model`` for ``epochs`` epochs with ``balancer`` and return the `History`.

    Each batch is ``(x, {task: target})``. When the balancer's method works on the shared
    features, the model must provide ``encode(x)`` and ``decode(z)``; the features are passed
    to `GradBalancer.backward`. ``kpi_fn(outputs, targets) -> {task: kpi}`` feeds methods
    that need KPIs (DTP). ``balancer.end_epoch()`` and ``scheduler.step()`` run after each epoch.

    Examples:
        >>> import torch, gradbalance as gb
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.trunk, self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
        ...     def forward(self, x):
        ...         z = self.trunk(x)
        ...         return {"a": self.a(z).squeeze(-1), "b": self.b(z).squeeze(-1)}
        >>> net = Net()
        >>> data = [(torch.randn(8, 3), {"a": torch.randn(8), "b": torch.randn(8)})] * 4
        >>> opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.trunk)
        >>> mse = nn.functional.mse_loss
        >>> h = gb.training.fit(net, opt, data, {"a": mse, "b": mse}, epochs=2,
        ...                     show_progress=False)
        >>> len(h.steps), h.tasks
        (8, ['a', 'b'])
    """
    tasks = list(loss_fns)
    history = History(tasks=tasks)
    needs_features = FEATURES in balancer.method.requires or balancer.engine == "representation"
    needs_kpis = KPIS in balancer.method.requires
    if needs_kpis and kpi_fn is None:
        raise ValueError(
            f"method {balancer.method.name!r} needs KPIs: pass kpi_fn(outputs, targets)"
        )
    step = 0
    busy = 0.0
    for epoch in range(epochs):
        model.train()
        for x, targets in progress(
            loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", enabled=show_progress
        ):
            start = time.perf_counter()
            features = None
            if needs_features:
                features = model.encode(x)  # type: ignore[operator]
                outputs = model.decode(features)  # type: ignore[operator]
            else:
                outputs = model(x)
            losses = {t: loss_fns[t](outputs[t], targets[t]) for t in tasks}
            kpis = kpi_fn(outputs, targets) if needs_kpis and kpi_fn is not None else None
            balancer.zero_grad()
            weights = balancer.backward(losses, features=features, kpis=kpis)
            balancer.step()
            busy += time.perf_counter() - start
            row: dict[str, float] = {"step": step, "epoch": epoch}
            for t, w in zip(tasks, weights.tolist()):
                row[f"loss/{t}"] = float(losses[t].detach())
                row[f"weight/{t}"] = w
            history.steps.append(row)
            if run_logger is not None:
                run_logger.log(row)
            step += 1
        balancer.end_epoch()
        if scheduler is not None:
            scheduler.step()
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                metrics = dict(evaluate(model))
            history.epochs.append({"epoch": epoch, **metrics})
            logger.info("%s epoch %d: %s", desc, epoch + 1, metrics)
    history.seconds_per_step = busy / max(step, 1)
    return history
