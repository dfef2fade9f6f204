"""Ternary SVD: W ≈ U diag(s) V with U, V ∈ {−1, 0, +1} (docs/methods.md §4).

The authors' greedy algorithm, vectorised: take the top `stride` singular pairs of the residual,
ternarise them, refit all scales jointly by least squares, repeat. Two changes make it cheaper at
the same spectral error (see tests/compress/test_ternary.py for the figures against the reference):

* each new pair is refined by a few alternating steps in ternary space (u ← tern(R v), v ← tern(Rᵀu),
  R deflated by the atoms already taken in this batch) instead of ternarising the real singular
  vectors once: the atom then fits the residual, not only its top singular direction, so fewer
  atoms with fewer non-zeros reach the tolerance (`refine=0` gives the authors' atoms);
* the stop is exact: the loop ends as soon as σ₁(R) ≤ tolerance·σ₁(W), measured after the refit,
  so the returned factors always meet the tolerance (unless `max_rank` stops them first).

The scales are refit with an incrementally grown Cholesky factor of K = (UᵀU) ⊙ (VVᵀ), so a step
costs O(r²·stride) instead of a fresh O(r³) solve.
"""

from __future__ import annotations

import math

import torch

COS_THRESH = 0.8386


def ternarize(a: torch.Tensor, cos_thresh: float = COS_THRESH) -> torch.Tensor:
    """Ternary sign patterns of the rows of `a`: the sparsest top-k pattern whose cosine with the row
    reaches `cos_thresh` (else the best cosine). Zero rows give zero patterns."""
    norm = a.norm(dim=-1, keepdim=True)
    mag, order = (a.abs() / norm.clamp_min(torch.finfo(a.dtype).tiny)).sort(dim=-1, descending=True)
    k = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=a.dtype)
    score = mag.cumsum(-1) / k.sqrt()
    reach = score >= cos_thresh
    last = torch.where(reach.any(-1), reach.to(torch.uint8).argmax(-1), score.argmax(-1))
    keep_sorted = torch.arange(a.shape[-1], device=a.device) <= last.unsqueeze(-1)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.sign(a) * keep * (norm > 0)


