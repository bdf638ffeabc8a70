"""The part of a teacher that turns a block's attention input into its attention logits: per captured layer, the q
and k rows of `qkv` (weight and bias), the q/k norms, and the scale. Caches of the `inputs` codec store each
layer's attention input and carry these in `teacher_qk.safetensors`, so the maps are recomputed on the training
device: logits = (q_norm(x W_qᵀ + b_q) · scale) (k_norm(x W_kᵀ + b_k))ᵀ per head, timm's explicit formula.

The file is safetensors (no pickle). Its tensors, per captured layer i (position in `capture.layers`):
  `{i}.qk.weight` (2D, D) float32: rows 0..D-1 are W_q, rows D..2D-1 are W_k (timm's qkv weight, first 2D rows)
  `{i}.qk.bias`   (2D,)   float32: zeros where the teacher has no qkv bias
  `{i}.q_norm.weight`, `{i}.q_norm.bias`, `{i}.k_norm.weight`, `{i}.k_norm.bias` (head_dim,) float32: with qk-norm
and the metadata `{"qk_norm": "none" | "layernorm", "eps": "<float>"}`. Readers check every name, shape and dtype
against the manifest's geometry before using any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttncacheError, CacheFormatError
from ..files import canonical_safetensors


@dataclass
class Projections:
    """Per captured layer: (2D, D) weight, (2D,) bias; the q/k LayerNorm parameters when the teacher has qk-norm."""

    weight: torch.Tensor  # (L, 2D, D)
    bias: torch.Tensor  # (L, 2D)
    norm: torch.Tensor | None  # (L, 4, head_dim): q weight, q bias, k weight, k bias; None without qk-norm
    eps: float
    heads: int

    def to(self, device) -> Projections:
        return Projections(self.weight.to(device), self.bias.to(device),
                           None if self.norm is None else self.norm.to(device), self.eps, self.heads)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, N, D) attention inputs -> (B, L, H, N, N) float32 logits."""
        B, L, N, D = x.shape
        d = D // self.heads
        qk = torch.einsum("blnd,led->blne", x.float(), self.weight) + self.bias[None, :, None, :]
        qk = qk.reshape(B, L, N, 2, self.heads, d).permute(3, 0, 1, 4, 2, 5)  # (2, B, L, H, N, d)
        q, k = qk[0], qk[1]
        if self.norm is not None:
            q = _layer_norm(q, self.norm[:, 0], self.norm[:, 1], self.eps)
            k = _layer_norm(k, self.norm[:, 2], self.norm[:, 3], self.eps)
        return (q * d ** -0.5) @ k.transpose(-2, -1)


def _layer_norm(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-layer LayerNorm over the head dimension of (B, L, H, N, d) with (L, d) parameters."""
    t = F.layer_norm(t, t.shape[-1:], eps=eps)
    return t * weight[None, :, None, None, :] + bias[None, :, None, None, :]


def teacher_projections(model: nn.Module, layers: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file, from a timm ViT; refuses attention this format cannot describe."""
    tensors, kinds, eps = {}, set(), 1e-6
    for i, layer in enumerate(layers):
        attn = model.blocks[layer].attn
        dim = attn.qkv.weight.shape[1]
        if attn.qkv.weight.shape[0] != 3 * dim or attn.num_heads * attn.head_dim != dim:
            raise AttncacheError("codec inputs: the teacher's qkv projection is not timm's (3D, D) layout")
        tensors[f"{i}.qk.weight"] = attn.qkv.weight[:2 * dim].detach().float().contiguous().cpu()
        bias = attn.qkv.bias[:2 * dim] if attn.qkv.bias is not None else torch.zeros(2 * dim)
        tensors[f"{i}.qk.bias"] = bias.detach().float().contiguous().cpu()
        for side, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
            if isinstance(norm, nn.Identity):
                kinds.add("none")
            elif isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None:
                kinds.add("layernorm")
                eps = norm.eps
                tensors[f"{i}.{side}_norm.weight"] = norm.weight.detach().float().contiguous().cpu()
                tensors[f"{i}.{side}_norm.bias"] = norm.bias.detach().float().contiguous().cpu()
            else:
                raise AttncacheError(f"codec inputs: layer {layer}'s {side}_norm is {type(norm).__name__}; this "
                                     "format describes none or an affine LayerNorm")
    if len(kinds) != 1:
        raise AttncacheError("codec inputs: the captured layers mix q/k norms")
    return tensors, {"qk_norm": kinds.pop(), "eps": repr(float(eps))}


def expected_names(layers: int, qk_norm: str) -> set[str]:
    names = {f"{i}.qk.{p}" for i in range(layers) for p in ("weight", "bias")}
    if qk_norm == "layernorm":
        names |= {f"{i}.{s}_norm.{p}" for i in range(layers) for s in "qk" for p in ("weight", "bias")}
    return names


def load_projections(data: bytes, layers: int, heads: int, dim: int, where: str) -> Projections:
    """Parse and check the file's bytes against the manifest's geometry (no pickle: safetensors)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        metadata = _metadata(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CacheFormatError(f"{where}: not a valid safetensors file ({' '.join(str(exc).split())[:200]})") from exc
    kind = metadata.get("qk_norm")
    if kind not in ("none", "layernorm"):
        raise CacheFormatError(f"{where}: metadata qk_norm must be none or layernorm, got {kind!r}")
    try:
        eps = float(metadata.get("eps", ""))
    except ValueError as exc:
        raise CacheFormatError(f"{where}: metadata eps is not a number") from exc
    if not 0 < eps < 1:
        raise CacheFormatError(f"{where}: metadata eps {eps} out of range")
    if set(tensors) != expected_names(layers, kind):
        raise CacheFormatError(f"{where}: tensors {sorted(set(tensors) ^ expected_names(layers, kind))[:4]} do "
                               "not match the manifest's layers")
    d = dim // heads
    shapes = {"qk.weight": (2 * dim, dim), "qk.bias": (2 * dim,)}
    for name, t in tensors.items():
        want = shapes.get(name.split(".", 1)[1], (d,))
        if tuple(t.shape) != want or t.dtype != torch.float32 or not t.isfinite().all():
            raise CacheFormatError(f"{where}: tensor {name} must be finite float32 of shape {want}")
    weight = torch.stack([tensors[f"{i}.qk.weight"] for i in range(layers)])
    bias = torch.stack([tensors[f"{i}.qk.bias"] for i in range(layers)])
    norm = None
    if kind == "layernorm":
        norm = torch.stack([torch.stack([tensors[f"{i}.{s}_norm.{p}"] for s in "qk" for p in ("weight", "bias")])
                            for i in range(layers)])
    return Projections(weight, bias, norm, eps, heads)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (strings only)."""
    from ..files import loads_strict

    size = int.from_bytes(data[:8], "little")
    header = loads_strict(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ must map strings to strings")
    return meta


def projections_bytes(model: nn.Module, layers: list[int]) -> bytes:
    from safetensors.torch import save

    tensors, metadata = teacher_projections(model, layers)
    return canonical_safetensors(save(tensors, metadata=metadata))


def from_model(model: nn.Module, layers: list[int]) -> Projections:
    """The same, straight from a live model (benchmarks, tests)."""
    data = projections_bytes(model, layers)
    attn = model.blocks[layers[0]].attn
    return load_projections(data, len(layers), attn.num_heads, attn.qkv.weight.shape[1], "teacher")
