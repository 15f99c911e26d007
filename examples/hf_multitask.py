"""Hugging Face: balance two tasks of a small BERT encoder with the Trainer, then with accelerate.

A one-layer BERT encoder, randomly initialised from a config (no download), reads synthetic token
sequences; two heads on the [CLS] vector predict which third of the vocabulary is most frequent
(3-way classification, "topic") and the share of padding in the sequence (regression,
"padding"). Part 1 trains with `BalancedTrainer` (a transformers.Trainer), part 2 with a plain
accelerate loop in which `backward(accelerator, optimizer, losses)` replaces
``accelerator.backward``. Runs in seconds on a CPU; needs ``pip install gradbalance[huggingface]``.

    python examples/hf_multitask.py [--steps 60] [--method mgda] [--bf16] [--quick]

Launch with ``torchrun --nproc_per_node 2`` (or ``accelerate launch``) for DDP: both parts then
balance the global batch on every process.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from torch import nn

import gradbalance as gb
from gradbalance.integrations.huggingface import BalancedTrainer, backward, find_balancer

TASKS = ["topic", "padding"]
VOCAB, SEQ, BATCH = 48, 12, 32


class MultiTaskBert(nn.Module):
    """A tiny BERT encoder and one head per task; returns ``{"losses": {task: loss}}``."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=SEQ,
        )
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.topic = nn.Linear(32, 3)
        self.padding = nn.Linear(32, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        topic: torch.Tensor,
        padding: torch.Tensor,
    ) -> dict[str, Any]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = h[:, 0]
        return {
            "losses": {
                "topic": nn.functional.cross_entropy(self.topic(cls), topic),
                "padding": nn.functional.mse_loss(self.padding(cls).squeeze(-1), padding),
            }
        }


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences: token 0 is [CLS], the rest drawn mostly from one third of the vocabulary,
    then padding (token 0 with attention mask 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        third = int(torch.randint(0, 3, (), generator=g))
        length = int(torch.randint(4, SEQ + 1, (), generator=g))
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        favoured = torch.rand(SEQ, generator=g) < 0.6
        ids[favoured] = 1 + third * (VOCAB // 3) + ids[favoured] % (VOCAB // 3 - 1)
        ids[0], ids[length:] = 0, 0
        mask = (torch.arange(SEQ) < length).long()
        counts = torch.stack([((ids[1:length] - 1) // (VOCAB // 3) == k).sum() for k in range(3)])
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "topic": counts.argmax(),
                "padding": torch.tensor(1.0 - length / SEQ),
            }
        )
    return rows


def with_trainer(method: str, steps: int, bf16: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = MultiTaskBert()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=max(1, steps // 3),
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,  # the model's forward takes the task targets
            disable_tqdm=True,
        )
        trainer = BalancedTrainer(
            model=model,
            args=args,
            train_dataset=make_data(BATCH * steps, seed=1),
            tasks=TASKS,
            method=method,
            shared=model.encoder,  # gradient methods balance the encoder's gradients
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(
            f"  step {entry['step']:>3}: loss/topic {entry['loss/topic']:.3f}, "
            f"loss/padding {entry['loss/padding']:.3f}, weights "
            f"[{entry['weight/topic']:.3f}, {entry['weight/padding']:.3f}]"
        )
    return logs[-1]


def with_accelerate(method: str, steps: int, bf16: bool) -> gb.GradBalancer:
    # accelerate keeps one state per process: the same settings as the Trainer's accelerator
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no"
    )
    torch.manual_seed(0)
    model = MultiTaskBert()
    opt = gb.GradBalancer(
        torch.optim.AdamW(model.parameters(), lr=3e-3), method, shared=model.encoder, tasks=TASKS
    )
    loader = torch.utils.data.DataLoader(
        make_data(BATCH * steps, seed=2),
        batch_size=BATCH,
        collate_fn=transformers.default_data_collator,
    )
    ddp_model, opt, loader = accelerator.prepare(model, opt, loader)
    for step, batch in enumerate(loader):
        losses = ddp_model(**batch)["losses"]
        backward(accelerator, opt, losses)  # instead of accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 3) == 0 or step == steps - 1:
            balancer = find_balancer(opt)
            w = ", ".join(f"{v:.3f}" for v in balancer.last_weights.tolist())
            values = {t: float(v) for t, v in zip(TASKS, balancer.last_losses)}
            accelerator.print(
                f"  step {step + 1:>3}: loss/topic {values['topic']:.3f}, "
                f"loss/padding {values['padding']:.3f}, weights [{w}]"
            )
    return find_balancer(opt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per part (%(default)s)")
    parser.add_argument("--method", default="mgda", help="Trainer part's method (%(default)s)")
    parser.add_argument(
        "--accelerate-method", default="uncertainty", help="accelerate part's (%(default)s)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both parts")
    parser.add_argument("--quick", action="store_true", help="6 steps (for smoke tests)")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    print(f"part 1: transformers.Trainer + {args.method}, {steps} steps")
    last = with_trainer(args.method, steps, args.bf16)
    print(f"part 2: accelerate loop + {args.accelerate_method}, {steps} steps")
    balancer = with_accelerate(args.accelerate_method, steps, args.bf16)
    print(
        f"done: Trainer weights [{last['weight/topic']:.3f}, {last['weight/padding']:.3f}], "
        f"accelerate balancer steps {balancer.steps}"
    )


if __name__ == "__main__":
    main()