def _top_pairs(r: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of a wide matrix via eigh of R Rᵀ (float64: σ down to 1e-4·σ₁ is enough)."""
    ev, q = torch.linalg.eigh(r @ r.T)
    ev, q = ev.flip(0)[:k].clamp_min(0), q.flip(1)[:, :k]
    sv = ev.sqrt()
    vt = (q.T @ r) / sv.clamp_min(1e-300).unsqueeze(1)
    return q, sv, vt


class _GrowingCholesky:
    """Cholesky factor of K + δI, grown by blocks as atoms are appended."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.L: torch.Tensor | None = None

    def append(self, cross: torch.Tensor, block: torch.Tensor) -> None:
        eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
        if self.L is None:
            schur = block
        else:
            b = torch.linalg.solve_triangular(self.L, cross, upper=False)
            schur = block - b.T @ b
        jitter = self.delta
        while True:  # a (near-)repeated atom makes the Schur complement singular: add jitter
            c, info = torch.linalg.cholesky_ex(schur + jitter * eye)
            if int(info) == 0:
                break
            jitter *= 10
        if self.L is None:
            self.L = c
            return
        r, k = self.L.shape[0], c.shape[0]
        grown = self.L.new_zeros(r + k, r + k)
        grown[:r, :r], grown[r:, :r], grown[r:, r:] = self.L, b.T, c
        self.L = grown

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(x.unsqueeze(1), self.L).squeeze(1)


def _refine_atom(
    r: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iters: int, cos_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating ternary fit of one atom to the residual r, starting from its singular pair."""
    tu, tv = ternarize(u, cos_thresh), ternarize(v, cos_thresh)
    for _ in range(iters):
        y = r @ tv
        if not y.any():
            break
        tu = ternarize(y, cos_thresh)
        z = r.T @ tu
        if not z.any():
            break
        tv = ternarize(z, cos_thresh)
    return tu, tv


@torch.no_grad()
def ternary_decompose(
    W: torch.Tensor,
    tolerance: float = 0.05,
    steps: int = 20,
    cos_thresh: float = COS_THRESH,
    max_rank: int | None = None,
    refine: int = 3,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    prune_rate: float | None = None,
    max_cost: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy ternary SVD of W (m×n): returns U (m×r), s (r), V (r×n), U and V in {−1, 0, +1}.

    Stops when the spectral relative error ‖W − U diag(s) V‖₂/‖W‖₂ ≤ `tolerance` or at `max_rank`.
    `stride` = max(1, ⌊mn/(m+n)/steps⌋) atoms are added per residual SVD. `refine` alternating
    steps fit each atom to the residual (0: the authors' one-shot ternarisation).
    `init` = (U0, V0) warm-starts from existing atoms (quantisation-aware training re-decomposes a
    slowly changing weight): their scales are refit to W and, with `prune_rate` η, atoms whose
    Frobenius contribution |s|·‖u‖‖v‖ is below tolerance·σ₁(W)/η are dropped before growing.
    `max_cost` caps the cost the TSVD paper counts, ⌈(nnz(U) + nnz(V))/2⌉ + rank per token (an
    addition is half a multiply-accumulate): the greedy loop takes no atom that would exceed it.
    Factors come back in W's dtype (float32 for half-precision inputs) on W's device.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    out_dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    wide = W.shape[0] <= W.shape[1]
    w = (W if wide else W.T).to(torch.float64)
    if init is not None:
        u0, v0 = (init[0], init[1]) if wide else (init[1].T, init[0].T)
        u0, v0 = u0.to(w), v0.to(w)
    m, n = w.shape
    limit = min(max_rank, 10**9) if max_rank is not None else 10**9
    stride = max(1, int(m * n / (m + n) / steps))
    s1 = torch.linalg.eigvalsh(w @ w.T)[-1].clamp_min(0).sqrt()
    target = tolerance * s1 * (1 - 1e-9)
    U, V = w.new_zeros(m, 0), w.new_zeros(0, n)
    x, s = w.new_zeros(0), w.new_zeros(0)
    chol = _GrowingCholesky(1e-10 * m * n)
    if float(s1) == 0.0 or limit == 0:
        return _orient(U, s, V, wide, out_dtype)

    def add(tu: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
        nonlocal U, V, x
        chol.append((U.T @ tu) * (V @ tv.T), (tu.T @ tu) * (tv @ tv.T))
        U, V = torch.cat([U, tu], 1), torch.cat([V, tv], 0)
        x = torch.cat([x, ((tu.T @ w) * tv).sum(1)])
        return chol.solve(x)

    if init is not None and u0.shape[1] > 0:
        keep = (u0 != 0).any(0) & (v0 != 0).any(1)
        u0, v0 = u0[:, keep][:, :limit].sign(), v0[keep][:limit].sign()
        if prune_rate is not None and math.isfinite(prune_rate) and u0.shape[1] > 0:
            probe = _GrowingCholesky(chol.delta)
            probe.append(u0.new_zeros(0, u0.shape[1]), (u0.T @ u0) * (v0 @ v0.T))
            s0 = probe.solve(((u0.T @ w) * v0).sum(1))
            size = s0.abs() * (u0 != 0).sum(0).sqrt() * (v0 != 0).sum(1).sqrt()
            alive = size >= tolerance * s1 / prune_rate
            u0, v0 = u0[:, alive], v0[alive]
        if u0.shape[1] > 0:
            s = add(u0, v0)

    def cost(extra_adds: int = 0, extra_rank: int = 0) -> int:
        adds = int((U != 0).sum()) + int((V != 0).sum()) + extra_adds
        return (adds + 1) // 2 + U.shape[1] + extra_rank

    full = False  # the cost cap is reached
    while U.shape[1] < limit and not full:
        r = w - (U * s) @ V
        q, sv, vt = _top_pairs(r, min(stride, m))
        if sv[0] <= target:
            break
        k = min(max(1, int((sv > target).sum())), limit - U.shape[1])
        tus, tvs = [], []
        for j in range(k):
            tu, tv = _refine_atom(r, q[:, j], vt[j], refine, cos_thresh)
            if not tu.any() or not tv.any():
                continue
            if max_cost is not None:
                taken = sum(int((a != 0).sum()) + int((b != 0).sum()) for a, b in zip(tus, tvs, strict=True))
                if cost(taken + int((tu != 0).sum()) + int((tv != 0).sum()), len(tus) + 1) > max_cost:
                    full = True
                    break
            tus.append(tu)
            tvs.append(tv)
            if j + 1 < k:  # deflate so the next atom of this batch fits what is left
                c = (tu @ r @ tv) / ((tu @ tu) * (tv @ tv))
                r = r - c * torch.outer(tu, tv)
        if not tus:
            break
        s = add(torch.stack(tus, 1), torch.stack(tvs, 0))
    return _orient(U, s, V, wide, out_dtype)


def _orient(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, wide: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not wide:
        U, V = V.T, U.T
    return U.to(dtype).contiguous(), s.to(dtype), V.to(dtype).contiguous()


def ternary_stats(W: torch.Tensor, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> dict[str, float]:
    """Rank, non-zeros and relative errors (spectral, Frobenius) of a ternary decomposition, in float64."""
    w = W.double()
    r = w - (U.double() * s.double()) @ V.double()
    return {
        "rank": int(s.numel()),
        "nnz_u": int((U != 0).sum()),
        "nnz_v": int((V != 0).sum()),
        "spectral_rel_err": float(torch.linalg.matrix_norm(r, 2) / torch.linalg.matrix_norm(w, 2)),
        "fro_rel_err": float(r.norm() / w.norm()),
    }
