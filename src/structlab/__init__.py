"""structlab: structured linear layers under Hydra + Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_LAZY = {
    "compress_model": "structlab.compress",
    "save_compressed": "structlab.surgery",
    "load_compressed": "structlab.surgery",
}


def __getattr__(name: str) -> Any:  # imported on first use: `import structlab` stays light (no torch)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'structlab' has no attribute {name!r}")
