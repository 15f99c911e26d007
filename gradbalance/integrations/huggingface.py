"""Hugging Face: a `transformers.Trainer` that balances tasks, and helpers for `accelerate` loops.

`BalancedTrainer` is a ``transformers.Trainer`` whose optimizer is a `gradbalance.GradBalancer`
around the optimizer the Trainer would build (or the one passed in ``optimizers=``) and whose
training step calls `GradBalancer.backward` on one loss per task instead of
``accelerator.backward`` on one loss. In a plain `accelerate` loop, prepare the balancer like
any optimizer and call `backward` (this module's function) instead of ``accelerator.backward``.

Both follow the same rules for gradient accumulation: every micro-batch's task weights are
computed on that micro-batch's own (unscaled) losses, the balancer's gradient average over
processes is deferred to the last micro-batch (`GradBalancer.no_sync`), and that last
micro-batch divides the accumulated gradients by the number of micro-batches, so the update
is the mean of the micro-batches' balanced gradients, as ``accelerator.backward`` does for one
loss. Under fp16 the accelerator's ``GradScaler`` is handed to the balancer.

Importing this module imports ``transformers`` (``accelerate`` comes with it);
``import gradbalance`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from gradbalance import GradBalancer
from gradbalance.callbacks import StepRecord
from gradbalance.methods import Method

__all__ = ["BalancedTrainer", "backward", "find_balancer", "task_losses"]

#: The `accelerate` distributed types whose backward the balancer cannot replace (they run
#: their own backward engine or shard the parameters the balancer needs whole).
_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def find_balancer(optimizer: Any) -> GradBalancer:
    """The `GradBalancer` inside an optimizer wrapper (``accelerate``'s ``AcceleratedOptimizer``,
    possibly nested), or the balancer itself.

    Args:
        optimizer: a `GradBalancer`, or a wrapper that holds one as ``.optimizer``.

    Raises:
        TypeError: when no `GradBalancer` is found; the message names the type found instead.

    Examples:
        >>> import torch, gradbalance as gb
        >>> opt = gb.GradBalancer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
        >>> find_balancer(opt) is opt
        True
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(seen, GradBalancer):
            return seen
        inner = getattr(seen, "optimizer", None)
        if inner is None:
            break
        seen = inner
    raise TypeError(
        f"expected a GradBalancer or an optimizer wrapper around one (accelerate's "
        f"AcceleratedOptimizer), got {type(optimizer).__name__} around {type(seen).__name__}; "
        f"wrap the optimizer in gradbalance.GradBalancer before accelerator.prepare"
    )


