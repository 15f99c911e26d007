"""Hugging Face: `BalancedTrainer` and the accelerate recipe of docs/integrations/huggingface.md,
run for real on CPU with a tiny randomly initialised BERT encoder and two task heads.

The acceptance check: the parameters after Trainer (and accelerate) steps equal those of
`GradBalancer` run outside any framework on a copy of the model and the same batches (SGD, no
momentum, constant learning rate, no clipping), for MGDA and uncertainty weighting. Then
gradient accumulation, clipping, checkpoints (Trainer resume, accelerate save/load_state), bf16
autocast, the GradScaler path, and DDP with two gloo processes (accelerate and the Trainer)
against one process on the global batch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradbalance as gb

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState  # noqa: E402

from gradbalance.integrations.huggingface import (  # noqa: E402
    BalancedTrainer,
    backward,
    find_balancer,
    task_losses,
)
from tests.ddp_harness import run_ranks  # noqa: E402

TASKS = ["cls", "reg"]
BATCH = 8
SEQ = 6


class MultiTaskBert(nn.Module):
    """A one-layer BERT encoder (built from a config, no download) and two heads on [CLS]:
    3-way classification and regression. ``forward`` returns ``{"losses": {task: loss}}``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        config = transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(seed)
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        y_cls: torch.Tensor,
        y_reg: torch.Tensor,
    ) -> dict[str, Any]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = h[:, 0]
        losses = {
            "cls": nn.functional.cross_entropy(self.cls(h), y_cls),
            "reg": (self.reg(h).squeeze(-1) - y_reg).pow(2).mean(),
        }
        return {"losses": losses}


def make_data(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[int(torch.randint(3, SEQ + 1, (), generator=g)) :] = 0  # some padding
        rows.append(
            {
                "input_ids": torch.randint(0, 50, (SEQ,), generator=g),
                "attention_mask": mask,
                "y_cls": torch.randint(0, 3, (), generator=g),
                "y_reg": torch.randn((), generator=g),
            }
        )
    return rows


collate = transformers.default_data_collator


def reference(
    model: MultiTaskBert,
    method: str,
    steps: list[list[list[dict[str, torch.Tensor]]]],
    lr: float,
) -> gb.GradBalancer:
    """Train ``model`` with a plain GradBalancer loop: ``steps[s][m]`` is micro-batch ``m`` of
    step ``s``; the update is the mean of the micro-batches' balanced gradients."""
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=lr), method, shared=model.encoder, tasks=TASKS
    )
    for micro_batches in steps:
        opt.zero_grad()
        for rows in micro_batches:
            opt.backward(model(**collate(rows))["losses"])
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(len(micro_batches))
        opt.step()
    return opt


def same_state(
    model: nn.Module,
    balancer: gb.GradBalancer,
    ref: nn.Module,
    ref_opt: gb.GradBalancer,
    **tol: float,
) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)
    for p, q in zip(balancer.method.parameters(), ref_opt.method.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)  # uncertainty's log-variances
    assert balancer.steps == ref_opt.steps
    torch.testing.assert_close(balancer.last_weights, ref_opt.last_weights, **tol)


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Each test builds its own Accelerator (the Trainer too): reset accelerate's singletons."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def training_args(tmp_path: Any, **options: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "remove_unused_columns": False,
        "train_sampling_strategy": "sequential",
        "dataloader_drop_last": True,
        "disable_tqdm": True,
        "logging_steps": 1,
        "optim": "sgd",  # torch.optim.SGD without momentum
        "learning_rate": 0.5,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # no clipping
        "per_device_train_batch_size": BATCH,
        "seed": 0,
    }
    settings.update(options)
    return transformers.TrainingArguments(**settings)


