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


@pytest.mark.parametrize("name, dim, spec", [
    ("tv:efficientnet_b0", 1280, (256, 224, "bicubic")),
    ("tv:regnet_y_400mf", 440, (232, 224, "bilinear")),  # a builder that cannot run on the meta device
])
def test_any_torchvision_model_is_a_backbone_with_its_own_preprocessing(name, dim, spec):
    bb = create_backbone(name, "none", seed=0)
    assert (bb.name, bb.feature_dim, (bb.spec.resize, bb.spec.crop, bb.spec.interpolation)) == (name, dim, spec)
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, dim)


def test_a_short_name_and_its_tv_name_are_one_backbone():
    assert get_entry("tv:resnet18") is get_entry("resnet18")
    assert create_backbone("tv:resnet18", "none").name == "resnet18"  # one name, so one cache fingerprint


@pytest.mark.parametrize("name, words", [
    ("tv:efficientnet_b9", "did you mean tv:efficientnet_b"),
    ("tv:squeezenet1_0", "no linear classifier layer"),
    ("nosuch:model", "unknown backbone family 'nosuch'"),
    ("resnet19", "tv:NAME"),
])
def test_bad_backbone_names_are_one_line(name, words):
    with pytest.raises(UserError, match=words):
        get_entry(name)


def test_tv_features_equal_torchvision_own_pipeline(tmp_path):
    """The cache holds what torchvision's own transform and forward give, with the same weights file."""
    import torch.nn as nn
    from torchvision.models import get_model, get_model_weights

    torch.manual_seed(3)
    reference = get_model("efficientnet_b0", weights=None).eval()
    transform = get_model_weights("efficientnet_b0").DEFAULT.transforms()
    saved = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.classifier[1] = nn.Identity()  # torchvision's features: the classifier's input
    reference.load_state_dict({k: v for k, v in saved.items() if not k.startswith("classifier.1.")})
    assert_library_parity(tmp_path, "tv:efficientnet_b0", reference, transform)


def test_timm_models_are_backbones_with_timms_preprocessing():
    bb = create_backbone("timm:vit_tiny_patch16_224", "none", seed=0)
    # timm's data config for it: 224 px, crop_pct 0.9 (so resize 248), bicubic, mean and std 0.5.
    assert (bb.feature_dim, bb.spec.resize, bb.spec.crop, bb.spec.interpolation) == (192, 248, 224, "bicubic")
    assert bb.spec.mean == pytest.approx((0.5, 0.5, 0.5)) and bb.weights == "none:seed=0"
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, 192)
    with pytest.raises(UserError, match="timm:not_a_model is not a timm model"):
        get_entry("timm:not_a_model")
    with pytest.raises(UserError, match="Invalid pretrained tag"):
        get_entry("timm:resnet18.nosuchtag")


def test_timm_features_equal_timms_own_pipeline(tmp_path):
    """The cache holds what timm's own eval transform and forward give, with the same weights file."""
    import timm

    torch.manual_seed(5)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    assert_library_parity(tmp_path, "timm:resnet18", reference, transform)


# (--amp, demo images): each family's parity test extracts 40 images in fp32 and 16 under bf16 autocast.
PARITY_RUNS = (("off", 40), ("bf16", 16))


