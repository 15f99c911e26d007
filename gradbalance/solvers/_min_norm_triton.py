# mypy: ignore-errors
"""The Triton kernel of `gradbalance.solvers.fused`: exact min-norm weights, one launch.

Imported lazily (only when the fused path is taken); it imports without Triton, and the kernel
is built by `get_kernel` at first use (`triton.jit` picks the compiler or the interpreter,
``TRITON_INTERPRET=1``, when it wraps the function, as in
`gradbalance.solvers._frank_wolfe_triton`).

One program per Gramian. It loads ``G`` (padded to ``KP``, a power of two, with masks; the
symmetric part, divided by its largest diagonal entry) into registers once and alternates

- a **pairwise Frank-Wolfe phase** (mass moves from the away vertex, the support index with the
  largest ``(Gw)_i``, to the Frank-Wolfe vertex, the smallest; exact line search clipped to the
  away weight: a linearly convergent Frank-Wolfe on the simplex), which finds the support;
- an **exact finish**: Wolfe's minor cycle on the support ``S``: the equality-constrained
  minimiser on ``S`` from the positive definite Jacobi-scaled system
  ``(D⁻¹ G_SS D⁻¹ + b bᵀ) x = b``, ``w_S = b x / bᵀx`` (``d_i = sqrt(G_ii)`` floored at
  ``d_floor``, ``b_i = d_min / d_i``; Gauss-Jordan without pivoting; an index whose pivot falls
  below ``piv_tol`` is affinely dependent on the ones before it and is dropped), accepted only
  if ``w_S > 0``; otherwise a step back to the first sign change, which removes an index, and
  again;

until the current weights are certified, computed here: ``wᵀGw - (Gw)_i <= tol max(d_i, d̄) d̄``
for every ``i`` (``d̄ = Σ w_j d_j``; implies a duality gap ``wᵀGw - min_i (Gw)_i`` of at most
``tol`` relative to ``max_i G_ii``), or ``max_rounds`` rounds have run. Every operation is a
masked register operation or a reduction; the scalars are 0-d tensors, so the same code runs
compiled and under the interpreter. Everything is written out in the one function (a kernel can
only call jitted helpers, see `gradbalance.solvers._frank_wolfe_triton`).
"""

from __future__ import annotations

from gradbalance.solvers._triton import jitted, tl

__all__ = ["get_kernel"]


