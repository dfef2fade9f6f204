"""Seeded matrices that published reference figures were measured on."""

from __future__ import annotations

import torch


def tsvd_reference_matrices(seed: int = 0) -> dict[str, torch.Tensor]:
    """The two matrices of `tests/fixtures/tsvd_reference_seed0.pt` (the TSVD authors' reference output), rebuilt exactly as docs/methods.md §4
    prescribes (same generator, same order of draws): a 256×512 Gaussian and a 384×768 matrix with
    power-law singular values plus noise."""
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(256, 512, generator=g) / 512**0.5
    u, _ = torch.linalg.qr(torch.randn(384, 384, generator=g))
    v, _ = torch.linalg.qr(torch.randn(768, 384, generator=g))
    s = torch.arange(1, 385, dtype=torch.float32) ** -0.8
    decay = (u * s) @ v.T + 0.01 * torch.randn(384, 768, generator=g) / 768**0.5
    return {"gaussian": gaussian, "decay": decay}
