"""QM9MPNN: shapes, padding, permutation and rigid-motion invariance, the cutoff, the sum over
atoms, gradient flow to the shared trunk, the registry entry and the balancer's engines."""

from __future__ import annotations

import math

import pytest
import torch

import gradbalance as gb
from gradbalance.losses import task_loss
from gradbalance.models import QM9_TARGETS, QM9_TASKS, QM9MPNN
from tests.models.helpers import molecules

# ethanol-like geometry (Å): C, C, O and six H
ETHANOL = torch.tensor(
    [
        [6, -0.0011, 0.5584, -0.0000],
        [6, -1.2153, -0.3540, 0.0000],
        [8, 1.1882, -0.2233, 0.0000],
        [1, -0.0330, 1.2077, 0.8798],
        [1, -0.0330, 1.2077, -0.8798],
        [1, -2.1343, 0.2341, 0.0000],
        [1, -1.2166, -1.0043, 0.8795],
        [1, -1.2166, -1.0043, -0.8795],
        [1, 1.9656, 0.3380, 0.0000],
    ]
)


def padded(atoms: torch.Tensor, rows: int = 29) -> torch.Tensor:
    """One molecule ``(n, 4)`` as a padded batch of one ``(1, rows, 4)``."""
    x = torch.zeros(1, rows, 4)
    x[0, : atoms.shape[0]] = atoms
    return x


def model(**kw) -> QM9MPNN:
    torch.manual_seed(0)
    return gb.models.create("qm9-mpnn", width=kw.pop("width", 0.5), **kw).eval()


def stacked(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(out.values()), dim=1)


def random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))  # orthogonal; det ±1 (reflections included)


def test_default_tasks_and_output_shapes():
    net = model()
    assert list(net.tasks) == list(QM9_TARGETS) and len(QM9_TARGETS) == 11
    assert dict(net.tasks) == dict(QM9_TASKS)
    out = net(molecules(5))
    assert list(out) == list(QM9_TARGETS)
    assert all(tuple(v.shape) == (5, 1) for v in out.values())
    # the regression loss takes (B,) targets against these (B, 1) predictions
    loss = task_loss(net.tasks["u0"], out["u0"], torch.zeros(5))
    assert loss.dim() == 0


def test_configured_tasks_and_options():
    net = model(tasks=["gap", "u0"], width=1.0, interactions=2, cutoff=4.0, rbf=8, filters=4)
    assert {t: (s.kind, s.channels) for t, s in net.tasks.items()} == {
        "gap": ("regression", 1),
        "u0": ("regression", 1),
    }
    assert net.hidden == 64 and net.filters == 4 and len(net.blocks) == 2
    assert tuple(net.centres.shape) == (8,) and float(net.centres[-1]) == 4.0
    assert tuple(net(molecules(3))["gap"].shape) == (3, 1)
    assert model(width=1 / 16).filters == 4  # gcd(8, 4): each filter serves whole channels
    per_channel = model(width=1.0, filters=64)  # SchNet's one filter per channel
    assert per_channel.filters == 64 and torch.isfinite(stacked(per_channel(molecules(2)))).all()


def test_padding_rows_are_ignored_even_with_garbage_coordinates():
    net = model()
    ref = net(padded(ETHANOL, 9))
    x = padded(ETHANOL, 29)
    x[0, 9:, 1:] = torch.randn(20, 3) * 100  # Z = 0 rows with arbitrary coordinates
    x[0, 10, 1:] = torch.tensor([math.inf, -math.inf, math.nan])
    torch.testing.assert_close(stacked(net(x)), stacked(ref))
    # padding interleaved with the atoms (no trailing rows to drop) gives the same again
    spread = torch.zeros(1, 29, 4)
    spread[0, ::3][:9] = ETHANOL
    spread[0, 1::3, 1:] = 7.0
    torch.testing.assert_close(stacked(net(spread)), stacked(ref))


