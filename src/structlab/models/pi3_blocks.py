"""Building blocks of π3 (see pi3.py): attention with 2-D RoPE, transformer blocks, the DINOv2
encoder, the head decoders and the point / confidence / camera heads.

Module and parameter names follow the official checkpoint, so its state dict loads as is. Every
matmul is an `nn.Linear` called as a module: surgery swaps them for structured layers by name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sign-folded sin), each tokens-per-frame × head dim


def rope_tables(h: int, w: int, head_dim: int, specials: int, base: float, device, dtype) -> Rope:
    """cos/sin for the tokens of one frame: `specials` tokens at (0, 0), then the h×w patches at
    (row + 1, col + 1). The first half of the head dim turns with the row, the second with the column,
    each half as rotate-half 1-D RoPE. sin is stored with rotate-half's sign folded in (see `apply_rope`).
    Computed in float32, then cast (more exact than rounding the angles to bf16 first)."""
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half)
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w) + 1
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h) + 1
    zero = torch.zeros(specials, device=device)
    angles = [torch.outer(torch.cat([zero, p]), inv_freq) for p in (rows, cols)]  # T × half/2 each
    # per half: cat(freqs, freqs); the first quarter of each half gets -sin (rotate-half's -x2)
    cos = torch.cat([a.cos() for a in angles for _ in (0, 1)], -1)
    sin = torch.cat([s * a.sin() for a in angles for s in (-1, 1)], -1)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: batch × heads × (frames·T) × head dim, frames of T tokens each (T = the tables' length)."""
    cos, sin = rope
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    b, heads, length, d = x.shape
    x = x.reshape(b, heads, length // cos.shape[0], cos.shape[0], d)  # frames × T: tables broadcast
    # swapping the quarters within each half (sign in `sin`) is rotate-half on both halves at once
    swapped = x.unflatten(-1, (2, 2, d // 4)).flip(-2).flatten(-3)
    return (x * cos + swapped * sin).reshape(b, heads, length, d)


Norms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]  # q w, q b, k w, k b, eps


def prepare_qk(q: torch.Tensor, k: torch.Tensor, norms: Norms | None, rope: Rope | None):
    """QK-norm (LayerNorm over the head dim; under autocast in float32, back to q's dtype), then RoPE."""
    if norms is not None:
        qw, qb, kw, kb, eps = norms
        dtype = q.dtype
        q = F.layer_norm(q, q.shape[-1:], qw, qb, eps).to(dtype)
        k = F.layer_norm(k, k.shape[-1:], kw, kb, eps).to(dtype)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return q, k


@functools.cache
def _fused_prepare_qk():
    """prepare_qk as one generated kernel: eager PyTorch spends ~0.9 ms per 1024-wide block at 14k
    tokens on it (a LayerNorm kernel slow on 64-wide rows, copies, casts, four RoPE passes)."""
    return torch.compile(prepare_qk, dynamic=True, fullgraph=True)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if qk_norm:  # LayerNorm over the head dim, default eps (official)
            self.q_norm = nn.LayerNorm(dim // heads)
            self.k_norm = nn.LayerNorm(dim // heads)
        self.qk_norm = qk_norm
        self.fuse_qk = False  # on CUDA: `prepare_qk` compiled (Pi3's `fuse_qk`)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        norms = None
        if self.qk_norm:
            qn, kn = self.q_norm, self.k_norm
            norms = (qn.weight, qn.bias, kn.weight, kn.bias, qn.eps)
        if norms is not None or rope is not None:
            fused = self.fuse_qk and q.is_cuda and not torch.compiler.is_compiling()
            q, k = (_fused_prepare_qk() if fused else prepare_qk)(q, k, norms, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, length, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `layer_scale` None: no LayerScale (the head decoders)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = residual(x, self.attn(self.norm1(x), rope), self.ls1)
        return residual(x, self.mlp(self.norm2(x)), self.ls2)


class DecoderBlock(Block):
    """A decoder block on B×N×T×C tokens: attention within each frame, or (`across_frames`) over all
    of a sample's frames at once. One shape in and out keeps the decoder a plain chain of blocks, so
    block-by-block calibration (compress/stages.py) can feed each block the previous one's output."""

    def __init__(self, *args, across_frames: bool, **kw) -> None:
        super().__init__(*args, **kw)
        self.across_frames = across_frames

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        b, n, t, c = x.shape
        y = super().forward(x.reshape(b, n * t, c) if self.across_frames else x.reshape(b * n, t, c), rope)
        return y.view(b, n, t, c)


def residual(x: torch.Tensor, y: torch.Tensor, scale: nn.Module) -> torch.Tensor:
    """x + scale(y); LayerScale as one addcmul (a pass over the float32 stream fewer)."""
    return torch.addcmul(x, y, scale.gamma) if isinstance(scale, LayerScale) else x + scale(y)


def run_blocks(blocks, x: torch.Tensor, rope: Rope | None, checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        x = (
            torch.utils.checkpoint.checkpoint(blk, x, rope, use_reentrant=False)
            if checkpoint
            else blk(x, rope)
        )
    return x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoEncoder(nn.Module):
    """DINOv2 ViT with register tokens (no mask token); returns the normalised patch tokens."""

    def __init__(
        self, dim: int, depth: int, heads: int, patch: int, registers: int, grid: int, mlp_ratio: float
    ):
        super().__init__()
        self.grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, layer_scale=1e-5) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def pos_embedding(self, h: int, w: int) -> torch.Tensor:
        """The cls + grid position embedding, the grid part resized to h×w (bicubic, antialiased; in
        float32 like DINOv2: the antialiased kernel differs from plain bicubic even when upsampling)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_embed.proj.stride[0], x.shape[-1] // self.patch_embed.proj.stride[1]
        x = self.patch_embed(x)
        # cat promotes to the cls token's dtype (float32 under autocast, as DINOv2): a float32 stream
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embedding(h, w).to(x.dtype)
        regs = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)  # after cls, no position
        x = torch.cat([x[:, :1], regs, x[:, 1:]], 1)
        x = run_blocks(self.blocks, x, None, self.grad_checkpointing and torch.is_grad_enabled())
        return self.norm(x)[:, 1 + regs.shape[1] :]


class HeadDecoder(nn.Module):
    """Linear in, frame-attention RoPE blocks (no QK-norm, no LayerScale), Linear out."""

    def __init__(self, in_dim: int, dim: int, heads: int, depth: int, out_dim: int, mlp_ratio: float):
        super().__init__()
        self.projects = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.linear_out = nn.Linear(dim, out_dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        x = self.projects(x)
        x = run_blocks(self.blocks, x, rope, self.grad_checkpointing and torch.is_grad_enabled())
        return self.linear_out(x)


class PixelHead(nn.Module):
    """Each patch token → `channels` values for each of its patch×patch pixels (pixel shuffle)."""

    def __init__(self, dim: int, channels: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(dim, channels * patch * patch)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.proj(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return F.pixel_shuffle(x, self.patch).permute(0, 2, 3, 1)  # BN × H × W × channels


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.res_conv3(F.relu(self.res_conv2(F.relu(self.res_conv1(x))))))


class CameraHead(nn.Module):
    """Patch features → 4×4 camera-to-world pose (translation + SVD-orthogonalised rotation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv = nn.ModuleList(ResBlock(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.res_conv:
            x = blk(x)
        x = self.more_mlps(x.mean(1))  # average over the patches
        rot = svd_orthogonalize(self.fc_rot(x).view(-1, 3, 3))
        pose = torch.cat([rot, self.fc_t(x).unsqueeze(-1)], -1)
        bottom = F.pad(x.new_ones(x.shape[0], 1, 1), (3, 0))  # [0, 0, 0, 1] without a host copy
        return torch.cat([pose, bottom], 1)


def svd_orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """The official map from 9 numbers to a rotation: rows L2-normalised, transposed, then the
    nearest rotation V·diag(1, 1, det(V·Uᵀ))·Uᵀ from its SVD (torch.svd's V is linalg.svd's Vhᵀ)."""
    dtype = m.dtype  # SVD needs float32 or float64 (a bf16 model)
    u, _, vh = torch.linalg.svd(F.normalize(m.float(), dim=-1).mT)
    v = vh.mT
    vu = v @ u.mT
    det = (vu[:, 0] * torch.linalg.cross(vu[:, 1], vu[:, 2], dim=-1)).sum(-1)  # 3×3 det, no LU
    v = torch.cat([v[..., :2], v[..., 2:] * det[:, None, None]], -1)
    return (v @ u.mT).to(dtype)
