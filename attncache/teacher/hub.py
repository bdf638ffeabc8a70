"""Hub downloads that fail fast: an unreachable hub is reported in about a second, not after a minute of retries.

Before timm downloads pretrained weights, the weights are looked up in the local caches (Hugging Face, torch hub);
if they are not there, the download host is probed with a short timeout. Unreachable: one line that says so and
names the way out (`--weights FILE`).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from ..errors import AttncacheError

PROBE_TIMEOUT_S = 3.0


def require_hub(model_name: str, flag: str = "`teacher.weights`") -> None:
    """Raise AttncacheError at once if `model_name`'s pretrained weights can neither be found locally nor
    downloaded; return silently when timm can load them (or when it is not ours to tell)."""
    from timm.models import get_pretrained_cfg

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return  # the user asked for cache-only loading: huggingface_hub fails fast by itself
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return  # timm gives its own error for a name without weights
    if cfg.hf_hub_id:
        if _in_hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename):
            return
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    elif cfg.url:
        import torch.hub

        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return
        url = cfg.url
    else:
        return
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    if not reachable(host, port):
        raise AttncacheError(f"cannot reach {host} to download the weights of {model_name!r} (offline?): "
                             f"pass {flag} FILE with local weights")


def _in_hf_cache(repo_id: str, filename: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo, _, revision = repo_id.partition("@")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names)


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to host:port be opened within `timeout` (name resolution included)?"""
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