def assert_library_parity(tmp_path, backbone: str, reference, transform, runs=PARITY_RUNS):
    """Extract demo images with ``backbone`` from ``reference``'s saved weights, once per (--amp, number of
    images) in ``runs``; the features of each cache must equal ``reference(transform(image))`` (fp32) for
    the same images by the discriminating parity criteria. bf16 autocast moves the numbers a little, never
    to another image's; a wrong cast, an overflow or a NaN does."""
    import h5py
    from PIL import Image

    from featcache.cache.h5 import FeatureCache
    from featcache.data.demo import DEMO_DATA
    from featcache.eval import parity
    from featcache.extract import extract

    weights_file = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), weights_file)
    for amp, n_images in runs:
        cache = tmp_path / f"{amp}.h5"
        extract(DEMO_DATA, cache, backbone=backbone, weights=str(weights_file), max_images=n_images,
                subsample_all=True, workers=0, batch_size=16, amp=amp, progress=False)
        assert FeatureCache.open(cache).fingerprint_inputs.get("precision") == (None if amp == "off" else amp)
        with h5py.File(cache) as f:
            ours = f["features"][:]
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
        with torch.inference_mode():
            images = torch.stack([transform(Image.open(DEMO_DATA / p).convert("RGB")) for p in paths])
            theirs = reference(images).numpy()
        result = parity.parity(ours, theirs, same=parity.duplicate_groups(paths, DEMO_DATA))
        assert result["passed"], (f"--amp {amp}", parity.failures(result))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A DINOv2 encoder folder as save_pretrained writes it (random weights, two small layers) with the
    image processor of facebook/dinov2-*: shorter side 256 bicubic, centre crop 224, ImageNet mean and std."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(11)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             image_size=224, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_hugging_face_encoders_are_backbones_with_their_processors_preprocessing(tiny_dinov2):
    name = f"hf:{tiny_dinov2}"
    bb = create_backbone(name, "none", seed=0)
    assert (bb.feature_dim, bb.spec.resize, bb.spec.crop, bb.spec.interpolation) == (64, 256, 224, "bicubic")
    pretrained = create_backbone(name, "imagenet")  # the folder's own weights
    assert pretrained.weights.startswith(f"hf:{tiny_dinov2.resolve()}@sha256=")
    with torch.inference_mode():
        x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
        assert bb.model(x).shape == (2, 64) and not torch.allclose(bb.model(x), pretrained.model(x))
    empty = tiny_dinov2.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(UserError, match="holds no config.json"):
        get_entry(f"hf:{empty}")


def test_hf_features_equal_transformers_own_pipeline(tmp_path, tiny_dinov2):
    """The cache holds the CLS token that transformers' own processor and model give, same weights file."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tiny_dinov2).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_dinov2)

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    # The library's own pipeline: processor tensors in, CLS token out.
    reference = library_module(model, lambda x: model(pixel_values=x).last_hidden_state[:, 0])
    assert_library_parity(tmp_path, f"hf:{tiny_dinov2}", reference, transform)


POOLED = {
    "mean": lambda hidden, prefix: hidden[:, prefix:].mean(dim=1),
    "cls+mean": lambda hidden, prefix: torch.cat([hidden[:, 0], hidden[:, prefix:].mean(dim=1)], dim=1),
}


@pytest.mark.parametrize("pool", sorted(POOLED))
def test_hf_pooled_features_equal_transformers_own_pipeline(tmp_path, tiny_dinov2, pool):
    """#pool=mean is the mean of the patch tokens (CLS left out); #pool=cls+mean is CLS then that mean, as
    DINOv2's linear evaluation concatenates them: transformers' own processor and model, same weights."""
    from transformers import AutoImageProcessor, AutoModel

    from featcache.backbones.registry import with_pool

    model = AutoModel.from_pretrained(tiny_dinov2).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_dinov2)

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    reference = library_module(model, lambda x: POOLED[pool](model(pixel_values=x).last_hidden_state, 1))
    name = with_pool(f"hf:{tiny_dinov2}", pool)
    assert name == f"hf:{tiny_dinov2}#pool={pool}"
    assert create_backbone(name, "none").feature_dim == 64 * (2 if pool == "cls+mean" else 1)
    assert_library_parity(tmp_path, name, reference, transform, runs=PARITY_RUNS[:1])


def test_hf_mean_pool_leaves_register_tokens_out(tmp_path):
    """DINOv2 with registers: [CLS, 4 registers, 256 patches]; the mean is over the patches only."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(19)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
        num_register_tokens=4)).eval()
    model.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        hidden = model(pixel_values=(images.float() / 255 - 0.5) / 0.5).last_hidden_state
        assert hidden.shape[1] == 1 + 4 + 256
        for pool, expected in POOLED.items():
            bb = create_backbone(f"hf:{tmp_path}#pool={pool}", "imagenet")
            assert torch.allclose(bb.model(images), expected(hidden, 5), atol=1e-5)
            assert not torch.allclose(bb.model(images), expected(hidden, 1), atol=1e-5)  # registers do count


