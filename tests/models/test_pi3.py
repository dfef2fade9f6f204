"""π3: the official checkpoint layout (keys, shapes, Linear names, 958,696,732 parameters), the
official outputs on seeded weights (golden files), strict checkpoint loading with clear errors, the
config targets, and the tiny model's geometry, permutation equivariance, backward and bf16 autocast."""

from __future__ import annotations

import json
import time

import pytest
import torch
from omegaconf import OmegaConf
from support import ROOT, compose_train

from structlab.models import build_model
from structlab.models.pi3 import IMAGENET_MEAN, IMAGENET_STD, SIZES, Pi3
from structlab.surgery import find_targets, replace_layers

# the reference files: copied into tests/fixtures/pi3, or the project's shared folder beside it
REFS = [
    ROOT / "tests" / "fixtures" / "pi3",
    ROOT.parent / "shared" / "reference" / "pi3",
    ROOT / "shared" / "reference" / "pi3",
]
REF = next((p for p in REFS if (p / "state_dict_shapes.json").is_file()), None)
needs_ref = pytest.mark.skipif(
    REF is None, reason=f"π3 reference files absent (looked in {[str(p) for p in REFS]})"
)
GOLDEN = ["golden_seed0_N2_56x56.pt", "golden_seed3_N3_56x42.pt"]
OUTPUTS = ("points", "local_points", "conf", "camera_poses")
PI3_PARAMS = 958_696_732


def tiny(**kw) -> Pi3:
    torch.manual_seed(0)
    return build_model("pi3_tiny", **kw)


def frames(b: int, n: int, h: int = 28, w: int = 42, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@needs_ref
def test_state_dict_is_the_official_layout():
    ref = json.loads((REF / "state_dict_shapes.json").read_text())
    with torch.device("meta"):  # shapes only: no 4 GB of weights
        model = build_model("pi3")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == PI3_PARAMS
    assert sum(torch.Size(s).numel() for s in ref["state_dict"].values()) == PI3_PARAMS + 6  # + mean, std
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear == ref["linear_modules"] and len(linear) == 318


def seeded_(model: Pi3, seed: int) -> Pi3:
    """The golden files' weights (shared/docs/pi3.md): every key in sorted order, 0.02·randn, or
    1 + 0.02·randn for norm weights, from one generator; mean/std keep ImageNet's values."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for key in sorted(sd):
            t = sd[key]
            if key in ("image_mean", "image_std"):
                t.copy_(torch.tensor(IMAGENET_MEAN if key == "image_mean" else IMAGENET_STD).view(1, 3, 1, 1))
            else:  # normal_ in place draws what randn(shape) would, without a second 4 GB
                t.normal_(generator=g).mul_(0.02)
                if "norm" in key and key.endswith("weight"):
                    t.add_(1)
    return model


@pytest.fixture(scope="module")
def large() -> Pi3:
    with torch.device("meta"):
        model = build_model("pi3")
    return model.to_empty(device="cpu").eval()  # every tensor is overwritten by seeded_


@needs_ref
@pytest.mark.slow
@pytest.mark.parametrize("golden", GOLDEN)
def test_official_outputs_on_seeded_weights(large, golden):
    """float32 on the CPU, as the golden files were made: equal to rounding."""
    ref = torch.load(REF / golden, weights_only=False)
    seeded_(large, ref["seed"])
    start = time.perf_counter()
    with torch.no_grad():
        out = large(ref["imgs"])
    seconds = time.perf_counter() - start
    errors = {}
    for key in OUTPUTS:
        assert out[key].shape == ref[key].shape, key
        diff = out[key] - ref[key]
        errors[key] = (float(diff.norm() / ref[key].norm()), float(diff.abs().max()))
    print(f"{golden}: forward {seconds:.2f} s; relative error, max abs: {errors}")
    assert all(rel < 1e-4 for rel, _ in errors.values()), errors


@pytest.mark.parametrize(
    "name, params, targets",
    [("pi3", PI3_PARAMS, 300), ("pi3_small", 56_123_676, 120), ("pi3_tiny", 485_180, 28)],
)
def test_configs_build_their_size_and_target_every_block_linear(name, params, targets):
    cfg = OmegaConf.to_container(compose_train(f"model={name}").model, resolve=True)
    assert cfg["ckpt_path"] is None and cfg["grad_checkpointing"] is False
    with torch.device("meta"):
        model = build_model(
            cfg.pop("name"), **{k: v for k, v in cfg.items() if k not in ("targets", "exclude")}
        )
        default = build_model(name)
    assert (
        sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in default.parameters()) == params
    )
    found = find_targets(model, cfg["targets"], cfg["exclude"])
    assert len(found) == targets
    per_block = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert {n.split(".", n.count(".") - 1)[-1] for n in found} == per_block
    enc, dec = SIZES[name]["enc_depth"], SIZES[name]["dec_depth"]
    assert sum(n.startswith("encoder.") for n in found) == 4 * enc
    assert sum(n.startswith("decoder.") for n in found) == 4 * dec
    assert targets == 4 * (enc + dec + 3 * SIZES[name]["head_depth"])


def test_tiny_outputs_and_camera_geometry():
    model = tiny().eval()
    imgs = frames(2, 3)
    with torch.no_grad():
        out = model(imgs)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "points": (2, 3, 28, 42, 3),
        "local_points": (2, 3, 28, 42, 3),
        "conf": (2, 3, 28, 42, 1),
        "camera_poses": (2, 3, 4, 4),
    }
    pose = out["camera_poses"]
    rot, trans = pose[..., :3, :3], pose[..., :3, 3]
    torch.testing.assert_close(rot @ rot.mT, torch.eye(3).expand_as(rot), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(2, 3), atol=1e-5, rtol=0)
    assert torch.equal(pose[..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand(2, 3, 4))
    local = out["local_points"]
    assert (local[..., 2] > 0).all()  # z = exp(·)
    world = torch.einsum("bnij,bnhwj->bnhwi", rot, local) + trans[:, :, None, None]
    torch.testing.assert_close(out["points"], world)
    with pytest.raises(ValueError, match="multiples of 14"):
        model(frames(1, 2, 28, 30))


def test_tiny_is_permutation_equivariant():
    """No frame is special (no reference frame, no frame index): permuting the input frames
    permutes every per-frame output, camera poses and world points included."""
    model = tiny().eval()
    with torch.no_grad():  # LayerScale 1 instead of 0.01: frames interact strongly at init
        for blk in model.decoder:
            blk.ls1.gamma.fill_(1), blk.ls2.gamma.fill_(1)
    imgs, order = frames(1, 4), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out, permuted = model(imgs), model(imgs[:, order])
    for key in OUTPUTS:
        torch.testing.assert_close(permuted[key], out[key][:, order], atol=1e-5, rtol=1e-4)
    other = imgs.clone()
    other[:, 3] = 1 - other[:, 3]
    with torch.no_grad():  # yet the frames see each other (global attention): frame 0 moves too
        changed = model(other)["local_points"][:, 0]
    assert (changed - out["local_points"][:, 0]).abs().max() > 1e-5  # float noise: < 1e-7


def test_tiny_forward_backward_with_and_without_checkpointing():
    imgs = frames(1, 2, 28, 28)
    grads = []
    for checkpointing in (False, True):
        model = tiny(grad_checkpointing=checkpointing).train()
        start = time.perf_counter()
        out = model(imgs)
        loss = sum(v.float().square().mean() for v in out.values())
        loss.backward()
        if not checkpointing:
            assert time.perf_counter() - start < 1.0
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_tiny_under_bf16_autocast():
    """The trunk in bf16, heads and camera in float32: finite, float32 outputs near float32's."""
    model = tiny().eval()
    imgs = frames(1, 3)
    with torch.no_grad():
        ref = model(imgs)
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
            out = model(imgs)
    for key in OUTPUTS:
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
    rel = (out["local_points"] - ref["local_points"]).norm() / ref["local_points"].norm()
    assert rel < 0.05


def test_encoder_wider_than_decoder_gets_a_projection():
    model = tiny(enc_dim=96, enc_heads=3).eval()
    assert model.encoder_proj.in_features == 96 and model.encoder_proj.out_features == 64
    with torch.no_grad():
        assert model(frames(1, 2))["points"].shape == (1, 2, 28, 42, 3)


def test_checkpoint_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)  # differs from a fresh init
    sd = source.state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "model.pt")
    imgs = frames(1, 2)
    for file in ("model.safetensors", "model.pt"):
        loaded = build_model("pi3_tiny", ckpt_path=str(tmp_path / file)).eval()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
        with torch.no_grad():
            torch.testing.assert_close(loaded(imgs), source.eval()(imgs))


