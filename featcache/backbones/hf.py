"""The ``hf:`` family: Hugging Face image encoders, by repo id or local folder.

``hf:microsoft/rad-dino``, ``hf:facebook/dinov2-small``, ``hf:/models/my-dinov2``
are built with ``transformers.AutoModel``; the preprocessing is the repo's
own ``AutoImageProcessor`` config (shorter side, centre crop, resampling,
mean and std), which featcache's decoders apply to uint8 pixels. The
features are the CLS token of the last hidden state for transformer
encoders, or the pooled output for convolutional ones; ``hf:REPO#pool=mean``
takes the mean of a transformer's patch tokens instead (CLS and register or
distillation tokens left out) and ``#pool=cls+mean`` both, concatenated as
DINOv2's linear evaluation does (twice the feature dimension). Pretrained weights
come from the Hugging Face cache (or the folder); ``--weights none`` needs
only the config (``config.json``) and builds a seeded random init.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from featcache.backbones.hub import hub_reachable
from featcache.backbones.registry import BackboneEntry, with_pool
from featcache.backbones.spec import PreprocessSpec
from featcache.errors import UserError

INSTALL = 'pip install "transformers>=4.45"'
# PIL resampling codes, as image processors record them.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Where a fine-tuned run stores its classifier beside the encoder's own keys (model.*).
HEAD_PREFIX = "model.featcache_head."


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f"hf: backbones need the transformers package: {INSTALL}") from None
    return transformers


def _local_only(source: str) -> bool:
    return Path(source).is_dir() or not hub_reachable()


def _config(transformers, source: str, local: bool):
    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=local)
    except Exception as exc:
        where = (f"{source} holds no config.json" if Path(source).is_dir() else
                 f"the repo {source} is not in the Hugging Face cache and cannot be downloaded here")
        raise UserError(f"hf:{source}: {where} ({exc.__class__.__name__}); give a repo id or a folder written "
                        "by save_pretrained") from None


def _spec(transformers, source: str, local: bool) -> PreprocessSpec:
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except Exception as exc:
        raise UserError(f"hf:{source}: no image processor config (preprocessor_config.json) to say how images "
                        f"are prepared ({exc.__class__.__name__})") from None
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {})
    shortest = size.get("shortest_edge")
    crop_side = crop.get("height") if crop.get("height") == crop.get("width") else None
    if not getattr(processor, "do_center_crop", False) or not shortest or not crop_side:
        raise UserError(f"hf:{source}: its processor resizes to {size} without a square centre crop; featcache's "
                        "decoders make shorter-side resizes with a square centre crop")
    factor = getattr(processor, "rescale_factor", 1 / 255)
    if abs(factor * 255 - 1) > 1e-6:
        raise UserError(f"hf:{source}: rescale factor {factor} is not 1/255")
    resample = getattr(processor, "resample", 2)
    resample = getattr(resample, "value", resample)
    return PreprocessSpec(resize=int(shortest), crop=int(crop_side),
                          mean=tuple(float(v) for v in processor.image_mean),
                          std=tuple(float(v) for v in processor.image_std),
                          interpolation=RESAMPLE.get(int(resample), "bilinear"))


def _pooled_module():
    import torch
    import torch.nn as nn

    class Pooled(nn.Module):
        """An AutoModel whose forward returns one vector per image: the CLS token (else the pooled output),
        the mean of the patch tokens (the last ``patches`` of the sequence), or both."""

        def __init__(self, model, pool: str = "cls", patches: int = 0, pooler: bool = False):
            super().__init__()
            self.model, self.pool, self.patches, self.pooler = model, pool, patches, pooler

        def forward(self, x):
            out = self.model(pixel_values=x)
            hidden = getattr(out, "last_hidden_state", None)
            if self.pool == "cls" and (self.pooler or hidden is None or hidden.ndim != 3):
                return out.pooler_output.flatten(1)
            cls = hidden[:, 0]
            if self.pool == "cls":
                return cls
            mean = hidden[:, -self.patches:].mean(dim=1)
            return mean if self.pool == "mean" else torch.cat([cls, mean], dim=1)

    return Pooled


def entry(source: str, pool: str = "cls") -> BackboneEntry:
    """The backbone ``hf:SOURCE`` (a repo id or a local folder), its tokens pooled by ``pool`` (cls, mean or
    cls+mean)."""
    transformers = _transformers()
    local = _local_only(source)  # one reachability check for the config, the processor and the weights
    config = _config(transformers, source, local)
    spec = _spec(transformers, source, local)
    Pooled = _pooled_module()
    pooler = False
    if pool == "cls":
        patches = 0
        pooler = not _has_cls_token(transformers, config, spec, source)
        feature_dim = (0 if pooler else int(getattr(config, "hidden_size", 0) or 0)) or \
            _probe_dim(transformers, config, spec, lambda model: Pooled(model, pool, 0, pooler))
    else:
        patches, width = _patch_tokens(transformers, config, spec, source, pool)
        feature_dim = width * (2 if pool == "cls+mean" else 1)

    def build(weights=None):
        return Pooled(transformers.AutoModel.from_config(config), pool, patches, pooler)

    def load_pretrained(model) -> tuple[str, str]:
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            pretrained = transformers.AutoModel.from_pretrained(source, local_files_only=local)
        except Exception as exc:
            where = (f"{source} holds no weights (model.safetensors)" if Path(source).is_dir() else
                     f"put the repo {source} in {HF_HUB_CACHE} (huggingface-cli download {source} where there "
                     "is a network, then copy that cache here)")
            raise UserError(f"cannot get pretrained weights for hf:{source} ({exc.__class__.__name__}): {where}, "
                            "or pass --weights PATH, or --weights none") from None
        model.model.load_state_dict(pretrained.state_dict())
        if not Path(source).is_dir():
            return "hf", source
        # A local folder is named by where it is and what its weights are.
        digest = hashlib.sha256()
        for f in sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin")):
            digest.update(f.read_bytes())
        return "hf", f"{Path(source).resolve()}@sha256={digest.hexdigest()[:16]}"

    # AutoModel is the encoder without a classifier: a fine-tuned run's best.pt keeps its new head under
    # HEAD_PREFIX, which a --weights file then skips.
    return BackboneEntry(with_pool(f"hf:{source}", pool), feature_dim, lambda: (build, None), lambda model: None,
                         (HEAD_PREFIX,), make_spec=lambda: spec, load_pretrained=load_pretrained, state_prefix="model.")


def _probe_dim(transformers, config, spec: PreprocessSpec, wrap) -> int:
    """The feature width of ``wrap(model)``, from a forward on the meta device."""
    import torch

    with torch.device("meta"):
        model = wrap(transformers.AutoModel.from_config(config))
        return int(model(torch.empty(1, 3, spec.crop, spec.crop)).shape[-1])


def _token_layout(transformers, config, spec: PreprocessSpec):
    """What the last hidden state holds, from a forward on the meta device (no memory, no arithmetic):
    (its shape, or None; the patch size; the patch tokens, (crop / patch size)^2, 0 when unknown; whether
    the model has a pooled output)."""
    import torch

    with torch.device("meta"):
        out = transformers.AutoModel.from_config(config)(pixel_values=torch.empty(1, 3, spec.crop, spec.crop))
    hidden = getattr(out, "last_hidden_state", None)
    side = getattr(config, "patch_size", None)
    side = side[0] if isinstance(side, (tuple, list)) else side
    patches = (spec.crop // side) ** 2 if isinstance(side, int) and side > 0 else 0
    return (tuple(hidden.shape) if hidden is not None else None), side, patches, \
        getattr(out, "pooler_output", None) is not None


def _has_cls_token(transformers, config, spec: PreprocessSpec, source: str) -> bool:
    """Whether the last hidden state starts with a CLS token before the patch grid. Encoders without one
    (SigLIP's vision tower, Swin) have only patch tokens there, and their pooled output is the image vector:
    taking token 0 would take one corner patch. Conv nets (no token sequence) use the pooled output too."""
    shape, _, patches, has_pooler = _token_layout(transformers, config, spec)
    if shape is None or len(shape) != 3:
        return False
    if patches and shape[1] - patches >= 1:
        return True
    if not has_pooler:
        raise UserError(f"hf:{source}: its last hidden state has no CLS token before the patch grid and the model "
                        "has no pooled output; use --pool mean")
    return False


def _patch_tokens(transformers, config, spec: PreprocessSpec, source: str, pool: str) -> tuple[int, int]:
    """(patch tokens, token width) of the last hidden state: the patch tokens are the sequence's last
    (crop / patch size)^2, after the CLS token and any register or distillation tokens. A model without
    such a sequence cannot be pooled: a user error."""
    shape, side, patches, _ = _token_layout(transformers, config, spec)
    if shape is None or len(shape) != 3:
        raise UserError(f"hf:{source}: --pool {pool} averages a vision transformer's patch tokens, but its last "
                        f"hidden state is no token sequence (shape {shape}); use --pool cls (its pooled output)")
    prefix = shape[1] - patches  # CLS, register and distillation tokens; mean alone needs none
    if not patches or prefix < (0 if pool == "mean" else 1):
        raise UserError(f"hf:{source}: --pool {pool} cannot tell its patch tokens from the others ({shape[1]} "
                        f"tokens, patch size {side}, crop {spec.crop}: no CLS token before a patch grid); "
                        "use --pool cls")
    return patches, int(shape[2])