def _exact_kernel(
    g_ptr,
    w_ptr,
    gap_ptr,
    ok_ptr,
    it_ptr,
    K,
    tol,
    piv_tol,
    d_floor,
    fw_iters,
    max_rounds,
    KP: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, KP)
    valid = offs < K
    rows = offs[:, None]
    cols = offs[None, :]
    both = valid[:, None] & valid[None, :]
    eye = rows == cols
    base = pid.to(tl.int64) * K * K
    a_ = tl.load(g_ptr + base + rows * K + cols, mask=both, other=0.0)
    b_ = tl.load(g_ptr + base + cols * K + rows, mask=both, other=0.0)
    G = 0.5 * (a_ + b_)
    inf = float("inf")
    nothing = offs < 0  # an all-false mask (vector & scalar masks go through tl.where)
    diag = tl.sum(tl.where(eye, G, 0.0), axis=1)
    scale = tl.max(tl.where(valid, diag, 0.0), axis=0)
    G = G / tl.where(scale > 0, scale, 1.0)
    diag = tl.sum(tl.where(eye, G, 0.0), axis=1)
    # the norms (the largest is 1) scale the certificate and, floored, the finish (Jacobi)
    d = tl.sqrt(tl.maximum(diag, 0.0))
    dj = tl.where(valid, tl.maximum(d, d_floor), 1.0)
    bj = tl.min(dj, axis=0) / dj

    # start at the vertex of smallest norm
    i0 = tl.argmin(tl.where(valid, diag, inf), axis=0)
    w = tl.where(offs == i0, 1.0, 0.0) + 0.0 * diag
    gw = tl.sum(G * w[None, :], axis=1)
    f = tl.sum(w * gw, axis=0)
    gap = f - tl.min(tl.where(valid, gw, inf), axis=0)
    dw = tl.sum(w * d, axis=0)
    viol = tl.max(tl.where(valid, f - gw - tol * tl.maximum(d, dw) * dw, -inf), axis=0)
    done = (gap <= tol) & (viol <= 0)
    rounds = pid * 0
    go = (done == 0) & (rounds < max_rounds)
    while go:
        # ---- pairwise Frank-Wolfe phase
        it = pid * 0
        pgap = gap + 1.0
        pthr = gap * 0.0
        while (it < fw_iters) & (pgap > pthr):
            gw = tl.sum(G * w[None, :], axis=1)
            s = tl.argmin(tl.where(valid, gw, inf), axis=0)
            a = tl.argmax(tl.where(w > 0, gw, -inf), axis=0)
            gs = tl.sum(tl.where(offs == s, gw, 0.0), axis=0)
            ga = tl.sum(tl.where(offs == a, gw, 0.0), axis=0)
            wa = tl.sum(tl.where(offs == a, w, 0.0), axis=0)
            gsa = tl.sum(tl.sum(tl.where((rows == s) & (cols == a), G, 0.0), axis=1), axis=0)
            dss = tl.sum(tl.where(offs == s, diag, 0.0), axis=0)
            daa = tl.sum(tl.where(offs == a, diag, 0.0), axis=0)
            pgap = ga - gs
            dw = tl.sum(w * d, axis=0)
            pthr = tol * tl.maximum(tl.sum(tl.where(offs == s, d, 0.0), axis=0), dw) * dw
            curv = dss + daa - 2.0 * gsa
            step = tl.where(curv > 0, pgap / tl.where(curv > 0, curv, 1.0), wa)
            step = tl.minimum(tl.maximum(step, 0.0), wa)
            step = tl.where(pgap > 0, step, 0.0)
            drop = step >= wa
            w = w + tl.where(offs == s, step, 0.0) - tl.where(offs == a, step, 0.0)
            w = tl.where(tl.where(drop & (s != a), offs == a, nothing), 0.0, w)
            it += 1

        # ---- exact finish: Wolfe's minor cycle on the support of w
        gw = tl.sum(G * w[None, :], axis=1)
        f = tl.sum(w * gw, axis=0)
        dw = tl.sum(w * d, axis=0)
        viol = tl.max(tl.where(valid, f - gw - tol * tl.maximum(d, dw) * dw, -inf), axis=0)
        minor = pid * 0
        todo = viol > 0
        while todo & (minor < K):
            keep = w > 0
            # Jacobi-scaled: D^-1 (G + dmin^2 11^T) D^-1 (entries <= 2), right-hand side b
            A = G / (dj[:, None] * dj[None, :]) + bj[:, None] * bj[None, :]
            A = tl.where(keep[:, None] & keep[None, :], A, tl.where(eye, 1.0, 0.0))
            rhs = tl.where(keep, bj, 0.0)
            for p in range(0, K):  # Gauss-Jordan without pivoting (A is positive definite)
                rp = tl.sum(tl.where(rows == p, A, 0.0), axis=0)
                cp = tl.sum(tl.where(cols == p, A, 0.0), axis=1)
                piv = tl.sum(tl.where(offs == p, rp, 0.0), axis=0)
                bp = tl.sum(tl.where(offs == p, rhs, 0.0), axis=0)
                in_s = tl.sum(tl.where((offs == p) & keep, 1, 0), axis=0) > 0
                good = in_s & (piv > piv_tol)
                f = tl.where(tl.where(good, offs != p, nothing), cp / tl.where(good, piv, 1.0), 0.0)
                A = A - f[:, None] * rp[None, :]
                rhs = rhs - f * bp
                dep = in_s & (piv <= piv_tol)  # affinely dependent on the pivots before it
                line = tl.where(dep, (rows == p) | (cols == p), eye & (rows < 0))
                A = tl.where(line, tl.where(eye, 1.0, 0.0), A)
                gone = tl.where(dep, offs == p, nothing)
                rhs = tl.where(gone, 0.0, rhs)
                keep = keep & (gone == 0)
            u = tl.where(keep, bj * rhs / tl.sum(tl.where(eye, A, 0.0), axis=1), 0.0)
            tot = tl.sum(u, axis=0)
            z = u / tl.where(tot > 0, tot, 1.0)
            bad = keep & (z <= 0)
            nbad = tl.sum(tl.where(bad, 1, 0), axis=0)
            usable = (tot > 0) & (tot == tot)
            # z >= 0: the minimiser on the support; else step back towards it until an index of
            # the support reaches zero (the objective does not increase on the way)
            ratio = tl.where(bad, w / tl.where(bad, w - z, 1.0), inf)
            alpha = tl.minimum(tl.min(ratio, axis=0), 1.0)
            moved = w + alpha * (z - w)
            moved = tl.where((bad & (ratio <= alpha)) | (moved <= 0), 0.0, moved)
            moved = moved / tl.sum(moved, axis=0)
            w = tl.where(usable, tl.where(nbad == 0, z, moved), w)
            todo = usable & (nbad > 0)
            minor += 1
        gw = tl.sum(G * w[None, :], axis=1)
        f = tl.sum(w * gw, axis=0)
        gap = f - tl.min(tl.where(valid, gw, inf), axis=0)
        dw = tl.sum(w * d, axis=0)
        viol = tl.max(tl.where(valid, f - gw - tol * tl.maximum(d, dw) * dw, -inf), axis=0)
        done = (gap <= tol) & (viol <= 0)
        rounds += 1
        go = (done == 0) & (rounds < max_rounds)

    tl.store(w_ptr + pid.to(tl.int64) * K + offs, w, mask=valid)
    tl.store(gap_ptr + pid, gap * scale)
    tl.store(ok_ptr + pid, tl.where(done, 1, 0))
    tl.store(it_ptr + pid, rounds)


def get_kernel():
    """The jitted kernel, built for the current ``TRITON_INTERPRET`` setting (cached)."""
    return jitted(_exact_kernel)
