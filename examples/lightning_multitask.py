"""Lightning: a two-task LightningModule trained with a GradBalancer (manual optimisation).

The recipe of docs/integrations/lightning.md on the quickstart's two regression tasks: the
balancer is the module's optimizer, ``balanced_backward`` replaces ``manual_backward``, and a
cosine schedule is stepped once per epoch. Runs in seconds on a CPU; needs ``lightning``
(``pip install -e ".[lightning]"``).

    python examples/lightning_multitask.py [--method mgda] [--epochs 8]
        [--precision bf16-mixed] [--devices 2] [--quick]

With ``--devices 2`` Lightning's DDP strategy starts two CPU processes (gloo); the balancer
averages over them by itself.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradbalance as gb
from gradbalance.integrations.lightning import balanced_backward, balancer

TASKS = ("smooth", "sharp")


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    smooth = torch.sin(x[:, 0]) + 0.5 * x[:, 1]
    sharp = 10.0 * torch.sign(x[:, 0]) * x[:, 2].abs()
    return TensorDataset(x, smooth, sharp)


class TwoTask(L.LightningModule):
    def __init__(self, method: str = "mgda", lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # the balancer runs the per-task backwards
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}

    def task_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, *targets = batch
        out = self(x)
        return {t: nn.functional.mse_loss(out[t].float(), y) for t, y in zip(TASKS, targets)}

    def configure_optimizers(self) -> Any:
        opt = gb.GradBalancer(
            torch.optim.Adam(self.parameters(), lr=self.hparams.lr),
            method=self.hparams.method,
            shared=self.trunk,
            tasks=TASKS,  # binds the method now, so the scheduler sees all param groups
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        losses = self.task_losses(batch)
        opt.zero_grad()
        weights = balanced_backward(self, losses)
        opt.step()
        logged = {f"loss/{t}": v.detach() for t, v in losses.items()}
        logged.update({f"weight/{t}": w for t, w in zip(TASKS, weights)})
        self.log_dict(logged, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()  # manual optimisation: Lightning does not step it
        balancer(self).end_epoch()  # epoch-based methods (DWA) learn here; a no-op otherwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mgda", help="any gradbalance method (default: mgda)")
    parser.add_argument("--epochs", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP from 2)")
    parser.add_argument("--quick", action="store_true", help="2 epochs on less data (smoke test)")
    args = parser.parse_args()
    epochs, n = (2, 512) if args.quick else (args.epochs, 4096)

    L.seed_everything(0, verbose=False)
    model = TwoTask(args.method)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision=args.precision,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(make_data(n, seed=1), batch_size=64, shuffle=True))
    if trainer.global_rank != 0:
        return
    test = make_data(2048, seed=99)
    with torch.no_grad():
        out = model(test.tensors[0])
    # normalised by each target's variance: 1.0 means "predicts the mean"
    rel = {
        t: float(nn.functional.mse_loss(out[t], y) / y.var())
        for t, y in zip(TASKS, test.tensors[1:])
    }
    weights = ", ".join(f"{w:.3f}" for w in balancer(model).last_weights.tolist())
    print(f"method {args.method}, {epochs} epochs, {balancer(model).steps} balanced steps")
    print("test rel. MSE: " + ", ".join(f"{t} {v:.4f}" for t, v in rel.items()))
    print(f"last weights: [{weights}]")


if __name__ == "__main__":
    main()
