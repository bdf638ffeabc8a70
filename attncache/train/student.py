"""Students: a timm ViT of the teacher's own architecture, built with timm's `attn_layer=` hook so that every block's
attention is a `TransferAttention`: timm's `Attention` (same parameters, same state-dict keys: a student checkpoint
loads into a plain timm model) plus a forward that can take the teacher's map or record the student's own logits.
What a forward does is set per call by `student_forward` (the EMA copy works the same way); with nothing set, a
block runs timm's own forward, fused attention included.

- "inject" (copy):  out = attn_drop(P) @ v with P the teacher's map and v the student's own V; q and k are not
                    computed, so the layer's q/k weights get no gradient from it (the reference code's behaviour).
- "record" (distill): the student's own attention (timm's explicit formula), its logits kept for the loss.
- "record_cls" (gta): the same, keeping only the [CLS]-query row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from ..errors import AttncacheError, ConfigError
from ..teacher import (
    TeacherSpec,
    check_standard_vit,
    geometry,
    geometry_differences,
    load_state,
    read_state_dict,
    state_dict_sha256,
)
from ..teacher.hub import require_hub
from .modes import Mode


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


def student_forward(model: nn.Module, images: torch.Tensor, layers: Sequence[int], attention: str | None,
                    teacher_probs: torch.Tensor | None = None,
                    wrapper: nn.Module | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Class logits, and (record/record_cls) the student's own attention logits per transferred layer.

    `teacher_probs` (B, L, H, N, N) are consumed by "inject"; "record" keeps full (B, H, N, N) logits,
    "record_cls" [CLS] rows (B, H, 1, N); None runs the plain model. `wrapper`: what to call instead of `model`
    (DistributedDataParallel around it), the attention settings still going to `model`'s blocks.
    """
    attns = [model.blocks[layer].attn for layer in layers] if attention else []
    try:
        for i, attn in enumerate(attns):
            if attention == "inject":
                if teacher_probs is None:
                    raise AttncacheError("copy mode needs the teacher's maps for every forward (train and eval)")
                attn.transfer_probs = teacher_probs[:, i]
            else:
                attn.record = "cls" if attention == "record_cls" else "logits"
        out = (wrapper or model)(images)
        recorded = [attn.recorded for attn in attns] if attention in ("record", "record_cls") else []
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
    """The student, randomly initialised from `seed` alone (not from what ran before)."""
    import timm

    if not timm.is_model(spec.model.split(".")[0]):
        raise AttncacheError(f"`student` {spec.model!r}: not a timm model name")
    kwargs = dict(pretrained=False, num_classes=spec.num_classes, img_size=spec.image_size,
                  drop_path_rate=spec.drop_path, **spec.model_args)
    try:
        with torch.device("meta"):  # the architecture as timm builds it, checked before anything is allocated
            shell = timm.create_model(spec.model, **kwargs)
        check_standard_vit(shell, f"`student` {spec.model!r}")
        check_size(shell, spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(spec.model, attn_layer=TransferAttention, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise AttncacheError(f"`student` {spec.model!r}: cannot build with {spec.model_args} ({exc})") from exc


BYTES_PER_TRAINED_PARAM = 16  # fp32 weights, gradients and AdamW's two moments


def max_student_params() -> int:
    """What this machine's memory can train (ATTNCACHE_MAX_PARAMS overrides): a cache from elsewhere must not make
    `train` allocate a model that cannot fit, only to fail (or swap) minutes later."""
    import os

    if "ATTNCACHE_MAX_PARAMS" in os.environ:
        return int(float(os.environ["ATTNCACHE_MAX_PARAMS"]))
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // BYTES_PER_TRAINED_PARAM


def check_size(shell: nn.Module, spec: StudentSpec) -> None:
    params = sum(p.numel() for p in shell.parameters())
    if params > max_student_params():
        raise AttncacheError(f"`student` {spec.model!r} with {spec.model_args or 'its defaults'} and "
                             f"{spec.num_classes} classes has {params / 1e6:,.0f}M parameters: more than this "
                             f"machine can train ({max_student_params() / 1e6:,.0f}M at {BYTES_PER_TRAINED_PARAM} "
                             "bytes each; set ATTNCACHE_MAX_PARAMS to allow)")


def check_geometry(student: nn.Module, spec: StudentSpec, teacher: TeacherSpec, layers: Sequence[int],
                   where: str) -> None:
    """A student may differ from the teacher only where maps still fit: layers, heads and tokens must match."""
    got = geometry(student, spec.model)
    problems = geometry_differences(got, vars(teacher), ("num_heads", "num_tokens", "num_prefix_tokens"))
    if layers and max(layers) >= got["depth"]:
        problems.insert(0, f"{got['depth']} layers (needs layer {max(layers)})")
    if problems:
        raise AttncacheError(f"`student` {spec.model!r} does not fit the maps of {where} "
                             f"(teacher {teacher.model}): " + "; ".join(problems))


def teacher_state(weights: str | None, pretrained: bool, teacher: TeacherSpec, mode: Mode) -> dict:
    """The teacher's weights a gta/finetune student starts from: `teacher.weights`, else the hub (checked to be
    reachable at once), else a one-line error (never a minute of retries)."""
    import timm

    if weights is not None:
        return read_state_dict(weights)
    if not pretrained:
        raise ConfigError(f"`mode` {mode.name} starts from the teacher's weights: pass `teacher.weights` (or turn "
                          "`teacher.pretrained` on to download them)")
    require_hub(teacher.model)
    try:
        return timm.create_model(teacher.model, pretrained=True, num_classes=0, img_size=teacher.image_size,
                                 **teacher.model_args).state_dict()
    except Exception as exc:  # noqa: BLE001 - unknown tag, a download that failed midway, ...
        raise AttncacheError(f"`mode` {mode.name} starts from the teacher's weights: pass `teacher.weights` "
                             f"(hub download of {teacher.model!r} failed: {exc})") from exc


def load_pretrained(student: nn.Module, state: dict, where: str) -> str:
    """Copy the teacher's body into the student (the classifier head stays fresh); returns the body's sha256,
    computed as the teacher registry computes it, so it can be compared with a cache's `weights_sha256`."""
    import copy

    body = copy.deepcopy(student)
    body.reset_classifier(0)  # the teacher as the registry builds it: no head
    load_state(body, state, where)
    student.load_state_dict({k: v for k, v in body.state_dict().items() if not k.startswith("head.")}, strict=False)
    return state_dict_sha256(body)
