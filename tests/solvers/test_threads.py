"""The solvers run with one intra-op thread on CPU and restore the caller's setting."""

from __future__ import annotations

import pytest
import torch

from gradbalance.solvers import cagrad_weights, min_norm, nash_bargaining, nonneg_qp
from gradbalance.solvers._threads import cpu_single_thread, single_thread_for


def test_one_thread_inside_and_restored_after(monkeypatch):
    seen = []

    @cpu_single_thread
    def probe(x):
        seen.append(torch.get_num_threads())
        return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe(torch.zeros(1))
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_restored_when_the_solver_raises():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError):
            min_norm(torch.zeros(2, 3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "solve",
    [
        lambda G: min_norm(G),
        lambda G: nonneg_qp(G, torch.ones(G.shape[-1], dtype=G.dtype)),
        lambda G: cagrad_weights(G, 0.5),
        lambda G: nash_bargaining(G),
    ],
)
def test_results_do_not_depend_on_the_thread_count(solve):
    J = torch.randn(5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = solve(G)
        torch.set_num_threads(1)
        b = solve(G)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


SOLVERS = {
    "min_norm_k2": lambda G: min_norm(G[:2, :2]),
    "min_norm_small": lambda G: min_norm(G),
    "min_norm_batched": lambda G: min_norm(G.expand(3, -1, -1)),
    "nonneg_qp": lambda G: nonneg_qp(G, torch.ones(G.shape[-1], dtype=G.dtype)),
    "cagrad_weights": lambda G: cagrad_weights(G, 0.5),
    "nash_bargaining": lambda G: nash_bargaining(G),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_solver_call_leaves_the_thread_count_as_it_found_it(name):
    J = torch.randn(5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        SOLVERS[name](J @ J.T)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_context_changes_only_what_helps_and_restores_only_what_it_changed(monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    try:
        real(1)  # already one thread: nothing to change, nothing to restore
        with single_thread_for(torch.zeros(2)):
            assert torch.get_num_threads() == 1
        assert calls == []
        real(2)
        with single_thread_for(torch.zeros(2, device="meta")):  # not a CPU tensor
            assert torch.get_num_threads() == 2
        with single_thread_for(None):  # not a tensor
            assert torch.get_num_threads() == 2
        assert calls == []
        with pytest.raises(RuntimeError), single_thread_for(torch.zeros(2)):
            assert torch.get_num_threads() == 1
            with single_thread_for(torch.zeros(2)):  # nested: sees one thread, leaves it
                pass
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert calls == [1, 2]
        assert torch.get_num_threads() == 2
    finally:
        real(before)