def test_each_molecule_is_independent_of_its_batch():
    net = model()
    x = molecules(6)
    together = stacked(net(x))
    alone = torch.cat([stacked(net(x[i : i + 1])) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_of_the_atoms(seed):
    net = model()
    x = padded(ETHANOL)
    order = torch.randperm(29, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(stacked(net(x[:, order])), stacked(net(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_reflection_and_translation(seed):
    net = model()
    x = padded(ETHANOL)
    moved = x.clone()
    shift = torch.randn(3, generator=torch.Generator().manual_seed(seed + 10)) * 5
    moved[0, :9, 1:] = ETHANOL[:, 1:] @ random_rotation(seed).T + shift
    torch.testing.assert_close(stacked(net(moved)), stacked(net(x)), rtol=1e-4, atol=1e-4)


def test_geometry_matters():
    net = model()
    x = padded(ETHANOL)
    stretched = x.clone()
    stretched[0, :, 1:] *= 1.2
    assert not torch.allclose(stacked(net(stretched)), stacked(net(x)), atol=1e-4)


def test_fragments_beyond_the_cutoff_add_up():
    # no message crosses the cutoff and the readout is a sum: features of two fragments far
    # apart are the sum of each fragment's features
    net = model(cutoff=5.0)
    a, b = ETHANOL[:3].clone(), ETHANOL[3:].clone()
    b[:, 1] += 20.0
    both = net.encode(padded(torch.cat([a, b])))
    apart = net.encode(padded(a)) + net.encode(padded(b))
    torch.testing.assert_close(both, apart, rtol=1e-5, atol=1e-5)


def test_the_cutoff_is_smooth():
    net = model(cutoff=3.0)
    pair = torch.tensor([[6.0, 0.0, 0.0, 0.0], [8.0, 0.0, 0.0, 0.0]])
    features = []
    for r in (3.0 - 1e-3, 3.0 + 1e-3):
        pair[1, 1] = r
        features.append(net.encode(padded(pair)))
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=1e-5)


def test_every_task_reaches_every_shared_parameter():
    net = model().train()
    x = molecules(4)
    x[0, :3, 0] = torch.tensor([1.0, 6.0, 7.0])  # every element, so each embedding row is hit
    x[1, :3, 0] = torch.tensor([8.0, 9.0, 6.0])
    out = net(x)
    shared = dict(net.named_parameters())
    shared_ids = {id(p) for p in net.shared_parameters()}
    names = [n for n, p in shared.items() if id(p) in shared_ids]
    assert names and all(n.startswith(("embedding.", "blocks.", "atomwise.")) for n in names)
    for t in net.tasks:
        grads = torch.autograd.grad(out[t].sum(), [shared[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads, strict=True):
            assert g is not None and bool(g.abs().sum() > 0), (t, n)


def test_partition_and_last_shared_layer():
    net = model()
    assert [id(p) for p in net.last_shared_parameters()] == [
        id(p) for p in net.atomwise.parameters()
    ]
    for t in net.tasks:
        assert [id(p) for p in net.task_parameters(t)] == [id(p) for p in net.heads[t].parameters()]
    x = molecules(3)
    z = net.encode(x)
    assert tuple(z.shape) == (3, net.hidden)
    torch.testing.assert_close(stacked(net.decode(z)), stacked(net(x)))


def test_registry_entry():
    assert "qm9-mpnn" in gb.models.available()
    assert isinstance(gb.models.create("QM9_MPNN", width=0.25), QM9MPNN)
    info = gb.models.describe("qm9-mpnn")
    assert info.model_class is QM9MPNN and info.has_shared_features
    assert info.accepts_width and info.required_options == ()
    assert info.summary.startswith("SchNet-style message passing")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(2, 29, 3), r"\(B, N, 4\)"),
        (torch.zeros(29, 4), r"\(B, N, 4\)"),
        (padded(torch.tensor([[10.0, 0.0, 0.0, 0.0]])), "atomic numbers 1..9"),
        (padded(torch.tensor([[6.5, 0.0, 0.0, 0.0]])), "atomic numbers 1..9"),
        (padded(torch.tensor([[-1.0, 0.0, 0.0, 0.0]])), "atomic numbers 1..9"),
    ],
)
def test_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        model()(x)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"interactions": 0}, ValueError),
        ({"rbf": 2.5}, ValueError),
        ({"filters": True}, ValueError),
        ({"cutoff": 0.0}, ValueError),
        ({"cutoff": math.inf}, ValueError),
        ({"width": 0}, ValueError),
        ({"tasks": {"depth": 1}}, ValueError),  # per-pixel kinds are refused
    ],
)
def test_bad_options(kw, error):
    with pytest.raises(error):
        QM9MPNN(**kw)


def test_double_precision_and_integer_inputs():
    net = model().double()
    x = padded(ETHANOL).double()
    out = net(x)
    assert all(v.dtype == torch.float64 for v in out.values())
    whole = padded(ETHANOL)
    whole[0, :, 1:] = whole[0, :, 1:].round()  # integer coordinates, to compare exactly
    as_float = model()(whole)
    as_int = model()(whole.long())
    torch.testing.assert_close(stacked(as_int), stacked(as_float))


def _balanced_grads(method: str, engine: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    x = molecules(4)
    y = torch.randn(4, 11, generator=torch.Generator().manual_seed(3))
    net = model().train()
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.0), method, shared=net, engine=engine
    )
    z = net.encode(x)
    out = net.decode(z)
    losses = {t: task_loss(s, out[t], y[:, k]) for k, (t, s) in enumerate(net.tasks.items())}
    opt.zero_grad()
    weights = opt.backward(losses, features=z)
    return [p.grad.clone() for p in net.parameters()], weights


def test_chained_engine_matches_the_loop():
    """The chained engine (one vmapped backward through the trunk) runs on this model and
    gives the per-task loop's gradients."""
    chained, w_chained = _balanced_grads("imtl-g", "chained")
    loop, w_loop = _balanced_grads("imtl-g", "loop")
    torch.testing.assert_close(w_chained, w_loop, rtol=1e-3, atol=1e-5)
    for a, b in zip(chained, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_mgda_ub_on_the_shared_features():
    grads, weights = _balanced_grads("mgda-ub", "representation")
    assert weights.shape == (11,) and bool(torch.isfinite(weights).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_learns_a_small_set():
    torch.manual_seed(0)
    net = QM9MPNN(["size", "spread"], width=0.5)
    x = molecules(32, generator=torch.Generator().manual_seed(5))
    atoms = (x[..., 0] > 0).float()
    count = atoms.sum(1)
    centre = (x[..., 1:] * atoms.unsqueeze(-1)).sum(1) / count.unsqueeze(-1)
    spread = ((x[..., 1:] - centre.unsqueeze(1)).pow(2).sum(-1) * atoms).sum(1)  # like <R²>
    y = torch.stack([count, spread], 1)
    y = (y - y.mean(0)) / y.std(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        out = net(x)
        return sum(task_loss(s, out[t], y[:, k]) for k, (t, s) in enumerate(net.tasks.items()))

    first = float(loss().detach())
    for _ in range(150):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.1 * first
