"""Backbone registry: torchvision classifiers turned into frozen feature extractors.

Each entry knows its feature dimension, its torchvision ImageNet weights and
the preprocessing those weights were trained with (:class:`PreprocessSpec`),
so a cache can record exactly what produced its features. Nothing here
imports torchvision until a backbone is built.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from featcache.backbones.spec import PreprocessSpec, spec_from_weights
from featcache.backbones.weights import WeightsRef
from featcache.errors import UserError



@dataclass(frozen=True)
class BackboneEntry:
    name: str
    feature_dim: int
    # Returns (torchvision builder, its ImageNet weights enum member).
    load: Callable[[], tuple[Callable, object]]
    # Replaces the ImageNet classifier so forward() returns features.
    strip_head: Callable[[object], None]
    # state_dict key prefixes of that classifier; ignored in a --weights file.
    head_prefixes: tuple[str, ...]
    # Other libraries than torchvision (load() then returns no weights enum): the preprocessing their own
    # config defines, and a function loading the library's pretrained weights into a model, returning
    # (library, the weights' name in that library).
    make_spec: Callable[[], PreprocessSpec] | None = None
    load_pretrained: Callable[[object], tuple[str, str]] | None = None
    # Prefix of the model's own keys inside the built module (a wrapper's attribute name): added to the keys
    # of a --weights file written by the library itself.
    state_prefix: str = ""

    def weights_enum(self):
        return self.load()[1]

    def spec(self) -> PreprocessSpec:
        return self.make_spec() if self.make_spec else spec_from_weights(self.weights_enum())


REGISTRY: dict[str, BackboneEntry] = {}


def register(name: str, *, feature_dim: int, strip_head: Callable, head_prefixes: tuple[str, ...]):
    """Decorator adding a backbone; a duplicate name is a programming error."""

    def decorator(load):
        if name in REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        REGISTRY[name] = BackboneEntry(name, feature_dim, load, strip_head, head_prefixes)
        return load

    return decorator


def _strip_resnet(model) -> None:
    import torch.nn as nn

    model.fc = nn.Identity()


def _strip_vgg(model) -> None:
    # Keep fc6 -> ReLU -> fc7 -> ReLU (-> Dropout, a no-op in eval): the
    # 4096-d penultimate layer, the usual VGG "fixed feature".
    model.classifier = model.classifier[:-1]


def _strip_mobilenet(model) -> None:
    import torch.nn as nn

    model.classifier = nn.Identity()


@register("resnet18", feature_dim=512, strip_head=_strip_resnet, head_prefixes=("fc.",))
def _resnet18():
    from torchvision.models import ResNet18_Weights, resnet18

    return resnet18, ResNet18_Weights.IMAGENET1K_V1


@register("vgg16", feature_dim=4096, strip_head=_strip_vgg, head_prefixes=("classifier.6.",))
def _vgg16():
    from torchvision.models import VGG16_Weights, vgg16

    return vgg16, VGG16_Weights.IMAGENET1K_V1


@register("resnet50", feature_dim=2048, strip_head=_strip_resnet, head_prefixes=("fc.",))
def _resnet50():
    from torchvision.models import ResNet50_Weights, resnet50

    return resnet50, ResNet50_Weights.IMAGENET1K_V2


@register("mobilenet_v2", feature_dim=1280, strip_head=_strip_mobilenet, head_prefixes=("classifier.1.",))
def _mobilenet_v2():
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    return mobilenet_v2, MobileNet_V2_Weights.IMAGENET1K_V2


def backbone_facts(name: str) -> dict:
    """Cost and quality from the torchvision weights' metadata (no model is built)."""
    entry = get_entry(name)
    weights = entry.weights_enum()
    meta = weights.meta
    return {
        "name": name,
        "weights": f"{type(weights).__name__}.{weights.name}",
        "params_m": round(meta["num_params"] / 1e6, 2),
        "gflops": meta.get("_ops"),
        "imagenet_top1": meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
        "feature_dim": entry.feature_dim,
        "resize": entry.spec().resize,
    }


# Families of backbones named FAMILY:NAME, each a module with ``entry(name) -> BackboneEntry``, imported
# only when a name of that family is asked for.
FAMILIES = {"tv": "featcache.backbones.tv", "timm": "featcache.backbones.timm_models",
            "hf": "featcache.backbones.hf", "xrv": "featcache.backbones.xrv",
            "open_clip": "featcache.backbones.open_clip_models"}
