"""Helpers shared by several methods: the checked Gramian, and the one seeding scheme.

Methods import what they share from here, never from a sibling method's module.

**Seeding.** Every stochastic method derives from `Seeded`: its random numbers all come from
one integer ``seed`` (validated by `check_seed`, shown in the repr, carried by
``state_dict``), through one of two streams, chosen by the class attribute `Seeded.stream`:

- ``"step"``: the draws of a step are a pure function of ``(seed, StepInputs.step)``
  (`step_rng`, `step_torch_seed`), so computing the weights twice, retrying a skipped step or
  resuming from a checkpoint all give the same numbers. ``state_dict`` carries the ``seed``.
  The default seed is drawn from torch's global generator. (RLW, GradDrop.)
- ``"running"``: the draws come from a `torch.Generator` seeded with ``seed`` and advanced
  only by `update` (`Seeded.running_generator`); ``state_dict`` carries the generator state
  ``rng_state``. The default seed is ``torch.initial_seed()``. (PCGrad, GradVac.)

Both streams follow ``torch.manual_seed`` when no seed is given, and both keep the exact draws
and checkpoint format of the classes they replace (``pcgrad.SeededOrders``, ``rlw._Seeded``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from gradbalance.errors import MissingInputError, OptionError, OptionTypeError
from gradbalance.methods.base import Method, StepInputs

__all__ = [
    "STREAMS",
    "Seeded",
    "SeededOrders",
    "check_seed",
    "checked_gramian",
    "draw_seed",
    "join_repr",
    "require_gramian",
    "step_rng",
    "step_torch_seed",
    "task_orders",
]


# ---------------------------------------------------------------------------- the Gramian
def require_gramian(inputs: StepInputs, name: str) -> Tensor:
    """``inputs.gramian`` as given, or `MissingInputError` naming the method ``name``."""
    g = inputs.gramian
    if g is None:
        raise MissingInputError(
            f"{name} needs the Gramian of the task gradients (StepInputs.gramian); use it "
            "through GradBalancer with shared=... or pass gramian= to StepInputs"
        )
    return g


def checked_gramian(inputs: StepInputs, name: str) -> Tensor:
    """``inputs.gramian`` checked (present, ``(K, K)``), detached, float64 and symmetrised.

    Raises:
        MissingInputError: the Gramian is missing; the message names the method ``name``.
        ValueError: the Gramian does not have shape ``(K, K)``.
    """
    g = require_gramian(inputs, name)
    k = inputs.num_tasks
    if g.shape != (k, k):
        raise ValueError(f"{name}: got a Gramian of shape {tuple(g.shape)} for {k} tasks")
    g = g.detach().to(torch.float64)
    return 0.5 * (g + g.mT)


# ---------------------------------------------------------------------------- repr
def join_repr(*parts: str) -> str:
    """The parts of an ``extra_repr`` joined with ``", "``, empty ones (an unbound method's
    base repr) left out."""
    return ", ".join(part for part in parts if part)


# ---------------------------------------------------------------------------- seeds
#: The two ways a `Seeded` method consumes its seed (see the module docstring).
STREAMS = ("step", "running")


def check_seed(seed: Any, *, non_negative: bool = True) -> int:
    """``seed`` as an ``int``, or an `OptionError` naming it.

    A bool or a non-integer raises `OptionTypeError` (also a ``TypeError``). ``non_negative``:
    negative seeds raise `OptionError` (``numpy.random.SeedSequence`` needs ``seed >= 0``;
    a `torch.Generator` takes any 64-bit seed).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        kind = "a non-negative int" if non_negative else "an int"
        raise OptionTypeError(f"seed must be {kind} or None, got {seed!r}")
    if non_negative and int(seed) < 0:
        raise OptionError(f"seed must be a non-negative int or None, got {seed!r}")
    return int(seed)


def draw_seed() -> int:
    """A seed drawn from torch's global generator, so ``torch.manual_seed`` makes it repeatable."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of step ``step``: a pure function of ``(seed, step)``.

    Counter-based seeding (``numpy.random.SeedSequence([seed, step])``) makes the draws of a step
    independent of how many draws earlier steps made, so computing the weights twice, skipping
    a step or resuming from a checkpoint all give the same numbers.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, int(step)]))


def step_torch_seed(seed: int, step: int) -> int:
    """A 64-bit seed for a ``torch.Generator`` of step ``step`` (pure function of both)."""
    state = np.random.SeedSequence([seed, int(step)]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def task_orders(k: int, generator: torch.Generator) -> Tensor:
    """``(K, K)`` long tensor: row ``i`` is a random permutation of the task indices."""
    return torch.rand(k, k, generator=generator, dtype=torch.float64).argsort(dim=1)


class Seeded(Method):
    """A method whose random numbers all derive from one integer ``seed``.

    Subclasses set `stream` (``"step"`` by default) and draw with `step_rng` /
    `step_torch_seed` (``"step"``) or from `running_generator` (``"running"``); see the
    module docstring. The seed (``"step"``) or the generator state (``"running"``) is part of
    the method's ``extra_state``, so ``state_dict`` / ``load_state_dict`` resume the same draws.

    Args:
        seed: an int (non-negative for the ``"step"`` stream), or ``None`` for the stream's
            default (one that ``torch.manual_seed`` makes repeatable).
    """

    #: How the method consumes its seed: ``"step"`` or ``"running"``.
    stream: ClassVar[str] = "step"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.stream not in STREAMS:
            raise TypeError(f"{cls.__name__}.stream must be one of {STREAMS}, got {cls.stream!r}")

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._generator: torch.Generator | None = None
        if self.stream == "step":
            self.seed = draw_seed() if seed is None else check_seed(seed)
        else:
            self.seed = (
                int(torch.initial_seed()) if seed is None else check_seed(seed, non_negative=False)
            )
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(self.seed)

    def running_generator(self, *, commit: bool = False) -> torch.Generator:
        """The ``"running"`` stream: the method's generator when ``commit`` (draws advance it;
        only `update` commits), else a copy of it (draws leave the method unchanged)."""
        if self._generator is None:
            raise RuntimeError(f"{type(self).__name__} draws per step, it has no running stream")
        if commit:
            return self._generator
        gen = torch.Generator(device="cpu")
        gen.set_state(self._generator.get_state())
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        if self._generator is None:
            state["seed"] = self.seed
        else:
            state["rng_state"] = self._generator.get_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if not isinstance(state, Mapping):
            return
        if self._generator is None:
            if state.get("seed") is not None:
                self.seed = check_seed(state["seed"])
        elif state.get("rng_state") is not None:
            self._generator.set_state(state["rng_state"])


class SeededOrders(Seeded):
    """A `Seeded` method (``"running"`` stream) that visits the tasks in random orders.

    `weights` draws from a copy of the generator (it must not change state); `update` draws
    the same orders from the generator itself, which advances it: a skipped step draws again
    the orders it did not use.
    """

    stream = "running"

    def orders(self, k: int, *, commit: bool = False) -> Tensor:
        """``(K, K)`` long tensor: row ``i`` is a random permutation of the task indices (task
        ``i`` itself is skipped when visited). Advances the generator only when ``commit``."""
        return task_orders(k, self.running_generator(commit=commit))

    def extra_repr(self) -> str:
        return join_repr(super().extra_repr(), f"seed={self.seed}")
