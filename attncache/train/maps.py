"""Where a step's teacher targets come from: a cache's compact fields decoded on the training device, or a live
teacher run on the exact images the student is about to see. Both give what the mode consumes (modes.py)."""

from __future__ import annotations

import torch

from ..cache import Cache
from ..teacher import AttentionCapture, drop_path_masks
from .modes import Mode


class CachedMaps:
    """Decode a batch's compact fields on the training device and keep the transferred layers."""

    def __init__(self, cache: Cache, layers: list[int], mode: Mode, device: torch.device):
        self.cache, self.mode, self.device = cache, mode, device
        self.positions = None if layers == cache.layers else [cache.layers.index(i) for i in layers]

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        maps = self.cache.decode(batch["fields"], self.device)
        if self.positions is not None:
            maps = maps[:, self.positions]
        return self.mode.teacher_targets(maps, self.cache.decodes_to)


class LiveMaps:
    """The same targets from a live teacher, on the images the student is about to see (and with the drop-path
    masks the views carry, as the cache's teacher ran)."""

    def __init__(self, model: torch.nn.Module, layers: list[int], mode: Mode, drop_path_rate: float = 0.0):
        self.capture, self.mode, self.rate = AttentionCapture(model, layers, mode.live_payload), mode, drop_path_rate

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        with drop_path_masks(self.capture.model, batch.get("drop_path_keep"), self.rate):
            return self.mode.teacher_targets(self.capture(images), self.capture.payload)
