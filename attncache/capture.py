"""Per-layer attention of a timm ViT in one forward.

- payload "probs": the captured blocks run timm's own explicit attention path (`fused_attn = False`), and a
  pre-hook on `attn.attn_drop` takes the softmax the block computes anyway: each map is computed once, and it is
  by construction the map the block multiplies with V.
- payload "logits": hooks on `attn.q_norm` / `attn.k_norm` (identity unless qk-norm is on) see q and k as the
  block uses them; the logits are formed with timm's explicit-path formula `(q * scale) @ kᵀ`.
- payload "qk": the same hooks keep `q * scale` and k themselves, (B, L, 2, H, N, head_dim): N·d numbers per head
  instead of N², from which `(q * scale) @ kᵀ` gives the logits back (the `qk` codecs).

The forward stops after the last captured layer (later layers cannot change earlier maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import AttncacheError

PAYLOADS = ("probs", "logits", "qk")


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
                raise AttncacheError(f"--layers {spec!r}: expected all, reference, or indices like 0,1,4-8") from exc
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise AttncacheError(f"--layers {spec!r}: layer indices must lie in 0..{depth - 1} (got {bad or 'none'})")
    return sorted(set(layers))


class AttentionCapture:
    """Call with a batch of images; returns (B, L, H, N, N) float32 maps of the chosen layers.

    payload "logits": pre-softmax `(q·scale) kᵀ`; "probs": their softmax (what copy/distill consume);
    "qk": (B, L, 2, H, N, head_dim), `q·scale` and k.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], payload: str = "probs"):
        if payload not in PAYLOADS:
            raise AttncacheError(f"--payload {payload!r}: expected one of {PAYLOADS}")
        self.model, self.layers, self.payload = model, list(layers), payload
        self._q: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._filled = 0
        self._active = False  # hooks only record during this object's own __call__
        self._handles = []
        for layer in self.layers:
            attn = model.blocks[layer].attn
            if payload == "probs":
                attn.fused_attn = False
                self._handles.append(attn.attn_drop.register_forward_pre_hook(self._keep_probs))
            else:
                self._handles.append(attn.q_norm.register_forward_hook(self._keep_q))
                self._handles.append(attn.k_norm.register_forward_hook(self._make_k_hook(attn.scale)))

    def close(self) -> None:
        """Remove the hooks (the captured blocks keep the explicit attention path, which computes the same)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keep_probs(self, module, inputs):
        if self._active:
            self._store(inputs[0])

    def _store(self, layer_map: torch.Tensor) -> None:
        # Written straight into the batch's output buffer: no per-layer list, no stack copy of B x L x H x N x N.
        if self._out is None:
            self._out = layer_map.new_empty((layer_map.shape[0], len(self.layers), *layer_map.shape[1:]),
                                            dtype=torch.float32)
        self._out[:, self._filled] = layer_map
        self._filled += 1

    def _keep_q(self, module, inputs, q):
        if self._active:
            self._q = q

    def _make_k_hook(self, scale: float):
        def hook(module, inputs, k):
            if not self._active:
                return
            # Same operations, same order as timm's non-fused path: bit-identical logits in fp32.
            q = self._q.float() * scale
            if self.payload == "qk":
                self._store(torch.stack([q, k.float()], dim=1))
            else:
                self._store(q @ k.float().transpose(-2, -1))
            self._q = None

        return hook

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._out, self._filled, self._active = None, 0, True
        try:
            if hasattr(self.model, "forward_intermediates"):
                self.model.forward_intermediates(images, indices=[self.layers[-1]], stop_early=True,
                                                 intermediates_only=True)
            else:
                self.model.forward_features(images)
        finally:
            self._active = False
        out, self._out = self._out, None
        if self._filled != len(self.layers):
            raise RuntimeError(f"captured {self._filled} attention maps, expected {len(self.layers)}")
        return out
