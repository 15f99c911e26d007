"""The one seeding scheme (`gradbalance.methods._common.Seeded`): method state dicts written
before it replaced ``pcgrad.SeededOrders`` and ``rlw._Seeded`` load and draw what they drew,
seeds are validated as before, and the two streams keep their own defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods._common import Seeded, SeededOrders
from gradbalance.methods.graddrop import GradDrop
from gradbalance.methods.gradvac import GradVac
from gradbalance.methods.pcgrad import PCGrad
from gradbalance.methods.pcgrad import SeededOrders as ReExported
from gradbalance.methods.rlw import RLW

F64 = torch.float64
TASKS = ("a", "b", "c")
J = torch.tensor([[1.0, 0.2, 0.0, 0.3], [-0.7, 1.5, 0.1, 0.0], [-0.4, -0.9, 2.0, -0.2]], dtype=F64)
INPUTS = StepInputs(TASKS, torch.ones(3, dtype=F64), gramian=J @ J.T, step=4, jacobian=(J,))


def old_rng_state(seed: int, committed_steps: int, k: int = 3) -> torch.Tensor:
    """The ``rng_state`` the old ``SeededOrders`` saved: its generator seeded with ``seed``,
    advanced by one ``(K, K)`` float64 draw per committed step."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(committed_steps):
        torch.rand(k, k, generator=gen, dtype=F64)
    return gen.get_state()


# The state dicts below have the exact layout the code before the seeding scheme wrote
# (``{"_extra_state": {"tasks", "rng_state" | "seed"}}`` plus GradVac's ``targets``); the
# expected numbers were printed by that code after loading them.
def test_old_pcgrad_state_dict_loads_and_draws_the_same_orders():
    m = PCGrad(seed=0)
    m.load_state_dict({"_extra_state": {"tasks": list(TASKS), "rng_state": old_rng_state(5, 2)}})
    assert m.tasks == TASKS
    assert m.orders(3).tolist() == [[1, 2, 0], [1, 2, 0], [2, 1, 0]]
    expected = torch.tensor([2.13069307884633, 1.461818181818182, 1.3266557793503901], dtype=F64)
    assert torch.equal(m.weights(INPUTS), expected)
    assert sorted(m.state_dict()["_extra_state"]) == ["rng_state", "tasks"]


def test_old_gradvac_state_dict_loads_and_gives_the_same_weights():
    targets = torch.tensor(
        [
            [0.0, -0.18579654630607345, -0.2171892533372996],
            [-0.18373701294564143, 0.0, -0.1930271886921176],
            [-0.20173588260219927, -0.21339264774764896, 0.0],
        ],
        dtype=F64,
    )
    m = GradVac(seed=0)
    m.load_state_dict(
        {
            "targets": targets,
            "_extra_state": {"tasks": list(TASKS), "rng_state": old_rng_state(5, 2)},
        }
    )
    assert torch.equal(m.targets, targets)
    expected = torch.tensor([1.253707830154497, 1.0571655144220915, 1.0639633699507083], dtype=F64)
    assert torch.equal(m.weights(INPUTS), expected)
    assert sorted(m.state_dict()) == ["_extra_state", "targets"]


def test_old_rlw_state_dict_loads_its_seed():
    m = RLW(seed=0)
    m.load_state_dict({"_extra_state": {"tasks": list(TASKS), "seed": 7}})
    assert m.seed == 7 and m.tasks == TASKS
    expected = torch.tensor(
        [0.6500325790261009, 0.26473546793972363, 0.08523195303417543], dtype=F64
    )
    assert torch.equal(m.weights(INPUTS), expected)
    assert m.state_dict()["_extra_state"] == {"tasks": list(TASKS), "seed": 7}


def test_old_graddrop_state_dict_loads_its_seed():
    m = GradDrop(seed=0)
    m.load_state_dict({"_extra_state": {"tasks": list(TASKS), "seed": 7}})
    assert m.seed == 7
    (d,) = m.combine(INPUTS, m.weights(INPUTS))
    assert torch.equal(d, torch.tensor([1.0, -0.9, 2.1, 0.3], dtype=F64))
    assert m.state_dict()["_extra_state"] == {"tasks": list(TASKS), "seed": 7}


# ---------------------------------------------------------------------------- the scheme
def test_stochastic_methods_derive_from_the_one_scheme():
    for name in gb.methods.available():
        cls = gb.methods.get_class(name)
        if cls.__module__.startswith("gradbalance.methods.") and cls.stochastic:
            assert issubclass(cls, Seeded), name
    assert ReExported is SeededOrders
    assert PCGrad.stream == GradVac.stream == "running"
    assert RLW.stream == GradDrop.stream == "step"


def test_default_seeds_per_stream():
    torch.manual_seed(21)
    before = torch.rand(2)
    torch.manual_seed(21)
    assert PCGrad().seed == torch.initial_seed()  # does not touch the global generator
    assert torch.equal(torch.rand(2), before)
    torch.manual_seed(21)
    seed = RLW().seed  # drawn from the global generator
    torch.manual_seed(21)
    assert seed == int(torch.randint(0, 2**62, (), dtype=torch.int64))


@pytest.mark.parametrize("cls", [PCGrad, GradVac, RLW, GradDrop])
@pytest.mark.parametrize("bad", [1.5, True, "3"])
def test_a_seed_of_the_wrong_type_is_an_option_type_error(cls, bad):
    with pytest.raises(gb.OptionError, match="seed") as info:
        cls(seed=bad)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_negative_seeds_only_for_the_running_stream():
    assert PCGrad(seed=-3).seed == -3
    with pytest.raises(gb.OptionError, match="non-negative"):
        RLW(seed=-3)
    assert RLW(seed=np.int64(4)).seed == 4 and isinstance(RLW(seed=np.int64(4)).seed, int)


def test_a_step_stream_has_no_running_generator_and_streams_are_checked():
    with pytest.raises(RuntimeError, match="per step"):
        RLW(seed=0).running_generator()
    with pytest.raises(TypeError, match="stream"):

        class Bad(Seeded):
            stream = "sometimes"
