"""How an image becomes a backbone's input, as data (:class:`PreprocessSpec`).

A spec is recorded in every cache and in its fingerprint, and every decode
backend implements it, so features from two backends (or two machines) are
comparable exactly when their specs are equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the backbone's input: the torchvision weights' transforms.

    Shorter side resized to ``resize`` with ``interpolation`` (antialiased),
    centre crop of ``crop``, then ``(x / 255 - mean) / std``; with one mean and std the model takes one
    grey channel (the mean of the three).
    """

    resize: int
    crop: int
    mean: tuple[float, ...]  # three values, or one for models that take one grey channel
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)



def spec_from_weights(weights) -> PreprocessSpec:
    t = weights.transforms()
    return PreprocessSpec(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
    )
