"""Quantised probabilities: one uint8 code per map entry, entropy-coded by zstd (inside blosc).

A map row is a distribution, and what a student loses is KL(p ‖ p̂) ≈ Σ (Δp)² / 2p = 2 Σ (Δ√p)². Two transforms:
- `logq`:  codes uniform in log p over [e^-floor, 1] (relative error bounded; spends levels on tiny entries);
- `sqrtq`: codes uniform in √p, which makes every entry's share of the KL the same (the KL-optimal scalar choice).
Measured on real DINOv2-S maps (docs/benchmarks.md), `sqrtq` reaches a given KL at a higher ratio than `logq`.
Decoding is elementwise arithmetic plus one row renormalisation, so it runs wherever the tensor lives.
"""

from __future__ import annotations

import torch

from .base import Codec, FieldSpec, blosc, register_codec


class ProbQuantCodec(Codec):
    payloads = ("probs", "logits")

    def __init__(self, bits: int = 6, **params):
        if not 2 <= int(bits) <= 8:
            raise ValueError("bits must lie in 2..8")
        super().__init__(bits=int(bits), **params)
        self.levels = (1 << int(bits)) - 1  # largest code

    def decodes_to(self, payload: str) -> str:
        return "probs"

    def fields(self, shape):
        return {"codes": FieldSpec(shape.map_shape, "uint8")}

    def compressor(self) -> dict:
        return blosc(shuffle=0)

    def encode(self, captured, payload):
        p = captured.float().softmax(-1) if payload == "logits" else captured.float()
        return {"codes": self.quantize(p).to(torch.uint8).cpu().numpy()}

    def decode(self, fields):
        p = self.dequantize(fields["codes"].float())
        return p / p.sum(-1, keepdim=True)

    def quantize(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_codec
class LogQuantCodec(ProbQuantCodec):
    """Code 0: p below e^-floor; codes 1..2^bits-1: log p on a uniform grid over [-floor, 0]."""

    name = "logq"

    def __init__(self, bits: int = 6, floor: float = 16.0):
        if not float(floor) > 0:
            raise ValueError("floor must be > 0 (nats)")
        super().__init__(bits=bits, floor=float(floor))
        self.step = float(floor) / (self.levels - 1)

    def quantize(self, p):
        floor = self.params["floor"]
        c = torch.round((p.clamp_min(1e-38).log() + floor) / self.step) + 1
        return torch.where(c < 1, torch.zeros_like(c), c.clamp_max(self.levels))

    def dequantize(self, codes):
        floor = self.params["floor"]
        # code 0 decodes one step below the grid: small, but never 0 (a 0 would make KL(p ‖ p̂) infinite)
        return torch.exp(torch.where(codes == 0, torch.full_like(codes, -1.0), codes - 1) * self.step - floor)


@register_codec
class SqrtQuantCodec(ProbQuantCodec):
    """Code c = round(√p · (2^bits - 1)); code 0 decodes to a quarter step (never 0, for the same reason)."""

    name = "sqrtq"

    def __init__(self, bits: int = 6):
        super().__init__(bits=bits)

    def quantize(self, p):
        return torch.round(p.sqrt() * self.levels)

    def dequantize(self, codes):
        return (codes.clamp_min(0.25) * (1.0 / self.levels)).square()

