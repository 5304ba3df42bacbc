"""torch modules shared by extraction and fine-tuning (imports torch at once)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
        self.spec = spec
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

    def for_inference(self) -> FeatureExtractor:
        """This extractor with each BatchNorm folded into the convolution before it, for frozen forward passes.

        A BatchNorm in eval mode is an affine map per channel, so the convolution
        feeding it can absorb it: one pass over the activations instead of two
        (about 10 % faster for ResNet18 on a CPU), the same features up to float
        rounding. Needs a network torch.fx can trace; one it cannot (most
        transformers) is returned as it is. This extractor is left unchanged.
        """
        body = fold_batchnorm(self.body)
        if body is self.body:
            return self
        return FeatureExtractor(body, self.spec).eval().requires_grad_(False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A traced copy of ``module`` with every Conv2d -> BatchNorm2d pair (eval mode, the convolution's output
    used by the BatchNorm alone) fused into one Conv2d; ``module`` itself when there is no such pair or
    torch.fx cannot trace it. The traced copy shares every other submodule with ``module``."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module)
    except Exception:  # dynamic control flow or untraceable calls: run the network as it is
        return module
    modules = dict(graph.named_modules())
    folded = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and conv.op == "call_module"
                and isinstance(modules[conv.target], nn.Conv2d) and len(conv.users) == 1):
            continue
        bn = modules[node.target]
        if bn.training or not bn.track_running_stats:
            continue
        parent, _, name = conv.target.rpartition(".")
        setattr(graph.get_submodule(parent) if parent else graph, name, fuse_conv_bn_eval(modules[conv.target], bn))
        node.replace_all_uses_with(conv)
        graph.graph.erase_node(node)
        folded += 1
    if not folded:
        return module
    graph.graph.lint()
    graph.recompile()
    graph.delete_all_unused_submodules()
    return graph
