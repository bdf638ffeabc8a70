"""Per-layer attention of a timm ViT in one forward, at inference speed.

Forward hooks on each captured block's `attn.q_norm` and `attn.k_norm` (identity unless qk-norm is on) see q and k
exactly as the block uses them; the blocks themselves keep timm's fused attention, so no payload makes the teacher
materialise an N×N map it would not otherwise compute. From q and k, in fp32, with timm's explicit-path formula:

- payload "logits": `(q * scale) @ kᵀ`;
- payload "probs":  its softmax (bit-identical to timm's non-fused path in fp32);
- payload "qk":     `q * scale` and k themselves, (B, L, 2, H, N, head_dim): N·d numbers per head instead of N²;
- payload "inputs": the attention's input x itself (the output of `norm1`), (B, L, N, D): the `inputs` codec
                    recomputes the logits from it with the teacher's q/k projections.

Under autocast (extraction with `--amp`) the block's q and k are bf16. The hooks then recompute q and k in fp32 from
the block's attention input (the fp32 output of its LayerNorm) with autocast off, so the stored map is the fp32 map
of what the block received; only the residual stream carries the bf16 rounding of earlier layers. "fp32" means
IEEE fp32 products: the capture's own matmuls run at `torch.set_float32_matmul_precision("highest")` whatever the
caller set (TF32, which training scripts often switch on, would keep 10 mantissa bits of q and k).

The forward stops after the last captured layer (later layers cannot change earlier maps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttncacheError

PAYLOADS = ("probs", "logits", "qk", "inputs")


class CaptureShape(NamedTuple):
    """Per-record geometry of what is captured: layers, heads, tokens N and head dimension d."""

    layers: int
    heads: int
    tokens: int
    head_dim: int

    @property
    def map_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.heads, self.tokens, self.tokens)


def parse_layers(spec: str | Sequence[int] | None, depth: int) -> list[int]:
    """`all`, `reference` (the first depth-3, as the attention-transfer reference code runs), `0,1,5`, `0-8`."""
    if spec is None or spec == "all":
        return list(range(depth))
    if spec == "reference":
        return list(range(max(1, depth - 3)))
    if isinstance(spec, str):
        layers: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(p) for p in part.split("-", 1))
                    layers.extend(range(lo, hi + 1))
                else:
                    layers.append(int(part))
            except ValueError as exc:
                raise AttncacheError(f"`layers` {spec!r}: expected all, reference, or indices like 0,1,4-8") from exc
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise AttncacheError(f"`layers` {spec!r}: layer indices must lie in 0..{depth - 1} (got {bad or 'none'})")
    return sorted(set(layers))


class AttentionCapture:
    """Call with a batch of images; returns the captured payload of the chosen layers as one fp32 tensor:
    (B, L, H, N, N) for probs/logits, (B, L, 2, H, N, head_dim) for qk, (B, L, N, D) for inputs. Use as a
    context manager (or `close()`) to remove the hooks; the model is otherwise untouched."""

    def __init__(self, model: nn.Module, layers: Sequence[int], payload: str = "probs"):
        if payload not in PAYLOADS:
            raise AttncacheError(f"`payload` {payload!r}: expected one of {PAYLOADS}")
        self.model, self.layers, self.payload = model, list(layers), payload
        self._x: torch.Tensor | None = None
        self._q: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._filled = 0
        self._active = False  # hooks only record during this object's own __call__
        self._handles = []
        for layer in self.layers:
            attn = model.blocks[layer].attn
            self._handles += [attn.register_forward_pre_hook(self._keep_input),
                              attn.q_norm.register_forward_hook(self._keep_q),
                              attn.k_norm.register_forward_hook(self._make_k_hook(attn))]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _keep_input(self, module, inputs):
        if self._active:
            self._x = inputs[0]

    def _keep_q(self, module, inputs, q):
        if self._active:
            self._q = q

    def _make_k_hook(self, attn: nn.Module):
        def hook(module, inputs, k):
            if not self._active:
                return
            if self.payload == "inputs":
                with torch.autocast(k.device.type, enabled=False):
                    self._store(self._x.float())
                self._q = self._x = None
                return
            q = self._q
            with ieee_fp32():
                if torch.is_autocast_enabled(k.device.type):
                    q, k = _qk_fp32(attn, self._x)
                self._maps(attn, q, k)
            self._q = self._x = None

        return hook

    def _maps(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        with torch.autocast(k.device.type, enabled=False):
            # Same operations, same order as timm's non-fused path: bit-identical logits in fp32.
            q = q.float() * attn.scale
            if self.payload == "qk":
                self._store(torch.stack([q, k.float()], dim=1))
            else:
                logits = q @ k.float().transpose(-2, -1)
                self._store(logits.softmax(dim=-1) if self.payload == "probs" else logits)

    def _store(self, layer_map: torch.Tensor) -> None:
        # Written straight into the batch's output buffer: no per-layer list, no stack copy of B x L x H x N x N.
        if self._out is None:
            self._out = layer_map.new_empty((layer_map.shape[0], len(self.layers), *layer_map.shape[1:]),
                                            dtype=torch.float32)
        self._out[:, self._filled] = layer_map
        self._filled += 1

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self._handles:
            raise RuntimeError("AttentionCapture used after close()")
        self._out, self._filled, self._active = None, 0, True
        try:
            self.model.forward_intermediates(images, indices=[self.layers[-1]], stop_early=True,
                                             intermediates_only=True)
        finally:
            self._active, self._q, self._x = False, None, None
        out, self._out = self._out, None
        if self._filled != len(self.layers):
            raise RuntimeError(f"captured {self._filled} attention maps, expected {len(self.layers)}")
        return out


def _qk_fp32(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of timm's `Attention` recomputed in fp32 from its input `x` (the qkv layout of timm's forward). Only
    the q and k rows of the projection are multiplied: v is not needed, and it is a third of the work."""
    with torch.autocast(x.device.type, enabled=False):
        B, N, _ = x.shape
        rows = 2 * attn.num_heads * attn.head_dim
        bias = attn.qkv.bias[:rows].float() if attn.qkv.bias is not None else None
        qk = F.linear(x.float(), attn.qkv.weight[:rows].float(), bias)
        qk = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        # .forward, not __call__: the norms carry this capture's own hooks
        return attn.q_norm.forward(qk[0]), attn.k_norm.forward(qk[1])


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """float32 matmuls in full IEEE precision inside (no TF32), the caller's setting restored after."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