# ---------------------------------------------------------------------- the Trainer
@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
def test_trainer_steps_are_the_balanced_steps(tmp_path, method):
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),  # the same batch twice
        train_dataset=data,
        tasks=TASKS,
        method=method,
        shared=model.encoder,
    )
    trainer.train()
    ref_opt = reference(ref, method, [[data], [data]], lr=0.5)
    same_state(model, trainer.balancer, ref, ref_opt)
    # the balancer sits inside accelerate's optimizer wrapper, and its weights are logged
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    w = ref_opt.last_weights
    assert logs[-1]["weight/cls"] == pytest.approx(float(w[0]), rel=1e-5)
    assert logs[-1]["weight/reg"] == pytest.approx(float(w[1]), rel=1e-5)
    assert logs[-1]["loss/reg"] == pytest.approx(float(ref_opt.last_losses[1]), rel=1e-5)
    assert ("cosine/cls~reg" in logs[-1]) == (method == "mgda")  # gradient methods only


def test_trainer_accumulates_the_mean_of_the_balanced_micro_batches(tmp_path):
    # uncertainty's weights depend on the loss values: each micro-batch is weighted on its own
    # undivided losses, and the update is the mean of the micro-batches' gradients
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    trainer = BalancedTrainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=BATCH // 2,
            gradient_accumulation_steps=2,
        ),
        train_dataset=data,
        tasks=TASKS,
        method="uncertainty",
    )
    trainer.train()
    ref_opt = reference(ref, "uncertainty", [[data[:4], data[4:]]], lr=0.5)
    same_state(model, trainer.balancer, ref, ref_opt)


def test_a_second_train_call_continues_with_the_same_balancer(tmp_path):
    # the plain Trainer keeps accelerate's prepared optimizer across train() calls; the
    # BalancedTrainer wrapped that wrapper in a second GradBalancer (and failed to load it)
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=data,
        tasks=TASKS,
        method="uncertainty",
    )
    trainer.train()
    first = trainer.balancer
    trainer.train()
    assert trainer.balancer is first
    assert find_balancer(trainer.optimizer.optimizer) is first  # one wrapper, one balancer
    ref_opt = reference(ref, "uncertainty", [[data], [data]], lr=0.5)
    same_state(model, trainer.balancer, ref, ref_opt)


def test_train_after_an_interrupted_accumulation_cycle_starts_from_zero(tmp_path):
    # an error between two micro-batches (Ctrl-C in a notebook, a bad batch) leaves the first
    # micro-batch's gradient of the method's own parameters (uncertainty's log-variances) in
    # .grad, where the Trainer's model.zero_grad() does not reach: the next train() clears it
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    calls = []

    def losses_failing_once(net: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return net(**inputs)["losses"]

    trainer = BalancedTrainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=BATCH // 2,
            gradient_accumulation_steps=2,
        ),
        train_dataset=data,
        tasks=TASKS,
        method="uncertainty",
        compute_losses=losses_failing_once,
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train()
    ref_opt = reference(ref, "uncertainty", [[data[:4], data[4:]]], lr=0.5)
    same_state(model, trainer.balancer, ref, ref_opt)


def test_trainer_takes_an_optimizer_and_scheduler_passed_in(tmp_path):
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    balancer = gb.GradBalancer(inner, "mgda", shared=model.encoder, tasks=TASKS)
    schedule = torch.optim.lr_scheduler.LambdaLR(balancer, lambda step: 1.0)
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=data,
        tasks=TASKS,
        optimizers=(balancer, schedule),
    )
    trainer.train()
    assert trainer.balancer is balancer  # used as it is, not wrapped twice
    ref_opt = reference(ref, "mgda", [[data]], lr=0.5)
    same_state(model, balancer, ref, ref_opt)


def test_trainer_under_bf16_autocast_is_close_to_the_fp32_step(tmp_path):
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, bf16=True),
        train_dataset=data,
        tasks=TASKS,
        method="mgda",
        shared=model.encoder,
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    ref_opt = reference(ref, "mgda", [[data]], lr=0.5)
    close_updates(model, ref, start)
    torch.testing.assert_close(
        trainer.balancer.last_weights, ref_opt.last_weights, rtol=0, atol=0.02
    )


