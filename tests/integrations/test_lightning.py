"""PyTorch Lightning: the recipe of docs/integrations/lightning.md, run by a real Trainer on CPU.

The acceptance check: one step inside Lightning writes the same gradients and makes the same
update as `GradBalancer` outside any framework on a copy of the model and the same batch. Then
the parts of a training run around it: DDP (two gloo processes against one process on the
global batch, with and without accumulation), mixed precision, a learning-rate scheduler stepped
in the module, gradient clipping, resuming from a checkpoint, and the errors that name a missing
part of the recipe.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradbalance as gb
from gradbalance.integrations.lightning import balanced_backward, balancer

L = pytest.importorskip("lightning")

# Lightning's own use of a torch API that torch deprecates (lightning/pytorch/utilities/_pytree)
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")

TASKS = ("a", "b")
BATCH = 8


def make_data(steps: int, batch: int = BATCH, seed: int = 1) -> TensorDataset:
    """``steps`` batches of ``batch`` samples: inputs and one regression target per task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch, 4, generator=g)
    return TensorDataset(
        x, torch.randn(steps * batch, generator=g), torch.randn(steps * batch, generator=g)
    )


class MultiTask(L.LightningModule):
    """A shared trunk, two heads, trained with a GradBalancer under manual optimisation."""

    def __init__(
        self,
        method: str = "mgda",
        lr: float = 0.1,
        momentum: float = 0.0,
        gamma: float | None = None,
        out: str | None = None,
        seed: int = 0,
        accumulate: int = 1,
        clip: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        with torch.random.fork_rng():  # seeded weights, the global generator left as it was
            torch.manual_seed(seed)
            self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})
        self.method, self.lr, self.momentum, self.gamma, self.out = method, lr, momentum, gamma, out
        self.accumulate = accumulate  # micro-batches per optimizer step
        self.clip = clip  # the gradients' norm bound, applied in on_before_optimizer_step
        self.lrs: list[list[float]] = []

    def task_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, *ys = batch
        z = self.trunk(x)
        return {
            t: (self.heads[t](z).squeeze(-1).float() - y).pow(2).mean() for t, y in zip(TASKS, ys)
        }

    def configure_optimizers(self) -> Any:
        inner = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        opt = gb.GradBalancer(inner, method=self.method, shared=self.trunk, tasks=TASKS)
        if self.gamma is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, self.gamma),
        }

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        last = (batch_idx + 1) % self.accumulate == 0
        if batch_idx % self.accumulate == 0:
            opt.zero_grad()
        balanced_backward(self, self.task_losses(batch), sync=last)
        if not last:
            return
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.lrs.append([g["lr"] for g in opt.param_groups])
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip)

    def on_train_epoch_end(self) -> None:
        balancer(self).end_epoch()

    def on_train_end(self) -> None:
        if self.out is not None:
            found = balancer(self)
            torch.save(
                {
                    "params": {k: v.detach().clone() for k, v in self.state_dict().items()},
                    "grads": {k: p.grad.clone() for k, p in self.named_parameters()},
                    "weights": found.last_weights,
                    "balancer": found.state_dict(),
                },
                Path(self.out) / f"rank{self.global_rank}.pt",
            )


def trainer(**options: Any) -> Any:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(options)
    return L.Trainer(**settings)


def reference(module: MultiTask, batches: Iterable[Any], steps: int) -> dict[str, Any]:
    """The same training outside Lightning: a copy of the module, the plain GradBalancer loop."""
    model = copy.deepcopy(module)
    config = model.configure_optimizers()
    opt, scheduler = (
        (config["optimizer"], config["lr_scheduler"])
        if isinstance(config, dict)
        else (config, None)
    )
    for i, b in enumerate(batches):
        if i == steps * model.accumulate:
            break
        if i % model.accumulate == 0:
            opt.zero_grad()
        weights = opt.backward(model.task_losses(b))
        if (i + 1) % model.accumulate:
            continue
        if model.clip is not None:
            every = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(every, model.clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        # the tests that use DWA (the one method here with epochs) hold one batch per epoch
        opt.end_epoch()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "weights": weights,
        "balancer": opt.state_dict(),
    }


