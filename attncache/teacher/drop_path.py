"""Stochastic depth with given masks. The reference distill recipe hands the student's per-sample drop-path masks to
the teacher's forward, so the teacher's maps depend on them; a cache therefore stores, per view, the per-block keep
mask its teacher ran with, and the student's transferred blocks reuse it.

A mask applies to both residual branches of its block (attention and MLP), scaled as timm's `DropPath` scales
(scale_by_keep): x * keep / (1 - rate), in x's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class MaskedDropPath(nn.Module):
    """timm's DropPath with the keep mask (B,) given instead of drawn."""

    def __init__(self, keep: torch.Tensor, rate: float):
        super().__init__()
        self.keep, self.rate = keep, rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm: random_tensor = bernoulli(keep_prob), then random_tensor.div_(keep_prob), then x * random_tensor
        scale = self.keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.rate)  # never in place: keep stays 0/1
        return x * scale.view(-1, *([1] * (x.ndim - 1)))


@contextlib.contextmanager
def drop_path_masks(model: nn.Module, keep: torch.Tensor | None, rate: float,
                    blocks: Sequence[int] | None = None) -> Iterator[None]:
    """While inside, block i of `model` (every block, or `blocks`) drops the residual branches of the samples
    where `keep[:, i]` is False. `keep` None: the model is left as it is."""
    if keep is None:
        yield
        return
    # One copy of the masks to the model's device, asynchronous from pinned memory (the loader pins batches), not a
    # synchronous host-to-device copy in each block's two residual branches (2 x depth stalls of the step on a GPU).
    keep = keep.to(next(model.parameters()).device, non_blocking=True)
    swapped = []
    try:
        for i in (range(len(model.blocks)) if blocks is None else blocks):
            block = model.blocks[i]
            swapped.append((block, block.drop_path1, block.drop_path2))
            block.drop_path1 = block.drop_path2 = MaskedDropPath(keep[:, i], rate)
        yield
    finally:
        for block, first, second in swapped:
            block.drop_path1, block.drop_path2 = first, second