_RESOLVED: dict[str, BackboneEntry] = {}
# What each family is, with names that work, for `featcache models`.
FAMILY_EXAMPLES = {
    "tv": ("any torchvision classification model", "tv:efficientnet_b0, tv:convnext_tiny, tv:vit_b_16"),
    "timm": ("any timm model, with its pretrained tag", "timm:resnet18, timm:vit_small_patch14_dinov2.lvd142m"),
    "hf": ("a Hugging Face image encoder, repo id or folder", "hf:microsoft/rad-dino, hf:facebook/dinov2-small"),
    "xrv": ("TorchXRayVision chest X-ray models", "xrv:densenet121-res224-all, xrv:resnet50-res512-all"),
    "open_clip": ("an open_clip image tower", "open_clip:ViT-B-32:openai, open_clip:hf-hub:microsoft/"
                                              "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
}


# How a ViT's last token sequence becomes one vector (hf: only; every other family has one pooled output):
# the CLS token, the mean of the patch tokens, or both concatenated, DINOv2's linear-evaluation input. The
# pool is part of the backbone's name, hf:REPO#pool=mean, so caches, fingerprints and run records that name
# the backbone rebuild the same features; cls, the default, is the plain name.
POOLS = ("cls", "mean", "cls+mean")
POOL_MARK = "#pool="
POOLED_FAMILIES = ("hf",)


def split_pool(name: str) -> tuple[str, str]:
    """(the name without its pool, the pool): hf:org/model#pool=mean -> (hf:org/model, mean); no suffix: cls."""
    base, mark, pool = name.rpartition(POOL_MARK)
    if not mark:
        return name, "cls"
    if pool not in POOLS:
        raise UserError(f"{name}: pool {pool!r} is not one of {', '.join(POOLS)}")
    return base, pool


def with_pool(name: str, pool: str | None) -> str:
    """``name`` pooled by ``pool`` (None: as the name says), canonical: cls is the plain name, the others
    end in #pool=POOL. A name whose own suffix says another pool is a user error."""
    base, named = split_pool(name)
    if pool is not None and pool not in POOLS:
        raise UserError(f"--pool takes {', '.join(POOLS)}, got {pool!r}")
    if pool is not None and POOL_MARK in name and pool != named:
        raise UserError(f"--pool {pool} contradicts the backbone name {name}; give one of them")
    pool = pool or named
    return base if pool == "cls" else f"{base}{POOL_MARK}{pool}"


def poolable(name: str) -> bool:
    """Whether ``--pool`` can choose this backbone's features (an hf: encoder)."""
    return split_pool(name)[0].partition(":")[0] in POOLED_FAMILIES


def file_word(name: str) -> str:
    """A backbone name as a file-name word: tv:efficientnet_b0 -> tv-efficientnet_b0, hf:org/model -> hf-org-model,
    hf:org/model#pool=cls+mean -> hf-org-model-pool-cls-mean."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def backbone_names() -> str:
    """For help texts: the short names, then the families."""
    return ", ".join(REGISTRY) + ", or " + ", ".join(f"{f}:NAME" for f in FAMILIES)


def get_entry(name: str) -> BackboneEntry:
    """The backbone ``name``: a short name (resnet18, ...) or ``FAMILY:NAME`` (tv:efficientnet_b0, ...)."""
    name = with_pool(name, None)
    base, pool = split_pool(name)
    if pool != "cls" and not poolable(name):
        raise UserError(f"--pool {pool} (#pool={pool}) pools the tokens of hf: vision transformers only; {base} "
                        "has pooled features of its own: leave the pool out")
    if name in REGISTRY:
        return REGISTRY[name]
    family, sep, model = base.partition(":")
    if not sep:
        raise UserError(f"unknown backbone {name!r}; choose one of: {backbone_names()}")
    if family not in FAMILIES:
        raise UserError(f"unknown backbone family {family!r} in {name!r}; families: {', '.join(FAMILIES)}")
    if family == "tv" and model in REGISTRY:  # tv:resnet18 is resnet18: same network, same features, one cache
        return REGISTRY[model]
    if name not in _RESOLVED:
        import importlib

        module = importlib.import_module(FAMILIES[family])
        _RESOLVED[name] = module.entry(model, pool=pool) if pool != "cls" else module.entry(model)
    return _RESOLVED[name]


@dataclass
class Backbone:
    """A ready feature extractor and the facts a cache records about it."""

    name: str
    model: object  # FeatureExtractor
    spec: PreprocessSpec
    feature_dim: int
    ref: WeightsRef  # resolved: names the pretrained weights, or carries the file's SHA-256
    weights_note: str  # for people

    @property
    def weights(self) -> str:
        """The weights' id, e.g. "none:seed=0", "torchvision:ResNet18_Weights.IMAGENET1K_V1"."""
        return self.ref.to_id()


def create_backbone(name: str, weights: str | WeightsRef = "none", *, seed: int = 0) -> Backbone:
    """Build ``name`` with ``weights`` (a :class:`WeightsRef` or a ``--weights`` value: imagenet, none,
    none:seed=N or a state_dict path; ``seed`` seeds ``none``), frozen and in eval mode."""
    import torch

    ref = WeightsRef.parse(weights, seed=seed)
    entry = get_entry(name)
    builder, imagenet = entry.load()
    with torch.random.fork_rng(devices=[]):
        # A seeded random init that leaves the caller's RNG untouched.
        torch.manual_seed(ref.seed)
        model = builder(weights=None)
    if ref.kind == "pretrained" and entry.load_pretrained is not None:
        library, tag = entry.load_pretrained(model)
        ref = replace(ref, library=library, tag=tag)
        note = f"{library} pretrained ({tag})"
    elif ref.kind == "pretrained":
        model.load_state_dict(_imagenet_state_dict(entry, imagenet))
        ref = ref.resolved(tag=f"{type(imagenet).__name__}.{imagenet.name}")
        note = f"ImageNet ({ref.tag})"
    elif ref.kind == "none":
        note = f"none - random init, seed {ref.seed} (no pretrained weights)"
    else:
        ref = ref.resolved(sha256=_load_weights_file(model, entry, Path(ref.path)))
        note = f"file {ref.path} (sha256 {ref.sha256[:12]})"
    entry.strip_head(model)
    spec = entry.spec()
    from featcache.backbones.extractor import FeatureExtractor

    extractor = FeatureExtractor(model, spec).eval().requires_grad_(False)
    return Backbone(entry.name, extractor, spec, entry.feature_dim, ref, note)


def auto_weights(name: str, seed: int = 0) -> tuple[WeightsRef, str | None]:
    """``--weights auto``: the pretrained weights when they can be had, else seeded random init.
    Returns the reference and, when it fell back, why (one line)."""
    try:
        create_backbone(name, "imagenet", seed=seed)
        return WeightsRef("pretrained", seed=seed), None
    except UserError as exc:
        return WeightsRef("none", seed=seed), str(exc)


def _imagenet_state_dict(entry: BackboneEntry, weights) -> dict:
    import torch

    filename = os.path.basename(urlparse(weights.url).path)
    expected = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, timeouts, a partial download, a bad hash
        raise UserError(
            f"cannot get ImageNet weights for {entry.name}: {exc.__class__.__name__}: {exc}. "
            f"Put {filename} (from {weights.url}) at {expected}, "
            f"or pass --weights PATH to a state_dict file, or --weights none"
        ) from None


def _load_weights_file(model, entry: BackboneEntry, path: Path) -> str:
    if not path.is_file():
        raise UserError(
            f"weights file not found: {path} (--weights takes imagenet, none, or a path to a state_dict)"
        )
    state = load_tensors(path, "a PyTorch state_dict")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state_dict (a dict of tensors)")
    state = {_strip_wrapper_prefix(k): v for k, v in state.items()}
    if entry.state_prefix:
        state = {k if k.startswith(entry.state_prefix) else entry.state_prefix + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(entry.head_prefixes)}
    own = model.state_dict()
    shapes = [(k, tuple(getattr(v, "shape", ())), tuple(own[k].shape)) for k, v in state.items()
              if k in own and tuple(getattr(v, "shape", ())) != tuple(own[k].shape)]
    if shapes:
        key, theirs, ours = shapes[0]
        raise UserError(f"{path} does not fit {entry.name}: {len(shapes)} tensors have other shapes (e.g. {key}: "
                        f"{theirs} in the file, {ours} in {entry.name}); is it another architecture's state_dict?")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(entry.head_prefixes)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise UserError(f"{path} does not fit {entry.name}: keys {'; '.join(parts)}")
    return _sha256_file(path)


def load_tensors(path: Path, what: str):
    """``torch.load(path, weights_only=True)``, any failure as one plain line.

    torch's own message runs to several lines with ANSI codes and suggests
    ``weights_only=False``, which would run whatever code the file carries:
    that advice is never passed on.
    """
    import pickle

    import torch

    if Path(path).suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"cannot read {path} as {what}: {exc.__class__.__name__}: {str(exc)[:200]}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # torch's safe loader met code it will not run
            raise UserError(f"{path} is not {what}: it holds objects other than tensors, which are never "
                            "loaded (only plain tensors and containers are read)") from None
        # torch's first line here is its advice to load unsafely: nothing of it is passed on.
        raise UserError(f"cannot read {path} as {what}: not a PyTorch file") from None
    except Exception as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise UserError(f"cannot read {path} as {what}: {exc.__class__.__name__}"
                        + (f": {first[0][:200]}" if first else "")) from None


def _strip_wrapper_prefix(key: str) -> str:
    # DistributedDataParallel and torch.compile wrap module names.
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
