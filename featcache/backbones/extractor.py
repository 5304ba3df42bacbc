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
        scale = torch.tensor([255.0, 255.0, 255.0])
        self.register_buffer("shift", (torch.tensor(spec.mean) * scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", (torch.tensor(spec.std) * scale).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.shift) / self.scale
        return torch.flatten(self.body(x), 1)
