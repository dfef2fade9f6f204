"""Vision Transformers from timm: the real sizes, plus small ones that train on a CPU."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from structlab.models.registry import register_model

# Small ViTs for 28×28 single-channel images (Fashion-MNIST) and 32×32 CIFAR images.
# timm builds them from its own VisionTransformer class, so surgery targets are the same names.
_SMALL = {
    "vit_fmnist_p7": dict(
        img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0
    ),
    "vit_fmnist_p4": dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0
    ),
    # ViT-S/4 on 32×32 CIFAR (Gaudi-GBLR paper recipe)
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6),
}
_TIMM = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")


def _timm_vit(timm_name: str, defaults: dict[str, Any]):
    def build(pretrained: bool = False, num_classes: int = 1000, **kw: Any) -> nn.Module:
        # Pretrained weights come from the HF hub (online users); offline this raises timm's own error.
        return timm.create_model(
            timm_name, pretrained=pretrained, num_classes=num_classes, **{**defaults, **kw}
        )

    return build


for _name in _TIMM:
    register_model(_name)(_timm_vit(_name, {}))
for _name, _cfg in _SMALL.items():
    register_model(_name)(_timm_vit("vit_tiny_patch16_224", _cfg))
