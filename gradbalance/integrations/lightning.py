"""PyTorch Lightning: train a ``LightningModule`` with a `gradbalance.GradBalancer`.

The balancer runs one backward per task itself, so a module that uses it turns Lightning's
automatic optimisation off and, in ``training_step``, replaces ``self.manual_backward(loss)``
with `balanced_backward` ``(self, losses)``; everything else is Lightning's manual-optimisation
idiom (``opt = self.optimizers()``, ``opt.zero_grad()``, ``opt.step()``). See
``docs/integrations/lightning.md`` for the whole recipe.

`balanced_backward` gets right three things a direct ``opt.backward(losses)`` would not:

* it calls `GradBalancer.backward` on the balancer itself, not on the ``LightningOptimizer``
  wrapper that ``self.optimizers()`` returns (the wrapper's ``optimizer`` attribute is the
  balancer, not the inner optimizer the balancer's own code means by that name, and what
  ``backward`` records on ``self`` would land on the wrapper);
* it passes the precision plugin's ``GradScaler`` (``precision="16-mixed"``) as ``scaler=``,
  so the per-task backwards are scaled and ``opt.step()`` unscales, skips on overflow and
  updates the scale as with a plain loss;
* it runs the balancer outside the ``autocast`` region Lightning opens around
  ``training_step`` (the backward of autocast operations keeps their forward dtypes; the
  balancer's own products, such as ``Jᵀw``, stay in the parameters' dtype).

Under Lightning's DDP strategies nothing else is needed: the balancer notices the process group
on its first backward and averages what the method needs over the ranks itself (see
`gradbalance.distributed`); Lightning's ``DistributedDataParallel`` wrapper plays no part in
the gradient average.

This module imports nothing from Lightning: it uses only the module's public attributes
(``optimizers``, ``trainer.precision_plugin``, ``trainer.strategy``, ``automatic_optimization``,
``device``). The FSDP, DeepSpeed and model-parallel strategies are refused (they shard the
parameters the balancer needs whole). Tested with ``lightning`` 2.x; the older
``pytorch_lightning`` package has the same attributes but is not tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradbalance.balancer import GradBalancer

__all__ = ["balanced_backward", "balancer"]

#: Lightning strategies (matched by class name, also in subclasses) that shard the parameters
#: whose whole per-task gradients the balancer reads, or wrap the optimizer in their own.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _check_strategy(module: Any, caller: str) -> None:
    """Refuse a sharding strategy before anything is computed (see `_UNSUPPORTED_STRATEGIES`)."""
    # Fabric's trainer stand-in has no strategy (AttributeError): nothing to refuse there
    strategy = getattr(module.trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__}
    for name in _UNSUPPORTED_STRATEGIES:
        if name in names:
            raise NotImplementedError(
                f"{caller}: Lightning's {name} is not supported: it shards the parameters whose "
                "whole per-task gradients the balancer computes (DeepSpeed also replaces the "
                'optimizer); use strategy="ddp" (or "ddp_spawn") or a single device'
            )


def balancer(module: Any, index: int = 0) -> GradBalancer:
    """The `gradbalance.GradBalancer` that ``module.configure_optimizers`` returned.

    ``self.optimizers()`` returns Lightning's ``LightningOptimizer`` wrapper; step and
    zero the gradients through it (so that Lightning counts the steps and applies its precision
    plugin), but call the balancer's own methods and properties (``backward``, ``no_sync``,
    ``end_epoch``, ``last_weights``, ...) on the object this function returns.

    Args:
        module: a ``LightningModule`` attached to a trainer, after ``configure_optimizers``.
        index: which optimizer, when ``configure_optimizers`` returned several.

    Returns:
        The balancer itself (not Lightning's wrapper).

    Raises:
        TypeError: when that optimizer is not a `gradbalance.GradBalancer`.
        IndexError: when ``index`` is out of range.
        NotImplementedError: under the FSDP, DeepSpeed and model-parallel strategies.

    Examples:
        In a ``LightningModule`` whose ``configure_optimizers`` returns a balancer with
        DWA, which learns from the losses of whole epochs:

        ```python
        def on_train_epoch_end(self):
            balancer(self).end_epoch()
        ```
    """
    _check_strategy(module, f"balancer(module, index={index})")
    optimizers = module.optimizers(use_pl_optimizer=False)
    if not isinstance(optimizers, (list, tuple)):
        optimizers = [optimizers]
    if not -len(optimizers) <= index < len(optimizers):
        raise IndexError(
            f"balancer(module, index={index}): the module has {len(optimizers)} optimizer(s)"
        )
    found = optimizers[index]
    # Lightning's wrapper also passes `isinstance(..., GradBalancer)`: unwrap it if one comes
    found = getattr(found, "_optimizer", found)
    if not isinstance(found, GradBalancer):
        raise TypeError(
            f"balancer(module, index={index}): configure_optimizers returned a "
            f"{type(found).__name__} there, not a gradbalance.GradBalancer; return "
            "gb.GradBalancer(torch.optim.<Optimizer>(self.parameters(), ...), method=...)"
        )
    return found


def balanced_backward(
    module: Any,
    losses: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...],
    *,
    features: Tensor | Iterable[Tensor] | None = None,
    kpis: Mapping[str, float] | Iterable[float] | Tensor | None = None,
    index: int = 0,
    sync: bool = True,
    retain_graph: bool = False,
) -> Tensor:
    """``manual_backward`` for several task losses: `GradBalancer.backward` inside Lightning.

    Call it in ``training_step`` of a module with ``self.automatic_optimization = False``,
    between ``opt.zero_grad()`` and ``opt.step()`` (``opt = self.optimizers()``). It accumulates
    the balanced gradient into ``.grad``, with the precision plugin's ``GradScaler`` when there
    is one and outside Lightning's ``autocast`` region.

    Args:
        module: the ``LightningModule`` (``self``); its automatic optimisation must be off.
        losses: one scalar loss per task, as for `GradBalancer.backward`: the *unscaled* losses,
            also under ``precision="16-mixed"``.
        features: passed on to `GradBalancer.backward` (MGDA-UB, the chained engine).
        kpis: passed on to `GradBalancer.backward` (DTP).
        index: which optimizer, when ``configure_optimizers`` returned several.
        sync: ``False`` to accumulate without averaging the gradients over DDP ranks, for every
            micro-batch but the last when accumulating gradients (`GradBalancer.no_sync`;
            Lightning's ``opt.toggle_model(sync_grad=False)`` does not reach the balancer).
            Without a process group it changes nothing.
        retain_graph: passed on to `GradBalancer.backward`.

    Returns:
        The task weights, shape ``(K,)``, as `GradBalancer.backward` returns them.

    Raises:
        RuntimeError: when the module still uses automatic optimisation.
        TypeError: when that optimizer is not a `gradbalance.GradBalancer`.
        NotImplementedError: under the FSDP, DeepSpeed and model-parallel strategies, which
            shard the parameters the balancer needs whole.

    Examples:
        ```python
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            weights = balanced_backward(self, self.task_losses(batch))
            opt.step()
        ```
    """
    if module.automatic_optimization:
        raise RuntimeError(
            "balanced_backward: the module uses automatic optimization; set "
            "`self.automatic_optimization = False` in its __init__ and step the optimizer in "
            "training_step (opt = self.optimizers(); opt.zero_grad(); "
            "balanced_backward(self, losses); opt.step())"
        )
    _check_strategy(module, "balanced_backward")
    found = balancer(module, index)
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    device_type = _device_type(module)
    with torch.autocast(device_type, enabled=False):
        if sync:
            return found.backward(
                losses, features=features, kpis=kpis, scaler=scaler, retain_graph=retain_graph
            )
        with found.no_sync():
            return found.backward(
                losses, features=features, kpis=kpis, scaler=scaler, retain_graph=retain_graph
            )


def _device_type(module: Any) -> str:
    """The autocast device type of the module's parameters ("cpu", "cuda", ...)."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device.type
    return "cpu"
