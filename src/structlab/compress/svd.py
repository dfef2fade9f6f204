"""Low-rank factorisations W ≈ A B of a dense weight: plain, whitened (SVD-LLM) and activation-aware (ASVD).

All return (A, B) with A ∈ R^{m×k}, B ∈ R^{k×n} in W's dtype and on W's device, √Σ split into both
factors so that neither factor dominates when fine-tuning afterwards.
"""

from __future__ import annotations

import torch


def _check(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out × in), got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank must lie in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank}"
        )


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def plain_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k approximation in Frobenius norm: A = U_k Σ_k^½, B = Σ_k^½ V_kᵀ."""
    _check(weight, rank)
    u, s, vh = torch.linalg.svd(weight.to(_work_dtype(weight)), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def whitened_svd(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, rel_floor: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k W′ = AB minimising the output error ‖(W − W′)Xᵀ‖_F, given the Gram matrix G = XᵀX.

    Any S with SSᵀ = G turns the output error into ‖(W − W′)S‖_F. We take S = QΛ^½ from G's
    eigendecomposition (eigenvalues clipped at 0; G may be singular, e.g. fewer tokens than inputs)
    and never invert it: with WS = UΣVᵀ the optimum is W′ = U_k U_kᵀ W, so SVD-LLM's factors
    A = U_k Σ_k^½, B = Σ_k^½ V_kᵀ S⁻¹ equal A = U_k D, B = D⁻¹ U_kᵀ W with D = Σ_k^½.
    This reaches √(Σ_{i>k} σ_i(WXᵀ)²) exactly, is finite for any G, and ‖W′‖_F ≤ ‖W‖_F (a projection).
    Only the split D uses floored eigenvalues (≥ `rel_floor`·mean): σ̃_i = ‖u_iᵀ W Q Λ_f^½‖ ≈ σ_i for
    components the data sees, while components in G's null space get a finite scale instead of
    σ_i ≈ 0, so B cannot blow up (its rows are at most ~rel_floor^-¼ times larger than usual).
    """
    _check(weight, rank)
    n = weight.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"gram must be {n}×{n} for a weight with {n} inputs, got {tuple(gram.shape)}")
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(device=w.device, dtype=torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("gram contains NaN or inf: the calibration data was not finite")
    lam, q = torch.linalg.eigh((g + g.T) / 2)
    lam = lam.clamp_min(0)
    wq = w @ q
    u = torch.linalg.svd(wq * lam.sqrt(), full_matrices=False)[0][:, :rank]
    floor = rel_floor * float(lam.mean()) if float(lam.mean()) > 0 else 1.0
    proj_q = u.T @ wq  # U_kᵀ W Q: k×n
    sigma = (proj_q * lam.clamp_min(floor).sqrt()).norm(dim=1).clamp_min(1e-150)
    d = sigma.sqrt()
    a = u * d
    b = (proj_q @ q.T) / d[:, None]  # U_kᵀ W / d
    return a.to(weight.dtype), b.to(weight.dtype)


def asvd(
    weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = 0.5, rel_floor: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: scale input columns by s_i = mean|x_i|^α, truncate the SVD of W·diag(s), unscale B.

    s is floored at `rel_floor`·max(s) so that dead input features do not divide by zero.
    """
    _check(weight, rank)
    if abs_mean.shape != (weight.shape[1],):
        raise ValueError(f"abs_mean must have {weight.shape[1]} entries, got shape {tuple(abs_mean.shape)}")
    dt = _work_dtype(weight)
    s = abs_mean.detach().to(device=weight.device, dtype=dt).abs().pow(alpha)
    s = s.clamp_min(rel_floor * float(s.max()) if float(s.max()) > 0 else 1.0)
    a, b = plain_svd(weight.to(dt) * s, rank)
    return a.to(weight.dtype), (b / s).to(weight.dtype)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W′)Xᵀ‖_F computed from G = XᵀX: √trace(D G Dᵀ) with D = W − W′."""
    d = (weight.to(torch.float64) - approx.to(torch.float64)).to(gram.device)
    return float(torch.einsum("ij,jk,ik->", d, gram.to(torch.float64), d).clamp_min(0).sqrt())


def falor(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    mean: torch.Tensor,
    tokens: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FALOR (features are low rank, Yu & Wu 2023, as ptdeco names it): keep the top-k principal
    directions U_k of the layer's *centred* outputs y = Wx + b and map y ↦ μ_y + U_k U_kᵀ (y − μ_y).

    The output covariance is W Σ_x Wᵀ with Σ_x = G/N − μμᵀ (from the calibration statistics), so
    no output is stored. Returns (A, B, bias′) = (U_k, U_kᵀ W, μ_y + U_k U_kᵀ (b − μ_y)); unlike the
    whitened SVD (uncentred second moment) the mean output is kept exactly.
    """
    _check(weight, rank)
    n = weight.shape[1]
    if gram.shape != (n, n) or mean.shape != (n,):
        raise ValueError(
            f"gram must be {n}×{n} and mean {n} long, got {tuple(gram.shape)}, {tuple(mean.shape)}"
        )
    if tokens < 1:
        raise ValueError("falor needs calibration statistics of at least one token")
    w = weight.detach().to(torch.float64)
    g, mu = (t.detach().to(device=w.device, dtype=torch.float64) for t in (gram, mean))
    cov_x = g / tokens - torch.outer(mu, mu)
    cov_y = w @ ((cov_x + cov_x.T) / 2) @ w.T
    u = torch.linalg.eigh(cov_y)[1].flip(1)[:, :rank]
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.to(w)
    mu_y = w @ mu + b
    new_bias = mu_y + u @ (u.T @ (b - mu_y))
    return u.to(weight.dtype), (u.T @ w).to(weight.dtype), new_bias.to(weight.dtype)


def _pinv_psd(m: torch.Tensor, rel_floor: float = 1e-10) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix by eigendecomposition (never a Cholesky that can fail)."""
    lam, q = torch.linalg.eigh((m + m.T) / 2)
    keep = lam > rel_floor * lam.max().clamp_min(1e-300)
    inv = torch.where(keep, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
    return (q * inv) @ q.T


def refit_left(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    right: torch.Tensor,
    cross: torch.Tensor,
    gram_in: torch.Tensor,
    sum_dense: torch.Tensor,
    sum_in: torch.Tensor,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SVD-LLM's update: with the right factor B fixed, the left factor (and bias) minimising
    Σ_t ‖W x_t + b − (A B x′_t + b′)‖², where x_t is the dense model's input of this layer and x′_t the
    input it gets in the compressed model (the layers before it already compressed).

    From the statistics cross = Σ x x′ᵀ, gram_in = Σ x′x′ᵀ, sum_dense = Σ x, sum_in = Σ x′ and N tokens:
    with z′ = [B x′; 1], [A b′] = (Σ y z′ᵀ)(Σ z′z′ᵀ)⁺ (an eigendecomposition pseudo-inverse, so a
    rank-deficient system still has the least-norm solution). Without a bias only A is refit.
    """
    dt = torch.float64
    w, b_mat = weight.to(dt), right.to(dt)
    dev = w.device
    cross, gram_in, sum_dense, sum_in = (
        t.to(device=dev, dtype=dt) for t in (cross, gram_in, sum_dense, sum_in)
    )
    bs = b_mat @ sum_in  # Σ B x′
    yz = w @ cross @ b_mat.T  # Σ W x (B x′)ᵀ
    zz = b_mat @ gram_in @ b_mat.T
    if bias is None:
        return (yz @ _pinv_psd(zz)).to(weight.dtype), None
    b = bias.to(device=dev, dtype=dt)
    yz = torch.cat([yz + torch.outer(b, bs), (w @ sum_dense + tokens * b)[:, None]], 1)
    zz = torch.cat(
        [torch.cat([zz, bs[:, None]], 1), torch.cat([bs, bs.new_tensor([float(tokens)])])[None]], 0
    )
    ab = yz @ _pinv_psd(zz)
    return ab[:, :-1].to(weight.dtype), ab[:, -1].to(bias.dtype)
