"""The ``xrv:`` family: TorchXRayVision's chest X-ray models, by their weights name.

``xrv:densenet121-res224-all`` (and the other ``densenet121-res224-*``
weights) and ``xrv:resnet50-res512-all``. These models take **one** grey
channel scaled to [-1024, 1024] (``xrv.utils.normalize(img, 255)``), at
224 px (DenseNet) or 512 px (ResNet50): the spec says so with one mean
(0.5) and std (0.5 / 1024), and the extractor averages the decoded channels
to one. Features are the pooled vector before the classifier
(``features2`` of the DenseNet: ReLU, global average pool; the ResNet's
``features``). Pretrained weights are TorchXRayVision's own files in its
cache folder (``~/.torchxrayvision/models_data``).
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse

from featcache.backbones.hub import reachable
from featcache.backbones.registry import BackboneEntry
from featcache.backbones.spec import PreprocessSpec
from featcache.errors import UserError

INSTALL = 'pip install "torchxrayvision>=1.2"'
# xrv.utils.normalize maps 0..255 to -1024..1024: (x / 255 - 0.5) / (0.5 / 1024).
MEAN, STD = (0.5,), (0.5 / 1024,)


def _xrv():
    try:
        import torchxrayvision
    except ImportError:
        raise UserError(f"xrv: backbones need the torchxrayvision package: {INSTALL}") from None
    return torchxrayvision


def names(xrv) -> list[str]:
    return [k for k in xrv.models.model_urls if k.startswith(("densenet121-", "resnet50-"))]


def _body(dense: bool):
    import torch.nn as nn

    class Features(nn.Module):
        """The xrv model's pooled features: DenseNet ``features2``, ResNet conv1..avgpool (its ``features``)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            if dense:
                return self.model.features2(x)
            m = self.model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x = m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x)))))
            return x.flatten(1)

    return Features


def entry(name: str) -> BackboneEntry:
    xrv = _xrv()
    known = names(xrv)
    if name not in known:
        raise UserError(f"xrv:{name} is not a TorchXRayVision model; choose one of: "
                        f"{', '.join('xrv:' + k for k in known)}")
    dense = name.startswith("densenet121")
    resolution = 224 if dense else 512
    info = xrv.models.model_urls[name]
    n_labels = len(info["labels"])
    Features = _body(dense)

    def build(weights=None):
        if dense:
            return Features(xrv.models.DenseNet(weights=None, num_classes=n_labels))
        import torch.nn as nn
        import torchvision

        model = torchvision.models.resnet50(num_classes=n_labels, weights=None)
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # as xrv patches it
        return Features(model)

    def load_pretrained(model) -> tuple[str, str]:
        url = info["weights_url"]
        path = os.path.expanduser(os.path.join(xrv.utils.get_cache_dir(), os.path.basename(urlparse(url).path)))
        if not os.path.isfile(path) and not reachable(urlparse(url).hostname):
            raise UserError(f"cannot get TorchXRayVision weights for xrv:{name}: put {os.path.basename(path)} "
                            f"(from {url}) at {path}, or pass --weights PATH, or --weights none")
        try:  # TorchXRayVision's own loader: it reads its own files (a pickled model for the DenseNets)
            loaded = xrv.models.DenseNet(weights=name) if dense else xrv.models.ResNet(weights=name)
        except Exception as exc:
            raise UserError(f"cannot load TorchXRayVision weights for xrv:{name} from {path} "
                            f"({exc.__class__.__name__}); delete the file to download it again") from None
        state = (loaded if dense else loaded.model).state_dict()
        model.model.load_state_dict({k: v for k, v in state.items() if k != "op_threshs"}, strict=False)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        return "xrv", f"{name}@sha256={digest}"

    spec = PreprocessSpec(resize=resolution, crop=resolution, mean=MEAN, std=STD, interpolation="bilinear")
    return BackboneEntry(f"xrv:{name}", 1024 if dense else 2048, lambda: (build, None), lambda model: None,
                         ("model.classifier.",) if dense else ("model.fc.",), make_spec=lambda: spec,
                         load_pretrained=load_pretrained, state_prefix="model.")
