"""Gaudi masks (docs/methods.md §5): soft boxes on one axis, and their analytic gradient.

Kept apart from the layer because it is pure signal math: a mask is the inverse real FFT of a
sinc spectrum (with an optional Gaussian smoothing), and its gradient in the width and location
has a closed form that one rfft of the incoming gradient evaluates for every position at once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import torch


def _grid(sizes: tuple[int, ...], sigma: float | None, device: torch.device, dtype: torch.dtype):
    """Constants of a mask computation: positions t, frequencies f = 0…max(n)/2, lengths n (A×1×1),
    1/sinc(f/n)·Gaussian (A×1×F) and the irfft weights c_f (1 at DC and Nyquist, 2 between, 0 beyond
    an axis's own Nyquist). Cached per (sizes, σ, device, dtype) in eager mode; while torch.compile
    traces they are built inline (and folded), so the cache never holds a traced value."""
    if torch.compiler.is_compiling():
        return _grid_tensors(sizes, sigma, device, dtype)
    return _grid_cached(sizes, sigma, device, dtype)


@functools.lru_cache(maxsize=64)
def _grid_cached(sizes: tuple[int, ...], sigma: float | None, device: torch.device, dtype: torch.dtype):
    with torch.inference_mode(False), torch.no_grad():
        return _grid_tensors(sizes, sigma, device, dtype)


def _grid_tensors(sizes: tuple[int, ...], sigma: float | None, device: torch.device, dtype: torch.dtype):
    t = torch.arange(max(sizes), device=device, dtype=dtype)
    f = t[: max(sizes) // 2 + 1].clone() if max(sizes) > 1 else torch.zeros(1, device=device, dtype=dtype)
    n = torch.tensor(sizes, dtype=dtype, device=device).view(-1, 1, 1)
    inside = f <= torch.div(n, 2, rounding_mode="floor")
    base = 1.0 / torch.sinc(torch.where(inside, f / n, 0.0))
    if sigma is not None:
        base = base * torch.exp(-f.square() / (2.0 * sigma**2))
    c = torch.where((f == 0) | (2 * f == n), 1.0, 2.0) * inside
    return t, f, n, base, c


def _spectrum(w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...], sigma: float | None):
    """Spectra of A axes at once (w, loc: A×K; axis a has length sizes[a]) on one frequency grid:
    amplitude A_f = w·sinc(fw)·base and phase φ_f = π(f/n − fw − 2fℓ), both A×K×F."""
    _, f, n, base, _ = _grid(sizes, sigma, w.device, w.dtype)
    w, loc = w.unsqueeze(-1), loc.unsqueeze(-1)
    fw = f * w
    return w * torch.sinc(fw) * base, math.pi * (f / n - fw - 2.0 * f * loc)


def box_masks(w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The exact cyclic interval masks the Gaudi formula gives at σ = ∞ on the 1/n grid, as booleans:
    per axis a K×sizes[a] mask, true on [round(ℓn), round(ℓn) + round(wn)) (w clamped to [0, 1])."""
    t, _, n, _, _ = _grid(sizes, None, w.device, w.dtype)
    length, start = torch.round(w.clamp(0.0, 1.0) * n[:, 0]), torch.round(loc * n[:, 0])
    return tuple(
        torch.remainder(t[:size] - start[a, :, None], size) < length[a, :, None]
        for a, size in enumerate(sizes)
    )


class _GaudiMasks(torch.autograd.Function):
    """Masks of A axes (one K-vector of widths and locations each) in one autograd node.

    Forward by irfft (or the exact box), backward by the analytic derivative of the spectrum:
    ∂m_t/∂w = Σ_f c_f [A'_f cos θ + πf A_f sin θ], ∂m_t/∂ℓ = Σ_f c_f 2πf A_f sin θ, θ = φ_f + 2πft/n,
    evaluated for every t at once through one rfft of the incoming gradient per axis.
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...], sigma: float | None, box: bool
    ):
        ctx.save_for_backward(w, loc)
        ctx.sizes, ctx.sigma = sizes, sigma
        if box:
            return tuple(mask.to(w.dtype) for mask in box_masks(w, loc, sizes))
        amp, phase = _spectrum(w, loc, sizes, sigma)
        spec = torch.polar(torch.ones_like(phase), phase) * amp
        return tuple(
            torch.fft.irfft(spec[a, :, : n // 2 + 1], n, norm="forward") for a, n in enumerate(sizes)
        )

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        w, loc = ctx.saved_tensors
        grad_w, grad_loc = mask_grads(w, loc, ctx.sizes, ctx.sigma, grads)
        return grad_w, grad_loc, None, None, None


def mask_grads(
    w: torch.Tensor,
    loc: torch.Tensor,
    sizes: tuple[int, ...],
    sigma: float | None,
    grads: tuple[torch.Tensor | None, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of the masks of A axes (w, loc: A×K; grads[a]: K×sizes[a] or None):
    (∂L/∂w, ∂L/∂loc), both A×K, by the analytic derivative of the spectrum (see `_GaudiMasks`)."""
    _, f, n, base, c = _grid(sizes, sigma, w.device, w.dtype)
    spec = w.new_zeros(
        (len(sizes), w.shape[1], f.numel()),
        dtype=torch.complex128 if w.dtype == torch.float64 else torch.complex64,
    )
    for a, (size, g) in enumerate(zip(sizes, grads, strict=True)):
        if g is not None:
            spec[a, :, : size // 2 + 1] = torch.fft.rfft(g.to(w.dtype), n=size)  # G_f = Σ_t g_t e^{−2πift/n}
    args = (w, loc, spec.real, spec.imag, f, n, c * base)
    if not torch.compiler.is_compiling() and w.is_cuda and not _EAGER and not _COMPILE_FAILED:
        try:
            terms = _compiled_terms()(*args)
        except _compile_errors() as err:  # Inductor cannot build here (no Triton, GPU too old, no C compiler)
            _COMPILE_FAILED.append(err)
            warnings.warn(f"gblr mask gradient runs eager: torch.compile failed ({err!r:.200})", stacklevel=2)
        else:
            _COMPILED_RUNS[0] += 1
            return terms
    return _spectral_terms(*args)


_COMPILE_FAILED: list[Exception] = []
_COMPILED_RUNS = [0]  # calls the compiled kernel served (a GPU test checks the fast path ran)
_EAGER = False  # set by `eager_terms`


@contextlib.contextmanager
def eager_terms() -> Iterator[None]:
    """Within: the mask gradient runs eager on a GPU too. For shapes used for a few hundred steps only
    (fitting layer after layer), where compiling the kernel for each shape costs more than it saves."""
    global _EAGER
    before, _EAGER = _EAGER, True
    try:
        yield
    finally:
        _EAGER = before


@functools.cache
def _compile_errors() -> tuple[type[Exception], ...]:
    """What torch.compile raises when its backend cannot build for this machine. Dynamo's own errors
    (a graph it cannot trace: a bug here) and errors of the function itself are not among them."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor import exc

    # newer torch raises these two unwrapped (older wraps every backend error in BackendCompilerFailed)
    names = ("TritonMissing", "GPUTooOldForTriton")
    return (BackendCompilerFailed, *(getattr(exc, name) for name in names if hasattr(exc, name)))


def _spectral_terms(w, loc, g_re, g_im, f, n, cb):  # noqa: ANN001, ANN202
    """The sums over f of the gradient: with x = πfw, φ = π(f/n − fw − 2fℓ) and P = e^{iφ}·conj(G_f),
    πf·A_f = sin(x)·base and A'_f = cos(x)·base, so ∂L/∂w = Σ c·base·(cos x·Re P + sin x·Im P) and
    ∂L/∂ℓ = 2 Σ c·base·sin x·Im P. Pure elementwise work and two reductions: one fused kernel on a GPU."""
    x = math.pi * f * w.unsqueeze(-1)
    phase = math.pi * f / n - x - 2.0 * math.pi * f * loc.unsqueeze(-1)
    cos_p, sin_p = torch.cos(phase), torch.sin(phase)
    re_p = cos_p * g_re + sin_p * g_im
    im_p = sin_p * g_re - cos_p * g_im
    s_im = cb * torch.sin(x) * im_p
    return (cb * torch.cos(x) * re_p + s_im).sum(-1), 2.0 * s_im.sum(-1)


@functools.cache
def _compiled_terms():  # noqa: ANN202
    """`_spectral_terms` compiled once per process (Inductor fuses it into one kernel per shape)."""
    return torch.compile(_spectral_terms, dynamic=False, fullgraph=True)


def gaudi_mask(
    widths: torch.Tensor, locations: torch.Tensor, n: int, sigma: float | None = None
) -> torch.Tensor:
    """Gaudi masks (…, K) → (…, K, n): irfft of w·sinc(fw)/sinc(f/n)·e^{−f²/2σ²}·e^{iπf(1/n−w) − 2πifℓ}.

    No rounding here (the layer rounds to the 1/n grid first). σ=None drops the Gaussian factor; then
    integer w·n, ℓ·n give the exact 0/1 indicator of the cyclic interval [ℓn, ℓn + wn).
    """
    (mask,) = _GaudiMasks.apply(widths.reshape(1, -1), locations.reshape(1, -1), (n,), sigma, False)
    return mask.reshape(*widths.shape, n)


def _ste_round(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Round to the 1/n grid in the forward, identity in the backward."""
    return x + (torch.round(x * n) / n - x).detach()