def same_state(a: Any, b: Any, **tol: float) -> None:
    """Nested state dicts alike: tensors close, everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for k in a:
            same_state(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            same_state(x, y, **tol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **tol)
    else:
        assert a == b, (a, b)


@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
def test_one_step_in_lightning_is_the_balanced_step(tmp_path, method):
    data = make_data(1)
    module = MultiTask(method, out=str(tmp_path))
    expected = reference(module, DataLoader(data, batch_size=BATCH), 1)
    trainer(max_steps=1).fit(module, DataLoader(data, batch_size=BATCH))
    got = torch.load(tmp_path / "rank0.pt")
    torch.testing.assert_close(got["grads"], expected["grads"])
    torch.testing.assert_close(got["params"], expected["params"])
    torch.testing.assert_close(got["weights"], expected["weights"])
    same_state(got["balancer"], expected["balancer"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_on_two_processes_trains_like_one_process_on_the_global_batch(tmp_path, accumulate):
    # accumulate=2: the first micro-batch's backward with sync=False (GradBalancer.no_sync)
    steps, per_rank = 2, 4
    data = make_data(steps * accumulate, batch=2 * per_rank)
    module = MultiTask("mgda", momentum=0.5, out=str(tmp_path), accumulate=accumulate)
    # Lightning gives each rank its part of the training set through a shuffling
    # DistributedSampler (seed 0); one process steps on the ranks' batches concatenated
    parts = [
        DataLoader(data, per_rank, sampler=DistributedSampler(data, 2, rank, shuffle=True, seed=0))
        for rank in range(2)
    ]
    global_batches = [[torch.cat(t) for t in zip(*bs)] for bs in zip(*parts)]
    expected = reference(module, global_batches, steps)
    fit = trainer(max_steps=steps, devices=2, strategy="ddp_spawn")
    fit.fit(module, DataLoader(data, batch_size=per_rank))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["params"], expected["params"])
        torch.testing.assert_close(got["grads"], expected["grads"])
        torch.testing.assert_close(got["weights"], expected["weights"])
        same_state(got["balancer"], expected["balancer"])


def amp_reference(
    module: MultiTask, data: TensorDataset, dtype: torch.dtype, init_scale: float = 1.0
) -> tuple[Any, Any]:
    """One AMP step outside Lightning (docs/amp.md): autocast forward, the balancer outside."""
    model = copy.deepcopy(module)
    opt = model.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if dtype == torch.float16 else None
    with torch.autocast("cpu", dtype=dtype):
        losses = model.task_losses(next(iter(DataLoader(data, batch_size=BATCH))))
    opt.zero_grad()
    opt.backward(losses, scaler=scaler)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return model, scaler


@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
def test_bf16_mixed_precision_makes_the_balanced_update(method):
    data = make_data(1)
    module = MultiTask(method)
    amp, _ = amp_reference(module, data, torch.bfloat16)
    fp32 = reference(module, DataLoader(data, batch_size=BATCH), 1)
    trainer(max_steps=1, precision="bf16-mixed").fit(module, DataLoader(data, batch_size=BATCH))
    # the same computation as the plain AMP recipe, and the fp32 step to bfloat16 precision
    torch.testing.assert_close(module.state_dict(), amp.state_dict())
    torch.testing.assert_close(module.state_dict(), fp32["params"], atol=2e-3, rtol=2e-2)
    assert balancer(module).steps == 1


@pytest.mark.parametrize("init_scale", [2.0**8, 2.0**16])
def test_16_mixed_precision_scales_the_per_task_backwards_with_lightnings_scaler(init_scale):
    from lightning.pytorch.plugins import MixedPrecision

    data = make_data(1)
    module = MultiTask("mgda")
    start = copy.deepcopy(module.state_dict())
    amp, scaler = amp_reference(module, data, torch.float16, init_scale)
    # Trainer(precision="16-mixed") on CPU falls back to bf16; the plugin gives fp16 + GradScaler
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))
    trainer(max_steps=1, plugins=[plugin]).fit(module, DataLoader(data, batch_size=BATCH))
    torch.testing.assert_close(module.state_dict(), amp.state_dict())
    assert plugin.scaler is not None and plugin.scaler.get_scale() == scaler.get_scale()
    if init_scale == 2.0**8:
        assert balancer(module).steps == 1
        assert not _same(module.state_dict(), start)
    else:  # fp16 overflows at this scale: the step is skipped and the scale halved
        assert balancer(module).steps == 0 and scaler.get_scale() == init_scale / 2
        torch.testing.assert_close(module.state_dict(), start)


def test_a_scheduler_stepped_in_the_module_sets_the_learning_rate_of_every_group():
    data = make_data(3)
    module = MultiTask("uncertainty", gamma=0.5)
    expected = reference(module, DataLoader(data, batch_size=BATCH), 3)
    trainer(max_steps=3).fit(module, DataLoader(data, batch_size=BATCH))
    # two param groups: the model's and the method's (uncertainty's log-variances)
    assert module.lrs == [[0.1, 0.1], [0.05, 0.05], [0.025, 0.025]]
    assert [g["lr"] for g in balancer(module).param_groups] == [0.0125, 0.0125]
    torch.testing.assert_close(module.state_dict(), expected["params"])


def test_gradients_clipped_in_on_before_optimizer_step_are_the_balanced_ones_clipped():
    data = make_data(2)
    module = MultiTask("uncertainty", clip=0.05)
    expected = reference(module, DataLoader(data, batch_size=BATCH), 2)
    unclipped = reference(MultiTask("uncertainty"), DataLoader(data, batch_size=BATCH), 2)
    trainer(max_steps=2).fit(module, DataLoader(data, batch_size=BATCH))
    torch.testing.assert_close(module.state_dict(), expected["params"])
    assert not _same(expected["params"], unclipped["params"])


@pytest.mark.parametrize("method", ["uncertainty", "dwa"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path, method):
    data = make_data(1)  # one batch per epoch: DWA learns from the epochs' losses
    loader = DataLoader(data, batch_size=BATCH)
    options = dict(method=method, momentum=0.5, gamma=0.8)
    whole, first, second = (tmp_path / n for n in ("whole", "first", "second"))
    for d in (whole, first, second):
        d.mkdir()
    trainer(max_epochs=4).fit(MultiTask(**options, out=str(whole)), loader)

    interrupted = trainer(max_epochs=2)
    interrupted.fit(MultiTask(**options, out=str(first)), loader)
    interrupted.save_checkpoint(tmp_path / "half.ckpt")
    # another initialisation: the weights must come from the checkpoint
    resumed = MultiTask(**options, out=str(second), seed=1)
    trainer(max_epochs=4).fit(resumed, loader, ckpt_path=tmp_path / "half.ckpt")

    a, b = torch.load(whole / "rank0.pt"), torch.load(second / "rank0.pt")
    torch.testing.assert_close(b["params"], a["params"])
    same_state(b["balancer"], a["balancer"])  # inner SGD momentum, method state, counters
    torch.testing.assert_close(b["weights"], a["weights"])
    assert a["balancer"]["gradbalance"]["balancer"]["steps"] == 4
    # the method state moved away from its start, so restoring it is what made them equal
    halfway = torch.load(first / "rank0.pt")["balancer"]["gradbalance"]["method"]
    assert not _same(halfway, a["balancer"]["gradbalance"]["method"])


def _same(a: Any, b: Any) -> bool:
    try:
        same_state(a, b)
    except AssertionError:
        return False
    return True


class Misconfigured(MultiTask):
    """The recipe with one part missing: automatic optimisation on, or a plain optimizer."""

    def __init__(self, mistake: str) -> None:
        super().__init__("mgda")
        self.mistake = mistake
        self.automatic_optimization = mistake == "automatic"

    def configure_optimizers(self) -> Any:
        if self.mistake == "plain optimizer":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return super().configure_optimizers()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        balanced_backward(self, self.task_losses(batch))


@pytest.mark.parametrize(
    ("mistake", "error", "match"),
    [
        ("automatic", RuntimeError, "automatic_optimization = False"),
        ("plain optimizer", TypeError, "returned a SGD there, not a gradbalance.GradBalancer"),
    ],
)
def test_a_missing_part_of_the_recipe_is_named(mistake, error, match):
    data = make_data(1)
    with pytest.raises(error, match=match):
        trainer(max_steps=1).fit(Misconfigured(mistake), DataLoader(data, batch_size=BATCH))


def test_balancer_is_the_optimizer_lightning_holds_and_a_wrong_index_is_named():
    module = MultiTask("mgda")
    fit = trainer(max_steps=0)
    fit.fit(module, DataLoader(make_data(1), batch_size=BATCH))
    assert balancer(module) is fit.optimizers[0]
    with pytest.raises(IndexError, match=r"index=1.*1 optimizer"):
        balancer(module, 1)


def test_importing_gradbalance_or_the_helper_does_not_import_lightning():
    code = (
        "import sys, gradbalance, gradbalance.integrations.lightning; "
        "assert not {'lightning', 'pytorch_lightning'} & set(sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_recipe_of_the_docs_runs(capsys):
    page = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "lightning.md"
    if not page.is_file():  # pragma: no cover - tests run from a checkout
        pytest.skip(f"{page} not found")
    text = page.read_text(encoding="utf-8")
    recipe = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(recipe, str(page), "exec"), namespace)
    assert namespace["trainer"].global_step == 3 * 8  # 512 samples in batches of 64, 3 epochs
    assert balancer(namespace["model"]).steps == 24
    assert "tensor([" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused_with_the_reason(strategy):
    # FSDP and DeepSpeed shard the parameters whose whole per-task gradients the balancer
    # reads (DeepSpeed also wraps the optimizer): refused before anything is computed
    from lightning.pytorch import strategies

    found = getattr(strategies, strategy)
    kind = type(strategy, (found,), {"__init__": lambda self: None})  # no launch, no deepspeed
    module = MultiTask("mgda")
    fake_trainer = type("T", (), {"strategy": kind(), "precision_plugin": None})()
    object.__setattr__(module, "_trainer", fake_trainer)
    module.automatic_optimization = False
    losses = {t: torch.ones((), requires_grad=True) for t in TASKS}
    with pytest.raises(NotImplementedError, match=rf"balanced_backward: .*{strategy}.*\"ddp\""):
        balanced_backward(module, losses)
    with pytest.raises(NotImplementedError, match=strategy):
        balancer(module)


class MeanAccumulation(MultiTask):
    """docs/integrations/lightning.md's accumulation recipe with the gradients divided by the
    number of micro-batches before the step (their mean instead of their sum)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        last = (batch_idx + 1) % self.accumulate == 0
        if batch_idx % self.accumulate == 0:
            opt.zero_grad()
        balanced_backward(self, self.task_losses(batch), sync=last)
        if last:
            with torch.no_grad():
                for group in balancer(self).param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(self.accumulate)
            opt.step()


@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
def test_accumulating_the_mean_of_the_micro_batches_as_the_docs_show(method):
    # plain SGD: the mean of 2 micro-batches at lr 0.1 is their sum at lr 0.05, every group
    # (uncertainty's log-variances included) alike
    data = make_data(4)
    module = MeanAccumulation(method, lr=0.1, accumulate=2)
    summed = reference(MultiTask(method, lr=0.05, accumulate=2), DataLoader(data, BATCH), 2)
    trainer(max_steps=2).fit(module, DataLoader(data, batch_size=BATCH))
    torch.testing.assert_close(module.state_dict(), summed["params"])
    assert balancer(module).steps == 2
