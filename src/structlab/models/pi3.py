"""π3 (Pi3): permutation-equivariant multi-view geometry — per-pixel 3-D points, confidence and camera
poses from N unordered frames (docs: shared/docs/pi3.md). Implemented here so that its linear layers
can be made structured; the official `model.safetensors` loads as is (`ckpt_path`): the state dict's
keys and shapes are the official ones, and float32 outputs match the official code to ~1e-6.

Sizes: `pi3` (official large, 958.7 M), `pi3_small` (ViT-S/14 trunk, 56.1 M, to train from scratch)
and `pi3_tiny` (0.49 M, CPU tests). Speed: SDPA everywhere, RoPE tables once per grid shape, QK-norm +
RoPE fusable on CUDA (`fuse_qk`, opt-in until measured), no host syncs or per-frame loops; `torch.compile(fullgraph=True)` works.

Where it differs from the official code (same function in float32):
- RoPE angles are computed in float32 and then cast; under bf16 autocast the official code rounds the
  angles themselves to bf16 first (phase errors up to ~0.1 rad at large positions).
- LayerScale + residual is one addcmul; the camera head averages tokens with a mean (= its avg-pool);
  the rotation's determinant is a cross product (no LU); its SVD runs in float32 even for a bf16 model.
- `encoder_proj` (a Linear) exists only when enc_dim != dec_dim (never in the official sizes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlab.layers.base import compute_dtype
from structlab.models.pi3_blocks import (
    Attention,
    CameraHead,
    DecoderBlock,
    DinoEncoder,
    HeadDecoder,
    PixelHead,
    Rope,
    rope_tables,
    run_blocks,
)
from structlab.models.registry import register_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# fmt: off
SIZES: dict[str, dict[str, Any]] = {
    "pi3": dict(  # official large: DINOv2 ViT-L/14-reg encoder, 36 decoder blocks
        enc_dim=1024, enc_depth=24, enc_heads=16, dec_dim=1024, dec_depth=36, dec_heads=16,
        head_width=1024, head_heads=16, head_depth=5, camera_dim=512, pos_grid=37,
    ),
    "pi3_small": dict(  # ViT-S/14-reg encoder, decoder as wide, 12 blocks (6 frame + 6 global)
        enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=384, dec_depth=12, dec_heads=6,
        head_width=384, head_heads=6, head_depth=2, camera_dim=256, pos_grid=37,
    ),
    "pi3_tiny": dict(  # CPU tests: one frame + one global decoder block
        enc_dim=64, enc_depth=2, enc_heads=2, dec_dim=64, dec_depth=2, dec_heads=2,
        head_width=64, head_heads=2, head_depth=1, camera_dim=32, pos_grid=4,
    ),
}
# fmt: on


class Pi3(nn.Module):
    """imgs B×N×3×H×W in [0, 1] (H, W multiples of patch_size) → dict of `points`, `local_points`
    (B×N×H×W×3), `conf` (B×N×H×W×1, logits) and `camera_poses` (B×N×4×4, camera-to-world, OpenCV).

    enc_*: the DINOv2 encoder (num_registers register tokens, a pos_grid² position embedding);
    dec_*: the trunk (even blocks attend within a frame, odd ones across frames; dec_registers tokens);
    head_*: the point / conf / camera decoders; camera_dim: the camera head's width."""

    def __init__(
        self,
        enc_dim: int = 1024,
        enc_depth: int = 24,
        enc_heads: int = 16,
        dec_dim: int = 1024,
        dec_depth: int = 36,
        dec_heads: int = 16,
        head_width: int = 1024,
        head_heads: int = 16,
        head_depth: int = 5,
        camera_dim: int = 512,
        patch_size: int = 14,
        num_registers: int = 4,
        dec_registers: int = 5,
        pos_grid: int = 37,
        mlp_ratio: float = 4.0,
        rope_base: float = 100.0,
        grad_checkpointing: bool = False,
        fuse_qk: bool = False,
    ) -> None:
        super().__init__()
        if dec_depth < 2 or dec_depth % 2:
            raise ValueError(
                f"dec_depth must be even and ≥ 2 (frame and global blocks alternate), got {dec_depth}"
            )
        if (dec_dim // dec_heads) % 4 or (head_width // head_heads) % 4:
            raise ValueError("2-D RoPE needs head dims (dim / heads) divisible by 4")
        self.patch_size, self.dec_registers, self.rope_base = patch_size, dec_registers, rope_base
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.encoder = DinoEncoder(
            enc_dim, enc_depth, enc_heads, patch_size, num_registers, pos_grid, mlp_ratio
        )
        # not in the official model (its encoder and decoder are both 1024 wide): only when they differ
        self.encoder_proj = nn.Linear(enc_dim, dec_dim) if enc_dim != dec_dim else None
        self.register_token = nn.Parameter(torch.zeros(1, 1, dec_registers, dec_dim))
        self.decoder = nn.ModuleList(  # even blocks: within each frame; odd blocks: across all frames
            DecoderBlock(
                dec_dim, dec_heads, mlp_ratio, qk_norm=True, layer_scale=0.01, across_frames=i % 2 == 1
            )
            for i in range(dec_depth)
        )
        head = dict(
            in_dim=2 * dec_dim, dim=head_width, heads=head_heads, depth=head_depth, mlp_ratio=mlp_ratio
        )
        self.point_decoder = HeadDecoder(out_dim=head_width, **head)
        self.point_head = PixelHead(head_width, 3, patch_size)
        self.conf_decoder = HeadDecoder(out_dim=head_width, **head)
        self.conf_head = PixelHead(head_width, 1, patch_size)
        self.camera_decoder = HeadDecoder(out_dim=camera_dim, **head)
        self.camera_head = CameraHead(camera_dim)
        self.head_dims = (dec_dim // dec_heads, head_width // head_heads)  # attention head dims: RoPE tables
        self._rope_cache: dict[tuple, dict[int, Rope]] = {}
        self.init_weights()
        self.set_grad_checkpointing(grad_checkpointing)
        self.set_fuse_qk(fuse_qk)

    def init_weights(self) -> None:
        """For training from scratch (a checkpoint overwrites all of it): ViT-style truncated normal
        Linear weights, zero biases; tokens as DINOv2 / π3 initialise them."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        for token in (self.encoder.cls_token, self.encoder.register_tokens, self.register_token):
            nn.init.normal_(token, std=1e-6)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer blocks' activations in backward (training memory ↓, time ≈ +30%)."""
        self.grad_checkpointing = enabled
        for m in (self.encoder, self.point_decoder, self.conf_decoder, self.camera_decoder):
            m.grad_checkpointing = enabled

    def set_fuse_qk(self, enabled: bool = True) -> None:
        """On CUDA, QK-norm + RoPE as one compiled kernel (`pi3_blocks.prepare_qk`): eager PyTorch
        spends ≈ 40 ms of an 11-frame 364×700 forward there; the first call compiles (seconds)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_qk = enabled

    def rope(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> dict[int, Rope]:
        """{head dim: RoPE tables} for an h×w grid, cached per grid, device, dtype and inference
        mode (inference tensors cannot be saved for a later backward); computed afresh when compiling."""
        make = lambda: {  # noqa: E731
            d: rope_tables(h, w, d, self.dec_registers, self.rope_base, device, dtype)
            for d in set(self.head_dims)
        }
        if torch.compiler.is_compiling():
            return make()
        key = (h, w, device, dtype, torch.is_inference_mode_enabled())
        if key not in self._rope_cache:
            if len(self._rope_cache) > 32:  # many resolutions: don't grow without bound
                self._rope_cache.clear()
            self._rope_cache[key] = make()
        return self._rope_cache[key]

    def decode(self, tokens: torch.Tensor, b: int, n: int, rope: Rope) -> torch.Tensor:
        """Register tokens + patch tokens through the alternating frame / global blocks; returns the
        last two blocks' outputs side by side (B·N × T × 2·dim)."""
        regs = self.register_token.expand(b, n, -1, -1).flatten(0, 1).to(tokens.dtype)
        x = torch.cat([regs, tokens], 1).unflatten(0, (b, n))
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        outs = []
        for i, blk in enumerate(self.decoder):
            x = run_blocks([blk], x, rope, checkpoint)
            if i >= len(self.decoder) - 2:
                outs.append(x)
        return torch.cat(outs, -1).flatten(0, 1)

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, _, height, width = imgs.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image height and width must be multiples of {p}, got {height}×{width}")
        h, w = height // p, width // p
        dtype = self.image_mean.dtype  # the model's own (float32; bf16 for a model cast to it)
        x = ((imgs.flatten(0, 1) - self.image_mean) / self.image_std).to(dtype)
        tokens = self.encoder(x)
        if self.encoder_proj is not None:
            tokens = self.encoder_proj(tokens)
        ropes = self.rope(h, w, imgs.device, compute_dtype(tokens))
        head_rope = ropes[self.head_dims[1]]
        hidden = self.decode(tokens, b, n, ropes[self.head_dims[0]])
        r = self.dec_registers  # the register tokens go through the head decoders, then are dropped
        pts = self.point_decoder(hidden, head_rope)[:, r:]
        conf = self.conf_decoder(hidden, head_rope)[:, r:]
        cam = self.camera_decoder(hidden, head_rope)[:, r:]
        # the final projections, camera MLP and rotation in the model's own precision (float32)
        with autocast_off(imgs.device):
            xy, z = self.point_head(pts.to(dtype), h, w).split([2, 1], -1)
            z = z.exp()
            local = torch.cat([xy * z, z], -1).view(b, n, height, width, 3)
            conf = self.conf_head(conf.to(dtype), h, w).view(b, n, height, width, 1)
            poses = self.camera_head(cam.to(dtype)).view(b, n, 4, 4)
            rot, trans = poses[..., :3, :3], poses[..., :3, 3]
            points = torch.einsum("bnij,bnhwj->bnhwi", rot, local) + trans[:, :, None, None]
        return dict(points=points, local_points=local, conf=conf, camera_poses=poses)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device` (nothing to turn off where it has none: meta tensors counting MACs)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a `.pt`/`.pth` state dict (also one wrapped in "state_dict"/"model")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.ckpt_path={path}: no such file (the official π3 weights are its model.safetensors; "
            "model.ckpt_path=null builds a random init)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def _sizes_of(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The size kwargs a π3 state dict was built with, as far as its keys tell."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    known = {
        "enc_dim": ("encoder.cls_token", -1),
        "dec_dim": ("register_token", -1),
        "head_width": ("point_decoder.projects.weight", 0),
        "camera_dim": ("camera_head.fc_t.weight", 1),
    }
    sizes = {k: sd[key].shape[i] for k, (key, i) in known.items() if key in sd}
    depths = {"enc_depth": "encoder.blocks.", "dec_depth": "decoder.", "head_depth": "point_decoder.blocks."}
    return {**sizes, **{k: count(prefix) for k, prefix in depths.items()}}


def load_checkpoint(model: Pi3, path: str | Path, name: str) -> None:
    """Load `path` strictly into `model`; a mismatch names a few keys and the config that fits."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: {list(sd[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        sizes, ours = _sizes_of(sd), _sizes_of(own)
        fits = [n for n, s in SIZES.items() if all(s[k] == v for k, v in sizes.items())]
        sets = "set " + " ".join(f"model.{k}={v}" for k, v in sizes.items() if ours.get(k) != v)
        hint = f"use model={fits[0]} (or {sets})" if fits else sets
        raise ValueError(
            f"model.ckpt_path={path} does not fit model {name}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(shapes)} of another shape (checkpoint vs model) "
            f"{shapes[:4]}. The checkpoint has {', '.join(f'{k}={v}' for k, v in sizes.items())}: {hint}"
        )
    model.load_state_dict(sd, strict=True)


def _pi3(name: str, sizes: dict[str, Any]):
    def build(ckpt_path: str | None = None, **kw: Any) -> Pi3:
        model = Pi3(**{**sizes, **kw})
        if ckpt_path:
            load_checkpoint(model, ckpt_path, name)
        return model

    return build


for _name, _sizes in SIZES.items():
    register_model(_name)(_pi3(_name, _sizes))
