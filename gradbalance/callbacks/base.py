"""What a training loop tells its observers: the step and epoch records, the `Callback` base
class, `LambdaCallback`, and `CallbackList`, which `gradbalance.training.fit` calls."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: the training loop imports this module, not the reverse
    from gradbalance.balancer import GradBalancer
    from gradbalance.training import History

__all__ = [
    "Callback",
    "CallbackList",
    "EpochRecord",
    "LambdaCallback",
    "StepRecord",
    "pair_cosines",
    "read_step",
]

logger = logging.getLogger(__name__)

Pair = tuple[str, str]


def pair_cosines(gramian: Tensor) -> Tensor:
    """The cosine similarity of every pair of task gradients, from their Gramian.

    ``cos(g_i, g_j) = G_ij / sqrt(G_ii G_jj)`` for ``i < j``, in row-major order of the upper
    triangle (``(0, 1), (0, 2), ..., (1, 2), ...``); NaN for a pair with a zero gradient. On
    the Gramian's device, without a host synchronisation.

    Examples:
        >>> g = torch.tensor([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
        >>> pair_cosines(g)
        tensor([1., 0., 0.])
    """
    k = gramian.shape[0]
    norms = gramian.diagonal().clamp_min(0).sqrt()
    i, j = torch.triu_indices(k, k, 1, device=gramian.device)
    return gramian[i, j] / (norms[i] * norms[j])


def _pairs(tasks: Sequence[str]) -> list[Pair]:
    return [(a, b) for n, a in enumerate(tasks) for b in tasks[n + 1 :]]


def read_step(
    losses: Sequence[Tensor],
    weights: Tensor,
    gramian: Tensor | None = None,
    *,
    cosines: bool = False,
) -> tuple[list[float], list[float], list[float] | None]:
    """``(losses, weights, cosines)`` of one step as Python floats, in one device-to-host copy.

    The losses, the weights and (when ``cosines``) the pair cosines of ``gramian`` are packed
    into one float64 tensor (float32 on MPS) on the losses' device and read with one
    ``.tolist()``: one host synchronisation per step, however many tasks (each value is the one
    ``float(x)`` gives).
    With ``cosines`` and no Gramian, or after a skipped step (NaN weights: the Gramian is the
    previous step's), the cosines are NaN, so that a CSV keeps its columns.

    Examples:
        >>> read_step([torch.tensor(0.5), torch.tensor(2.0)], torch.tensor([1.0, 0.25]))
        ([0.5, 2.0], [1.0, 0.25], None)
    """
    k = len(losses)
    device = losses[0].device if k else weights.device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    parts = [loss.detach().reshape(-1).to(device, dtype) for loss in losses]
    parts.append(weights.detach().reshape(-1).to(device, dtype))
    if cosines and gramian is not None:
        parts.append(pair_cosines(gramian.detach()).to(device, dtype))
    values = torch.cat(parts).tolist()
    loss_values, weight_values = values[:k], values[k : 2 * k]
    if not cosines:
        return loss_values, weight_values, None
    cos = values[2 * k :] if gramian is not None else [math.nan] * (k * (k - 1) // 2)
    if any(math.isnan(w) for w in weight_values):
        cos = [math.nan] * len(cos)
    return loss_values, weight_values, cos


@dataclass(frozen=True)
class StepRecord:
    """One training step as the observers see it.

    Attributes:
        step: the step's index in the run, from 0.
        epoch: the epoch's index, from 0.
        losses: ``{task: loss}`` of the step.
        weights: ``{task: weight}`` the balancer gave (NaN after a skipped step).
        cosines: ``{(task_a, task_b): cos}``: the cosine similarity of the two tasks' gradients
            (on the shared parameters, or the shared features with the representation
            engine), from the step's Gramian; ``None`` when no observer asked for them
            (`Callback.needs_cosines`) or the method computes no Gramian (loss weightings).
    """

    step: int
    epoch: int
    losses: dict[str, float]
    weights: dict[str, float]
    cosines: dict[Pair, float] | None = None

    def scalars(self) -> dict[str, float]:
        """The numbers by name: ``loss/<task>`` and ``weight/<task>`` task by task, then
        ``cosine/<a>~<b>``.

        Examples:
            >>> StepRecord(0, 0, {"a": 1.5}, {"a": 1.0}).scalars()
            {'loss/a': 1.5, 'weight/a': 1.0}
        """
        out: dict[str, float] = {}
        for task, loss in self.losses.items():
            out[f"loss/{task}"] = loss
            if task in self.weights:
                out[f"weight/{task}"] = self.weights[task]
        for (a, b), v in (self.cosines or {}).items():
            out[f"cosine/{a}~{b}"] = v
        return out

    def row(self) -> dict[str, float]:
        """``step``, ``epoch`` and `scalars`: a CSV row."""
        return {"step": self.step, "epoch": self.epoch, **self.scalars()}

    @classmethod
    def from_balancer(
        cls, balancer: GradBalancer, *, step: int, epoch: int = 0, cosines: bool = False
    ) -> StepRecord:
        """The record of ``balancer``'s last `backward`, for a loop of your own.

        Reads `GradBalancer.last_losses`, ``last_weights`` and ``last_gramian`` (in the
        balancer's task order) with one host synchronisation.

        Examples:
            >>> import torch, gradbalance as gb
            >>> net = torch.nn.Linear(3, 2)
            >>> opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net)
            >>> out = net(torch.randn(8, 3))
            >>> w = opt.backward({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].abs().mean()})
            >>> record = StepRecord.from_balancer(opt, step=0, cosines=True)
            >>> list(record.cosines)
            [('a', 'b')]
        """
        tasks = balancer.tasks
        losses, weights = balancer.last_losses, balancer.last_weights
        if tasks is None or losses is None or weights is None:
            raise RuntimeError(
                "StepRecord.from_balancer reads the last backward; call balancer.backward first"
            )
        gram = balancer.last_gramian if balancer.method.is_gradient_method() else None
        want = cosines and balancer.method.is_gradient_method()
        loss_v, weight_v, cos_v = read_step(list(losses.unbind()), weights, gram, cosines=want)
        return cls.build(step, epoch, tasks, loss_v, weight_v, tasks, cos_v)

    @classmethod
    def build(
        cls,
        step: int,
        epoch: int,
        tasks: Sequence[str],
        losses: Sequence[float],
        weights: Sequence[float],
        gram_tasks: Sequence[str] | None = None,
        cosines: Sequence[float] | None = None,
    ) -> StepRecord:
        """A record from `read_step`'s lists; ``gram_tasks`` orders the cosines' pairs."""
        cos = None
        if cosines is not None and gram_tasks is not None:
            cos = dict(zip(_pairs(gram_tasks), cosines))
        return cls(step, epoch, dict(zip(tasks, losses)), dict(zip(tasks, weights)), cos)


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: its index, the steps run so far and the evaluation's metrics.

    Attributes:
        epoch: the epoch's index, from 0.
        step: how many steps the run has made so far (the x axis shared with the steps).
        metrics: what ``evaluate(model)`` returned (``{"task/metric": value}``); empty when
            `gradbalance.training.fit` got no ``evaluate``.
    """

    epoch: int
    step: int
    metrics: dict[str, float]

    def row(self) -> dict[str, float]:
        """``epoch`` and the metrics: a CSV row (the layout of ``History.epochs``)."""
        return {"epoch": self.epoch, **self.metrics}


class Callback:
    """An observer of `gradbalance.training.fit`: override the hooks you need.

    Hooks run in the order of ``fit(..., callbacks=[...])``: `on_step` after every step,
    `flush` after every epoch's steps (before the evaluation), `on_epoch` after the
    evaluation, `on_fit_end` once at the end, also when training stops with an error.

    Attributes:
        needs_cosines: set it to ask for `StepRecord.cosines` (a few operations on the
            ``K x K`` Gramian per step, read back with the losses and weights: no extra host
            synchronisation); when no callback asks, nothing is computed.

    Examples:
        >>> class PrintWeights(Callback):
        ...     def on_step(self, record):
        ...         print(record.step, record.weights)
        >>> PrintWeights().on_step(StepRecord(3, 0, {"a": 0.5}, {"a": 1.0}))
        3 {'a': 1.0}
    """

    needs_cosines: bool = False

    def on_step(self, record: StepRecord) -> None:
        """After each training step (balancer's ``step()`` done)."""

    def on_epoch(self, record: EpochRecord) -> None:
        """After each epoch, once the model was evaluated."""

    def on_fit_end(self, history: History) -> None:
        """Once, when `fit` returns or raises (``history`` then holds the steps so far)."""

    def flush(self) -> None:
        """Write what was received so far (`fit` calls it after every epoch's steps)."""


class LambdaCallback(Callback):
    """A `Callback` from plain functions: send the numbers to any tracker in a few lines.

    Args:
        on_step: ``fn(StepRecord)``.
        on_epoch: ``fn(EpochRecord)``.
        on_fit_end: ``fn(History)``.
        cosines: ask for the task-pair gradient cosines (`StepRecord.cosines`).

    Examples:
        >>> rows = []
        >>> cb = LambdaCallback(on_step=lambda r: rows.append(r.scalars()))
        >>> cb.on_step(StepRecord(0, 0, {"a": 2.0}, {"a": 0.5}))
        >>> rows
        [{'loss/a': 2.0, 'weight/a': 0.5}]
    """

    def __init__(
        self,
        on_step: Callable[[StepRecord], Any] | None = None,
        on_epoch: Callable[[EpochRecord], Any] | None = None,
        on_fit_end: Callable[[Any], Any] | None = None,
        *,
        cosines: bool = False,
    ) -> None:
        self._step, self._epoch, self._end = on_step, on_epoch, on_fit_end
        self.needs_cosines = cosines

    def on_step(self, record: StepRecord) -> None:
        if self._step is not None:
            self._step(record)

    def on_epoch(self, record: EpochRecord) -> None:
        if self._epoch is not None:
            self._epoch(record)

    def on_fit_end(self, history: History) -> None:
        if self._end is not None:
            self._end(history)


class CallbackList:
    """The callbacks of one `fit` call, called in order (objects with only some of the hooks
    are accepted: the missing ones are skipped).

    Examples:
        >>> seen = []
        >>> hooks = CallbackList([LambdaCallback(on_epoch=seen.append)])
        >>> hooks.needs_cosines, bool(hooks)
        (False, True)
        >>> hooks.on_epoch(EpochRecord(0, 4, {"a/mae": 0.5}))
        >>> seen[0].row()
        {'epoch': 0, 'a/mae': 0.5}
    """

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            hooks = ("on_step", "on_epoch", "on_fit_end", "flush")
            if not any(callable(getattr(cb, h, None)) for h in hooks):
                raise TypeError(
                    f"callbacks: {cb!r} has none of the hooks {list(hooks)}; subclass "
                    "gradbalance.callbacks.Callback or use gradbalance.callbacks.LambdaCallback"
                )
        self.needs_cosines = any(getattr(cb, "needs_cosines", False) for cb in self.callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _call(self, hook: str, arg: Any = None, *, with_arg: bool = True) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                if with_arg:
                    fn(arg)
                else:
                    fn()

    def on_step(self, record: StepRecord) -> None:
        self._call("on_step", record)

    def on_epoch(self, record: EpochRecord) -> None:
        self._call("on_epoch", record)

    def flush(self) -> None:
        self._call("flush", with_arg=False)

    def on_fit_end(self, history: History, *, failed: bool = False) -> None:
        """Call every ``on_fit_end``; when training ``failed``, a callback's own error is
        logged, not raised, so that the training error is the one the caller sees."""
        for cb in self.callbacks:
            fn = getattr(cb, "on_fit_end", None)
            if not callable(fn):
                continue
            if not failed:
                fn(history)
                continue
            try:
                fn(history)
            except Exception:
                logger.exception("callback %r failed in on_fit_end after a training error", cb)
