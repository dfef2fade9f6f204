"""Calibration statistics of linear-layer inputs, collected by forward hooks while the model runs.

Per module: the Gram matrix G = Σ_t x_t x_tᵀ (float64 accumulation, on the module's device), the
mean x and mean |x| per input feature and the token count. Modules that read the *same input tensor* in a
forward pass (q/k/v of BERT, fc1/gate) share one set of statistics: it is computed once and
`gram(name)` returns the same tensor for all of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from structlab.layers.base import dense_parts


class _Stats:
    """Running sums for one distinct input."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens = 0
        self.last: weakref.ref[torch.Tensor] | None = None  # the input of the latest call


class CalibrationStats:
    """Context manager: hooks on `names` while inside, statistics readable afterwards.

    >>> with CalibrationStats(model, ["blocks.0.mlp.fc1"]) as stats:
    ...     for batch in loader:
    ...         model(batch)
    >>> stats.gram("blocks.0.mlp.fc1")

    `batch_dtype` is the dtype of each batch's XᵀX (float32 is faster on GPUs; the running sum is
    float64 either way). Set `token_mask` (bool, shape of the inputs without the feature dim, e.g.
    the attention mask) before a forward to drop padding tokens; any other shape is a ValueError.
    """

    def __init__(
        self, model: nn.Module, names: str | Iterable[str], batch_dtype: torch.dtype = torch.float64
    ) -> None:
        self.model = model
        self.names = [names] if isinstance(names, str) else list(names)
        if not self.names:
            raise ValueError("no module names given to calibrate")
        self.batch_dtype = batch_dtype
        self.token_mask: torch.Tensor | None = None
        self._stats: dict[str, _Stats] = {}  # owner name → sums
        self._owner: dict[str, str] = {}  # module name → owner name (itself when not shared)
        self._handles: list[Any] = []
        self._modules: dict[str, nn.Module] = {}
        known = dict(model.named_modules())
        for name in self.names:
            if name not in known:
                raise ValueError(f"{type(model).__name__} has no module {name!r}")
            dense_parts(known[name])  # raises TypeError for non-linear modules
            self._modules[name] = known[name]

    # --- hooks ---------------------------------------------------------------------------
    def __enter__(self) -> CalibrationStats:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent); the statistics stay."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            self._observe(name, x)

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        owner = self._owner.get(name)
        if owner is None:  # first call: does another module read this very tensor?
            owner = next((o for o, st in self._stats.items() if st.last is not None and st.last() is x), name)
            self._owner[name] = owner
            if owner != name:
                return
        elif owner != name:
            last = self._stats[owner].last
            if last is None or last() is not x:
                raise RuntimeError(
                    f"{name} shared its input with {owner} on the first batch but not now; "
                    "calibrate them in separate runs"
                )
            return
        self._accumulate(name, x)

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        feats = x.detach()
        if self.token_mask is not None:
            if tuple(self.token_mask.shape) != tuple(feats.shape[:-1]):  # ignoring it would count padding
                raise ValueError(
                    f"token_mask has shape {tuple(self.token_mask.shape)} but the input of {name} has "
                    f"leading (batch, seq) dims {tuple(feats.shape[:-1])}: set stats.token_mask to this "
                    "batch's mask (e.g. its attention_mask) before each forward, or to None"
                )
            feats = feats[self.token_mask.to(device=feats.device, dtype=torch.bool)]
        feats = feats.reshape(-1, feats.shape[-1])
        st = self._stats.get(name)
        if st is None:
            st = self._stats[name] = _Stats(feats.shape[-1], feats.device)
        xb = feats.to(self.batch_dtype)
        g = xb.T @ xb
        if not torch.isfinite(g).all():
            raise ValueError(f"non-finite inputs reached {name}: calibration batches must be finite")
        st.gram += g.to(torch.float64)
        st.abs_sum += xb.abs().sum(0).to(torch.float64)
        st.sum += xb.sum(0).to(torch.float64)
        st.tokens += feats.shape[0]
        st.last = weakref.ref(x)

    # --- results -------------------------------------------------------------------------
    def _get(self, name: str) -> _Stats:
        if name not in self._modules:
            raise KeyError(f"{name!r} was not calibrated; calibrated modules: {self.names}")
        owner = self._owner.get(name)
        if owner is None:
            raise KeyError(f"{name!r} never ran while calibrating: run the model inside the `with` block")
        return self._stats[owner]

    def gram(self, name: str) -> torch.Tensor:
        """Σ_t x_t x_tᵀ (in × in, float64); the same tensor for modules that share their input."""
        return self._get(name).gram

    def abs_mean(self, name: str) -> torch.Tensor:
        """mean_t |x_t| per input feature (float64)."""
        st = self._get(name)
        return st.abs_sum / max(st.tokens, 1)

    def mean(self, name: str) -> torch.Tensor:
        """mean_t x_t per input feature (float64)."""
        st = self._get(name)
        return st.sum / max(st.tokens, 1)

    def tokens(self, name: str) -> int:
        """Number of input vectors seen."""
        return self._get(name).tokens

    def owner(self, name: str) -> str:
        """The module whose statistics `name` uses (itself unless it shares its input)."""
        self._get(name)
        return self._owner[name]

    def groups(self) -> dict[str, list[str]]:
        """{owner: [modules sharing its statistics]}, owners in the order they first ran."""
        out: dict[str, list[str]] = {}
        for name, owner in self._owner.items():
            out.setdefault(owner, []).append(name)
        return out
