"""The transfer losses, written as the formulas in docs/training.md state them (sources in docs/method.md).

Teacher targets per transferred layer l, (B, L, H, Q, N): probabilities for copy and distill, [CLS]-query logit rows
for gta. Student logits are timm's explicit `(q * scale) @ kᵀ` of the same layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(teacher_probs: torch.Tensor, student_logits: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers −(softmax(t) · log_softmax(s)).sum(keys), averaged over batch, heads and queries."""
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(student_logits):
        total = total + -(teacher_probs[:, i] * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return total


def gta_loss(teacher_cls: torch.Tensor, student_cls: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers ‖s_cls − t_cls‖² over keys, averaged over batch and heads ([CLS]-query logit rows)."""
    total = student_cls[0].new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(student_cls):
        total = total + (logits.float() - teacher_cls[:, i]).pow(2).sum(-1).mean()
    return total


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices (label smoothing applied here), or against soft targets of mixed
    views (`mixed_targets`, smoothing already in them): timm's SoftTargetCrossEntropy."""
    if labels.is_floating_point():
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits.float(), labels)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor, num_classes: int,
                  label_smoothing: float) -> torch.Tensor:
    """timm's `mixup_target` with a lambda per view: lam * smooth(y) + (1 - lam) * smooth(y_partner)."""
    from timm.data.mixup import one_hot

    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    y1 = one_hot(labels, num_classes, on, off)
    y2 = one_hot(partner_labels, num_classes, on, off)
    lam = lam.to(y1.dtype)[:, None]
    return y1 * lam + y2 * (1.0 - lam)
