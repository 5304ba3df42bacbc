"""The Hugging Face hub as featcache meets it: what is cached, whether the hub can be reached, and
downloads whose failures are reported in one line (timm and transformers backbones share these)."""

from __future__ import annotations


def in_hf_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub: offline, fail in seconds rather than after the hub's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class quiet_hub:
    """The hub's retry warnings off while a download is attempted: a failure is reported in one line."""

    def __enter__(self):
        from huggingface_hub.utils import logging

        self.logging, self.level = logging, logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)
