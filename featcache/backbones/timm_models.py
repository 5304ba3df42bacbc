"""The ``timm:`` family: any timm model, optionally with its pretrained tag.

``timm:resnet18``, ``timm:convnext_small.fb_in22k``,
``timm:vit_small_patch14_dinov2.lvd142m`` are built with
``timm.create_model(name, num_classes=0)``, so the forward returns timm's
pooled pre-logits features. The preprocessing is what timm's own
``resolve_model_data_config`` says for the model (input size, crop_pct,
interpolation, mean, std), as timm's eval transform applies it: the shorter
side resized to ``floor(size / crop_pct)``, a centre crop of ``size``.
Pretrained means the weights timm names for the tag (its default tag when
none is given), from the Hugging Face cache.
"""

from __future__ import annotations

import math

from featcache.backbones.registry import BackboneEntry
from featcache.backbones.hub import hub_reachable, in_hf_cache, quiet_hub
from featcache.backbones.spec import PreprocessSpec
from featcache.errors import UserError

INSTALL = 'pip install "timm>=1.0"'


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(f"timm: backbones need the timm package: {INSTALL}") from None
    return timm


def _skeleton(timm, name: str):
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0)
    except (NotImplementedError, RuntimeError):
        return timm.create_model(name, pretrained=False, num_classes=0)


def _spec(timm, model, name: str) -> PreprocessSpec:
    config = timm.data.resolve_model_data_config(model)
    channels, height, width = config["input_size"]
    if channels != 3 or height != width or config.get("crop_mode", "center") != "center":
        raise UserError(f"timm:{name} wants input {config['input_size']} with crop mode {config.get('crop_mode')}; "
                        "featcache's decoders make square 3-channel centre crops")
    crop_pct = config.get("crop_pct") or 1.0
    return PreprocessSpec(resize=math.floor(height / crop_pct), crop=height,
                          mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                          interpolation=config.get("interpolation") or "bilinear")


def _feature_dim(model, spec: PreprocessSpec) -> int:
    import torch

    try:
        device = next(model.parameters()).device
        return int(model(torch.empty(1, 3, spec.crop, spec.crop, device=device)).shape[-1])
    except Exception:  # a forward the meta device cannot run: timm's own count
        return int(getattr(model, "head_hidden_size", None) or model.num_features)


def entry(name: str) -> BackboneEntry:
    """The backbone ``timm:NAME``; an unknown name is one line with the closest timm names."""
    timm = _timm()
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[: max(3, len(arch) // 2)]}*")[:4]
        hint = f"; close: {', '.join('timm:' + c for c in close)}" if close else "; timm.list_models() lists them"
        raise UserError(f"timm:{name} is not a timm model{hint}")
    try:
        skeleton = _skeleton(timm, name)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise UserError(f"timm:{name}: {str(exc).splitlines()[0]}") from None
    spec = _spec(timm, skeleton, name)
    feature_dim = _feature_dim(skeleton, spec)
    hub_id = skeleton.pretrained_cfg.get("hf_hub_id") or name
    classifier = skeleton.pretrained_cfg.get("classifier") or "head"
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))

    def build(weights=None):
        return timm.create_model(name, pretrained=False, num_classes=0)

    def load_pretrained(model) -> tuple[str, str]:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = (f"put the Hugging Face repo {hub_id} in {HF_HUB_CACHE} (huggingface-cli download {hub_id} where "
                 "there is a network, then copy that cache here), or pass --weights PATH, or --weights none")
        if not in_hf_cache(hub_id) and not hub_reachable():
            raise UserError(f"cannot get pretrained weights for timm:{name}: not in the Hugging Face cache and "
                            f"huggingface.co cannot be reached; {where}")
        try:
            with quiet_hub():
                pretrained = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # a partial download, a missing repo, a lost connection
            first = (str(exc).splitlines() or [""])[0][:200]
            raise UserError(f"cannot get pretrained weights for timm:{name} ({exc.__class__.__name__}: {first}); "
                            f"{where}") from None
        model.load_state_dict(pretrained.state_dict())
        return "timm", hub_id

    return BackboneEntry(f"timm:{name}", feature_dim, lambda: (build, None), lambda model: None, prefixes,
                         make_spec=lambda: spec, load_pretrained=load_pretrained)
