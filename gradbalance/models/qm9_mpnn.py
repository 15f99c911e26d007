"""QM9MPNN: a small SchNet-style message-passing network for QM9's molecular properties.

References:
    Gilmer, Schoenholz, Riley, Vinyals, Dahl. *Neural Message Passing for Quantum Chemistry.*
    ICML 2017 (the message-passing framing: messages from neighbours, an update, a readout).

    Schütt, Kindermans, Sauceda, Chmiela, Tkatchenko, Müller. *SchNet: A continuous-filter
    convolutional neural network for modeling quantum interactions.* NeurIPS 2017 (the
    continuous-filter interaction blocks, the Gaussian distance expansion, the shifted softplus
    and the sum over atoms).

    Behler. *Atom-centered symmetry functions for constructing high-dimensional neural network
    potentials.* J. Chem. Phys. 134, 074106 (2011) (the cosine cutoff function).

Input: a padded batch ``x`` of shape ``(B, N, 4)`` (``N = 29`` for QM9, any ``N`` works): column
0 the atomic number ``Z`` (0 on padding rows), columns 1-3 the coordinates in Å. The real atoms
are ``x[..., 0] > 0``. What the network computes, with hidden size ``F = 64 · width``, ``K``
Gaussians and ``G`` radial filters per block (``G`` divides ``F``):

```text
h_i   = Embedding(Z_i)                                               (F)
e_ijk = exp(-(d_ij - μ_k)² / (2δ²)) · ½(cos(π d_ij / r_c) + 1)      k = 1..K, for the pairs
        i ≠ j of real atoms with d_ij < r_c, zero otherwise; the μ_k evenly spaced on
        [0, r_c], δ their spacing
T interaction blocks (continuous-filter convolution, residual update):
    y_j  = Linear(h_j)                                               (no bias)
    W_ij = A e_ij                                                    (A: G × K, per block)
    m_i  = Σ_j W_ij ⊙ y_j          (filter g acts on channels g·F/G .. (g+1)·F/G - 1)
    h_i  = h_i + Linear(ssp(Linear(m_i)))
z     = Σ_{i real} ssp(Linear(h_i))                                  (the shared features)
out_t = Linear_t(z)                                                  (one head per target)
```

``ssp(x) = softplus(x) - log 2`` is SchNet's shifted softplus. Distances are the only geometric
input, so the outputs are invariant to translations, rotations and reflections of a molecule
and, the sums being over atoms, to the order of its atoms; padding rows take no part. No
gradient flows to the coordinates (the model predicts properties, not forces).

Deviations, all for speed on a CPU:

- The multi-task QM9 experiments of Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al.,
  NeurIPS 2023) use PyTorch Geometric's MPNN of Gilmer et al. (``dim = 64``: an edge network,
  ``NNConv`` with mean aggregation, a GRU update over three steps, a Set2Set readout and a
  shared linear layer before the heads), reading PyG's eleven atom features and its bond
  features. This model is a lighter SchNet-style variant with sum pooling, reading only the
  atom types and the coordinates, so that a short training run fits on a laptop CPU; its
  absolute errors are not comparable with those papers'.
- SchNet generates a filter per channel (``G = F``) with two dense layers and shifted softplus
  on 300 Gaussians (0-30 Å, 0.1 Å apart) over all pairs of atoms. Here a filter is a linear
  combination of ``K = 16`` Gaussians (0-5 Å) times Behler's cosine cutoff, and ``G = 8``
  filters are each shared by ``F / G`` channels (``filters=64`` at ``width=1`` gives one per
  channel). A combination of Gaussians is already a smooth radial function at the basis
  resolution; sharing lets the messages be ``G`` batched ``N × N`` matrix products per
  molecule rather than per-pair, per-channel products.
- SchNet's readout gives one value per atom and sums them (one target); here the sum of the
  atoms' ``F`` features is shared by every task, each reading it with its own linear head.
- Nothing is normalised: no division by the number of neighbours, no feature normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.models.base import (
    Member,
    MultiTaskModel,
    TasksLike,
    TaskSpec,
    check_width,
    parse_tasks,
    scaled,
)

__all__ = ["QM9MPNN", "QM9_TARGETS", "QM9_TASKS"]

#: QM9's eleven standard targets, in the order of the MTL papers (μ, α, ε_HOMO, ε_LUMO, ⟨R²⟩,
#: ZPVE, U0, U, H, G, c_v).
QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u298", "h298", "g298", "cv")
#: The eleven targets as tasks: one scalar regression each.
QM9_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {name: TaskSpec("regression", 1) for name in QM9_TARGETS}
)


def shifted_softplus(x: Tensor) -> Tensor:
    """SchNet's activation ``softplus(x) - log 2`` (zero at zero).

    Examples:
        >>> float(shifted_softplus(torch.zeros(1)))
        0.0
    """
    return F.softplus(x) - math.log(2.0)


class _Interaction(nn.Module):
    """One continuous-filter interaction block: ``h + Linear(ssp(Linear(cfconv(h))))``, with
    ``filters`` radial filters, each shared by ``F / filters`` consecutive channels."""

    def __init__(self, hidden: int, rbf: int, filters: int) -> None:
        super().__init__()
        self.filters = filters
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.filter = nn.Linear(rbf, filters, bias=False)
        self.out1 = nn.Linear(hidden, hidden)
        self.out2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, w: Tensor) -> Tensor:
        """``h`` ``(B, N, F)``; ``w`` ``(G·B, N, N)``: this block's filter matrices ``W_ij``,
        filter-major (zero for pairs that do not interact)."""
        b, n, f = h.shape
        g = self.filters
        y = self.in2f(h).reshape(b, n, g, f // g).permute(2, 0, 1, 3).reshape(g * b, n, f // g)
        m = torch.bmm(w, y).reshape(g, b, n, f // g).permute(1, 2, 0, 3).reshape(b, n, f)
        return h + self.out2(shifted_softplus(self.out1(m)))


class QM9MPNN(MultiTaskModel):
    """SchNet-style message passing on padded molecules, with one linear head per QM9 target.

    The trunk (atom embedding, ``interactions`` continuous-filter blocks on Gaussian-expanded
    interatomic distances, an atom-wise layer and a sum over the real atoms) is hard-shared;
    its output ``(B, F)`` is the shared representation (`encode`; `decode` applies the heads).
    Inputs are ``(B, N, 4)``: atomic number (0 for padding), then x, y, z in Å.

    Args:
        tasks: the targets; default `QM9_TASKS` (eleven scalar regressions). Names alone are
            read as one-channel regressions; per-sample kinds only (no per-pixel task).
        width: multiplier of the hidden size ``F`` (64 at ``width=1``), as for the other zoo
            models.
        interactions: number of interaction blocks ``T``.
        cutoff: the cutoff radius ``r_c`` in Å; pairs at or beyond it exchange no message.
        rbf: number ``K`` of Gaussians in the distance expansion (centres on ``[0, r_c]``).
        filters: radial filters ``G`` per block, each serving ``F / G`` channels; the greatest
            common divisor of ``filters`` and ``F`` is used (``F`` gives SchNet's one filter
            per channel, at a higher cost).
        max_z: the largest atomic number accepted (9, fluorine, for QM9).

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.create("qm9-mpnn", width=0.25).eval()
        >>> x = torch.zeros(2, 29, 4)
        >>> x[:, :3, 0] = torch.tensor([8.0, 1.0, 1.0])  # water, twice
        >>> x[:, :3, 1:] = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
        >>> out = model(x)
        >>> len(out), tuple(out["u0"].shape)
        (11, (2, 1))
        >>> torch.testing.assert_close(out["u0"][0], out["u0"][1])
    """

    has_shared_features = True
    centres: Tensor  # the Gaussians' centres μ_k (a buffer)

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        width: float = 1.0,
        interactions: int = 3,
        cutoff: float = 5.0,
        rbf: int = 16,
        filters: int = 8,
        max_z: int = 9,
    ) -> None:
        super().__init__(
            parse_tasks(tasks, default=QM9_TASKS, default_kind="regression", default_channels=1)
        )
        dense = [t for t, s in self.tasks.items() if s.dense]
        if dense:
            raise ValueError(f"QM9MPNN predicts per molecule; task(s) {dense} are per-pixel")
        checked = (
            ("interactions", interactions),
            ("rbf", rbf),
            ("filters", filters),
            ("max_z", max_z),
        )
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (0 < float(cutoff) < math.inf):
            raise ValueError(f"cutoff must be positive and finite (Å), got {cutoff}")
        hidden = scaled(64, check_width(width))
        self.hidden, self.cutoff, self.max_z = hidden, float(cutoff), max_z
        self.filters = math.gcd(filters, hidden)  # each filter serves F / filters channels
        centres = torch.linspace(0.0, self.cutoff, rbf)
        self.register_buffer("centres", centres, persistent=False)
        spacing = self.cutoff / max(rbf - 1, 1)
        self.gamma = 1.0 / (2.0 * spacing * spacing)
        self.embedding = nn.Embedding(max_z + 1, hidden, padding_idx=0)
        self.blocks = nn.ModuleList(
            _Interaction(hidden, rbf, self.filters) for _ in range(interactions)
        )
        self.atomwise = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(hidden, spec.channels) for t, spec in self.tasks.items()}
        )

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                "QM9MPNN expects padded molecules of shape (B, N, 4) (atomic number, x, y, z), "
                f"got {shape}"
            )
        if not x.is_floating_point():
            x = x.float()
        z = x[..., 0]
        if bool(((z < 0) | (z > self.max_z) | (z != z.round())).any()):
            raise ValueError(
                f"column 0 must hold atomic numbers 1..{self.max_z} (0 for padding), got values "
                f"in [{float(z.min()):g}, {float(z.max()):g}]"
            )
        return x

    def _prepare(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The expanded distances ``e`` ``(K, B·N'·N')`` (``e[k, (b·N' + i)·N' + j]`` is
        ``e_ijk`` of molecule ``b``), the atomic numbers ``(B, N')`` (long) and the mask of
        real atoms ``(B, N')``.

        ``e_ijk`` is zero unless ``i ≠ j`` are real atoms closer than the cutoff. Padding rows
        may hold any coordinates (even non-finite ones); trailing padding rows that no molecule
        of the batch needs are dropped (``N' ≤ N``).
        """
        x = self._check(x)
        atoms = x[..., 0] > 0
        used = int(atoms.sum(1).max()) if atoms.numel() else 0
        if not bool(atoms[:, used:].any()):
            x, atoms = x[:, :used], atoms[:, :used]
        n = atoms.shape[1]
        pos = x[..., 1:].detach()
        pairs = atoms.unsqueeze(2) & atoms.unsqueeze(1)
        pairs &= ~torch.eye(n, dtype=torch.bool, device=x.device)
        d = (pos.unsqueeze(2) - pos.unsqueeze(1)).norm(dim=-1)
        pairs &= d < self.cutoff
        d = torch.where(pairs, d, torch.full_like(d, self.cutoff)).reshape(1, -1)
        # no gradient flows to the coordinates, so the expansion is built in place
        envelope = torch.cos(d * (math.pi / self.cutoff)).add_(1.0).mul_(0.5)
        envelope.mul_(pairs.reshape(1, -1))
        # the exponent is clamped so that far tails stay normal floats (denormals are slow)
        e = (d - self.centres.unsqueeze(-1)).square_().mul_(-self.gamma).clamp_(min=-30.0)
        e = e.exp_().mul_(envelope)
        z = x[..., 0].round().long() * atoms
        return e.to(self.embedding.weight.dtype), z, atoms

    def encode(self, x: Tensor) -> Tensor:
        """The pooled molecule features ``(B, F)``: the sum over real atoms of the trunk's
        atom-wise output."""
        e, z, atoms = self._prepare(x)
        n = atoms.shape[1]
        h = self.embedding(z)
        # every block's filter matrices W_ij from one product with the expansion
        a = torch.cat([cast(_Interaction, block).filter.weight for block in self.blocks])
        w = (a @ e).reshape(len(self.blocks), -1, n, n)
        for block, w_block in zip(self.blocks, w.unbind(0), strict=True):
            h = block(h, w_block)
        per_atom = shifted_softplus(self.atomwise(h))
        return (per_atom * atoms.unsqueeze(-1).to(per_atom.dtype)).sum(dim=1)

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        """Each target's prediction ``(B, channels)`` from the pooled features."""
        return {t: self.heads[t](features) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def _shared_members(self) -> list[Member]:
        return [self.embedding, self.blocks, self.atomwise]

    def _task_members(self, task: str) -> list[Member]:
        return [self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        return [self.atomwise]
