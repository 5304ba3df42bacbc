"""Mixed precision, one decision for training and extraction.

``auto`` is bf16 where the hardware runs it natively (recent GPUs; CPUs with
AVX512-BF16 or AMX), else fp16 on a CUDA GPU, else fp32. Training with fp16
needs loss scaling (a GradScaler); inference does not.
"""

from __future__ import annotations

from featcache.errors import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, device: str):
    """(autocast dtype or None, use a GradScaler, words) for ``amp`` on ``device``."""
    import torch

    if amp not in AMP_MODES:
        raise UserError(f"--amp takes {', '.join(AMP_MODES)}, got {amp!r}")
    cuda = device.startswith("cuda")
    if amp == "off":
        return None, False, "off (fp32)"
    if amp == "fp16":
        if not cuda:
            raise UserError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or off")
        return torch.float16, True, "fp16 autocast with loss scaling"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else _cpu_has_bf16()
    if amp == "bf16":
        return torch.bfloat16, False, "bf16 autocast" + ("" if bf16_ok else " (emulated: slow on this CPU)")
    if bf16_ok:
        return torch.bfloat16, False, "auto: bf16 autocast (supported here)"
    if cuda:
        return torch.float16, True, "auto: fp16 autocast with loss scaling (no bf16 on this GPU)"
    return None, False, "auto: fp32 (this CPU has no native bf16)"


def autocast(device: str, dtype):
    """The autocast context for ``dtype`` (None: plain fp32) on ``device`` ("cpu", "cuda", "cuda:1")."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype) -> str | None:
    """"bf16" or "fp16" for an autocast dtype, None for fp32."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # the probe is private API; without it, assume no
        return False
