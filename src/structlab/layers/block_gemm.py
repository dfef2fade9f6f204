"""Block-sparse GEMMs of the exported Gaudi-GBLR layer: one Triton kernel per stage, and the same
computation in plain torch (CPU, and the reference the kernels are tested against).

Both stages multiply BK×BN weight blocks packed in CSR order: output tile i (BN wide) owns blocks
`ptr[i]:ptr[i+1]`. Stage in: zᵀ[tile i] = Σ_q (x[:, idx[q]·BK : idx[q]·BK + BK] @ blocks[q])ᵀ, i.e.
each tile of BN z-columns reads only the input blocks some of its components touch. Stage out:
y[:, tile j] = Σ_q zᵀ[idx[q]]ᵀ @ blocks[q] + bias, idx[q] naming the BK z-rows that reach tile j.
z is kept transposed (rows contiguous in tokens) so that stage out gathers whole rows, which stays
coalesced; both stages accumulate in float32.
"""

from __future__ import annotations

import warnings
from itertools import pairwise

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as triton_errors
except ImportError:  # no Triton (e.g. macOS): the torch path serves every device
    triton = None
else:
    # what Triton raises when it cannot build or run here: no C compiler for its launcher or no driver
    # (RuntimeError, ImportError), a target it cannot compile for (CompilationError, ptxas errors),
    # too little shared memory for the launch shape (OutOfResources)
    _CANNOT_LAUNCH = (RuntimeError, ImportError, CompilationError, triton_errors.OutOfResources)
    _CANNOT_LAUNCH += (getattr(triton_errors, "PTXASError", RuntimeError),)


class KernelsUnavailable(RuntimeError):
    """Triton could not build or launch a kernel on this machine (raised from the launch only)."""


