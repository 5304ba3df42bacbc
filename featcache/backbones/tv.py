"""The ``tv:`` family: any torchvision classification model, by its torchvision name.

``tv:efficientnet_b0``, ``tv:convnext_tiny``, ``tv:vit_b_16``, ... are built
with ``torchvision.models.get_model``; pretrained means the model's
``DEFAULT`` weights, and the preprocessing is those weights' own transforms
(resize, crop, interpolation, mean and std). The features are the input of
the classifier layer: the last ``nn.Linear`` of the model (``fc``,
``classifier.N``, ``heads.head``, ``head``), replaced by an identity. Models
whose classifier is not a linear layer (SqueezeNet's convolution) are
refused. The four short names (resnet18, resnet50, vgg16, mobilenet_v2) are
the same networks with the same features; ``tv:resnet18`` resolves to
``resnet18`` so their caches are shared.
"""

from __future__ import annotations

import difflib
import functools

from featcache.backbones.registry import BackboneEntry
from featcache.errors import UserError


def _classification_models() -> list[str]:
    import torchvision.models as models

    return models.list_models(module=models)


def _last_linear(model) -> tuple[str, int] | None:
    import torch.nn as nn

    found = [(path, m.in_features) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def _skeleton(name: str):
    """The model's modules without real tensors (on the meta device) when the builder allows it."""
    import torch
    from torchvision.models import get_model

    try:
        with torch.device("meta"):
            return get_model(name)
    except (NotImplementedError, RuntimeError):  # builders that compute with tensors while building
        return get_model(name)


def _set_module(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if leaf.isdigit():
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def _strip(path: str, model) -> None:
    import torch.nn as nn

    _set_module(model, path, nn.Identity())


def entry(name: str) -> BackboneEntry:
    """The backbone ``tv:NAME``; an unknown name is one line with the closest torchvision names."""
    from torchvision.models import get_model, get_model_weights

    known = _classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join('tv:' + c for c in close)}?" if close else \
            "; torchvision.models.list_models() lists them"
        raise UserError(f"tv:{name} is not a torchvision classification model{hint}")
    head = _last_linear(_skeleton(name))
    if head is None:
        raise UserError(f"tv:{name} ends in no linear classifier layer, so it has no feature vector before one; "
                        "choose another model")
    path, feature_dim = head
    weights = get_model_weights(name).DEFAULT

    def load():
        return functools.partial(get_model, name), weights

    return BackboneEntry(f"tv:{name}", feature_dim, load, functools.partial(_strip, path), (f"{path}.",))
