"""Class probabilities of a student on eval views, and top-1: what training's evaluation and `attncache eval`
share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .loader import batches
from .student import student_forward


@torch.no_grad()
def predict(model: torch.nn.Module, loader, layers: list[int], maps, device: torch.device,
            autocast: Callable = contextlib.nullcontext, should_stop: Callable[[], bool] = lambda: False):
    """(class probabilities in the stream's order, labels), or None if `should_stop()` turned true midway.
    With `maps` (copy mode) the student's transferred layers run on the teacher's maps of the eval views."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for batch in batches(loader):
            if should_stop():
                return None
            images = batch["images"].to(device, non_blocking=True)
            targets = maps(batch, images) if maps is not None else None
            with autocast():
                out, _ = student_forward(model, images, layers, "inject" if targets is not None else None, targets)
            probs.append(out.float().softmax(-1).cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    nll = -probs.clamp_min(1e-12).log().gather(1, labels[:, None]).mean().item()
    return {"top1": 100.0 * (probs.argmax(-1) == labels).float().mean().item(), "loss": nll,
            "images": len(labels)}
