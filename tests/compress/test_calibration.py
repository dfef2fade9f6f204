"""Calibration hooks: exact Gram/mean|x|/token sums, shared inputs, Conv1D, masks, hook removal."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from structlab.compress import CalibrationStats


def capture_inputs(model: nn.Module, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
        for n in names
    ]
    return seen, handles


def gram_of(xs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    return x.T @ x


def test_streaming_sums_are_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    seen, handles = capture_inputs(model, ["0", "2"])
    batches = [torch.randn(2, 3, 6), torch.randn(4, 6)]
    with CalibrationStats(model, ["0", "2"]) as stats, torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    for name in ("0", "2"):
        assert torch.allclose(stats.gram(name), gram_of(seen[name]), rtol=1e-12, atol=1e-12)
        assert stats.gram(name).dtype == torch.float64
        assert stats.tokens(name) == 10
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]]).double()
        assert torch.allclose(stats.abs_mean(name), x.abs().mean(0), rtol=1e-12)
    assert stats.groups() == {"0": ["0"], "2": ["2"]}
    # hooks are gone after the with block: running again changes nothing
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    model(torch.randn(3, 6))
    assert stats.tokens("0") == 10


def test_same_tensor_fed_twice_counts_twice() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(5, 4)
    with CalibrationStats(model, ["0"]) as stats:
        model(x)
        model(x)
    assert stats.tokens("0") == 10
    assert torch.allclose(stats.gram("0"), 2 * x.double().T @ x.double())


class QKV(nn.Module):
    """q, k, v read one tensor; o reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) * self.k(x) + self.v(x)
        return self.o(h)


def test_modules_reading_one_tensor_share_one_matrix() -> None:
    torch.manual_seed(1)
    model = QKV()
    xs = [torch.randn(3, 8), torch.randn(2, 8)]
    with CalibrationStats(model, ["q", "k", "v", "o"]) as stats:
        for x in xs:
            model(x)
    assert stats.gram("q") is stats.gram("k") is stats.gram("v")
    assert stats.gram("o") is not stats.gram("q")
    assert stats.groups() == {"q": ["q", "k", "v"], "o": ["o"]}
    assert stats.owner("v") == "q" and stats.owner("o") == "o"
    assert stats.tokens("k") == 5  # counted once, not three times
    assert torch.allclose(stats.gram("v"), gram_of(xs), rtol=1e-12)


def test_token_mask_drops_padding_and_float32_batches() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with CalibrationStats(model, ["0"], batch_dtype=torch.float32) as stats:
        stats.token_mask = mask
        model(x)
    assert stats.tokens("0") == 8
    assert torch.allclose(stats.gram("0"), gram_of([x[mask]]), rtol=1e-5)


def test_token_mask_of_the_wrong_shape_is_an_error() -> None:
    """A mask that does not match the (batch, seq) dims used to be ignored: padding was counted."""
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(2, 5, 6)
    with CalibrationStats(model, ["0"]) as stats:
        for bad in (torch.ones(2, 4, dtype=torch.bool), torch.ones(10, dtype=torch.bool)):
            stats.token_mask = bad
            expected = f"token_mask has shape {tuple(bad.shape)} but the input of 0 has leading (batch, seq) dims (2, 5)"
            with pytest.raises(ValueError, match=re.escape(expected)):
                model(x)
        stats.token_mask = torch.ones(2, 5, dtype=torch.bool)
        model(x)
        stats.token_mask = None
        model(x[0])
    assert stats.tokens("0") == 15  # nothing was counted by the refused batches


def test_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no module 'fc'"):
        CalibrationStats(model, ["fc"])
    with pytest.raises(TypeError, match="cannot read a dense weight"):
        CalibrationStats(model, ["1"])
    with CalibrationStats(model, ["0"]) as stats, pytest.raises(ValueError, match="non-finite"):
        model(torch.full((2, 4), float("nan")))
    with CalibrationStats(model, ["0"]) as stats:
        pass
    with pytest.raises(KeyError, match="never ran"):
        stats.gram("0")


def test_gpt2_conv1d_inputs() -> None:
    """HF Conv1D (c_attn, c_fc) read x of shape (..., in): their Gram equals that of ln_1 / ln_2 outputs."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    cfg = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = GPT2Model(cfg).eval()
    names = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    outs: dict[str, list[torch.Tensor]] = {"h.0.ln_1": [], "h.0.ln_2": []}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: outs[n].append(y)) for n in outs
    ]
    ids = torch.randint(0, 64, (2, 16))
    with CalibrationStats(model, names) as stats, torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert torch.allclose(stats.gram("h.0.attn.c_attn"), gram_of(outs["h.0.ln_1"]), rtol=1e-10)
    assert torch.allclose(stats.gram("h.0.mlp.c_fc"), gram_of(outs["h.0.ln_2"]), rtol=1e-10)
    assert stats.gram("h.0.mlp.c_proj").shape == (128, 128)
    assert all(stats.tokens(n) == 32 for n in names)
    assert len(stats.groups()) == 4


def test_minilm_qkv_share_one_matrix(minilm: tuple) -> None:
    model, batch = minilm
    pre = "encoder.layer.1.attention."
    names = [pre + "self.query", pre + "self.key", pre + "self.value", pre + "output.dense"]
    with CalibrationStats(model, names) as stats, torch.no_grad():
        stats.token_mask = batch["attention_mask"].bool()
        model(**batch)
    g = stats.gram(names[0])
    assert g is stats.gram(names[1]) is stats.gram(names[2])
    assert stats.gram(names[3]) is not g
    assert stats.tokens(names[0]) == int(batch["attention_mask"].sum())
    assert g.shape == (384, 384) and torch.allclose(g, g.T)
    assert float(torch.linalg.eigvalsh(g).min()) > -1e-8 * float(g.diagonal().max())
    assert not any(model.get_submodule(n)._forward_pre_hooks for n in names)
