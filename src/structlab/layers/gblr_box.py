"""The default Gaudi-GBLR training path (sharp box masks, widths and locations rounded to the grid) as
one autograd node.

The composed path (masks → masked factors → W → GEMM, each op its own autograd node) launches about
180 small kernels per step, so on a GPU the layer is bound by kernel launches, not by its GEMMs. Here
the forward is the box test, two masked casts and two GEMMs; the backward is the two GEMMs of a dense
layer, two small ones for the masked factors and the analytic mask gradient of gaudi.py. It computes
exactly what the composed path computes (tests compare both in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structlab.layers.gaudi import _grid, box_masks, mask_grads


class BoxGBLRLinear(torch.autograd.Function):
    """y = x (Ũ Ṽᵀ)ᵀ + b, Ũ = U ⊙ M_outᵀ, Ṽ = V ⊙ M_inᵀ with 0/1 box masks from the rounded
    widths/locations (2×K, [out, in]); the rounding is a straight-through estimator and the widths are
    clamped to [0, 1]. `x` and `bias` arrive in the compute dtype, which W and the GEMMs use."""

    @staticmethod
    def forward(ctx, x, U, V, widths, locations, bias, rank: int):  # noqa: ANN001, ANN205
        m, n = U.shape[0], V.shape[0]
        sizes = (m, n)
        with torch.autocast(x.device.type, enabled=False):
            w = widths.clamp(0.0, 1.0)
            n_grid = _grid(sizes, None, w.device, w.dtype)[2][:, 0]  # cached: no host-to-device copy
            w_r, loc_r = torch.round(w * n_grid) / n_grid, torch.round(locations * n_grid) / n_grid
            rows, cols = box_masks(w_r, loc_r, sizes)
            if rank > 1:
                rows, cols = rows.repeat_interleave(rank, 0), cols.repeat_interleave(rank, 0)
            u = torch.mul(U, rows.T, out=U.new_empty(U.shape, dtype=x.dtype))  # mask and cast: one pass
            v = torch.mul(V, cols.T, out=V.new_empty(V.shape, dtype=x.dtype))
            weight = u @ v.T
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, U, V, u, v, weight, rows, cols, widths, w, w_r, loc_r)
        ctx.rank, ctx.has_bias = rank, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, U, V, u, v, weight, rows, cols, widths, w, w_r, loc_r = ctx.saved_tensors
        m, n, r = U.shape[0], V.shape[0], ctx.rank
        with torch.autocast(x.device.type, enabled=False):
            g = grad_y.reshape(-1, m).to(x.dtype)
            grad_x = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
            grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
            grad_w = g.T @ x.reshape(-1, n)  # ∂L/∂W, m×n
            gu, gv = grad_w @ v, grad_w.T @ u  # ∂L/∂Ũ, ∂L/∂Ṽ in the compute dtype
            grad_U = torch.mul(gu, rows.T, out=torch.empty_like(U))
            grad_V = torch.mul(gv, cols.T, out=torch.empty_like(V))
            # ∂L/∂M[k, t] = Σ_r ∂L/∂Ũ[t, kr] U[t, kr], then the analytic mask derivative
            gm_out, gm_in = (gu * U).T, (gv * V).T
            if r > 1:
                gm_out, gm_in = gm_out.view(-1, r, m).sum(1), gm_in.view(-1, r, n).sum(1)
            gw, gl = mask_grads(w_r, loc_r, (m, n), None, (gm_out, gm_in))
            gw = gw * (w == widths)  # clamp's gradient (1 inside [0, 1]); the rounding passes it through
        return grad_x, grad_U, grad_V, gw, gl, grad_b, None
