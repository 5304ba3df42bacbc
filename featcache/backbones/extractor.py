"""torch modules shared by extraction and fine-tuning (imports torch at once)."""

from __future__ import annotations

import torch
import torch.nn as nn

from featcache.backbones.spec import PreprocessSpec


class FeatureExtractor(nn.Module):
    """uint8 RGB batch (N, 3, H, W) in, (N, feature_dim) features out.

    Normalization lives in the model, so every decode backend hands over plain
    uint8 pixels (a quarter of the bytes to move to a GPU) and the mean/std
    always match the weights.
    """

    def __init__(self, body: nn.Module, spec: PreprocessSpec):
        super().__init__()
        self.body = body
        channels = len(spec.mean)  # 3, or 1 for grey-input models (TorchXRayVision)
        self.grey = channels == 1
        self.register_buffer("shift", (torch.tensor(spec.mean) * 255.0).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("scale", (torch.tensor(spec.std) * 255.0).view(1, channels, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.grey:  # decoders replicate grey X-rays to 3 channels; colour images become their channel mean
            x = x.mean(dim=1, keepdim=True)
        x = (x - self.shift) / self.scale
        return torch.flatten(self.body(x), 1)
