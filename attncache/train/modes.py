"""The training modes, one table: what each takes from the teacher, how its transferred layers run, its loss.

Adding a mode is one entry here (and, for a new way of running attention, one branch in `student.py`). Everything
else (the checks a cache must pass, what the live teacher captures, evaluation, the CLI's choices) reads the table.

- `targets`:   what the step consumes from the teacher's maps: None, "probs" (whole maps, softmaxed if the cache
               holds logits) or "cls_logits" (the [CLS]-query row of the logits);
- `attention`: how the transferred layers run: "inject" (the teacher's map replaces the student's softmax),
               "record" / "record_cls" (the student's own attention, its logits kept for the loss), or None;
- `starts_from_teacher`: the student starts from the teacher's weights (fresh head);
- `eval_with_maps`: evaluation also needs the teacher's maps of the eval views;
- `layers`:    default transferred layers: "reference" (the first depth − 3) or "cached" (all the cache has);
- `transfer`:  the transfer term of the loss, from (config, targets, recorded student logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _distill(cfg, targets, recorded):
    from .losses import distill_loss

    return cfg.distill_weight * distill_loss(targets, recorded)


def _gta(cfg, targets, recorded):
    from .losses import gta_loss

    return cfg.gta_weight * gta_loss(targets, recorded)


@dataclass(frozen=True)
class Mode:
    name: str
    help: str
    targets: str | None = None
    attention: str | None = None
    starts_from_teacher: bool = False
    eval_with_maps: bool = False
    layers: str = "reference"
    transfer: Callable | None = None

    @property
    def needs_maps(self) -> bool:
        return self.targets is not None

    @property
    def live_payload(self) -> str:
        """What a live teacher captures for this mode."""
        return "logits" if self.targets == "cls_logits" else "probs"

    def teacher_targets(self, maps: torch.Tensor, kind: str) -> torch.Tensor:
        """Decoded maps (B, L, H, Q, N) of `kind` ("probs" or "logits") -> what this mode consumes."""
        if self.targets == "cls_logits":
            return maps[:, :, :, :1, :].float()
        return maps.float().softmax(dim=-1) if kind == "logits" else maps.float()


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("copy", "the teacher's maps replace the student's attention (its own V)", targets="probs",
         attention="inject", eval_with_maps=True),
    Mode("distill", "CE + weight x cross-entropy between teacher and student attention", targets="probs",
         attention="record", transfer=_distill),
    Mode("gta", "fine-tune from the teacher + L2 on [CLS]-query attention logits", targets="cls_logits",
         attention="record_cls", starts_from_teacher=True, layers="cached",
         transfer=_gta),
    Mode("scratch", "the student alone, random init (baseline)"),
    Mode("finetune", "the student starts from the teacher's weights (baseline)", starts_from_teacher=True),
)}


def get_mode(name: str) -> Mode:
    from ..errors import ConfigError

    if name not in MODES:
        raise ConfigError(f"`mode` {name!r}: expected one of {', '.join(MODES)}")
    return MODES[name]