def test_hf_encoders_without_a_cls_token_give_their_pooled_output_not_a_corner_patch(tmp_path):
    """SigLIP's vision tower has only patch tokens (196 at 224/16) and an attention-pool head: --pool cls (the
    default) gives its pooled output, mean averages all 196 tokens, cls+mean has no CLS to take."""
    from transformers import BitImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(23)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=224, patch_size=16)).eval()
    model.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(pixel_values=(images.float() / 255 - 0.5) / 0.5)
        assert out.last_hidden_state.shape[1] == 196  # no CLS token
        cls = create_backbone(f"hf:{tmp_path}", "imagenet").model(images)
        assert torch.allclose(cls, out.pooler_output, atol=1e-5)
        assert not torch.allclose(cls, out.last_hidden_state[:, 0], atol=1e-3)
        mean = create_backbone(f"hf:{tmp_path}#pool=mean", "imagenet").model(images)
        assert torch.allclose(mean, out.last_hidden_state.mean(dim=1), atol=1e-5)
    with pytest.raises(UserError, match="no CLS token before a patch grid"):
        create_backbone(f"hf:{tmp_path}#pool=cls+mean", "imagenet")


@pytest.fixture(scope="module")
def tiny_hf_resnet(tmp_path_factory):
    """A Hugging Face ResNet folder (random weights): a convolutional encoder, no token sequence."""
    from transformers import BitImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("tiny-hf-resnet")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("argv, words", [
    (["--backbone", "resnet18", "--pool", "mean"], "--pool mean (#pool=mean) pools the tokens of hf: vision "
                                                    "transformers only; resnet18 has pooled features of its own"),
    (["--backbone", "timm:resnet18#pool=cls+mean"], "--pool cls+mean (#pool=cls+mean) pools the tokens of hf:"),
    (["--backbone", "HF_RESNET", "--pool", "cls+mean"], "its last hidden state is no token sequence"),
    (["--backbone", "HF_RESNET#pool=mean"], "use --pool cls (its pooled output)"),
    (["--backbone", "HF_DINO#pool=mean", "--pool", "cls+mean"], "--pool cls+mean contradicts the backbone name"),
    (["--backbone", "HF_DINO#pool=max"], "pool 'max' is not one of cls, mean, cls+mean"),
    (["--pool", "max"], "argument --pool: invalid choice: 'max'"),
])
def test_pool_mistakes_are_one_line_before_any_work(argv, words, tmp_path, tiny_dinov2, tiny_hf_resnet, capsys):
    from featcache.cli import main

    argv = [a.replace("HF_RESNET", f"hf:{tiny_hf_resnet}").replace("HF_DINO", f"hf:{tiny_dinov2}") for a in argv]
    # The data folder does not exist: a pool mistake must be found before the scan.
    assert main(["extract", str(tmp_path / "no-data"), "--out", str(tmp_path / "c.h5"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_pool_over_a_list_of_backbones_pools_the_hf_ones_that_name_no_pool(tiny_dinov2, tmp_path):
    """zoo and models --backbones ... --pool P: hf: names without a #pool= of their own take P, an explicit
    suffix (#pool=cls too) wins, and other families keep their own features."""
    import json

    from featcache.cli import main

    out = tmp_path / "models.json"
    assert main(["models", "--backbones", "resnet18", f"hf:{tiny_dinov2}", f"hf:{tiny_dinov2}#pool=cls", "--pool",
                 "cls+mean", "--no-measure", "--json", str(out)]) == 0
    rows = [(r["name"], r["feature_dim"]) for r in json.loads(out.read_text())]
    assert rows == [("resnet18", 512), (f"hf:{tiny_dinov2}#pool=cls+mean", 128), (f"hf:{tiny_dinov2}", 64)]


def test_the_pool_is_part_of_the_cache_identity_and_predict_rebuilds_it(small_dataset, tiny_dinov2, tmp_path):
    """--pool mean names the backbone hf:DIR#pool=mean: the cache fingerprint differs from the CLS cache's,
    and predict, reading the name back, pools the same way (same dimension as CLS, so only the numbers
    would tell a lost pool)."""
    import csv

    from featcache.cache.h5 import FeatureCache
    from featcache.cli import main
    from featcache.predict import load_run, predict

    common = [str(small_dataset), "--backbone", f"hf:{tiny_dinov2}", "--weights", "imagenet", "--workers", "0",
              "--no-progress"]
    cls_cache, cache, run = tmp_path / "cls.h5", tmp_path / "mean.h5", tmp_path / "run"
    assert main(["extract", *common, "--out", str(cls_cache)]) == 0
    assert main(["extract", *common, "--out", str(cache), "--pool", "mean"]) == 0
    pooled, plain = FeatureCache.open(cache), FeatureCache.open(cls_cache)
    assert pooled.attrs["backbone"] == f"hf:{tiny_dinov2}#pool=mean" and plain.attrs["backbone"] == f"hf:{tiny_dinov2}"
    assert pooled.attrs["fingerprint"] != plain.attrs["fingerprint"]
    assert main(["extract", *common, "--out", str(cls_cache), "--pool", "mean"]) == 2  # a different cache there
    assert main(["fit-head", str(cache), "--out", str(run), "--bootstrap", "0"]) == 0
    head, _ = load_run(run)
    arrays = pooled.read("features", "paths")
    by_path = dict(zip(arrays["paths"], arrays["features"]))
    out = tmp_path / "p.csv"
    predict(run, [str(small_dataset / "test")], out_csv=out)
    rows = list(csv.DictReader(out.open()))
    assert rows
    for r in rows:
        expected = head.predict_proba(by_path[r["path"][len(str(small_dataset)) + 1:]][None])[0]
        assert float(r["p_PNEUMONIA"]) == pytest.approx(expected[1], abs=1e-4)


def test_an_hf_backbone_fine_tunes_and_its_run_rebuilds_the_pool(small_dataset, tiny_dinov2, tmp_path):
    """finetune --pool cls+mean: best.pt keeps the new head apart from the encoder's keys (so it is a
    --weights file for extract), and predict rebuilds the pooled backbone from the name the run records."""
    import csv

    from featcache.cli import main
    from featcache.predict import predict

    run, name = tmp_path / "run", f"hf:{tiny_dinov2}#pool=cls+mean"
    assert main(["finetune", str(small_dataset), "--out", str(run), "--backbone", f"hf:{tiny_dinov2}", "--pool",
                 "cls+mean", "--weights", "imagenet", "--freeze-backbone", "--epochs", "1", "--batch-size", "32",
                 "--amp", "off", "--workers", "0", "--bootstrap", "0", "--no-progress"]) == 0
    tuned, pretrained = create_backbone(name, str(run / "best.pt")), create_backbone(name, "imagenet")
    with torch.inference_mode():
        x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
        assert torch.equal(tuned.model(x), pretrained.model(x)) and tuned.feature_dim == 128  # frozen encoder
    theirs = {r["path"]: float(r["p_PNEUMONIA"]) for r in csv.DictReader((run / "predictions.csv").open())
              if r["split"] == "test"}
    rows = predict(run, [str(small_dataset / "test")], out_csv=tmp_path / "p.csv")
    assert len(rows) == len(theirs) == 5
    for r in rows:
        assert r["p_PNEUMONIA"] == pytest.approx(theirs[r["path"][len(str(small_dataset)) + 1:]], abs=1e-4)


def test_pooled_names_make_file_words_and_config_runs(tmp_path):
    from featcache.backbones.registry import file_word, with_pool
    from featcache.run import read_config

    assert with_pool("hf:org/model#pool=cls", None) == "hf:org/model" == with_pool("hf:org/model", "cls")
    assert file_word(with_pool("hf:org/model", "cls+mean")) == "hf-org-model-pool-cls-mean"
    assert file_word("hf:org/model") == "hf-org-model" and file_word("tv:efficientnet_b0") == "tv-efficientnet_b0"
    config = tmp_path / "c.toml"
    config.write_text('data = "d"\n[[fixed]]\nbackbone = "hf:org/model"\npool = "cls+mean"\n'
                      '[[finetune]]\nbackbone = "hf:org/model"\npool = "mean"\n')
    read = read_config(config)
    assert read["fixed"][0] == {"backbone": "hf:org/model#pool=cls+mean"}
    assert read["finetune"][0] == {"backbone": "hf:org/model#pool=mean"}


def test_xrv_models_take_one_grey_channel_in_xrv_units():
    bb = create_backbone("xrv:densenet121-res224-all", "none", seed=0)
    assert (bb.feature_dim, bb.spec.resize, bb.spec.crop) == (1024, 224, 224)
    # uint8 0 and 255 must reach the network as -1024 and 1024, on one channel (xrv.utils.normalize).
    seen = {}
    hook = bb.model.body.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.inference_mode():
        images = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
        images[..., :112] = 255
        assert bb.model(images).shape == (1, 1024)
    hook.remove()
    assert seen["x"].shape == (1, 1, 224, 224)
    assert seen["x"].min().item() == pytest.approx(-1024) and seen["x"].max().item() == pytest.approx(1024)
    with pytest.raises(UserError, match="choose one of: xrv:densenet121-res224-all"):
        get_entry("xrv:densenet121-res999")


def test_xrv_features_equal_torchxrayvisions_own_pipeline(tmp_path):
    """The cache holds what TorchXRayVision's own preprocessing (normalize, XRayCenterCrop, XRayResizer)
    and features2 give, with the same weights file."""
    import torchvision
    import torchxrayvision as xrv

    torch.manual_seed(13)
    model = xrv.models.DenseNet(weights=None).eval()

    pipeline = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])

    def transform(image):
        import numpy as np

        pixels = xrv.datasets.normalize(np.asarray(image.convert("L")), 255)  # xrv's README: grey, [-1024, 1024]
        return torch.from_numpy(pipeline(pixels[None, ...]))

    assert_library_parity(tmp_path, "xrv:densenet121-res224-all", library_module(model, model.features2), transform)


def library_module(model, forward):
    """``model`` as a library's own pipeline runs it (``forward``), saved with the library's own keys."""

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model.eval()

        def state_dict(self, *args, **kwargs):
            return model.state_dict(*args, **kwargs)

        def forward(self, x):
            return forward(x)

    return Reference()


def test_open_clip_image_towers_are_backbones(tmp_path):
    bb = create_backbone("open_clip:ViT-B-32:openai", "none", seed=0)  # openai's preprocessing, random weights
    assert (bb.feature_dim, bb.spec.resize, bb.spec.crop, bb.spec.interpolation) == (512, 224, 224, "bicubic")
    assert bb.spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with pytest.raises(UserError, match="has no pretrained tag 'nosuch'"):
        get_entry("open_clip:ViT-B-32:nosuch")
    with pytest.raises(UserError, match="names no pretrained tag"):
        create_backbone("open_clip:ViT-B-32", "imagenet")


def test_open_clip_features_equal_open_clips_own_pipeline(tmp_path):
    """The cache holds open_clip's own preprocess + encode_image, with the same (full-model) weights file."""
    import open_clip

    torch.manual_seed(17)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    assert_library_parity(tmp_path, "open_clip:ViT-B-32", library_module(model, model.encode_image), preprocess)


def test_every_family_is_listed_with_examples_that_resolve():
    from featcache.backbones.registry import FAMILIES, FAMILY_EXAMPLES

    assert set(FAMILY_EXAMPLES) == set(FAMILIES)
    for family, (_, examples) in FAMILY_EXAMPLES.items():
        first = examples.split(", ")[0]
        assert first.startswith(family + ":")
        if family != "hf":  # a hub repo id needs the network or a filled cache
            assert get_entry(first).name == first


def test_batchnorm_folded_for_frozen_forward_passes_keeps_the_features():
    """extract runs each backbone with its BatchNorms folded into the convolutions before them."""
    bb = create_backbone("resnet18", weights="none:seed=3")
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        before = bb.model(x)
        folded = bb.model.for_inference()
        after = folded(x)
    count = lambda m: sum(isinstance(q, torch.nn.BatchNorm2d) for q in m.modules())  # noqa: E731
    assert count(bb.model) == 20 and count(folded) == 0  # every conv -> bn pair folded ...
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5 * before.abs().max().item())  # ... same features
    with torch.inference_mode():
        assert torch.equal(bb.model(x), before)  # the extractor it came from is untouched


def test_a_network_torch_fx_cannot_trace_runs_unfolded():
    from featcache.backbones.extractor import fold_batchnorm

    class Branchy(torch.nn.Module):  # data-dependent control flow: symbolic tracing fails
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    net = Branchy().eval()
    assert fold_batchnorm(net) is net
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).train())
    assert fold_batchnorm(plain) is plain  # a BatchNorm in train mode uses batch statistics: not foldable
