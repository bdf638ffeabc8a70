"""`--device`: a torch device that exists on this machine, or a one-line error before anything is built."""

from __future__ import annotations

import torch

from .errors import AttncacheError


def parse_device(name: str, flag: str = "`device`") -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise AttncacheError(f"{flag} {name!r}: not a device (expected cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AttncacheError(f"{flag} {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AttncacheError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise AttncacheError(f"{flag} {name}: expected cpu, cuda or cuda:N")
    return device
