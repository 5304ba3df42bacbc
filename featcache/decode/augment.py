"""Training augmentations for chest X-rays, one description for every decode backend.

Small rotations, shifts and scalings, brightness and contrast; never a
vertical flip; a horizontal flip only when asked (it moves the heart to the
other side). Applied to the decoded, centre-cropped image, by torchvision v2
transforms in CPU workers or by DALI operators (on the GPU with a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from featcache.errors import UserError

AUGMENTS = ("none", "light", "strong", "tutorial")
# The PyTorch transfer-learning tutorial's RandomResizedCrop: area share and aspect ratio ranges.
TUTORIAL_AREA = (0.08, 1.0)
TUTORIAL_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augment:
    degrees: float
    translate: float  # fraction of the side
    scale: tuple[float, float]
    shear: float
    brightness: float
    contrast: float
    hflip: bool
    resized_crop: tuple[float, float] | None = None  # area range of a random resized crop, then back to size


PRESETS = {
    "light": dict(degrees=5, translate=0.04, scale=(0.95, 1.05), shear=0, brightness=0.1, contrast=0.1),
    "strong": dict(degrees=12, translate=0.08, scale=(0.88, 1.12), shear=4, brightness=0.25, contrast=0.25),
    # The classic tutorial's training transform: RandomResizedCrop + RandomHorizontalFlip, nothing else.
    "tutorial": dict(degrees=0, translate=0, scale=(1.0, 1.0), shear=0, brightness=0, contrast=0,
                     resized_crop=TUTORIAL_AREA),
}


def augment_params(kind: str, hflip: bool = False) -> Augment | None:
    """The augmentation of ``--augment kind`` (None for none without a flip)."""
    if kind not in AUGMENTS:
        raise UserError(f"--augment takes {', '.join(AUGMENTS)}, got {kind!r}")
    if kind == "none":
        return Augment(0, 0, (1.0, 1.0), 0, 0, 0, True) if hflip else None
    return Augment(**PRESETS[kind], hflip=hflip or kind == "tutorial")


def torchvision_transform(aug: Augment | None):
    """uint8 (3, H, W) -> uint8 (3, H, W) with torchvision v2."""
    if aug is None:
        return None
    from torchvision.transforms import v2

    ops = []
    if aug.resized_crop:
        ops.append(_RandomResizedCropSameSize(aug.resized_crop))
    if aug.degrees or aug.translate or aug.scale != (1.0, 1.0) or aug.shear:
        ops.append(v2.RandomAffine(degrees=aug.degrees, translate=(aug.translate, aug.translate), scale=aug.scale,
                                   shear=aug.shear or None))
    if aug.brightness or aug.contrast:
        ops.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


class _RandomResizedCropSameSize:
    """torchvision's RandomResizedCrop with the output the size of its input (the decoded crop)."""

    def __init__(self, area: tuple[float, float]):
        self.area = area

    def __call__(self, image):
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = v2.RandomResizedCrop.get_params(image, scale=list(self.area), ratio=list(TUTORIAL_RATIO))
        return F.resized_crop(image, top, left, h, w, size=list(image.shape[-2:]), antialias=True)


def view_seed(key: str, view: int, seed: int) -> int:
    """The seed of augmented view ``view`` of the image named ``key`` (its path in the manifest): the same
    in every run, resume and worker count, whatever else is extracted with it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{view}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def augmented_views(images, keys: list[str], views: int, transform, seed: int):
    """``views`` augmented copies of each uint8 (3, H, W) image of ``images`` (on any device), view-major:
    view 1 of every image, then view 2, ... Each copy draws its parameters from its own seed
    (:func:`view_seed`), so it never depends on batch order or on which process made it."""
    import torch

    out, threads = [], torch.get_num_threads()
    # One image at a time is too little work to share between threads: on 2 busy cores, one thread
    # augmented a 224-px view about 10x faster than two did.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            for view in range(1, views + 1):
                for image, key in zip(images, keys):
                    torch.manual_seed(view_seed(key, view, seed))
                    out.append(transform(image))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(out) if out else images[:0]
