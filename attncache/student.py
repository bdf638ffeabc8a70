"""Students: a timm ViT of the teacher's own architecture, with attention injection in the transferred layers.

Each transferred block's `Attention` becomes a `TransferAttention` (same class plus a forward that takes the
teacher's map or records the student's own). The class is swapped in place, so state-dict keys stay timm's and a
student checkpoint loads into a plain timm model. What a forward should do is set per call by `student_forward`,
which works for any model carrying these modules (the EMA copy included).

- copy:     out = attn_drop(softmax(teacher_logits)) @ v, the student's own V; q and k are not computed, so the
            layer's q/k weights get no gradient from it (the reference code's behaviour).
- distill:  the student's own attention runs (timm's explicit formula) and its logits are recorded.
- gta:      as distill, recording only the [CLS]-query row of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from .errors import AttncacheError
from .teachers import TeacherSpec, geometry, geometry_differences, load_state, read_state_dict, state_dict_sha256

MODES = ("copy", "distill", "gta", "scratch", "finetune")
MAP_MODES = ("copy", "distill", "gta")  # modes that consume teacher maps
PRETRAINED_MODES = ("gta", "finetune")  # modes that start from the teacher's weights


class TransferAttention(Attention):
    """timm `Attention` whose forward can take a teacher map (copy) or record the student's logits."""

    transfer_probs: torch.Tensor | None = None  # (B, H, N, N) teacher probabilities to use instead of our own
    record: str | None = None  # None | "logits" | "cls": what of our own logits to keep
    recorded: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if (self.transfer_probs is None and self.record is None) or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.transfer_probs is not None:
            # Only V is needed: slicing the qkv projection keeps q/k out of the graph (no gradient reaches them).
            w = self.qkv.weight[2 * self.attn_dim:]
            b = self.qkv.bias[2 * self.attn_dim:] if self.qkv.bias is not None else None
            v = F.linear(x, w, b).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            attn = self.transfer_probs.to(v.dtype)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            logits = (q * self.scale) @ k.transpose(-2, -1)  # timm's explicit path, same order of operations
            self.recorded = logits[:, :, :1, :] if self.record == "cls" else logits
            attn = logits.softmax(dim=-1)
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def enable_transfer(model: nn.Module, layers: Sequence[int]) -> None:
    """Swap the attention class of the given blocks to TransferAttention (parameters and keys unchanged)."""
    for layer in layers:
        attn = model.blocks[layer].attn
        if type(attn) is not Attention and not isinstance(attn, TransferAttention):
            raise AttncacheError(f"student block {layer}: attention {type(attn).__name__} is not timm's Attention; "
                                 "attention transfer supports standard ViT attention only")
        attn.__class__ = TransferAttention


def student_forward(model: nn.Module, images: torch.Tensor, layers: Sequence[int], mode: str,
                    teacher_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Class logits, and (distill/gta) the student's own attention logits per transferred layer.

    `teacher_probs` (B, L, H, N, N) are consumed in copy mode; in distill mode the recorded tensors are full
    (B, H, N, N) logits, in gta mode [CLS] rows (B, H, 1, N).
    """
    attns = [model.blocks[layer].attn for layer in layers]
    try:
        for i, attn in enumerate(attns):
            if mode == "copy":
                if teacher_probs is None:
                    raise AttncacheError("copy mode needs the teacher's maps for every forward (train and eval)")
                attn.transfer_probs = teacher_probs[:, i]
            elif mode in ("distill", "gta"):
                attn.record = "cls" if mode == "gta" else "logits"
        out = model(images)
        recorded = [attn.recorded for attn in attns] if mode in ("distill", "gta") else []
    finally:
        for attn in attns:
            attn.transfer_probs, attn.record, attn.recorded = None, None, None
    return out, recorded


# ---------------------------------------------------------------------------------------------------------------
# construction


@dataclass(frozen=True)
class StudentSpec:
    model: str
    model_args: dict
    image_size: int
    num_classes: int
    drop_path: float = 0.0

    def to_json(self) -> dict:
        return {"model": self.model, "model_args": dict(self.model_args), "image_size": self.image_size,
                "num_classes": self.num_classes, "drop_path": self.drop_path}


def student_spec(teacher: TeacherSpec, num_classes: int, name: str | None = None, drop_path: float = 0.0,
                 model_args: dict | None = None) -> StudentSpec:
    """The teacher's architecture by default (registers, LayerScale, prefix tokens included)."""
    if name is None:
        return StudentSpec(teacher.model, dict(teacher.model_args), teacher.image_size, num_classes, drop_path)
    return StudentSpec(name, dict(model_args or {}), teacher.image_size, num_classes, drop_path)


def create_student(spec: StudentSpec, seed: int = 0) -> nn.Module:
    import timm

    if not timm.is_model(spec.model.split(".")[0]):
        raise AttncacheError(f"--student {spec.model!r}: not a timm model name")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
            return timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes,
                                     img_size=spec.image_size, drop_path_rate=spec.drop_path, **spec.model_args)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise AttncacheError(f"--student {spec.model!r}: cannot build with {spec.model_args} ({exc})") from exc


def check_geometry(student: nn.Module, spec: StudentSpec, teacher: TeacherSpec, layers: Sequence[int],
                   where: str) -> None:
    """A student may differ from the teacher only where maps still fit: layers, heads and tokens must match."""
    if not hasattr(student, "blocks") or not hasattr(student, "patch_embed"):
        raise AttncacheError(f"--student {spec.model!r}: not a timm VisionTransformer")
    got = geometry(student, spec.model)
    problems = geometry_differences(got, vars(teacher), ("num_heads", "num_tokens", "num_prefix_tokens"))
    if layers and max(layers) >= got["depth"]:
        problems.insert(0, f"{got['depth']} layers (needs layer {max(layers)})")
    if problems:
        raise AttncacheError(f"--student {spec.model!r} does not fit the maps of {where} "
                             f"(teacher {teacher.model}): " + "; ".join(problems))


def load_pretrained(student: nn.Module, weights: str | None, teacher: TeacherSpec, mode: str) -> str:
    """Start gta/finetune from the teacher's weights (the classifier head stays fresh); returns their sha256,
    computed as the teacher registry computes it, so it can be compared with a cache's `weights_sha256`."""
    import copy

    import timm

    if weights is None:
        try:
            state = timm.create_model(teacher.model, pretrained=True, num_classes=0, img_size=teacher.image_size,
                                      **teacher.model_args).state_dict()
        except Exception as exc:  # noqa: BLE001 - offline, unknown tag, ...
            raise AttncacheError(f"--mode {mode} starts from the teacher's weights: pass --weights FILE "
                                 f"(hub download of {teacher.model!r} failed: {exc})") from exc
    else:
        state = read_state_dict(weights)
    body = copy.deepcopy(student)
    body.reset_classifier(0)  # the teacher as the registry builds it: no head
    load_state(body, state, f"--weights {weights or teacher.model}")
    student.load_state_dict({k: v for k, v in body.state_dict().items() if not k.startswith("head.")}, strict=False)
    return state_dict_sha256(body)
