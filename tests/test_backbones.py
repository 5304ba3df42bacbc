from __future__ import annotations

import pytest
import torch

from featcache.backbones.registry import REGISTRY, create_backbone, get_entry, register
from featcache.errors import UserError

EXPECTED = {
    "resnet18": (512, 256),
    "vgg16": (4096, 256),
    "resnet50": (2048, 232),
    "mobilenet_v2": (1280, 232),
}


def test_registry_holds_the_four_backbones():
    assert set(REGISTRY) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_backbone_dim_spec_and_forward(name):
    dim, resize = EXPECTED[name]
    bb = create_backbone(name, "none", seed=0)
    assert bb.feature_dim == dim == REGISTRY[name].feature_dim
    assert (bb.spec.resize, bb.spec.crop, bb.spec.interpolation) == (resize, 224, "bilinear")
    assert bb.spec.mean == pytest.approx((0.485, 0.456, 0.406)) and bb.spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        out = bb.model(images)
    assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert bb.weights == "none:seed=0"


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_backbone("resnet18", "none", seed=1)
    assert torch.rand(1) == before  # the caller's RNG stream is untouched
    b = create_backbone("resnet18", "none", seed=1)
    c = create_backbone("resnet18", "none", seed=2)
    wa, wb, wc = (x.model.body.conv1.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_duplicate_registration_and_unknown_name():
    with pytest.raises(ValueError, match="already registered"):
        register("resnet18", feature_dim=1, strip_head=lambda m: None, head_prefixes=())(lambda: None)
    with pytest.raises(UserError, match="unknown backbone 'resnet19'.*resnet18"):
        get_entry("resnet19")


def _reference_features(state_dict, images):
    import torchvision

    model = torchvision.models.resnet18()
    model.load_state_dict(state_dict)
    model.fc = torch.nn.Identity()
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model((images.float() / 255 - mean) / std)


def test_weights_file_loads_and_fine_tuned_heads_are_ignored(tmp_path):
    import torchvision

    torch.manual_seed(7)
    source = torchvision.models.resnet18()
    state = source.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    bb = create_backbone("resnet18", str(path))
    assert bb.weights.startswith("file:sha256=")
    with torch.inference_mode():
        assert torch.allclose(bb.model(images), _reference_features(state, images), atol=1e-4)

    # A fine-tuned checkpoint: DDP prefix, a 2-class fc, wrapped in {"model": ...}.
    tuned = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    tuned["module.fc.weight"], tuned["module.fc.bias"] = torch.zeros(2, 512), torch.zeros(2)
    torch.save({"model": tuned, "epoch": 3}, tmp_path / "tuned.pt")
    bb2 = create_backbone("resnet18", str(tmp_path / "tuned.pt"))
    with torch.inference_mode():
        assert torch.allclose(bb2.model(images), bb.model(images))


def test_bad_weights_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read") as info:
        create_backbone("resnet18", str(tmp_path / "junk.pt"))
    assert "weights_only" not in str(info.value)  # torch's advice to load unsafely is never passed on
    import torchvision

    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mnv2.pt")
    with pytest.raises(UserError, match=r"does not fit resnet18: keys .*missing.*unexpected"):
        create_backbone("resnet18", str(tmp_path / "mnv2.pt"))


def test_imagenet_offline_names_the_expected_file(_offline_torch_home):
    with pytest.raises(UserError) as info:
        create_backbone("resnet18", "imagenet")
    message = str(info.value)
    expected = _offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message and "--weights PATH" in message


def test_imagenet_loads_from_a_filled_hub_cache(_offline_torch_home):
    import torchvision

    torch.manual_seed(11)
    state = torchvision.models.resnet18().state_dict()
    target = _offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    bb = create_backbone("resnet18", "imagenet")
    assert bb.weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(bb.model(images), _reference_features(state, images), atol=1e-4)


def test_weights_of_another_architecture_do_not_fit_in_one_line(tmp_path):
    import torchvision

    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UserError) as info:
        create_backbone("resnet18", str(path))
    message = str(info.value)
    assert "does not fit resnet18" in message and "other shapes" in message and "\n" not in message


def test_a_malicious_checkpoint_is_refused_in_one_plain_line(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    for name, save in (("evil.pt", torch.save), ("evil.pkl", lambda obj, p: p.write_bytes(pickle.dumps(obj)))):
        path = tmp_path / name
        save({"state_dict": Payload()}, path)
        with pytest.raises(UserError) as info:
            create_backbone("resnet18", str(path))
        message = str(info.value)
        assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message
        assert str(path) in message
