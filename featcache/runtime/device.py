"""Where work runs and what it costs: device choice, cores, timing syncs, peak memory.

Every stage that reports seconds or megabytes takes them from here, so a
figure in one table means what the same figure means in another.
"""

from __future__ import annotations

import os
import resource

from featcache.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for ``--device``; ``auto`` takes the GPU when PyTorch sees one."""
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible to PyTorch; use --device cpu")
    return device


def cpu_cores() -> int:
    """Cores this process may use: its affinity mask, which taskset, cgroups and containers narrow."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def synchronizer(device: str):
    """A function that waits for queued GPU work on ``device`` (a no-op on CPU), for honest timings."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def peak_host_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_children_mb() -> float:
    """Peak resident memory of the largest finished child process, MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def peak_gpu_mb(device: str) -> float | None:
    """Peak memory PyTorch allocated on ``device`` so far, MiB; None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20


def peak_memory_mb(device: str) -> float:
    """The memory that limits the work: GPU allocation on a GPU, host RSS otherwise."""
    gpu = peak_gpu_mb(device)
    return peak_host_mb() if gpu is None else gpu


def memory_format(model, device: str):
    """The memory layout ``model`` runs fastest in on ``device``.

    channels_last on a GPU (cuDNN's tensor-core convolutions want it) and, on a
    CPU, for networks built on BatchNorm2d (ResNet, DenseNet, EfficientNet:
    1.3-1.6x faster through oneDNN). ConvNeXt's LayerNorms permute to
    channels-last themselves and run slower on a CPU when the input already is
    (0.8x for convnext_tiny), and transformers do not care, so they keep the
    default layout there.
    """
    import torch

    if str(device).startswith("cuda"):
        return torch.channels_last
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return torch.channels_last if has_bn else torch.contiguous_format


def place(model, device: str):
    """``model`` moved to ``device`` in its fastest layout; returns (model, that layout for its inputs)."""
    fmt = memory_format(model, device)
    return model.to(device, memory_format=fmt), fmt
