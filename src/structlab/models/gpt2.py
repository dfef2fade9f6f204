"""GPT-2 language models from HF transformers (their Conv1D projections are surgery targets)."""

from __future__ import annotations

from typing import Any

from torch import nn

from structlab.models.registry import register_model


@register_model("gpt2_tiny")
def gpt2_tiny(
    vocab_size: int = 256,
    n_positions: int = 64,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    **kw: Any,
) -> nn.Module:
    """A randomly initialised GPT-2 small enough for CPU tests (offline: no weights to fetch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,  # GPT-2's defaults (50256) lie outside a small vocabulary
        eos_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(config)
