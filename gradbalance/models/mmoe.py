"""MMoE: Multi-gate Mixture-of-Experts for tabular and recommendation data.

Reference:
    Ma, Zhao, Yi, Chen, Hong, Chi. *Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts.* KDD 2018.

``E`` shared expert networks ``f_e`` and, per task ``k``, a softmax gate over the experts and a
tower ``h^k``:

```text
g^k(x) = softmax(W_{g,k} x)                 (E weights summing to one)
y_k    = h^k( Σ_e g^k(x)_e f_e(x) )
```

The experts are shared; each task owns its gate and tower. The gates read the input directly,
so no single tensor carries everything the heads read from the shared part, and
`has_shared_features` is ``False``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradbalance.models.base import Member, MultiTaskModel, TasksLike, TaskSpec, parse_tasks

__all__ = ["CENSUS_TASKS", "MMoE"]

#: The MMoE paper's UCI census-income tasks: income above 50K and marital status (binary).
CENSUS_TASKS = {
    "income": TaskSpec("classification", 2),
    "marital": TaskSpec("classification", 2),
}


def _mlp(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts.

    Args:
        tasks: per-sample tasks (``classification`` or ``regression``); default the census
            tasks `CENSUS_TASKS`. Names that are not standard kinds default to
            classification when given a class count.
        in_features: input features; inputs of shape `(B, *)` with `in_features` values per
            sample (e.g. images) are flattened.
        num_experts: ``E``.
        expert_hidden: hidden sizes of each expert MLP (``Linear-ReLU`` layers); its last size
            is the expert output size.
        tower_hidden: hidden sizes of each task tower before its output layer.
        dropout: dropout after each hidden layer.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.MMoE(in_features=10, num_experts=4)
        >>> out = model(torch.randn(5, 10))
        >>> {t: tuple(v.shape) for t, v in out.items()}
        {'income': (5, 2), 'marital': (5, 2)}
        >>> g = model.gates(torch.randn(5, 10))["income"]
        >>> bool(torch.allclose(g.sum(-1), torch.ones(5)))
        True
    """

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        in_features: int,
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(parse_tasks(tasks, default=CENSUS_TASKS, default_kind="classification"))
        dense = [t for t, s in self.tasks.items() if s.dense]
        if dense:
            raise ValueError(f"MMoE predicts per sample; task(s) {dense} are per-pixel kinds")
        if in_features < 1 or num_experts < 1 or not expert_hidden:
            raise ValueError(
                "in_features and num_experts must be positive and expert_hidden non-empty"
            )
        self.in_features = in_features
        self.experts = nn.ModuleList(
            _mlp([in_features, *expert_hidden], dropout) for _ in range(num_experts)
        )
        self.gate = nn.ModuleDict({t: nn.Linear(in_features, num_experts) for t in self.tasks})
        out = expert_hidden[-1]
        self.towers = nn.ModuleDict(
            {
                t: nn.Sequential(
                    _mlp([out, *tower_hidden], dropout),
                    nn.Linear(tower_hidden[-1] if tower_hidden else out, spec.channels),
                )
                for t, spec in self.tasks.items()
            }
        )

    def _check(self, x: Tensor) -> Tensor:
        """``x`` as ``(B, in_features)``: inputs ``(B, *)`` (images) are flattened."""
        if isinstance(x, Tensor) and x.dim() > 2:
            x = x.flatten(1)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"MMoE expects inputs of shape (B, {self.in_features}) (or (B, *) with "
                f"{self.in_features} values per sample, flattened), got {shape}"
            )
        return x

    def gates(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's gate weights over the experts, ``(B, E)``."""
        x = self._check(x)
        return {t: torch.softmax(self.gate[t](x), dim=-1) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self._check(x)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, H)
        out = {}
        for t, g in self.gates(x).items():
            mixed = torch.einsum("be,beh->bh", g, experts)
            out[t] = self.towers[t](mixed)
        return out

    def _shared_members(self) -> list[Member]:
        return [self.experts]

    def _task_members(self, task: str) -> list[Member]:
        return [self.gate[task], self.towers[task]]

    def _last_shared_members(self) -> list[Member]:
        # each expert is an nn.Sequential of Linear/ReLU(/Dropout) layers (see _mlp)
        return [[m for m in e.children() if isinstance(m, nn.Linear)][-1] for e in self.experts]
