"""Where a step's teacher targets come from: a cache's compact fields decoded on the training device, or a live
teacher run on the exact images the student is about to see. Both give what the mode consumes (modes.py)."""

from __future__ import annotations

import contextlib

import torch

from ..cache import Cache
from ..teacher import AttentionCapture, drop_path_masks
from .modes import Mode


class CachedMaps:
    """Decode a batch's compact fields on the training device and keep the transferred layers."""

    def __init__(self, cache: Cache, layers: list[int], mode: Mode, device: torch.device):
        self.cache, self.mode, self.device = cache, mode, device
        self.positions = None if layers == cache.layers else [cache.layers.index(i) for i in layers]
        self._select = _layer_selector(self.positions, device)

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        maps = self.cache.decode(batch["fields"], self.device)
        if self._select is not None:
            maps = maps[:, self._select]
        return self.mode.teacher_targets(maps, self.cache.decodes_to)


def _layer_selector(positions: list[int] | None, device: torch.device) -> slice | torch.Tensor | None:
    """The cached layers a step keeps, as an index made once: a slice for a run of layers (the usual case: the
    first depth - 3), else an index tensor already on the device. A Python list as the index becomes a tensor
    copied to the device synchronously on every step."""
    if positions is None:
        return None
    if positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions, device=device)


class LiveMaps:
    """The same targets from a live teacher, on the images the student is about to see (and with the drop-path
    masks the views carry, as the cache's teacher ran). With `amp` (training's bf16 autocast on CUDA) the teacher
    runs under autocast as `extract --amp` runs it: the capture still forms the maps in fp32."""

    def __init__(self, model: torch.nn.Module, layers: list[int], mode: Mode, drop_path_rate: float = 0.0,
                 amp: bool = False):
        self.capture, self.mode, self.rate = AttentionCapture(model, layers, mode.live_payload), mode, drop_path_rate
        self.amp = amp

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with autocast, drop_path_masks(self.capture.model, batch.get("drop_path_keep"), self.rate):
            return self.mode.teacher_targets(self.capture(images), self.capture.payload)
