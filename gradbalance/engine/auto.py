"""`EngineChoice`: which engine runs at each step, and why.

It holds the user's ``engine=`` request and everything learned while running: the strategy
``"auto"`` resolved to (loop on CPU; batched where vmap works elsewhere; chained when
``features=`` are passed and the heads reach the shared parameters only through them; memory
when ``K × P`` exceeds the threshold), the chained engine's trunk variant (timed once on CPU),
and the memory engine's inner strategy. `state_dict` keeps what a resumed run needs to make the
same choices.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from gradbalance.engine.base import (
    DEFAULT_MEMORY_THRESHOLD,
    STRATEGIES,
    Engine,
    Request,
    hooked,
)
from gradbalance.engine.batched import BatchedEngine, batched_gradients, probe_batched
from gradbalance.engine.chained import ChainedEngine, chained_gradients
from gradbalance.engine.loop import LoopEngine, loop_gradients
from gradbalance.engine.memory import MemoryEngine, jacobian_numel
from gradbalance.engine.representation import RepresentationEngine
from gradbalance.engine.result import TaskGradients

__all__ = ["EngineChoice", "check_request", "check_threshold"]

logger = logging.getLogger(__name__)

_LOOP = LoopEngine()
_BATCHED = BatchedEngine()
_CHAINED = ChainedEngine()
_REPRESENTATION = RepresentationEngine()


class EngineChoice:
    """The engine policy of one balancer: validates ``engine=`` against the method, picks the
    engine at each step, falls back where one does not apply.

    Args:
        engine: the user's request, one of `STRATEGIES`.
        method_name: for error messages.
        gradient_method: whether the method reads the task gradients (else it only weights
            the losses).
        needs_features: whether the method works on the shared features (MGDA-UB).
        needs_jacobian: whether the method reads the Jacobian rows themselves.
        memory_threshold: Jacobian entries above which ``"auto"`` takes the memory-light
            engine; also that engine's budget per group.
    """

    def __init__(
        self,
        engine: str,
        *,
        method_name: str,
        gradient_method: bool,
        needs_features: bool = False,
        needs_jacobian: bool = False,
        memory_threshold: int = DEFAULT_MEMORY_THRESHOLD,
    ) -> None:
        check_request(engine)
        check_threshold(memory_threshold)
        self.request = engine
        self.strategy = _validate(
            engine, method_name, gradient_method, needs_features, needs_jacobian
        )
        self.needs_jacobian = needs_jacobian
        self.memory = MemoryEngine(budget=memory_threshold)
        # the chained path applies to gradient methods given features= (auto or "chained")
        self.chained_ok = engine in ("auto", "chained") and self.strategy != "representation"
        self.chained_batched: bool | None = None
        self.chained_timing: dict[bool, float] | None = None
        self.fallback = "auto"

    @property
    def name(self) -> str:
        """The strategy in use (``"auto"`` until the first gradient step resolves it)."""
        return self.strategy

    @property
    def requires_features(self) -> bool:
        """Whether `backward` must be given ``features=`` (else it is an input error)."""
        return self.strategy == "representation" or (
            self.strategy == "chained" and self.request == "chained"
        )

    def compute(self, request: Request) -> tuple[Engine, TaskGradients]:
        """The engine for this step and its result (the request's rows hook applied)."""
        if self.strategy == "representation":
            return _REPRESENTATION, _REPRESENTATION.compute(request)
        k = len(request.losses)
        if (
            self.strategy == "auto"
            and not self.needs_jacobian
            and jacobian_numel(request.shared, k) > self.memory.budget
        ):
            self.strategy = "memory"
        if self.strategy == "memory":
            return self.memory, self.memory.compute(request)
        if request.features and self.chained_ok:
            result = self._chained(request)
            if result is not None:
                return _CHAINED, hooked(result, request)
        return _LOOP, hooked(self._parameter_rows(request), request)

    def _chained(self, request: Request) -> TaskGradients | None:
        """The shared Jacobian by the chained path, or ``None`` (and no more tries) when the
        heads reach shared parameters other than through the features."""
        args = (request.losses, request.features, request.shared, request.others)
        batched = self.chained_batched
        if batched is None:
            # first use: try the vmapped trunk backward on a kept graph; settle on K ordinary
            # trunk backwards if vmap fails or would hit slow fallbacks
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = chained_gradients(*args, retain_graph=True)
            except (RuntimeError, NotImplementedError) as exc:
                logger.info("chained engine: vmap through the trunk failed (%s); looping", exc)
                self.chained_batched = False
                return self._chained(request)
            slow = [w for w in caught if "batching rule" in str(w.message).lower()]
            for w in caught:
                if w not in slow:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self.chained_batched = not slow
            if (
                not slow
                and result is not None
                and request.losses[0].device.type == "cpu"
                and not torch.are_deterministic_algorithms_enabled()
            ):
                # on CPU, K ordinary trunk backwards can beat the vmapped one (MLP trunks):
                # time one step of each and keep the faster (both give the same Jacobian up to
                # rounding; under torch.use_deterministic_algorithms(True) we skip the timing
                # and keep the vmapped trunk, so fresh runs agree bit for bit)
                self.chained_timing = {}
        elif self.chained_timing is not None:
            trial = False in self.chained_timing  # the looped trunk first, then the vmapped
            start = time.perf_counter()
            result = chained_gradients(*args, retain_graph=request.retain_graph, batched=trial)
            self.chained_timing[trial] = time.perf_counter() - start
            if len(self.chained_timing) == 2:
                self.chained_batched = self.chained_timing[True] <= self.chained_timing[False]
                logger.info(
                    "chained engine: trunk backward %s (timed %.3g s vmapped, %.3g s looped)",
                    "vmapped" if self.chained_batched else "looped",
                    self.chained_timing[True],
                    self.chained_timing[False],
                )
                self.chained_timing = None
        else:
            result = chained_gradients(*args, retain_graph=request.retain_graph, batched=batched)
        if result is None:
            self.chained_ok = False
            if self.strategy == "chained":
                logger.warning(
                    "gradbalance: engine='chained' needs task losses that reach the shared "
                    "parameters only through the features passed to backward(); they do not, "
                    "so the loop engine is used instead"
                )
                self.strategy = "loop"
            return None
        if self.strategy == "auto":
            self.strategy = "chained"
        return result

    def _parameter_rows(self, request: Request) -> TaskGradients:
        """The shared Jacobian by the loop or batched engine (resolving ``"auto"``)."""
        strategy = self.strategy
        if strategy == "chained":
            # auto settled on the chained path, but this step passed no features
            strategy = self.fallback
        args = (request.losses, request.shared, request.others)
        if strategy == "auto":
            if request.losses[0].device.type == "cpu":
                # measured (benchmarks/step.py): on CPU, K backwards beat one vmapped backward
                # at every K on both benchmark models; vmap pays on accelerators. The graph is
                # kept on this resolving step, as the batched probe keeps it.
                result = loop_gradients(*args, retain_graph=True)
                strategy = "loop"
            else:
                result, strategy = probe_batched(*args, retain_graph=request.retain_graph)
            self.fallback = strategy
            if self.strategy == "auto":
                self.strategy = strategy
            return result
        if strategy == "loop":
            return loop_gradients(*args, retain_graph=request.retain_graph)
        return batched_gradients(*args, retain_graph=request.retain_graph)

    def for_last_layer(self, request: Request) -> TaskGradients:
        """The Jacobian on the last shared layer for loss weightings that read its Gramian
        (GradNorm): the loop engine, keeping the graph for the weighted backward."""
        return _LOOP.compute(request._replace(retain_graph=True))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to make the same choices."""
        return {
            "engine": self.strategy,
            # the chained engine's timed choice
            "chained_trunk": (
                None
                if self.chained_batched is None or self.chained_timing is not None
                else ("vmapped" if self.chained_batched else "looped")
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take over a saved choice (ignores what does not apply to this request)."""
        used = state.get("engine")
        if self.request == "auto" and used in ("loop", "batched", "chained"):
            self.strategy = used
        trunk = state.get("chained_trunk")
        if self.chained_ok and trunk in ("vmapped", "looped"):
            self.chained_batched = trunk == "vmapped"
            self.chained_timing = None


def check_request(engine: str) -> None:
    """Raise ``ValueError`` unless ``engine`` is one of `STRATEGIES`."""
    if engine not in STRATEGIES:
        raise ValueError(f"engine must be one of {STRATEGIES}, got {engine!r}")


def check_threshold(memory_threshold: int) -> None:
    """Raise unless ``memory_threshold`` is a positive int (of Jacobian entries)."""
    if isinstance(memory_threshold, bool) or not isinstance(memory_threshold, int):
        raise TypeError(f"memory_threshold must be an int, got {memory_threshold!r}")
    if memory_threshold < 1:
        raise ValueError(
            f"memory_threshold must be a positive number of Jacobian entries, "
            f"got {memory_threshold}"
        )


def _validate(
    engine: str,
    method_name: str,
    gradient_method: bool,
    needs_features: bool,
    needs_jacobian: bool,
) -> str:
    """The initial strategy for ``engine``, or a ``ValueError`` where it cannot serve."""
    if needs_features:
        if engine not in ("auto", "representation"):
            raise ValueError(
                f"method {method_name!r} works on the shared features and needs "
                f"engine='representation' (or 'auto'), got engine={engine!r}"
            )
        return "representation"
    if engine == "memory":
        if needs_jacobian:
            raise ValueError(
                f"method {method_name!r} reads the task gradients themselves (JACOBIAN), "
                "which the memory-light engine never holds; use engine='auto', 'loop' or "
                "'batched'"
            )
        if not gradient_method:
            raise ValueError(
                f"engine='memory' computes a Gramian, but method {method_name!r} is a loss "
                "weighting that needs no Gramian; drop the engine argument"
            )
    if engine == "representation" and not gradient_method:
        raise ValueError(
            f"engine='representation' computes a Gramian of feature gradients, but method "
            f"{method_name!r} is a loss weighting that needs no Gramian; drop the engine "
            "argument"
        )
    if engine == "chained" and not gradient_method:
        raise ValueError(
            f"engine='chained' computes the task gradients of the shared parameters, but "
            f"method {method_name!r} is a loss weighting that needs none; drop the engine "
            "argument"
        )
    return engine