def close_updates(model: nn.Module, ref: nn.Module, start: list[torch.Tensor]) -> None:
    """The bf16 update is the fp32 one to bf16 accuracy: relative error of the whole update
    (every parameter's change) below 5 % (bf16 keeps 8 bits of mantissa, ~0.4 % per value)."""
    got = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    want = torch.cat([(q.detach() - s).flatten() for q, s in zip(ref.parameters(), start)])
    error = float((got - want).norm() / want.norm())
    assert 0 < error < 0.05  # not 0: autocast did run in bf16 (about 0.6 % here)


def test_trainer_checkpoints_carry_the_balancer_and_resume_exactly(tmp_path):
    # AdamW's moments and uncertainty's log-variances travel in the Trainer's optimizer.pt
    data = make_data(2 * BATCH)

    def run(resume: str | None = None) -> tuple[nn.Module, gb.GradBalancer]:
        AcceleratorState._reset_state(reset_partial_state=True)
        model = MultiTaskBert()
        options = {"save_strategy": "steps", "save_steps": 1, "optim": "adamw_torch"}
        trainer = BalancedTrainer(
            model=model,
            args=training_args(tmp_path, max_steps=3, learning_rate=0.01, **options),
            train_dataset=data,
            tasks=TASKS,
            method="uncertainty",
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.balancer

    model, balancer = run()
    resumed, resumed_balancer = run(resume=str(tmp_path / "checkpoint-1"))
    assert resumed_balancer.steps == balancer.steps == 3
    for p, q in zip(
        [*model.parameters(), *balancer.method.parameters()],
        [*resumed.parameters(), *resumed_balancer.method.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(p, q)


def test_evaluation_reports_the_sum_of_the_task_losses(tmp_path):
    data = make_data(BATCH)
    model = MultiTaskBert()
    trainer = BalancedTrainer(
        model=model,
        # the Trainer computes an evaluation loss only for batches with its label_names
        args=training_args(
            tmp_path,
            per_device_eval_batch_size=BATCH,
            label_names=["y_cls", "y_reg"],
            prediction_loss_only=True,
        ),
        eval_dataset=data,
        tasks=TASKS,
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = sum(model(**collate(data))["losses"].values())
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------------- accelerate
def accelerate_run(
    method: str,
    data: list[dict[str, torch.Tensor]],
    *,
    micro: int = 1,
    mixed: str = "no",
) -> tuple[nn.Module, gb.GradBalancer, Any]:
    """The recipe: prepare(model, balancer, loader), then backward(accelerator, opt, losses)."""
    accelerator = accelerate.Accelerator(
        cpu=True, mixed_precision=mixed, gradient_accumulation_steps=micro
    )
    model = MultiTaskBert()
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.5), method, shared=model.encoder, tasks=TASKS
    )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH // micro, collate_fn=collate)
    ddp_model, opt, loader = accelerator.prepare(model, opt, loader)
    for batch in loader:
        with accelerator.accumulate(ddp_model):
            backward(accelerator, opt, ddp_model(**batch)["losses"])
            opt.step()
            opt.zero_grad()
    return model, find_balancer(opt), accelerator


@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
@pytest.mark.parametrize("micro", [1, 2])
def test_accelerate_steps_are_the_balanced_steps(method, micro):
    data = make_data(2 * BATCH)
    model, balancer, _ = accelerate_run(method, data, micro=micro)
    m = BATCH // micro
    steps = [
        [data[s * BATCH + i * m : s * BATCH + (i + 1) * m] for i in range(micro)] for s in (0, 1)
    ]
    ref_opt = reference(ref := MultiTaskBert(), method, steps, lr=0.5)
    same_state(model, balancer, ref, ref_opt)


def test_accelerate_under_bf16_autocast_is_close_to_the_fp32_step():
    data = make_data(BATCH)
    start = [p.detach().clone() for p in MultiTaskBert().parameters()]
    model, balancer, accelerator = accelerate_run("mgda", data, mixed="bf16")
    assert accelerator.mixed_precision == "bf16" and accelerator.scaler is None
    ref_opt = reference(ref := MultiTaskBert(), "mgda", [[data]], lr=0.5)
    close_updates(model, ref, start)
    torch.testing.assert_close(balancer.last_weights, ref_opt.last_weights, rtol=0, atol=0.02)


def test_accelerate_grad_scaler_path_steps_and_skips_like_the_balancer():
    # fp16 autocast needs a GPU; the GradScaler wiring does not: give the accelerator a CPU
    # scaler, which `prepare` hands to accelerate's optimizer wrapper as under fp16
    data = make_data(2 * BATCH)
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = MultiTaskBert()
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.5), "uncertainty", tasks=TASKS)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=collate)
    ddp_model, opt, loader = accelerator.prepare(model, opt, loader)
    assert opt.scaler is accelerator.scaler
    skipped = []
    for i, batch in enumerate(loader):
        losses = ddp_model(**batch)["losses"]
        if i == 1:  # an overflow: the scaler skips the step, the balancer's state stays
            losses["reg"] = losses["reg"] * float("inf")
        backward(accelerator, opt, losses)
        opt.step()
        opt.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
    assert skipped == [False, True] and accelerator.scaler.get_scale() == 2.0**9
    ref_opt = reference(ref := MultiTaskBert(), "uncertainty", [[data[:BATCH]]], lr=0.5)
    for p, q in zip(
        [*model.parameters(), *find_balancer(opt).method.parameters()],
        [*ref.parameters(), *ref_opt.method.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(p, q)
    assert find_balancer(opt).steps == 1


def test_trainer_clips_the_balanced_gradient(tmp_path):
    data = make_data(BATCH)
    model = MultiTaskBert()
    ref = copy.deepcopy(model)
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, max_grad_norm=0.05),
        train_dataset=data,
        tasks=TASKS,
        method="mgda",
        shared=model.encoder,
    )
    trainer.train()
    opt = gb.GradBalancer(
        torch.optim.SGD(ref.parameters(), lr=0.5), "mgda", shared=ref.encoder, tasks=TASKS
    )
    opt.backward(ref(**collate(data))["losses"])
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert float(norm) > 0.05  # the clip is active
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)


