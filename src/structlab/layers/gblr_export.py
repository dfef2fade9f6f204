"""Inference form of a Gaudi-GBLR layer: only the masks' non-zero blocks are multiplied.

`GaudiGBLRLinear.export()` builds a `GBLRInference`; the planning helpers here decide how the
components' blocks are grouped into few GEMMs (dynamic programming over sorted intervals).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from structlab.layers.base import compute_dtype


def _cyclic_support(mask: torch.Tensor) -> tuple[int, int]:
    """(start, length) of the shortest cyclic interval holding every non-zero of a 1-D mask."""
    idx = torch.nonzero(mask).flatten().tolist()
    n = mask.numel()
    if not idx:
        return 0, 0
    if len(idx) == n:
        return 0, n
    gaps = np.diff(np.asarray(idx + [idx[0] + n]))
    j = int(np.argmax(gaps))
    return idx[(j + 1) % len(idx)], n - int(gaps[j]) + 1


def _pieces(start: int, length: int, n: int) -> list[tuple[int, int]]:
    if start + length <= n:
        return [(start, start + length)]
    return [(start, n), (0, start + length - n)]


def _group_hulls(starts: np.ndarray, ends: np.ndarray, cols: int, overhead: int) -> list[tuple[int, int]]:
    """Split pieces sorted by start into consecutive groups minimising Σ hull·columns + overhead
    (hulls and column counts padded to the ALIGN grid, as the GEMMs run them)."""
    p = len(starts)
    best = np.zeros(p + 1)
    cut = np.zeros(p + 1, dtype=int)
    for j in range(1, p + 1):
        hull = _up(np.maximum.accumulate(ends[:j][::-1])[::-1]) - _down(starts[:j])
        count = _up((j - np.arange(j)) * cols)
        total = best[:j] + hull * count + overhead
        cut[j] = int(np.argmin(total))
        best[j] = total[cut[j]]
    groups, j = [], p
    while j > 0:
        groups.append((int(cut[j]), j))
        j = int(cut[j])
    return groups[::-1]


def _segments(starts: np.ndarray, ends: np.ndarray, size: int, cols: int, overhead: int, gather: int):
    """Partition [0, size) into output segments (ends on the ALIGN grid) minimising
    Σ len·(overlapping columns + 1) + per-segment and per-gathered-column costs."""
    points = np.unique(np.concatenate([[0, size], _down(starts), _up(ends)]).clip(0, size))
    s_sorted, e_sorted = np.sort(starts), np.sort(ends)
    q = len(points)
    best = np.full(q, np.inf)
    best[0] = 0.0
    cut = np.zeros(q, dtype=int)
    for j in range(1, q):
        a = points[:j]
        b = points[j]
        overlap = np.searchsorted(s_sorted, b, "left") - np.searchsorted(e_sorted, a, "right")
        width = _up(overlap * cols + 1)
        total = best[:j] + (b - a) * width + overhead + gather * width
        cut[j] = int(np.argmin(total))
        best[j] = total[cut[j]]
    segs, j = [], q - 1
    while j > 0:
        segs.append((int(points[cut[j]]), int(points[j])))
        j = int(cut[j])
    return segs[::-1]


ALIGN = 8  # GEMM operands start and span multiples of 8 elements (16 bytes): tensor-core kernels need it


def _down(x):  # noqa: ANN001, ANN202
    return x // ALIGN * ALIGN


def _up(x):  # noqa: ANN001, ANN202
    return -(-x // ALIGN) * ALIGN


class GBLRInference(nn.Module):
    """Exported Gaudi-GBLR: y = x Ṽ Ũᵀ + b computed block by block, skipping the masks' zeros.

    Stage 1 groups the components' input intervals (sorted, split by dynamic programming to balance
    wasted MACs against GEMM launches) and writes z = x Ṽ into one buffer, a GEMM per group over the
    group's input slice. Stage 2 partitions the output axis into segments; each segment gathers the
    z columns of the components that reach it and writes its slice of y with one GEMM whose extra
    ones-column adds the bias, so y is written once. Every slice, offset and inner dimension is padded
    with zeros to a multiple of 8 elements: unaligned bf16 GEMMs fall off the tensor-core kernels (4×
    slower on an H100). When this plan costs more than the dense matrix (wide blocks, soft masks),
    the module stores W and runs one dense GEMM instead.
    """

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        m_out: torch.Tensor,
        m_in: torch.Tensor,
        rank: int,
        bias: torch.Tensor | None,
        group_overhead: int = 16384,
        gather_cost: int = 256,
    ) -> None:
        super().__init__()
        m, n = u.shape[0], v.shape[0]
        self.in_features, self.out_features = n, m
        bias = torch.zeros(m, device=u.device) if bias is None else bias.detach().float()
        comps = []
        for k in range(m_out.shape[0]):
            so, lo = _cyclic_support(m_out[k])
            si, li = _cyclic_support(m_in[k])
            if lo and li:
                comps.append((k, _pieces(si, li, n), _pieces(so, lo, m)))
        in_pieces = sorted(((a, b, k) for k, pin, _ in comps for a, b in pin), key=lambda t: t[0])
        out_pieces = [(a, b, k) for k, _, pout in comps for a, b in pout]
        plan_cost, stage1, stage2 = 0.0, [], []
        col_of: dict[int, list[int]] = {}
        offset = 0
        if in_pieces:
            st = np.array([p[0] for p in in_pieces])
            en = np.array([p[1] for p in in_pieces])
            for i, j in _group_hulls(st, en, rank, group_overhead):
                lo_, hi_ = int(_down(st[i:j].min())), min(n, int(_up(en[i:j].max())))
                width = int(_up((j - i) * rank))
                block = v.new_zeros(hi_ - lo_, width)
                for c, (a, b, k) in enumerate(in_pieces[i:j]):
                    block[a - lo_ : b - lo_, c * rank : (c + 1) * rank] = v[a:b, k * rank : (k + 1) * rank]
                    col_of.setdefault(k, []).append(offset + c * rank)
                stage1.append((lo_, hi_, offset, offset + width, block))
                plan_cost += (hi_ - lo_) * width + group_overhead
                offset += width
        ones, zero = offset, offset + 1  # z's last ALIGN columns: a ones column (bias), then zeros
        gather, extra_dst, extra_src = [], [], []
        so = np.array([p[0] for p in out_pieces], dtype=int)
        eo = np.array([p[1] for p in out_pieces], dtype=int)
        for a, b in _segments(so, eo, m, rank, group_overhead, gather_cost):
            ks = sorted({k for (s, e, k) in out_pieces if s < b and e > a})
            start = len(gather)
            width = int(_up(len(ks) * rank + 1))
            block = u.new_zeros(width, b - a)
            for c, k in enumerate(ks):
                block[c * rank : (c + 1) * rank] = u[a:b, k * rank : (k + 1) * rank].T
                first, *rest = col_of[k]
                for q in range(rank):
                    gather.append(first + q)
                    for other in rest:
                        extra_dst.append(start + c * rank + q)
                        extra_src.append(other + q)
            block[len(ks) * rank] = bias[a:b]
            gather += [ones] + [zero] * (width - len(ks) * rank - 1)
            stage2.append((a, b, start, len(gather), block))
            plan_cost += (b - a) * width + group_overhead + gather_cost * width
        self.dense = plan_cost >= m * n
        self._stage1 = [(a, b, c0, c1) for a, b, c0, c1, _ in stage1]
        self._stage2 = [(a, b, c0, c1) for a, b, c0, c1, _ in stage2]
        self.width = offset + ALIGN
        if self.dense:
            self.register_buffer("weight", u @ v.T)
            self.register_buffer("bias", bias)
            self.blocks_in, self.blocks_out = nn.ParameterList(), nn.ParameterList()
        else:
            self.blocks_in = nn.ParameterList([nn.Parameter(blk, requires_grad=False) for *_, blk in stage1])
            self.blocks_out = nn.ParameterList([nn.Parameter(blk, requires_grad=False) for *_, blk in stage2])
        self.register_buffer("gather_idx", torch.tensor(gather, dtype=torch.long, device=u.device))
        self.register_buffer("extra_dst", torch.tensor(extra_dst, dtype=torch.long, device=u.device))
        self.register_buffer("extra_src", torch.tensor(extra_src, dtype=torch.long, device=u.device))
        self.plan_macs = int(plan_cost)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, self.in_features).to(dtype)
            if self.dense:
                return F.linear(x2, self.weight.to(dtype), self.bias.to(dtype)).view(*lead, self.out_features)
            z = x2.new_empty(x2.shape[0], self.width)
            z[:, -ALIGN:] = 0.0
            z[:, -ALIGN] = 1.0
            for (a, b, c0, c1), blk in zip(self._stage1, self.blocks_in, strict=True):
                torch.mm(x2[:, a:b], blk.to(dtype), out=z[:, c0:c1])
            z2 = z.index_select(1, self.gather_idx)
            if self.extra_dst.numel():
                z2.index_add_(1, self.extra_dst, z.index_select(1, self.extra_src))
            y = x2.new_empty(x2.shape[0], self.out_features)
            for (a, b, c0, c1), blk in zip(self._stage2, self.blocks_out, strict=True):
                torch.mm(z2[:, c0:c1], blk.to(dtype), out=y[:, a:b])
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dense={self.dense}, "
            f"gemms={len(self._stage1) + len(self._stage2)}, plan_macs={self.plan_macs}"
        )
