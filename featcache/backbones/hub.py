"""The Hugging Face hub (and download hosts) as featcache meets it: what is cached, whether the hub can be reached, and
downloads whose failures are reported in one line (timm and transformers backbones share these)."""

from __future__ import annotations


def in_hf_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"))


def reachable(host: str, timeout: float = 3.0) -> bool:
    """One TCP connection to ``host``:443: offline, a download fails in seconds rather than after a
    library's retries."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) can be reached, unless ``HF_HUB_OFFLINE`` says not to try."""
    import os
    from urllib.parse import urlparse

    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        return False
    return reachable(urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co")


class quiet_hub:
    """The hub's retry warnings off while a download is attempted: a failure is reported in one line."""

    def __enter__(self):
        from huggingface_hub.utils import logging

        self.logging, self.level = logging, logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)
