# mypy: ignore-errors
"""The Triton kernel of `gradbalance.solvers.frank_wolfe`: one launch, one program per Gramian.

Imported lazily (only when the Triton path is taken); it imports without Triton, and the kernel
is compiled by `get_kernel` at first use, as `triton.jit` decides between the compiler and the
interpreter (``TRITON_INTERPRET=1``, how CI runs it on CPU tensors) when it wraps a function.

Each program loads its ``K x K`` Gramian (padded to ``KP``, a power of two, with masks) into
registers once and runs the whole algorithm on it: the best pair by the two-task closed form,
the Frank-Wolfe loop with its early exit, and the duality gap of the result. The two-point
formula is `gradbalance.solvers.two_tasks.closed_form` with ``g12 = g21`` (its ``off`` is then
``g12`` exactly), written out here (twice: a kernel can only call jitted helpers, and one helper
for both the compiler and the interpreter needed global state); the PyTorch path
calls ``closed_form`` itself, and the tests check that both give the same iterates.
Not yet compiled or run on a GPU.
"""

from __future__ import annotations

from gradbalance.solvers._triton import jitted, tl

__all__ = ["get_kernel"]


def _frank_wolfe_kernel(g_ptr, p_ptr, w_ptr, it_ptr, gap_ptr, K, max_iter, KP: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, KP)
    valid = offs < K
    rows = offs[:, None]
    cols = offs[None, :]
    both = valid[:, None] & valid[None, :]
    base = pid.to(tl.int64) * K * K
    G = tl.load(g_ptr + base + rows * K + cols, mask=both, other=0.0)
    lo = tl.load(p_ptr)  # the end-point clip, 1 - clip and STOP_CRIT, in G's dtype
    hi = tl.load(p_ptr + 1)
    stop_crit = tl.load(p_ptr + 2)
    inf = float("inf")
    diag = tl.sum(tl.where(rows == cols, G, 0.0), axis=1)

    # the best pair i < j (first in lexicographic order on ties, as the published loop)
    # the two-point closed form (two_tasks.closed_form with off = v12) for every pair, x = g_i
    v11 = diag[:, None]
    v22 = diag[None, :]
    num = v22 - G
    first = G >= v11  # x is the closest point of the segment
    second = G >= v22  # y is
    den = tl.where(first | second, 1.0, v11 - G + num)
    pg = tl.where(first, hi, tl.where(second, lo, num / den))
    pc = tl.where(first, v11, tl.where(second, v22, v22 + pg * (G - v22)))
    pc = tl.where((rows < cols) & both, pc, inf)
    flat = rows * KP + cols
    best = tl.argmin(tl.reshape(pc, [KP * KP]), axis=0)
    gam = tl.sum(tl.sum(tl.where(flat == best, pg, 0.0), axis=1), axis=0)
    bi = best // KP
    bj = best % KP
    w = tl.where(offs == bi, gam, 0.0) + tl.where(offs == bj, 1.0 - gam, 0.0)

    n_it = pid * 0
    go = ((n_it + K) >= 3) & (n_it < max_iter)
    while go:
        gw = tl.sum(G * w[None, :], axis=1)
        t = tl.argmin(tl.where(valid, gw, inf), axis=0)
        v11 = tl.sum(w * gw, axis=0)
        v12 = tl.sum(tl.where(offs == t, gw, 0.0), axis=0)
        v22 = tl.sum(tl.where(offs == t, diag, 0.0), axis=0)
        # the same closed form on (wᵀGw, (Gw)_t, G_tt): x = w, y = e_t
        num = v22 - v12
        first = v12 >= v11
        second = v12 >= v22
        den = tl.where(first | second, 1.0, v11 - v12 + num)
        g = tl.where(first, hi, tl.where(second, lo, num / den))
        nw = g * w + tl.where(offs == t, 1.0 - g, 0.0)
        stop = tl.sum(tl.abs(nw - w), axis=0) < stop_crit
        w = tl.where(stop, w, nw)  # the stopping step is discarded, as published
        n_it += 1
        go = (stop == 0) & (n_it < max_iter)

    gw = tl.sum(G * w[None, :], axis=1)
    gap = tl.sum(w * gw, axis=0) - tl.min(tl.where(valid, gw, inf), axis=0)
    tl.store(w_ptr + pid.to(tl.int64) * K + offs, w, mask=valid)
    tl.store(it_ptr + pid, n_it)
    tl.store(gap_ptr + pid, gap)


def get_kernel():
    """The jitted kernel, built for the current ``TRITON_INTERPRET`` setting (cached)."""
    return jitted(_frank_wolfe_kernel)
