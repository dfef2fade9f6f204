"""GPT-2 sizes from their configs, random init offline, weights from a local directory or the hub
(with errors that say what to set), and the tied LM head as a target through `+layer.untie=true`."""

from __future__ import annotations

import socket

import pytest
import torch
from omegaconf import OmegaConf
from support import compose_train

from structlab.layers.base import StructuredLinear
from structlab.models import build_model
from structlab.tasks import LanguageModelingModule

TINY = dict(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)


def model_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_train(*overrides).model, resolve=True)


def build(cfg: dict, **kw):
    cfg = {**cfg, **kw}
    cfg.pop("targets"), cfg.pop("exclude")
    return build_model(cfg.pop("name"), **cfg)


@pytest.fixture
def saved(tmp_path):
    """A random tiny GPT2LMHeadModel written by save_pretrained (in bfloat16: loading gives float32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY, bos_token_id=0, eos_token_id=0)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "tiny")
    return model.float().eval(), tmp_path / "tiny"


@pytest.mark.parametrize("name, params", [("gpt2", 124_439_808), ("gpt2_medium", 354_823_168)])
def test_real_sizes_build_offline_from_their_configs(name, params):
    cfg = model_cfg(f"model={name}")
    assert cfg["pretrained"] is None and cfg["vocab_size"] == 50257 and cfg["n_positions"] == 1024
    with torch.device("meta"):  # the sizes without allocating the weights
        model = build(cfg)
        assert sum(p.numel() for p in model.parameters()) == params
        assert model.config.eos_token_id == 50256  # GPT-2's <|endoftext|>
        small = build(cfg, vocab_size=8192)  # a BPE fallback's vocabulary
    assert small.lm_head.out_features == 8192 and small.config.eos_token_id == 0  # inside the vocabulary


def test_weights_from_a_local_directory(saved):
    reference, folder = saved
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    for name in ("gpt2", "gpt2_tiny"):  # any size's config takes a folder of matching sizes
        model = build(model_cfg(f"model={name}"), **TINY, pretrained=str(folder)).eval()
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_size_that_disagrees_with_the_weights_is_a_clear_error(saved, tmp_path):
    _, folder = saved
    says = r"has n_embd=32, n_layer=2 .*says n_embd=768, n_layer=12: .*set model.n_embd=32 model.n_layer=2"
    with pytest.raises(ValueError, match=says):
        build(model_cfg("model=gpt2"), **{**TINY, "n_layer": 12, "n_embd": 768}, pretrained=str(folder))
    with pytest.raises(FileNotFoundError, match="model.pretrained=.*no such directory"):
        build_model("gpt2", pretrained=str(tmp_path / "absent"))


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by the hub at import; the constant for this process
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_an_uncached_hub_name_offline_says_to_set_a_directory(offline):
    with pytest.raises(OSError, match=r"not in the HF cache.*model.pretrained=/path/to/gpt2-weights") as err:
        build_model("gpt2", pretrained="structlab-tests/gpt2-never-cached")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no hub traceback above it


def test_an_unreachable_hub_says_to_set_a_directory(monkeypatch):
    """What an offline machine without HF_HUB_OFFLINE sees once the hub gives up (simulated: no wait)."""
    import huggingface_hub.constants
    from transformers import GPT2LMHeadModel

    def unreachable(*args, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", unreachable)
    with pytest.raises(
        OSError, match=r"from the HF hub \(We couldn't connect.*model.pretrained=/path"
    ) as err:
        build_model("gpt2", pretrained="gpt2")
    assert "HF_HUB_OFFLINE=1" in str(err.value) and err.value.__cause__ is None


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_openai_weights_by_hub_name():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    try:  # in the HF cache: no network needed
        AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
        GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True)
    except OSError:
        if not _hub_reachable():
            pytest.skip("offline: huggingface.co is unreachable and 'gpt2' is not in the HF cache")
    model = build(model_cfg("model=gpt2"), pretrained="gpt2").eval()
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    ids = torch.tensor([AutoTokenizer.from_pretrained("gpt2")(text)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss < 5  # real weights: far below a random init's ln(50257) ≈ 10.8


TARGETS = ["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc", "lm_head"]


def test_the_tied_lm_head_is_a_target_with_untie():
    """model.targets=[..., lm_head] +layer.untie=true: surgery unties it (wte keeps the weight)."""
    targets = f"model.targets=[{','.join(TARGETS)}]"
    cfg = compose_train("model=gpt2_tiny", targets, "layer=svd", "layer.rank=8", "+layer.untie=true")
    module = LanguageModelingModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), layer=OmegaConf.to_container(cfg.layer)
    )
    wte = module.model.transformer.wte.weight.detach().clone()
    module.convert()
    assert isinstance(module.model.lm_head, StructuredLinear)
    assert torch.equal(module.model.transformer.wte.weight, wte)
    assert not module.model.config.tie_word_embeddings  # else HF's tie_weights would tie them again
    tied = LanguageModelingModule(model={"name": "gpt2_tiny", "targets": TARGETS}, layer={"name": "svd"})
    with pytest.raises(ValueError, match="lm_head.weight is tied.*untie=True"):
        tied.convert()
