"""Whitened SVD reaches the optimal output error, also on singular Gram matrices and real activations."""

from __future__ import annotations

import pytest
import torch

from structlab.budget import rank_from_budget
from structlab.compress import (
    CalibrationStats,
    asvd,
    budget_from_ratio,
    output_error,
    plain_svd,
    rank_from_ratio,
    whitened_svd,
)


def optimum(w: torch.Tensor, x: torch.Tensor, k: int) -> float:
    """√(Σ_{i>k} σ_i(W Xᵀ)²): the best any rank-k W′ can do on these inputs (Eckart–Young)."""
    s = torch.linalg.svdvals(w.double() @ x.double().T)
    return float(s[k:].square().sum().sqrt())


def direct_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - a.double() @ b.double()) @ x.double().T).norm())


def correlated_inputs(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(t, n, generator=g, dtype=torch.float64) @ mix.T + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_gram_reaches_optimum_and_equals_svd_llm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96, dtype=dtype)
    x = correlated_inputs(400, 96, seed=1)
    gram = x.T @ x
    k = 12
    a, b = whitened_svd(w, gram, k)
    assert a.dtype == b.dtype == dtype and a.shape == (48, k) and b.shape == (k, 96)
    best = optimum(w, x, k)
    err = direct_error(w, a, b, x)
    assert err / best - 1 < 1e-3
    assert err == pytest.approx(output_error(w, a @ b, gram), rel=1e-5)
    # SVD-LLM's own construction (S = chol(G), B = Σ_k^½ V_kᵀ S⁻¹) gives the same factors
    s = torch.linalg.cholesky(gram)
    u, sig, vh = torch.linalg.svd(w.double() @ s, full_matrices=False)
    a_ref = u[:, :k] * sig[:k].sqrt()
    b_ref = torch.linalg.solve_triangular(s, sig[:k, None].sqrt() * vh[:k], upper=False, left=False)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert float((a.double() @ b.double() - a_ref @ b_ref).norm() / (a_ref @ b_ref).norm()) < tol
    # same √Σ split up to signs (G's tiniest eigenvalues are floored for the split only: ~1e-6 relative)
    assert torch.allclose(a.double().abs(), a_ref.abs(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [8, 24])
def test_rank_deficient_gram_still_optimal_and_bounded(k: int) -> None:
    """T = 20 tokens < n = 96 inputs, plus dead features: G is singular (rank ≤ 20)."""
    torch.manual_seed(2)
    w = torch.randn(64, 96, dtype=torch.float32)
    x = correlated_inputs(20, 96, seed=3)
    x[:, 10:20] = 0.0  # features never active in the calibration data
    gram = x.T @ x
    assert torch.linalg.matrix_rank(gram) <= 20
    a, b = whitened_svd(w, gram, k)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    best = optimum(w, x, k)
    err = direct_error(w, a, b, x)
    scale = float((w.double() @ x.T).norm())
    if k < 20:
        assert err / best - 1 < 1e-3
    else:  # the outputs have rank ≤ 20 < k: the optimum is 0
        assert best < 1e-9 * scale and err < 1e-5 * scale
    # no blow-up: W′ = AB is a projection of W, never larger than W
    assert float((a @ b).norm()) <= float(w.norm()) * (1 + 1e-5)
    assert float(a.abs().max()) < 1e3 and float(b.abs().max()) < 1e3


def test_zero_gram_gives_finite_factors() -> None:
    w = torch.randn(16, 24)
    a, b = whitened_svd(w, torch.zeros(24, 24, dtype=torch.float64), 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert float((a @ b).norm()) <= float(w.norm()) * (1 + 1e-5)


def test_bad_arguments() -> None:
    w = torch.randn(16, 24)
    with pytest.raises(ValueError, match="24×24"):
        whitened_svd(w, torch.eye(16, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="rank must lie"):
        whitened_svd(w, torch.eye(24, dtype=torch.float64), 17)
    with pytest.raises(ValueError, match="NaN"):
        whitened_svd(w, torch.full((24, 24), float("nan"), dtype=torch.float64), 4)


def test_ratio_translation() -> None:
    assert budget_from_ratio(0.2) == pytest.approx(0.8)
    assert rank_from_ratio(768, 768, 0.2, multiple=1) == 307  # ⌊0.8·384⌋ = ⌊307.2⌋
    assert rank_from_ratio(768, 3072, 0.4, multiple=1) == 368  # ⌊0.6·614.4⌋ = ⌊368.64⌋
    with pytest.raises(ValueError, match="fraction of parameters removed"):
        budget_from_ratio(1.2)


@pytest.mark.parametrize(
    "name",
    [
        "encoder.layer.2.attention.self.query",
        "encoder.layer.3.intermediate.dense",
        "encoder.layer.3.output.dense",
    ],
)
def test_whitened_beats_plain_on_minilm(minilm: tuple, name: str) -> None:
    """Real BERT activations: whitened SVD is optimal on them, plain SVD and ASVD are not."""
    model, batch = minilm
    inputs: list[torch.Tensor] = []
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with CalibrationStats(model, [name]) as stats, torch.no_grad():
        stats.token_mask = batch["attention_mask"].bool()
        model(**batch)
    handle.remove()
    x = inputs[0][batch["attention_mask"].bool()].double()
    assert stats.tokens(name) == x.shape[0]
    w = module.weight.detach()
    k = rank_from_budget(*w.shape, 0.5)
    gram = stats.gram(name)
    best = optimum(w, x, k)
    errs = {
        "whitened": direct_error(w, *whitened_svd(w, gram, k), x),
        "plain": direct_error(w, *plain_svd(w, k), x),
        "asvd": direct_error(w, *asvd(w, stats.abs_mean(name), k), x),
    }
    gap = errs["whitened"] / best - 1
    print(name, f"T={x.shape[0]} n={w.shape[1]} k={k} optimum={best:.4g} gap={gap:.1e}", errs)
    assert gap < 1e-3
    assert errs["whitened"] < 0.5 * errs["plain"]
    assert errs["whitened"] < errs["asvd"]