def blocks_in_torch(
    x: torch.Tensor, blocks: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """zᵀ (tiles·BN × T) from x (T × n): the stage-in computation in torch, one GEMM per z tile."""
    tokens, n = x.shape
    _, bk, bn = blocks.shape
    xp = F.pad(x, (0, -n % bk))
    zt = x.new_zeros(ptr.numel() - 1, bn, tokens)
    offsets = torch.arange(bk, device=x.device)
    bounds = ptr.tolist()
    for i, (a, b) in enumerate(pairwise(bounds)):
        if b > a:
            cols = (idx[a:b, None].long() * bk + offsets).flatten()
            zt[i] = (xp[:, cols] @ blocks[a:b].reshape(-1, bn)).T
    return zt.view(-1, tokens)


def blocks_out_torch(
    zt: torch.Tensor, blocks: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """y (T × m) from zᵀ: the stage-out computation in torch, one GEMM per output tile."""
    tokens, m = zt.shape[1], bias.numel()
    _, bk, bn = blocks.shape
    bounds = ptr.tolist()
    y = zt.new_zeros(tokens, (len(bounds) - 1) * bn)
    for j, (a, b) in enumerate(pairwise(bounds)):
        if b > a:
            y[:, j * bn : (j + 1) * bn] = zt[idx[a * bk : b * bk].long()].T @ blocks[a:b].reshape(-1, bn)
    return y[:, :m] + bias


if triton is not None:

    @triton.jit
    def _blocks_in_kernel(x_ptr, w_ptr, ptr_ptr, idx_ptr, zt_ptr, T, n, stride_x, stride_z,
                          BK: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        tile, pid_t = tl.program_id(0), tl.program_id(1)  # tiles vary fastest: neighbours share x rows
        rows = pid_t * BT + tl.arange(0, BT)
        k, c = tl.arange(0, BK), tl.arange(0, BN)
        row_ok = rows[:, None] < T
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        for q in range(tl.load(ptr_ptr + tile), tl.load(ptr_ptr + tile + 1)):
            cols = tl.multiple_of(tl.load(idx_ptr + q) * BK, BK) + k  # aligned: vector loads
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=row_ok & (cols[None, :] < n), other=0.0)  # fmt: skip
            w = tl.load(w_ptr + q * BK * BN + k[:, None] * BN + c[None, :])
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        out = (tile * BN + c).to(tl.int64)
        tl.store(
            zt_ptr + out[None, :] * stride_z + rows[:, None], acc.to(zt_ptr.dtype.element_ty), mask=row_ok
        )

    @triton.jit
    def _blocks_out_kernel(zt_ptr, w_ptr, ptr_ptr, idx_ptr, bias_ptr, y_ptr, T, m, stride_z, stride_y,
                           BK: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        tile, pid_t = tl.program_id(0), tl.program_id(1)  # tiles vary fastest: neighbours share z
        rows = pid_t * BT + tl.arange(0, BT)
        k, c = tl.arange(0, BK), tl.arange(0, BN)
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        for q in range(tl.load(ptr_ptr + tile), tl.load(ptr_ptr + tile + 1)):
            src = tl.load(idx_ptr + q * BK + k).to(tl.int64) * stride_z
            a = tl.load(zt_ptr + src[:, None] + rows[None, :], mask=rows[None, :] < T, other=0.0)
            w = tl.load(w_ptr + q * BK * BN + k[:, None] * BN + c[None, :])
            if IEEE:
                acc += tl.dot(tl.trans(a), w, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a), w)
        cols = tile * BN + c
        acc += tl.load(bias_ptr + cols, mask=cols < m, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cols[None, :] < m))  # fmt: skip


# launch shape: the fastest of scripts/bench_export_tiles.py's sweep on an H100 (docs/benchmarks.md)
TOKEN_TILE, NUM_WARPS, NUM_STAGES = 64, 4, 4


def _launch(kernel, tiles: int, tokens: int, blocks: torch.Tensor, *args) -> None:  # noqa: ANN001
    _, bk, bn = blocks.shape
    grid = (tiles, triton.cdiv(tokens, TOKEN_TILE))
    ieee = blocks.dtype == torch.float32
    try:
        kernel[grid](
            *args, BK=bk, BN=bn, BT=TOKEN_TILE, IEEE=ieee, num_warps=NUM_WARPS, num_stages=NUM_STAGES
        )
    except _CANNOT_LAUNCH as err:
        raise KernelsUnavailable(f"{err!r:.200}") from err


def blocks_in(x: torch.Tensor, blocks: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Stage in with the Triton kernel (x contiguous, T × n)."""
    (tokens, n), tiles = x.shape, ptr.numel() - 1
    # rows of zᵀ start on 32-byte boundaries (stride a multiple of 16): stage out's loads vectorise
    zt = x.new_empty(tiles * blocks.shape[2], -(-tokens // 16) * 16)[:, :tokens]
    args = (x, blocks, ptr, idx, zt, tokens, n, x.stride(0), zt.stride(0))
    _launch(_blocks_in_kernel, tiles, tokens, blocks, *args)
    return zt


def blocks_out(
    zt: torch.Tensor, blocks: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Stage out with the Triton kernel."""
    tokens, m, tiles = zt.shape[1], bias.numel(), ptr.numel() - 1
    y = zt.new_empty(tokens, m)
    args = (zt, blocks, ptr, idx, bias, y, tokens, m, zt.stride(0), y.stride(0))
    _launch(_blocks_out_kernel, tiles, tokens, blocks, *args)
    return y


_KERNELS_FAILED: list[Exception] = []


def block_sparse_linear(
    x: torch.Tensor,
    w_in: torch.Tensor,
    ptr_in: torch.Tensor,
    idx_in: torch.Tensor,
    w_out: torch.Tensor,
    ptr_out: torch.Tensor,
    idx_out: torch.Tensor,
    bias: torch.Tensor,
    kernels: bool | None = None,
) -> torch.Tensor:
    """y = stage out(stage in(x)) for x (T × n) contiguous. `kernels` (default: on a CUDA device)
    runs the Triton kernels; when they cannot be built the torch path takes over (warned once)."""
    if kernels is None:
        kernels = x.is_cuda
    if kernels and triton is not None and not _KERNELS_FAILED:
        try:
            return blocks_out(blocks_in(x, w_in, ptr_in, idx_in), w_out, ptr_out, idx_out, bias)
        except KernelsUnavailable as err:  # only the launches are covered: errors in our own code propagate
            _KERNELS_FAILED.append(err)
            warnings.warn(f"gblr export runs without its Triton kernels: {err!r:.200}", stacklevel=2)
    zt = blocks_in_torch(x, w_in, ptr_in, idx_in)
    return blocks_out_torch(zt, w_out, ptr_out, idx_out, bias)
