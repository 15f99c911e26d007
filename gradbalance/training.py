"""A small, transparent training loop used by the command line and the examples.

gradbalance does not own your training loop: `gradbalance.GradBalancer` drops into any
loop. This module is the loop that `gradbalance demo`, `gradbalance train` and the examples
share, so that their numbers come from one place. Read it as a reference for your own.

* `fit` trains a model with a balancer for some epochs and returns a `History`;
* `TensorLoader` batches in-memory tensors (MultiMNIST) faster than a ``DataLoader``;
* `make_evaluator` turns a loader into ``evaluate(model) -> {"task/metric": value}`` with
  `gradbalance.tasks.MultiTaskMetrics`;
* `make_kpi_fn` gives DTP its per-batch KPIs (accuracy-like numbers in ``[0, 1]``); it is
  `gradbalance.tasks.make_kpi_fn`, which picks each task's KPI from its kind.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradbalance.balancer import GradBalancer
from gradbalance.callbacks import Callback, CallbackList, EpochRecord, StepRecord, read_step
from gradbalance.methods import FEATURES, KPIS
from gradbalance.metrics import DEPTH_KPI_RATIO as DEPTH_KPI_RATIO
from gradbalance.metrics import NORMAL_KPI_DEGREES as NORMAL_KPI_DEGREES
from gradbalance.runlog import RunLogger
from gradbalance.tasks import MultiTaskMetrics, make_kpi_fn

__all__ = [
    "History",
    "TensorLoader",
    "fit",
    "make_evaluator",
    "make_kpi_fn",
    "progress",
    "progress_bar",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
LossesFn = Callable[[Any, Mapping[str, Tensor]], Mapping[str, Tensor]]
KpiFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, float]]
Batch = tuple[Tensor, Mapping[str, Tensor]]


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


class _NoBar:
    """Stands in for a tqdm bar when bars are off or tqdm is missing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "step") -> Any:
    """A tqdm bar (``update``, ``set_postfix_str``, ``close``), or a silent stand-in when
    ``enabled`` is false or tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the examples/test extras
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, unit=unit)


@dataclass
class History:
    """What `fit` records.

    Attributes:
        tasks: task names.
        steps: one dict per step: ``step``, ``epoch``, ``loss/<task>``, ``weight/<task>``.
        epochs: one dict per epoch: ``epoch`` and the metrics `fit`'s ``evaluate`` returned.
        seconds_per_step: mean wall time of a training step (forward, balancing, step);
            evaluation is not counted.
    """

    tasks: list[str]
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds_per_step: float = float("nan")

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics (empty before the first evaluation)."""
        return dict(self.epochs[-1]) if self.epochs else {}

    def mean_of_last(self, n: int) -> dict[str, float]:
        """The mean of each metric over the last ``n`` evaluated epochs (the MTAN protocol
        reports the mean of the last 10).

        Examples:
            >>> h = History(["a"], epochs=[{"epoch": 0, "a/x": 1.0}, {"epoch": 1, "a/x": 3.0}])
            >>> h.mean_of_last(10)
            {'a/x': 2.0}
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        rows = self.epochs[-n:]
        if not rows:
            return {}
        keys = [k for k in rows[-1] if k != "epoch"]
        return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}


class TensorLoader:
    """Mini-batches of in-memory tensors: ``(x[idx], {task: y[idx]})``, reshuffled each epoch.

    A light replacement for ``DataLoader(TensorDataset(...))`` for datasets that fit in memory
    (MultiMNIST): one indexing per batch instead of one per sample. The shuffle is drawn from
    its own generator, so a run is reproducible whatever else uses the global RNG.

    Args:
        inputs: ``(N, ...)``.
        targets: ``{task: (N, ...)}``.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a new permutation every epoch.
        seed: the seed of the shuffle.
        drop_last: drop the last incomplete batch.

    Examples:
        >>> import torch
        >>> loader = TensorLoader(torch.arange(10.0), {"a": torch.arange(10)}, batch_size=4,
        ...                       seed=0)
        >>> [len(x) for x, _ in loader], len(loader)
        ([4, 4, 2], 3)
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Mapping[str, Tensor],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = inputs.shape[0]
        bad = {t: tuple(y.shape) for t, y in targets.items() if y.shape[0] != n}
        if bad:
            raise ValueError(f"targets {bad} do not have the {n} rows of inputs")
        self.inputs = inputs
        self.targets = dict(targets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.inputs.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.inputs.shape[0]
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.inputs[idx], {t: y[idx] for t, y in self.targets.items()}


def _to(batch: Batch, device: torch.device | None) -> Batch:
    x, y = batch
    if device is None:
        return x, y
    return x.to(device), {t: v.to(device) for t, v in y.items()}


def fit(
    model: nn.Module,
    balancer: GradBalancer,
    loader: Iterable[Batch],
    loss_fns: Mapping[str, LossFn] | LossesFn,
    *,
    epochs: int,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    kpi_fn: KpiFn | None = None,
    scheduler: Any = None,
    callbacks: Sequence[Callback] | None = None,
    run_logger: RunLogger | None = None,
    show_progress: bool = True,
    desc: str = "",
    forward: Callable[[Tensor], Any] | None = None,
    device: torch.device | str | None = None,
    pass_features: bool = False,
) -> History:
    """Train ``model`` for ``epochs`` epochs with ``balancer`` and return the `History`.

    Each batch is ``(x, {task: target})``. One step is: forward, one loss per task,
    ``balancer.zero_grad()``, ``balancer.backward(losses, ...)``, ``balancer.step()``. After
    each epoch ``balancer.end_epoch()`` (DWA) and ``scheduler.step()`` run, then
    ``evaluate(model)`` in ``eval()`` mode under ``torch.no_grad()``.

    When the balancer's method works on the shared features (MGDA-UB) the model must provide
    ``encode(x)`` and ``decode(z)``; the features are passed to `GradBalancer.backward`.
    ``kpi_fn(outputs, targets) -> {task: kpi}`` feeds methods that need KPIs (DTP; see
    `make_kpi_fn`). One tqdm bar covers the whole run when ``show_progress`` is set and tqdm is
    installed.

    Args:
        model: the network; ``model(x)`` returns ``{task: output}``.
        balancer: the `GradBalancer` holding the model's parameters.
        loader: iterable of batches, iterated once per epoch.
        loss_fns: ``{task: fn(output, target)}``, or one callable
            ``(outputs, targets) -> {task: loss}`` for losses that are not one per output
            (PAD-Net's deep supervision: ``forward=model.predict``,
            ``loss_fns=model.deep_supervision_losses``).
        epochs: number of passes over ``loader``.
        evaluate: ``evaluate(model) -> {metric: value}`` after each epoch (see
            `make_evaluator`).
        kpi_fn: per-batch KPIs for methods that need them.
        scheduler: a learning-rate scheduler stepped once per epoch.
        callbacks: observers of the run (`gradbalance.callbacks`): each gets every step's
            `gradbalance.callbacks.StepRecord`, every epoch's
            `gradbalance.callbacks.EpochRecord` and the `History` at the end; e.g.
            ``[gb.callbacks.CSVLogger(out), gb.callbacks.TensorBoardLogger(out / "tb")]``.
        run_logger: a `gradbalance.runlog.RunLogger`; the same as adding it to
            ``callbacks`` (it receives every step's row; its rows are flushed to disk after
            every epoch).
        show_progress: show a progress bar.
        desc: the bar's label (and the log lines').
        forward: ``forward(x) -> outputs`` used instead of ``model(x)`` (e.g.
            ``model.predict``); not allowed with methods that work on features.
        device: move every batch there first (the model must already be there).
        pass_features: also pass the shared features (``model.encode``) to gradient methods
            that do not need them, so that ``engine="auto"`` can compute the exact parameter
            Jacobian by the chained engine (one trunk backward instead of ``K``); the same
            gradients up to rounding.

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
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    per_task = isinstance(loss_fns, Mapping)
    if not per_task and not callable(loss_fns):
        raise TypeError(
            "loss_fns must be a mapping {task: fn(output, target)} or a callable "
            f"(outputs, targets) -> {{task: loss}}, got {type(loss_fns).__name__}"
        )
    tasks: list[str] = list(loss_fns) if per_task else []  # type: ignore[arg-type]
    history = History(tasks=tasks)
    needs_features = FEATURES in balancer.method.requires or balancer.engine == "representation"
    if pass_features and balancer.method.is_gradient_method() and forward is None:
        needs_features = needs_features or hasattr(model, "encode")
    needs_kpis = KPIS in balancer.method.requires
    if needs_kpis and kpi_fn is None:
        raise ValueError(
            f"method {balancer.method.name!r} needs KPIs: pass kpi_fn(outputs, targets) "
            "(gradbalance.training.make_kpi_fn builds one from the task kinds)"
        )
    if needs_features and forward is not None:
        raise ValueError(
            f"method {balancer.method.name!r} works on the shared features, so fit calls "
            "model.encode and model.decode; drop forward="
        )
    dev = None if device is None else torch.device(device)
    try:
        per_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    hooks = CallbackList([*(callbacks or ()), *([] if run_logger is None else [run_logger])])
    cosines = hooks.needs_cosines and balancer.method.is_gradient_method()
    bar = progress_bar(None if per_epoch is None else per_epoch * epochs, desc, show_progress)
    step = 0
    busy = 0.0
    failed = True
    try:
        for epoch in range(epochs):
            model.train()
            for batch in loader:
                x, targets = _to(batch, dev)
                start = time.perf_counter()
                features = None
                if needs_features:
                    features = model.encode(x)  # type: ignore[operator]
                    outputs = model.decode(features)  # type: ignore[operator]
                else:
                    outputs = model(x) if forward is None else forward(x)
                if per_task:
                    losses = {t: loss_fns[t](outputs[t], targets[t]) for t in tasks}  # type: ignore[index]
                else:
                    losses = dict(loss_fns(outputs, targets))  # type: ignore[operator]
                    if not history.tasks:
                        history.tasks = tasks = list(losses)
                kpis = kpi_fn(outputs, targets) if needs_kpis and kpi_fn is not None else None
                balancer.zero_grad()
                weights = balancer.backward(losses, features=features, kpis=kpis)
                balancer.step()
                busy += time.perf_counter() - start
                # one host synchronisation reads the losses, weights (and cosines) of the step
                gram = balancer.last_gramian if cosines else None
                loss_v, weight_v, cos_v = read_step(
                    [losses[t] for t in tasks], weights, gram, cosines=cosines
                )
                row: dict[str, float] = {"step": step, "epoch": epoch}
                for t, loss, w in zip(tasks, loss_v, weight_v):
                    row[f"loss/{t}"] = loss
                    row[f"weight/{t}"] = w
                history.steps.append(row)
                if hooks:
                    order = balancer.tasks
                    hooks.on_step(
                        StepRecord.build(step, epoch, tasks, loss_v, weight_v, order, cos_v)
                    )
                step += 1
                bar.update(1)
            hooks.flush()  # on disk before evaluating: a killed run keeps them
            balancer.end_epoch()
            if scheduler is not None:
                scheduler.step()
            metrics: dict[str, float] = {}
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    metrics = dict(evaluate(model))
                history.epochs.append({"epoch": epoch, **metrics})
                logger.info("%s epoch %d: %s", desc, epoch + 1, metrics)
                shown = ", ".join(f"{k}={v:.3g}" for k, v in list(metrics.items())[:4])
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} {shown}")
            hooks.on_epoch(EpochRecord(epoch, step, metrics))
        failed = False
    finally:
        bar.close()
        history.seconds_per_step = busy / step if step else float("nan")
        hooks.on_fit_end(history, failed=failed)
    return history


def make_evaluator(
    loader: Iterable[Batch],
    tasks: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"task/metric": value}`` over every batch of ``loader``.

    The metrics are `gradbalance.tasks.MultiTaskMetrics` for ``tasks`` (a model's
    ``tasks``: ``{name: TaskSpec}``), accumulated over the whole split. `fit` calls it in
    ``eval()`` mode under ``torch.no_grad()``.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.MultiLeNet().eval()
        >>> data = [(torch.rand(4, 1, 28, 28), {"left": torch.zeros(4, dtype=torch.long),
        ...                                     "right": torch.ones(4, dtype=torch.long)})]
        >>> sorted(make_evaluator(data, model.tasks)(model))
        ['left/accuracy', 'right/accuracy']
    """
    metrics = MultiTaskMetrics(tasks)
    dev = None if device is None else torch.device(device)

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics.reset()
        with torch.no_grad():
            for batch in loader:
                x, y = _to(batch, dev)
                metrics.update(model(x), y)
        return metrics.compute()

    return evaluate
