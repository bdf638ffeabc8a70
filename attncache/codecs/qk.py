"""Queries and keys instead of maps: the logits are `(q·scale) kᵀ`, so N·d numbers per head and side replace N².

- `qk`: q·scale and k as captured (payload "qk"), fp16 (`bits=16`, exact up to storage precision) or integers of
  `bits` in int8 storage with one fp16 scale per token and head (symmetric, round to nearest).
- `lowrank`: the best rank-r factorisation of each head's logit matrix, A Bᵀ ≈ q kᵀ (Eckart-Young), found
  without forming the N×N matrix: q = Q_q R_q, k = Q_k R_k, SVD of the d×d matrix R_q R_kᵀ = U S Vᵀ, then
  A = Q_q U_r S_r^½ and B = Q_k V_r S_r^½. The factors are stored like `qk`'s q and k.

Both decode to logits with one batched matmul on the training device; copy and distill take their softmax, GTA
uses the [CLS] row as it is.
"""

from __future__ import annotations

import torch

from ..errors import AttncacheError
from .base import Codec, FieldSpec, blosc, register_codec


@register_codec
class QKCodec(Codec):
    name = "qk"
    payloads = ("qk",)

    def __init__(self, bits: int = 16, rank: int | None = None):
        bits = int(bits)
        if bits != 16 and not 2 <= bits <= 8:
            raise ValueError("bits must be 16 (fp16) or 2..8 (integers)")
        if rank is not None and int(rank) < 1:
            raise ValueError("rank must be >= 1")
        super().__init__(bits=bits, rank=None if rank is None else int(rank))

    def decodes_to(self, payload: str) -> str:
        return "logits"

    def rank(self, shape) -> int:
        rank = self.params["rank"]
        if rank is None:
            return shape.head_dim
        if rank > min(shape.head_dim, shape.tokens):
            raise AttncacheError(f"codec {self.name!r}: rank {rank} exceeds min(head_dim {shape.head_dim}, "
                                 f"tokens {shape.tokens})")
        return rank

    def fields(self, shape):
        side = (shape.layers, shape.heads, shape.tokens, self.rank(shape))
        if self.params["bits"] == 16:
            return {"q": FieldSpec(side, "float16"), "k": FieldSpec(side, "float16")}
        scales = (shape.layers, shape.heads, shape.tokens)
        return {"q": FieldSpec(side, "int8"), "k": FieldSpec(side, "int8"),
                "q_scale": FieldSpec(scales, "float16"), "k_scale": FieldSpec(scales, "float16")}

    def compressor(self) -> dict:
        # fp16 values compress with byte shuffle; integer codes are single bytes (shuffle would be a no-op)
        return blosc(shuffle=1, typesize=2) if self.params["bits"] == 16 else blosc(shuffle=0, typesize=1)

    def encode(self, captured, payload):
        q, k = captured[:, :, 0].float(), captured[:, :, 1].float()  # (B, L, H, N, d)
        rank = self.params["rank"]
        if rank is not None and rank < q.shape[-1]:
            q, k = low_rank_factors(q, k, rank)
        if self.params["bits"] == 16:
            return {"q": q.half().cpu().numpy(), "k": k.half().cpu().numpy()}
        out = {}
        for side, x in (("q", q), ("k", k)):
            codes, scale = quantize_rows(x, self.params["bits"])
            out[side], out[f"{side}_scale"] = codes.cpu().numpy(), scale.cpu().numpy()
        return out

    def decode(self, fields):
        if self.params["bits"] == 16:
            q, k = fields["q"].float(), fields["k"].float()
        else:
            q = fields["q"].float() * fields["q_scale"].float().unsqueeze(-1)
            k = fields["k"].float() * fields["k_scale"].float().unsqueeze(-1)
        return q @ k.transpose(-2, -1)


@register_codec
class LowRankCodec(QKCodec):
    """`qk` with a rank-r factorisation; defaults chosen on real DINOv2-S maps (docs/benchmarks.md)."""

    name = "lowrank"

    def __init__(self, rank: int = 32, bits: int = 8):
        super().__init__(bits=bits, rank=rank)


def low_rank_factors(q: torch.Tensor, k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, N, d) q and k -> (…, N, r) A and B with A Bᵀ the best rank-r approximation of q kᵀ (Frobenius)."""
    qq, rq = torch.linalg.qr(q)
    qk, rk = torch.linalg.qr(k)
    u, s, vh = torch.linalg.svd(rq @ rk.transpose(-2, -1))
    root = s[..., :rank].sqrt().unsqueeze(-2)  # split the singular values evenly: both factors of similar range
    return qq @ u[..., :rank] * root, qk @ vh[..., :rank, :].transpose(-2, -1) * root


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integers with one fp16 scale per row (token and head); the codes use the stored fp16 scale."""
    top = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(-1) / top).clamp_min(2 ** -14).half()  # fp16's smallest normal: never 0
    codes = torch.round(x / scale.float().unsqueeze(-1)).clamp(-top, top).to(torch.int8)
    return codes, scale
