"""Observers of a training run: send its losses, weights, gradient cosines and test metrics to
files, TensorBoard or any tracker.

`gradbalance.training.fit` calls each callback of ``fit(..., callbacks=[...])``: `Callback.on_step`
with a `StepRecord` (step, epoch, per-task losses and weights, and the cosine similarities
of the task gradients for gradient methods), `Callback.on_epoch` with an `EpochRecord` (the
evaluation's metrics) and `Callback.on_fit_end` with the `gradbalance.training.History`.

* `CSVLogger`: ``steps.csv`` and ``epochs.csv``;
* `TensorBoardLogger`: TensorBoard event files (``pip install gradbalance[tensorboard]``);
* `LambdaCallback`: plain functions, e.g. to send the numbers to wandb or MLflow;
* `StepRecord.from_balancer`: the same record from a `GradBalancer` in a loop of your own.

Examples:
    >>> import torch, gradbalance as gb
    >>> from gradbalance.training import fit
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net)
    >>> data = [(torch.randn(8, 3), {"a": torch.randn(8), "b": torch.randn(8)})] * 2
    >>> mse = torch.nn.functional.mse_loss
    >>> seen = []
    >>> tracker = gb.callbacks.LambdaCallback(on_step=lambda r: seen.append(r.scalars()),
    ...                                       cosines=True)
    >>> def losses(out, y):
    ...     return {"a": mse(out[:, 0], y["a"]), "b": mse(out[:, 1], y["b"])}
    >>> h = fit(net, opt, data, losses, epochs=1, callbacks=[tracker], show_progress=False)
    >>> sorted(seen[0])
    ['cosine/a~b', 'loss/a', 'loss/b', 'weight/a', 'weight/b']
"""

from gradbalance.callbacks.base import (
    Callback,
    CallbackList,
    EpochRecord,
    LambdaCallback,
    StepRecord,
    pair_cosines,
    read_step,
)
from gradbalance.callbacks.csv_logger import CSVLogger
from gradbalance.callbacks.tensorboard import INSTALL_HINT, TensorBoardLogger, tensorboard_available

__all__ = [
    "INSTALL_HINT",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EpochRecord",
    "LambdaCallback",
    "StepRecord",
    "TensorBoardLogger",
    "pair_cosines",
    "read_step",
    "tensorboard_available",
]