def test_accelerate_save_state_and_load_state_carry_the_balancer(tmp_path):
    data = make_data(2 * BATCH)
    accelerator = accelerate.Accelerator(cpu=True)
    model = MultiTaskBert()
    opt = gb.GradBalancer(
        torch.optim.AdamW(model.parameters(), lr=0.01), "uncertainty", tasks=TASKS
    )
    ddp_model, opt = accelerator.prepare(model, opt)
    state = [*model.parameters(), *find_balancer(opt).method.parameters()]

    def step(rows: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        backward(accelerator, opt, ddp_model(**collate(rows))["losses"])
        opt.step()
        opt.zero_grad()
        return [p.detach().clone() for p in state]

    step(data[:BATCH])
    accelerator.save_state(str(tmp_path / "state"))
    saved = [p.detach().clone() for p in state]
    after = step(data[BATCH:])
    accelerator.load_state(str(tmp_path / "state"))
    torch.testing.assert_close([p.detach() for p in state], saved)
    assert find_balancer(opt).steps == 1
    torch.testing.assert_close(step(data[BATCH:]), after)  # AdamW's and the method's state too


WORLD = 2


def ddp_scenarios(rank: int, world: int) -> dict[str, Any]:
    """On each rank: accelerate finds the gloo process group the harness started, wraps the
    model in DDP and shards the loader; two steps per method."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    results: dict[str, Any] = {}
    for method in ("mgda", "uncertainty"):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = accelerate.Accelerator(cpu=True)
        model = MultiTaskBert()
        opt = gb.GradBalancer(
            torch.optim.SGD(model.parameters(), lr=0.5),
            method,
            shared=model.encoder,
            tasks=TASKS,
        )
        data = make_data(2 * WORLD * BATCH)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=collate)
        ddp_model, opt, loader = accelerator.prepare(model, opt, loader)
        seen = []
        for batch in loader:
            seen.append(batch["y_reg"].clone())
            backward(accelerator, opt, ddp_model(**batch)["losses"])
            opt.step()
            opt.zero_grad()
        balancer = find_balancer(opt)
        results[method] = {
            "kind": str(accelerator.distributed_type),
            "ddp": isinstance(ddp_model, nn.parallel.DistributedDataParallel),
            "mode": balancer.distributed,
            "seen": seen,
            "params": [p.detach().clone() for p in model.parameters()],
            "method": [p.detach().clone() for p in balancer.method.parameters()],
            "weights": balancer.last_weights,
        }
    results["trainer"] = ddp_trainer(rank)
    return results


def ddp_trainer(rank: int) -> dict[str, Any]:
    """The Trainer under DDP (as under ``torchrun``): two steps of MGDA, recording the batches."""
    import tempfile

    AcceleratorState._reset_state(reset_partial_state=True)
    model = MultiTaskBert()
    seen: list[torch.Tensor] = []

    def losses(net: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        seen.append(inputs["y_reg"].clone())
        return net(**inputs)["losses"]

    with tempfile.TemporaryDirectory() as out:
        trainer = BalancedTrainer(
            model=model,
            args=training_args(out, max_steps=2, ddp_backend="gloo"),
            train_dataset=make_data(2 * WORLD * BATCH),
            tasks=TASKS,
            method="mgda",
            shared=model.encoder,
            compute_losses=losses,
        )
        trainer.train()
    return {
        "kind": str(trainer.accelerator.distributed_type),
        "ddp": isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel),
        "mode": trainer.balancer.distributed,
        "seen": seen,
        "params": [p.detach().clone() for p in model.parameters()],
        "method": [],
        "weights": trainer.balancer.last_weights,
    }


def test_accelerate_and_the_trainer_under_ddp_train_like_one_process_on_the_global_batch():
    ranks = run_ranks(ddp_scenarios, WORLD, preload=("torch", "transformers", "accelerate"))
    data = make_data(2 * WORLD * BATCH)
    by_value = {float(row["y_reg"]): i for i, row in enumerate(data)}
    for run, method in (("mgda", "mgda"), ("uncertainty", "uncertainty"), ("trainer", "mgda")):
        r0, r1 = ranks[0][run], ranks[1][run]
        assert r0["kind"].endswith("MULTI_CPU") and r0["ddp"] and r0["mode"] == "global", run
        # each step's global batch: the batches the two ranks read at that step, in rank order
        steps = [
            [[data[by_value[float(v)]] for r in (r0, r1) for v in r["seen"][s]]] for s in range(2)
        ]
        assert sorted(i for s in steps for i in map(id, s[0])) == sorted(map(id, data)), run
        ref_opt = reference(ref := MultiTaskBert(), method, steps, lr=0.5)
        for r in (r0, r1):
            for p, q in zip(r["params"], ref.parameters(), strict=True):
                torch.testing.assert_close(p, q, msg=lambda m, run=run: f"{run}: {m}")
            for p, q in zip(r["method"], ref_opt.method.parameters()):
                torch.testing.assert_close(p, q)
            torch.testing.assert_close(r["weights"], ref_opt.last_weights)


# ---------------------------------------------------------------------- the small helpers
def test_find_balancer_names_what_it_found_instead():
    with pytest.raises(TypeError, match=r"got SGD around SGD.*GradBalancer"):
        find_balancer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_task_losses_names_the_missing_task_and_the_fix():
    one = torch.tensor(1.0)
    assert task_losses({"cls": one, "reg": one, "logits": None}, TASKS) == {"cls": one, "reg": one}
    with pytest.raises(KeyError, match=r"task 'reg' has no loss.*compute_losses"):
        task_losses({"losses": {"cls": one}}, TASKS)
    with pytest.raises(TypeError, match="returned tuple, not a mapping"):
        task_losses((one,), TASKS)


def test_sharded_setups_are_refused_with_the_reason():
    class FakeAccelerator:
        distributed_type = "DistributedType.DEEPSPEED"

    opt = gb.GradBalancer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match=r"under DEEPSPEED.*plain DDP"):
        backward(FakeAccelerator(), opt, [torch.tensor(1.0, requires_grad=True)])


def test_importing_gradbalance_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, gradbalance, gradbalance.integrations; "
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