def _holds_balancer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a `GradBalancer` or a wrapper around one (`find_balancer`)."""
    try:
        find_balancer(optimizer)
    except TypeError:
        return False
    return True


def _scale_grads(balancer: GradBalancer, factor: float) -> None:
    """Multiply the ``.grad`` of every parameter of the balancer by ``factor`` (in place)."""
    with torch.no_grad():
        for group in balancer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)


def _accumulating_backward(
    balancer: GradBalancer,
    losses: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...],
    *,
    sync: bool,
    micro_batches: int,
    scaler: Any,
    **kwargs: Any,
) -> Tensor:
    """`GradBalancer.backward` for one micro-batch of an accumulation cycle (see the module)."""
    if not sync:
        with balancer.no_sync():
            return balancer.backward(losses, scaler=scaler, **kwargs)
    weights = balancer.backward(losses, scaler=scaler, **kwargs)
    if micro_batches > 1:
        _scale_grads(balancer, 1.0 / micro_batches)
    return weights


def _check_accelerator(accelerator: Any) -> None:
    kind = getattr(accelerator, "distributed_type", "NO")
    kind = str(getattr(kind, "value", kind)).rsplit(".", 1)[-1]  # an enum or its text
    if kind in _UNSUPPORTED:
        raise NotImplementedError(
            f"gradbalance's backward cannot replace accelerator.backward under {kind}: the "
            f"balancer needs the whole shared parameters and its own autograd calls; use "
            f"plain DDP (MULTI_GPU / MULTI_CPU) or a single process"
        )


def backward(
    accelerator: Any,
    optimizer: Any,
    losses: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...],
    **kwargs: Any,
) -> Tensor:
    """``accelerator.backward`` for several task losses: the balanced backward of one step.

    Finds the `GradBalancer` in ``optimizer`` (as prepared by ``accelerator.prepare``), hands
    it the accelerator's ``GradScaler`` (fp16), and follows ``accelerator.accumulate``: outside
    a synchronising micro-batch (``accelerator.sync_gradients`` false) the gradients stay
    rank-local (`GradBalancer.no_sync`); the synchronising one averages them over processes
    and divides them by ``accelerator.gradient_accumulation_steps`` (as
    ``accelerator.backward`` divides the loss). The task weights of every micro-batch come from
    its own, undivided losses.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        optimizer: the prepared optimizer (an ``AcceleratedOptimizer`` around a `GradBalancer`)
            or the balancer itself.
        losses: one scalar loss per task, as for `GradBalancer.backward`.
        **kwargs: passed on to `GradBalancer.backward` (``features=``, ``kpis=``, ...).

    Returns:
        The task weights, as `GradBalancer.backward` returns them.

    Raises:
        NotImplementedError: under DeepSpeed, FSDP, Megatron-LM or XLA.
        TypeError: when ``optimizer`` holds no `GradBalancer` (`find_balancer`).

    Examples:
        >>> import torch, gradbalance as gb
        >>> from accelerate import Accelerator
        >>> from gradbalance.integrations.huggingface import backward
        >>> accelerator = Accelerator(cpu=True)
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model)
        >>> model, opt = accelerator.prepare(model, opt)
        >>> out = model(torch.randn(4, 3))
        >>> w = backward(accelerator, opt, {"a": out[:, 0].pow(2).mean(), "b": out[:, 1].mean()})
        >>> opt.step()
        >>> opt.zero_grad()
    """
    _check_accelerator(accelerator)
    return _accumulating_backward(
        find_balancer(optimizer),
        losses,
        sync=bool(accelerator.sync_gradients),
        micro_batches=int(accelerator.gradient_accumulation_steps),
        scaler=accelerator.scaler,
        **kwargs,
    )


def task_losses(outputs: Any, tasks: Iterable[str]) -> dict[str, Tensor]:
    """The task losses in a model's outputs: ``outputs["losses"]`` when the outputs hold such
    a mapping, else the entries of ``outputs`` named by ``tasks``.

    Args:
        outputs: what the model returned: a mapping (a dict or a ``ModelOutput``).
        tasks: the task names.

    Raises:
        KeyError: naming the missing task.
        TypeError: when the outputs are not a mapping.

    Examples:
        >>> import torch
        >>> task_losses({"losses": {"a": torch.tensor(1.0)}, "logits": None}, ["a"])
        {'a': tensor(1.)}
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"the model returned {type(outputs).__name__}, not a mapping; return a dict of "
            f"task losses (or one under 'losses'), or pass compute_losses=fn(model, inputs)"
        )
    found = outputs["losses"] if "losses" in outputs else outputs
    names = list(tasks)
    missing = [t for t in names if t not in found]
    if missing:
        raise KeyError(
            f"task {missing[0]!r} has no loss in the model's outputs (keys: {sorted(found)}); "
            f"return it under outputs['losses'][{missing[0]!r}], or pass "
            f"compute_losses=fn(model, inputs) -> {{task: loss}}"
        )
    return {t: found[t] for t in names}


class BalancedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that balances one loss per task with a `GradBalancer`.

    The optimizer is a `GradBalancer` around the optimizer the Trainer builds from its
    arguments (``optim=``, ``learning_rate=``, ``weight_decay=``), or around the one passed as
    ``optimizers=(optimizer, scheduler)`` (a `GradBalancer` there is used as it is). The
    training step computes one loss per task (`compute_losses`), calls
    `GradBalancer.backward` instead of ``accelerator.backward``, and returns the weighted loss
    ``Σ w_i L_i`` for the Trainer's ``loss`` log. Every training log also carries the last
    step's ``loss/<task>``, ``weight/<task>`` and, for gradient methods, the cosines of the
    task gradients ``cosine/<a>~<b>`` (one step's values, its last micro-batch's under
    gradient accumulation; not averaged over ``logging_steps`` as ``loss`` is).

    Gradient accumulation, DDP (``torchrun``), fp16 and bf16 work as described in the module
    docstring; ``max_grad_norm`` clips the balanced gradient of the model's parameters.
    DeepSpeed, FSDP and other sharded setups are not supported.

    Args:
        *args: the ``transformers.Trainer`` arguments (``model``, ``args``, ...).
        tasks: the task names, in the order of the balancer's weights. Needed up front because
            the Trainer builds its learning-rate scheduler before the first step, and methods
            with learnable parameters (uncertainty, IMTL-L) add their param group when their
            tasks are known.
        method: a method name or a `gradbalance.methods.Method`.
        shared: the shared parameters (a module of the model, a list of tensors, or
            ``"auto"``), as for `GradBalancer`; needed by gradient methods.
        compute_losses: ``fn(model, inputs) -> {task: loss}``; by default the model's outputs
            (``model(**inputs)``) are read by `task_losses`.
        balancer_options: other `GradBalancer` keyword arguments (``engine=``,
            ``nonfinite=``, method options, ...).
        **kwargs: the other ``transformers.Trainer`` keyword arguments.

    Examples:
        >>> import tempfile, torch, transformers
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.trunk, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x, y):
        ...         out = self.head(self.trunk(x))
        ...         return {"losses": {"a": (out[:, 0] - y[:, 0]).pow(2).mean(),
        ...                            "b": (out[:, 1] - y[:, 1]).abs().mean()}}
        >>> net = Net()
        >>> data = [{"x": torch.randn(3), "y": torch.randn(2)} for _ in range(8)]
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=2, use_cpu=True,
        ...     per_device_train_batch_size=4, report_to=[], save_strategy="no",
        ...     remove_unused_columns=False, disable_tqdm=True)
        >>> trainer = BalancedTrainer(model=net, args=args, train_dataset=data,
        ...     tasks=["a", "b"], method="mgda", shared=net.trunk)
        >>> trainer.remove_callback(transformers.PrinterCallback)  # no printed logs here
        >>> _ = trainer.train()
        >>> trainer.balancer.steps
        2
    """

    def __init__(
        self,
        *args: Any,
        tasks: Iterable[str],
        method: str | Method = "equal",
        shared: Iterable[Tensor] | nn.Module | str | None = None,
        compute_losses: Callable[[nn.Module, dict[str, Any]], Mapping[str, Tensor]] | None = None,
        balancer_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
        self.tasks = list(tasks)
        self.balance_method = method
        self.shared = shared
        self.balancer_options = dict(balancer_options or {})
        self._compute_losses = compute_losses
        self._zero_before_next = True
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ the optimizer
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``; each call starts from zeroed gradients, also those
        of the method's own parameters that an interrupted accumulation cycle left behind
        (the Trainer's ``model.zero_grad()`` does not reach them)."""
        self._zero_before_next = True
        return super().train(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (or the one passed in), wrapped in a `GradBalancer`.

        A `GradBalancer`, or accelerate's wrapper around one (what a second ``train()`` call
        finds), is kept as it is.
        """
        inner = super().create_optimizer(model)
        if _holds_balancer(inner):
            return inner
        balancer = GradBalancer(
            inner,
            self.balance_method,
            shared=self.shared,
            tasks=self.tasks,
            **self.balancer_options,
        )
        self.optimizer = balancer
        return balancer

    @property
    def balancer(self) -> GradBalancer:
        """The `GradBalancer` (inside accelerate's optimizer wrapper once training started)."""
        if self.optimizer is None:
            raise RuntimeError("the optimizer is built when training starts (or create_optimizer)")
        return find_balancer(self.optimizer)

    # ------------------------------------------------------------------ the step
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Mapping[str, Tensor]:
        """One scalar loss per task for a batch: ``compute_losses=`` if given, else
        `task_losses` of ``model(**inputs)``. Override to change how losses are computed."""
        if self._compute_losses is not None:
            return self._compute_losses(model, inputs)
        return task_losses(model(**inputs), self.tasks)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Forward, per-task losses, `GradBalancer.backward`; returns ``Σ w_i L_i`` (detached)
        divided by the number of micro-batches (the Trainer sums it over them to log it).

        ``num_items_in_batch`` is ignored: each task's loss is its micro-batch's mean.
        """
        _check_accelerator(self.accelerator)
        if self.args.n_gpu > 1:
            raise NotImplementedError(
                "BalancedTrainer does not support torch.nn.DataParallel (several GPUs in one "
                "process): launch one process per GPU with torchrun or accelerate launch (DDP)"
            )
        balancer = self.balancer
        if self._zero_before_next:
            # the Trainer zeroes only the model's gradients; the method's own parameters (the
            # log-variances of uncertainty weighting, ...) live in the optimizer alone
            balancer.zero_grad()
            self._zero_before_next = False
        model.train()
        train_mode = getattr(self.optimizer, "train", None)
        if callable(train_mode):
            train_mode()  # schedule-free inner optimizers have a train mode
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = dict(self.compute_losses(model, inputs))
        micro_batches = int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        sync = bool(self.accelerator.sync_gradients)
        weights = _accumulating_backward(
            balancer, losses, sync=sync, micro_batches=micro_batches, scaler=self.accelerator.scaler
        )
        if sync:
            self._zero_before_next = True
        with torch.no_grad():
            stacked = torch.stack([loss.detach().float() for loss in losses.values()])
            total = (weights.to(stacked) * stacked).sum()
        return total / micro_batches

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The sum of the task losses (used by evaluation; training uses `training_step`)."""
        losses = self.compute_losses(model, inputs)
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        return (total, dict(losses)) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the last step's ``loss/<task>``, ``weight/<task>`` and, for gradient methods,
        ``cosine/<a>~<b>`` (`gradbalance.callbacks.StepRecord`) to the training logs."""
        optimizer = self.optimizer
        if "loss" in logs and optimizer is not None:
            balancer = find_balancer(optimizer)
            if balancer.last_weights is not None:
                step = self.state.global_step
                logs.update(StepRecord.from_balancer(balancer, step=step, cosines=True).scalars())
        super().log(logs, start_time)
