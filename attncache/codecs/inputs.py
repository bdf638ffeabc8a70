"""The attention's input instead of its output: per captured layer, the block's attention input x (N × D, the
output of `norm1`) is stored, and the logits are recomputed on the training device with the teacher's own q/k
projections, which the cache carries once (`teacher_qk.safetensors`, see `teacher/projections.py`).

N·D numbers per layer replace H·N² (DINOv2-S at 224 px: 98,688 against 396,294), and x quantises well:
- `bits=16`: x in fp16 (lossless grade);
- `bits=2..8`: integers in int8 storage, after a block-diagonal Hadamard rotation x̃ = x·H (the residual stream's
  outlier channels are spread over their block, so no channel takes the whole range), with one fp16 scale per
  channel and one per token: x̃ ≈ codes · token_scale[n] · channel_scale[c].

H is the Sylvester Hadamard matrix of order b, divided by √b, repeated along the diagonal; b is the largest power of
two dividing D, at most 256 (`hadamard_block`). H is symmetric and orthogonal, so x = x̃·H. Decoding folds H into the
projection (W·H) and runs two D×D projections per layer: about a sixth of a teacher forward, on the device.
"""

from __future__ import annotations

import torch

from ..teacher.capture import CaptureShape
from ..teacher.projections import Projections, load_projections, projections_bytes
from .base import Codec, FieldSpec, SideFile, SideFileInputs, blosc, register_codec
from .qk import quantize_rows

MAX_HADAMARD_BLOCK = 256


def _projections_file(codec: Codec, teacher: SideFileInputs) -> bytes:
    return projections_bytes(teacher.model, teacher.layers)


def _load_projections(data: bytes, shape: CaptureShape, where: str) -> Projections:
    return load_projections(data, shape.layers, shape.heads, shape.heads * shape.head_dim, where)


def _projections_nbytes(shape: CaptureShape) -> int:
    """float32 W_qk (2D × D) and bias (2D) per layer; a teacher with qk-norm adds 4d floats per layer."""
    dim = shape.heads * shape.head_dim
    return shape.layers * (2 * dim * dim + 2 * dim) * 4


# the teacher's q/k projections of the captured layers (teacher/projections.py): what decoding recomputes logits with
PROJECTIONS = SideFile("teacher_qk.safetensors", "projections", _projections_file, _load_projections,
                       _projections_nbytes)


def hadamard_block(dim: int) -> int:
    block = 1
    while dim % (block * 2) == 0 and block * 2 <= MAX_HADAMARD_BLOCK:
        block *= 2
    return block


def hadamard(dim: int, device=None) -> torch.Tensor:
    """The (dim, dim) block-diagonal normalised Hadamard rotation of this format (float32)."""
    block = hadamard_block(dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / block ** 0.5
    return torch.block_diag(*[h] * (dim // block)).float().to(device)


@register_codec
class InputsCodec(Codec):
    name = "inputs"
    payloads = ("inputs",)
    side_files = (PROJECTIONS,)

    def __init__(self, bits: int = 8):
        bits = int(bits)
        if bits != 16 and not 2 <= bits <= 8:
            raise ValueError("bits must be 16 (fp16) or 2..8 (integers)")
        super().__init__(bits=bits)

    def decodes_to(self, payload: str) -> str:
        return "logits"

    def fields(self, shape):
        dim = shape.heads * shape.head_dim
        x = (shape.layers, shape.tokens, dim)
        if self.params["bits"] == 16:
            return {"x": FieldSpec(x, "float16")}
        return {"x": FieldSpec(x, "int8"), "channel_scale": FieldSpec((shape.layers, dim), "float16"),
                "token_scale": FieldSpec((shape.layers, shape.tokens), "float16")}

    def compressor(self) -> dict:
        return blosc(shuffle=1, typesize=2) if self.params["bits"] == 16 else blosc(shuffle=0, typesize=1)

    def encode(self, captured, payload):
        x = captured.float()  # (B, L, N, D)
        if self.params["bits"] == 16:
            return {"x": x.half().cpu().numpy()}
        rotated = x @ hadamard(x.shape[-1], x.device)
        channel = rotated.abs().amax(-2).clamp_min(2 ** -14).half()  # (B, L, D), fp16's smallest normal: never 0
        codes, token = quantize_rows(rotated / channel.float().unsqueeze(-2), self.params["bits"])
        return {"x": codes.cpu().numpy(), "channel_scale": channel.cpu().numpy(), "token_scale": token.cpu().numpy()}

    def _projections_on(self, device: torch.device):
        """The projections on `device`, with H folded into the weights for the quantised fields."""
        key = str(device)
        if key not in self._on:
            p = self.projections.to(device)
            if self.params["bits"] != 16:
                p.weight = p.weight @ hadamard(p.weight.shape[-1], device)  # x·Wᵀ = x̃·(W·H)ᵀ, H symmetric
            self._on[key] = p
        return self._on[key]

    def decode(self, fields):
        if self.projections is None:
            raise RuntimeError("codec inputs: decode needs the teacher's projections (Cache binds them)")
        x = fields["x"].float()
        if self.params["bits"] != 16:
            x = x * fields["token_scale"].float().unsqueeze(-1) * fields["channel_scale"].float().unsqueeze(-2)
        return self._projections_on(x.device).logits(x)
