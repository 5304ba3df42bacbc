"""The ``open_clip:`` family: CLIP image towers from open_clip.

``open_clip:ViT-B-32`` (architecture only), ``open_clip:ViT-B-32:laion2b_s34b_b79k``
(with a pretrained tag) or ``open_clip:hf-hub:REPO`` (a model card on the
Hugging Face hub, e.g. BiomedCLIP). Features are the image embedding: the
image tower's projected output, before normalisation. Preprocessing is
open_clip's own for the model and tag (size, ``shortest`` resize mode, i.e.
shorter side then centre crop, interpolation, mean and std); other resize
modes are refused in one line.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from featcache.backbones.hub import hub_reachable, in_hf_cache, quiet_hub, reachable
from featcache.backbones.registry import BackboneEntry
from featcache.backbones.spec import PreprocessSpec
from featcache.errors import UserError

INSTALL = 'pip install "open_clip_torch>=2.24"'
# Keys of the text tower in an open_clip checkpoint: ignored when a --weights file is loaded.
TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
             "logit_scale", "logit_bias", "text.", "attn_mask")


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError(f"open_clip: backbones need the open_clip package: {INSTALL}") from None
    return open_clip


def _parse(open_clip, name: str) -> tuple[str, str | None]:
    if name.startswith("hf-hub:"):
        return name, None
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=4, cutoff=0.5)
        raise UserError(f"open_clip:{arch} is not an open_clip model"
                        + (f"; did you mean {', '.join('open_clip:' + c for c in close)}?" if close else
                           "; open_clip.list_models() lists them"))
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UserError(f"open_clip:{arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'}")
    return arch, tag or None


def _create(open_clip, arch: str, tag: str | None, *, weights: bool):
    import logging

    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "initialized randomly" is what was asked for
    try:
        if arch.startswith("hf-hub:"):
            return open_clip.create_model(arch, load_weights=weights)
        return open_clip.create_model(arch, pretrained=tag if weights else None, force_quick_gelu=quick_gelu)
    finally:
        logging.getLogger().setLevel(previous)


def _spec(open_clip, model, arch: str, tag: str | None) -> PreprocessSpec:
    config = dict(open_clip.get_model_preprocess_cfg(model))
    if tag:
        pretrained = open_clip.get_pretrained_cfg(arch, tag)
        config.update({k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained})
    size = config["size"]
    side = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
    if side is None or config.get("resize_mode", "shortest") != "shortest":
        raise UserError(f"open_clip:{arch}: resize mode {config.get('resize_mode')} to {size}; featcache's decoders "
                        "make shorter-side resizes with a square centre crop")
    return PreprocessSpec(resize=int(side), crop=int(side), mean=tuple(float(v) for v in config["mean"]),
                          std=tuple(float(v) for v in config["std"]),
                          interpolation=config.get("interpolation") or "bicubic")


def _body():
    import torch.nn as nn

    class Visual(nn.Module):
        """open_clip's image tower: pixels in, the (unnormalised) image embedding out."""

        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual(x)

    return Visual


def entry(name: str) -> BackboneEntry:
    open_clip = _open_clip()
    arch, tag = _parse(open_clip, name)
    if arch.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = arch[len("hf-hub:"):]
        if not isinstance(try_to_load_from_cache(repo, "open_clip_config.json"), str) and not hub_reachable():
            raise UserError(f"open_clip:{name}: the model card {repo} is not in the Hugging Face cache and "
                            f"huggingface.co cannot be reached; put the repo in {HF_HUB_CACHE} (huggingface-cli "
                            f"download {repo} where there is a network, then copy that cache here)")
    try:
        skeleton = _create(open_clip, arch, tag, weights=False)
    except Exception as exc:  # an hf-hub card that is not cached and cannot be fetched
        raise UserError(f"open_clip:{name}: cannot read the model's config ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    spec = _spec(open_clip, skeleton, arch, tag)
    feature_dim = int(getattr(skeleton.visual, "output_dim", 0) or 0)
    Visual = _body()

    def build(weights=None):
        return Visual(_create(open_clip, arch, tag, weights=False).visual)

    def load_pretrained(model) -> tuple[str, str]:
        if tag is None and not arch.startswith("hf-hub:"):
            raise UserError(f"open_clip:{arch} names no pretrained tag; use open_clip:{arch}:TAG with one of "
                            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
        where = _where(open_clip, arch, tag)
        if where is not None:
            raise UserError(f"cannot get pretrained weights for open_clip:{name}: {where}, or pass --weights PATH, "
                            "or --weights none")
        try:
            with quiet_hub():
                pretrained = _create(open_clip, arch, tag, weights=True)
        except Exception as exc:
            raise UserError(f"cannot get pretrained weights for open_clip:{name} ({exc.__class__.__name__}); "
                            "pass --weights PATH, or --weights none") from None
        model.visual.load_state_dict(pretrained.visual.state_dict())
        return "open_clip", name

    return BackboneEntry(f"open_clip:{name}", feature_dim, lambda: (build, None), lambda model: None, TEXT_KEYS,
                         make_spec=lambda: spec, load_pretrained=load_pretrained)


def _where(open_clip, arch: str, tag: str | None) -> str | None:
    """None when the weights can be had (cached, or the network is there); else where to put them."""
    from huggingface_hub.constants import HF_HUB_CACHE

    config = {} if arch.startswith("hf-hub:") else open_clip.get_pretrained_cfg(arch, tag)
    repo = arch[len("hf-hub:"):] if arch.startswith("hf-hub:") else (config.get("hf_hub") or "").rstrip("/")
    if repo:
        if in_hf_cache(repo) or hub_reachable():
            return None
        return f"put the Hugging Face repo {repo} in {HF_HUB_CACHE} (huggingface-cli download {repo} where there " \
               "is a network, then copy that cache here)"
    url = config.get("url", "")
    cached = os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(urlparse(url).path)))
    if os.path.isfile(cached) or reachable(urlparse(url).hostname or ""):
        return None
    return f"put {os.path.basename(cached)} (from {url}) at {cached}"