def test_checkpoint_errors_say_what_fits(tmp_path):
    from safetensors.torch import save_file

    save_file(tiny().state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(
        ValueError,
        match=r"does not fit model pi3_tiny: 36 missing keys .*decoder.2.*use model=pi3_tiny \(or set model.dec_depth=2\)",
    ):
        build_model("pi3_tiny", dec_depth=4, ckpt_path=str(tmp_path / "tiny.safetensors"))
    save_file(tiny(camera_dim=48).state_dict(), tmp_path / "other.safetensors")  # no registered size
    with pytest.raises(
        ValueError, match=r"0 missing.* of another shape .*camera_head.*: set model.camera_dim=48$"
    ):
        build_model("pi3_tiny", ckpt_path=str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.ckpt_path=.*no such file"):
        build_model("pi3_tiny", ckpt_path=str(tmp_path / "absent.safetensors"))


def test_surgery_replaces_the_targets_and_keeps_the_function_at_full_rank():
    """Every matmul is a module call: structured layers of full rank compute the same outputs."""
    model = tiny().eval()
    imgs = frames(1, 2)
    with torch.no_grad():
        ref = model(imgs)
    targets = OmegaConf.load(ROOT / "configs" / "model" / "pi3_tiny.yaml").targets
    replaced = replace_layers(model, "svd", list(targets), rank=64)
    assert len(replaced) == 28
    with torch.no_grad():
        out = model(imgs)
    for key in OUTPUTS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_fused_qk_on_cuda_equals_the_eager_ops():
    """fuse_qk (QK-norm + RoPE compiled into one kernel on CUDA) computes the same function."""
    model = tiny().cuda().eval()
    imgs = frames(1, 3).cuda()
    outs = {}
    for fused in (True, False):
        model.set_fuse_qk(fused)
        with torch.no_grad():
            outs[fused, torch.float32] = model(imgs)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs[fused, torch.bfloat16] = model(imgs)
    for key in OUTPUTS:
        torch.testing.assert_close(outs[True, torch.float32][key], outs[False, torch.float32][key])
        fused, plain = outs[True, torch.bfloat16][key], outs[False, torch.bfloat16][key]
        assert torch.isfinite(fused).all() and (fused - plain).norm() / plain.norm() < 2e-2, key
