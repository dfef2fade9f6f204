"""GPT-2 language models from HF transformers (their Conv1D projections are surgery targets).

Every size takes `pretrained`: None builds a random init from the size keys (offline); a local
directory (`save_pretrained` output) or an HF hub name loads those weights instead. The size keys
must then agree with the checkpoint (an error names those that differ), so a config never describes
a model other than the one trained; any other GPT2Config key (e.g. resid_pdrop) is passed through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlab.models.registry import register_model

GPT2_VOCAB = 50257  # GPT-2's tokenizer; <|endoftext|> is its last id
SIZES = {
    "gpt2_tiny": dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2),  # CPU tests
    "gpt2": dict(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12),  # 124 M
    "gpt2_medium": dict(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=1024, n_layer=24, n_head=16),  # 355 M
}


def _fetch_hint(name: str) -> str:
    # double quotes only: Hydra shows the repr of the error, which would escape single ones
    return (
        f'On a machine with internet, save it with GPT2LMHeadModel.from_pretrained("{name}")'
        '.save_pretrained("gpt2-weights"), copy that folder here and set model.pretrained=/path/to/gpt2-weights '
        "(or model.pretrained=null for a random init)"
    )


def _from_pretrained(cls: Any, pretrained: str, **kw: Any) -> Any:
    """cls.from_pretrained from a directory, the HF cache or the hub, with errors that say what to
    set instead of the hub's traceback."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    path = Path(pretrained).expanduser()
    if path.is_dir():
        return cls.from_pretrained(str(path), **kw)
    if pretrained.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model.pretrained={pretrained}: no such directory")
    try:
        return cls.from_pretrained(pretrained, local_files_only=True, **kw)  # the HF cache: no network
    except OSError:
        pass
    except HFValidationError as err:
        raise ValueError(
            f"model.pretrained={pretrained} is neither a directory nor a hub name ({err})"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise OSError(
            f"model.pretrained={pretrained} is not in the HF cache and HF_HUB_OFFLINE is set, so it cannot "
            f"be downloaded. {_fetch_hint(pretrained)}"
        ) from None
    try:
        return cls.from_pretrained(pretrained, **kw)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"could not load GPT-2 weights model.pretrained={pretrained} from the HF hub ({first}). "
            f"Offline? {_fetch_hint(pretrained)}. Set HF_HUB_OFFLINE=1 to skip the hub's retries."
        ) from None


def load_pretrained(pretrained: str, **kw: Any) -> nn.Module:
    """GPT2LMHeadModel with `pretrained`'s weights, in float32 (the training precision, whatever the
    checkpoint's). Under a meta device (cost accounting: shapes only) its config alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if torch.get_default_device().type == "meta":  # from_pretrained refuses meta; no weights needed
        return GPT2LMHeadModel(_from_pretrained(GPT2Config, pretrained, **kw))
    return _from_pretrained(GPT2LMHeadModel, pretrained, dtype=torch.float32, **kw)


def _gpt2(sizes: dict[str, int]):
    def build(pretrained: str | None = None, **kw: Any) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        size = {k: kw.pop(k, v) for k, v in sizes.items()}
        if pretrained is None:
            # GPT-2's <|endoftext|> with its own tokenizer; the BPE fallback puts it first (id 0)
            eos = GPT2_VOCAB - 1 if size["vocab_size"] == GPT2_VOCAB else 0
            return GPT2LMHeadModel(GPT2Config(**size, **{"bos_token_id": eos, "eos_token_id": eos, **kw}))
        model = load_pretrained(str(pretrained), **kw)
        differ = {k: (v, getattr(model.config, k)) for k, v in size.items() if getattr(model.config, k) != v}
        if differ:
            sets = " ".join(f"model.{k}={got}" for k, (_, got) in differ.items())
            raise ValueError(
                f"model.pretrained={pretrained} has "
                + ", ".join(f"{k}={got}" for k, (_, got) in differ.items())
                + " but the model config says "
                + ", ".join(f"{k}={want}" for k, (want, _) in differ.items())
                + f": choose the matching model config (model=gpt2, gpt2_medium) or set {sets}"
            )
        return model

    return build


for _name, _sizes in SIZES.items():
    register_model(_name)(_gpt2(_sizes))
