"""Inference form of a Gaudi-GBLR layer: only the weight blocks that hold non-zeros are multiplied.

`GaudiGBLRLinear.export()` builds a `GBLRInference`. The plan: the live component columns are sorted
(long input intervals first, then by where they start) and cut into tiles of `tile` columns of
z = x Ṽ; stage in multiplies, per tile, only the `block`-wide input blocks its intervals touch. Stage
out computes y = z Ũᵀ + b per output tile of `tile` rows from the z columns whose output intervals
reach it, `block` at a time. Intervals that wrap past the end need nothing special: a block set is a
set. On a GPU each stage is one Triton kernel (block_gemm.py); elsewhere the same plan runs in torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from structlab.layers.base import compute_dtype
from structlab.layers.block_gemm import block_sparse_linear


def _cyclic_start(support: torch.Tensor) -> int:
    """Start of the shortest cyclic interval holding every true entry of a 1-D mask."""
    idx = torch.nonzero(support).flatten().numpy()
    if len(idx) in (0, support.numel()):
        return 0
    gaps = np.diff(np.append(idx, idx[0] + support.numel()))
    return int(idx[(int(np.argmax(gaps)) + 1) % len(idx)])


def _tile_any(support: torch.Tensor, block: int) -> torch.Tensor:
    """(P × size) bool → (P × ⌈size/block⌉): which `block`-wide blocks hold a true entry."""
    size = support.shape[1]
    nb = -(-size // block)
    return F.pad(support, (0, nb * block - size)).view(support.shape[0], nb, block).any(-1)


def _z_positions(blocks: np.ndarray, tile: int) -> torch.Tensor:
    """z column of each sorted component: consecutive runs of ≤ `tile` components share a z tile, the
    runs chosen (dynamic programming) to minimise Σ over tiles of the input blocks they touch, since
    stage in costs block·tile MACs per token for each. `blocks`: (components × input blocks) bool."""
    count = len(blocks)
    best = np.zeros(count + 1)
    cut = np.zeros(count + 1, dtype=int)
    for end in range(1, count + 1):
        start = max(0, end - tile)
        union = np.logical_or.accumulate(blocks[start:end][::-1], axis=0)[::-1].sum(1)  # [j, end)
        total = best[start:end] + union
        cut[end] = start + int(np.argmin(total))
        best[end] = total[cut[end] - start]
    runs, end = [], count
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return torch.tensor(
        [t * tile + i for t, (a, b) in enumerate(reversed(runs)) for i in range(b - a)], dtype=torch.long
    )


def block_plan(
    u: torch.Tensor,
    v: torch.Tensor,
    m_out: torch.Tensor,
    m_in: torch.Tensor,
    rank: int,
    block: int,
    tile: int,
) -> dict[str, torch.Tensor]:
    """Packed weight blocks (block × tile) and CSR indices of both stages for Ũ (m×Kr), Ṽ (n×Kr)."""
    m, n = u.shape[0], v.shape[0]
    u, v = u.detach().float().cpu(), v.detach().float().cpu()
    sup_out = (m_out.detach().cpu() != 0).repeat_interleave(rank, 0)
    sup_in = (m_in.detach().cpu() != 0).repeat_interleave(rank, 0)
    cols = (sup_out.any(1) & sup_in.any(1)).nonzero().flatten().tolist()
    long_first = [(int(sup_in[c].sum()) <= n // 2, _cyclic_start(sup_in[c]), c) for c in cols]
    order = [c for *_, c in sorted(long_first)]
    pos = _z_positions(_tile_any(sup_in[order], block).numpy(), tile)
    tiles_z = -(-(int(pos[-1]) + 1) // tile) if len(order) else 0
    p = tiles_z * tile  # z columns, tile by tile; the padding columns stay zero
    nb_in, tiles_y = -(-n // block), -(-m // tile)
    v_z = v.new_zeros(nb_in * block, p)
    v_z[:n, pos] = v[:, order]
    u_z = u.new_zeros(tiles_y * tile, p + 1)  # + a zero column that padded stage-out slots point to
    u_z[:m, pos] = u[:, order]
    in_sup, out_sup = sup_in.new_zeros(p, n), sup_out.new_zeros(p, m)
    in_sup[pos], out_sup[pos] = sup_in[order], sup_out[order]
    # stage in: z tile i × input block j, for every pair where some column of the tile touches block j
    hit_in = _tile_any(in_sup, block).view(tiles_z, tile, nb_in).any(1)
    tile_i, blk_j = hit_in.nonzero().unbind(1)
    blocks_in = v_z.view(nb_in, block, tiles_z, tile).permute(2, 0, 1, 3)[tile_i, blk_j]
    # stage out: per output tile, the z columns that reach it, padded to whole blocks
    reach = _tile_any(out_sup, tile)  # p × tiles_y
    z_rows, u_cols, counts = [], [], []
    for j in range(tiles_y):
        hit = reach[:, j].nonzero().flatten()
        pad = -hit.numel() % block
        z_rows.append(F.pad(hit, (0, pad)))  # padded slots read z row 0 against a zero weight row
        u_cols.append(F.pad(hit, (0, pad), value=p))
        counts.append((hit.numel() + pad) // block)
    z_rows, u_cols = torch.cat(z_rows), torch.cat(u_cols)
    owner = torch.arange(tiles_y).repeat_interleave(torch.tensor(counts) * block)
    u_blocks = u_z.view(tiles_y, tile, p + 1)[owner, :, u_cols]  # (slots, tile): row = z column
    return {
        "blocks_in": blocks_in.contiguous(),
        "ptr_in": F.pad(hit_in.sum(1).cumsum(0), (1, 0)).int(),
        "idx_in": blk_j.int(),
        "blocks_out": u_blocks.view(-1, block, tile).contiguous(),
        "ptr_out": F.pad(torch.tensor(counts).cumsum(0), (1, 0)).int(),
        "idx_out": z_rows.int(),
    }


class GBLRInference(nn.Module):
    """Exported Gaudi-GBLR: y = x Ṽ Ũᵀ + b over the masks' non-zero blocks only (see module doc).

    When the blocks would cost more than `max_cost` × the dense matrix (wide or soft masks, or a GPU
    where dense GEMMs run faster per MAC than block-sparse ones), the module stores W and runs one
    dense GEMM instead. `plan_macs` counts the MACs per token the blocks cost, zero padding included.
    """

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        m_out: torch.Tensor,
        m_in: torch.Tensor,
        rank: int,
        bias: torch.Tensor | None,
        block: int = 64,
        tile: int = 128,
        max_cost: float = 0.4,
    ) -> None:
        super().__init__()
        m, n = u.shape[0], v.shape[0]
        self.in_features, self.out_features, self.block, self.tile = n, m, int(block), int(tile)
        bias = u.new_zeros(m) if bias is None else bias.detach().float()
        plan = block_plan(u, v, m_out, m_in, rank, self.block, self.tile)
        self.plan_macs = (plan["blocks_in"].shape[0] + plan["blocks_out"].shape[0]) * self.block * self.tile
        self.dense = plan["ptr_in"].numel() == 1 or self.plan_macs >= max_cost * m * n
        self.register_buffer("bias", bias)
        if self.dense:
            self.register_buffer("weight", u.detach().float() @ v.detach().float().T)
        else:
            for name, tensor in plan.items():
                self.register_buffer(name, tensor.to(u.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if self.dense:  # as nn.Linear runs (few host calls: eager inference is launch-bound)
            return F.linear(x, self.weight.to(dtype), self.bias.to(dtype))
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()
            y = block_sparse_linear(
                x2,
                self.blocks_in.to(dtype),
                self.ptr_in,
                self.idx_in,
                self.blocks_out.to(dtype),
                self.ptr_out,
                self.idx_out,
                self.bias.to(dtype),
            )
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dense={self.dense}, "
            f"block={self.block}, tile={self.tile}, plan_macs={self.plan_macs}"
        )
