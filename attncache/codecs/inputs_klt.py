"""`inputs_klt`: the attention inputs in a basis fitted to the cache, in the metric of the attention logits.

Like `inputs`, each captured layer's attention input x (N × D) is stored and the logits are recomputed on the
training device with the teacher's q/k projections (`teacher_qk.safetensors`). What changes is how x is quantised:

1. The metric. An error e in one token's x moves the logits of each head h by (W_q,h e)·k (as a query) and
   q·(W_k,h e) (as a key). Averaged over the tokens of the calibration views, the squared logit error is eᵀ G e with
   G = scale² Σ_h (W_q,hᵀ E[k_h k_hᵀ] W_q,h + W_k,hᵀ E[q_h q_hᵀ] W_k,h)   (D × D, from the teacher and the data).
   With qk-norm, q and k are the normed ones and W is scaled by the norm's gain over the mean pre-norm spread.
2. The basis. y = (x − μ) G^½ makes that error isotropic; the eigenvectors U of y's covariance (a Karhunen–Loève
   transform) decorrelate it. The stored coefficients are z = (x − μ) T with T = G^½ U, and x = μ + z T⁻¹.
3. One uniform step for every coefficient of every layer: in this domain equal steps mean equal logit error, which
   is what minimises it for a given entropy; the many low-variance coefficients round to 0 and cost almost nothing
   once blosc's bit shuffle and zstd have seen them (the codes are stored coefficient-major, (L, D, N)).
4. The codes are stored zigzag-mapped (0, −1, 1, −2, ... -> 0, 1, 2, 3, ...) as uint32: a small negative code in
   two's complement sets every high bit, which bit shuffle then spreads over 31 noisy bit planes; zigzag leaves
   them zero. 7-12 % smaller on DINOv2-S, within 5-7 % of the codes' per-coefficient order-0 entropy, so an
   entropy coder would win little more. Caches written before hold two's-complement int32 codes, and still read.

The basis (μ and T⁻¹ per layer, `inputs_basis.safetensors`) is fitted once per cache, at extraction, on `fit` views
spread over the cache's records, and stored beside the projections; decoding folds it into the projections
(W' = W T⁻ᵀ, b' = b + W μ), so it costs what `inputs` costs. The basis holds first and second moments of the
teacher's features on those views: it reveals a little about the data (docs/sharing.md).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import AttncacheError, CacheFormatError
from ..files import canonical_safetensors
from ..teacher.capture import CaptureShape
from ..teacher.projections import from_model
from .base import Codec, FieldSpec, SideFile, SideFileInputs, blosc, register_codec
from .inputs import PROJECTIONS

MAX_CODE = 2 ** 30 - 1  # the largest |code|: its zigzag code fits in 31 bits, so an int32 view is non-negative
# G is estimated from a few thousand tokens: a direction they hardly span would get almost no precision, and matter
# on other views. A floor of RIDGE x the mean eigenvalue keeps every direction coded (and G^½ invertible).
RIDGE = 1e-2
# The fit's sums over tokens are exact sums of integers, so neither BLAS's order nor its thread count shows in them:
# x − μ is rounded to BITS bits below each channel's largest |x − μ| (a relative 2^-21, far below what a few
# thousand tokens estimate), and products of two such integers, summed CHUNK at a time, stay below 2^52.
BITS, CHUNK = 20, 4096
_THREADS = threading.RLock()  # `_one_thread` saves and restores torch's thread count one block at a time


def _fitted_basis_file(codec: Codec, teacher: SideFileInputs) -> bytes:
    """Fitted on the codec's `fit` calibration views, in the logit metric of the teacher's own projections."""
    return basis_bytes(fit_basis(teacher.calibration(codec.params["fit"]), from_model(teacher.model, teacher.layers)))


def _load_basis(data: bytes, shape: CaptureShape, where: str) -> Basis:
    return load_basis(data, shape.layers, shape.heads * shape.head_dim, where)


def _basis_nbytes(shape: CaptureShape) -> int:
    """float32 mean (D) and T⁻¹ (D × D) per layer."""
    dim = shape.heads * shape.head_dim
    return shape.layers * (dim + dim * dim) * 4


# μ and T⁻¹ per captured layer (`Basis`), fitted at extraction: what coding and decoding need besides the projections
BASIS = SideFile("inputs_basis.safetensors", "basis", _fitted_basis_file, _load_basis, _basis_nbytes, fitted=True)


@register_codec
class InputsKLTCodec(Codec):
    name = "inputs_klt"
    payloads = ("inputs",)
    side_files = (PROJECTIONS, BASIS)

    def __init__(self, step: float = 0.02, fit: int = 64):
        step, fit = float(step), int(fit)
        if not 1e-4 <= step <= 10:
            raise ValueError("step must be in [1e-4, 10] (logit-error units; 0.02 is about KL 7e-4 on DINOv2-S)")
        if not 1 <= fit <= 4096:
            raise ValueError("fit (calibration views) must be in 1..4096")
        super().__init__(step=step, fit=fit)

    def decodes_to(self, payload: str) -> str:
        return "logits"

    def fields(self, shape):
        return {"z": FieldSpec((shape.layers, shape.heads * shape.head_dim, shape.tokens), "uint32")}

    def readable_fields(self, shape):
        twos_complement = {"z": FieldSpec((shape.layers, shape.heads * shape.head_dim, shape.tokens), "int32")}
        return [self.fields(shape), twos_complement]  # the second: caches written before zigzag codes

    def compressor(self) -> dict:
        return blosc(shuffle=2, typesize=4)  # bit shuffle: the zero high bits of small codes compress to nothing

    def encode(self, captured, payload):
        x = captured.float()  # (B, L, N, D); float32 is exact enough: an error of 1e-7·|z| against a step of 1e-3
        scaled_t, offset = self._encoder_on(x.device)
        z = torch.matmul(scaled_t, x.transpose(-1, -2)).add_(offset)  # (B, L, D, N) = ((x − μ) T / step)ᵀ
        low, high = torch.aminmax(z)  # NaN in, NaN out: the comparison below fails for it too
        if not (-MAX_CODE < low.item() and high.item() < MAX_CODE):
            raise AttncacheError("codec inputs_klt: a coefficient is not finite or beyond ±2^30 steps (choose a "
                                 "larger step)")
        return {"z": zigzag(z.round_().to(torch.int32)).cpu().numpy().view(np.uint32)}

    def _encoder_on(self, device: torch.device):
        """(Tᵀ / step (L, D, D), −(μ T)ᵀ / step (L, D, 1)) on `device`: one batched product per batch gives the
        codes coefficient-major, as stored, with the mean and the step folded in."""
        key = f"encode:{device}"
        if key not in self._on:
            if self.basis is None:
                raise RuntimeError("codec inputs_klt: encode needs the fitted basis (extraction binds it)")
            t = self.basis.encode.double() / self.params["step"]  # (L, D, D)
            with _one_thread():  # the codes follow these bits: the same on any thread count
                offset = -torch.einsum("ld,lde->le", self.basis.mean.double(), t)
            self._on[key] = (t.transpose(-1, -2).float().contiguous().to(device), offset.float()[..., None].to(device))
        return self._on[key]

    def _projections_on(self, device: torch.device):
        """The projections with the basis folded in (float64 once, then float32 on `device`)."""
        key = str(device)
        if key not in self._on:
            if self.projections is None or self.basis is None:
                raise RuntimeError("codec inputs_klt: decode needs the projections and the basis (Cache binds them)")
            p, b = self.projections, self.basis
            w = p.weight.double()  # (L, 2D, D)
            folded = type(p)((w @ b.decode.double().transpose(-1, -2)).float(),
                             (p.bias.double() + torch.einsum("led,ld->le", w, b.mean.double())).float(),
                             p.norm, p.eps, p.heads)
            self._on[key] = folded.to(device)
        return self._on[key]

    def decode(self, fields):
        z = fields["z"]
        if z.dtype == torch.uint32:  # zigzag codes (int32: two's complement, as written before)
            z = unzigzag(z.view(torch.int32))
        z = z.float().transpose(-1, -2) * self.params["step"]  # (B, L, N, D)
        return self._projections_on(z.device).logits(z)


def zigzag(z: torch.Tensor) -> torch.Tensor:
    """int32 codes with |z| < 2^30 -> their zigzag codes 2|z| − (z < 0), still int32 and non-negative."""
    return (z << 1) ^ (z >> 31)


def unzigzag(u: torch.Tensor) -> torch.Tensor:
    """The inverse of `zigzag`, on non-negative int32 (a uint32 field viewed as int32)."""
    return (u >> 1) ^ -(u & 1)


class Basis:
    """Per captured layer: the mean μ (L, D) and T⁻¹ (L, D, D) as stored (float32); T = (T⁻¹)⁻¹ for encoding (inverted
    in float64, kept in float32)."""

    def __init__(self, mean: torch.Tensor, decode: torch.Tensor):
        self.mean, self.decode = mean, decode
        self.encode = _inverse(decode).float()  # from the stored bytes: the same T on every resume


def _inverse(decode: torch.Tensor) -> torch.Tensor:
    """T = (T⁻¹)⁻¹ per layer in float64, one layer at a time on one thread (torch's batched float64 inverse fails on
    some MKL builds with several threads; numpy's OpenBLAS gives other last bits with other thread counts, and T
    decides the codes); a singular or ill-conditioned layer is a ValueError."""
    out = []
    with _one_thread():
        for i, m in enumerate(decode.double()):
            if not m.isfinite().all() or torch.linalg.cond(m) > 1e12:
                raise ValueError(f"layer {i}'s basis is singular or ill-conditioned")
            out.append(torch.linalg.inv(m))
    return torch.stack(out)


def fit_basis(x: torch.Tensor, projections) -> Basis:
    """The basis of `x` (V, L, N, D) calibration inputs, in the logit metric of `projections` (float64). The same
    bytes whatever the thread count: the sums over tokens are exact (`_gram`, `_exact_projection`) or pairwise in a
    fixed order (`_tree_sum`), and the D × D steps (products, eigh) run on one thread (`_one_thread`)."""
    views, layers, tokens, dim = x.shape
    heads, d = projections.heads, dim // projections.heads
    means, decodes = [], []
    for i in range(layers):
        xs = x[:, i].reshape(-1, dim).double()
        mean = _tree_sum(xs) / len(xs)
        if not mean.isfinite().all():  # a non-finite input makes its channel's sum non-finite
            raise AttncacheError(f"codec inputs_klt: layer {i}'s calibration inputs are not finite")
        centred, scale = _fixed_point(xs - mean)
        cov = _gram(centred) * (scale[:, None] * scale) / len(xs)  # E[(x − μ)(x − μ)ᵀ]
        w = projections.weight[i].double()
        gain, moments = _qk_moments(projections, i, mean, centred, scale, cov)
        with _one_thread():
            metric = torch.zeros(dim, dim, dtype=torch.float64)
            for h in range(heads):
                wq = w[h * d:(h + 1) * d] * gain[0, h, :, None]
                wk = w[dim + h * d:dim + (h + 1) * d] * gain[1, h, :, None]
                metric += wq.T @ moments[1, h] @ wq + wk.T @ moments[0, h] @ wk
            metric *= d ** -1.0  # scale² = 1/d
            evals, evecs = torch.linalg.eigh(metric)
            evals = evals.clamp_min(0) + RIDGE * evals.clamp_min(0).mean()
            root, root_inv = (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T
            rotation = torch.linalg.eigh(root @ cov @ root)[1].flip(-1)  # of y = (x − μ) G^½, descending variance
            decodes.append((rotation.T @ root_inv).float())
        means.append(mean.float())
    return Basis(torch.stack(means).contiguous(), torch.stack(decodes).contiguous())


def _qk_moments(projections, i: int, mean, centred, scale, cov) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's gain (2, H, d) of W and E[v vᵀ] (2, H, d, d) of its q then k per head, on the calibration tokens."""
    w, bias = projections.weight[i].double(), projections.bias[i].double()
    dim, heads = w.shape[1], projections.heads
    d = dim // heads
    if projections.norm is None:  # affine in x: E[v vᵀ] = W_h Σ W_hᵀ + (W_h μ + b_h)(W_h μ + b_h)ᵀ
        with _one_thread():
            rows, offset = w.reshape(2, heads, d, dim), (w @ mean + bias).reshape(2, heads, d, 1)
            moments = rows @ cov @ rows.transpose(-1, -2) + offset @ offset.transpose(-1, -2)
        return torch.ones(2, heads, d, dtype=torch.float64), moments
    # the normed q/k of every token, and W scaled by the norm's gain over the mean pre-norm spread
    qk = _exact_projection(centred, scale, w, bias + _tree_sum((w * mean).T))  # (x − μ) Wᵀ + (W μ + b)
    qk = qk.reshape(len(qk), 2, heads, d)
    norm = projections.norm[i].double()  # q weight, q bias, k weight, k bias
    norm_weight, norm_bias = norm[[0, 2]], norm[[1, 3]]  # (2, d): q then k
    qk.sub_((_tree_sum(qk, -1) / d)[..., None])
    std = (_tree_sum(qk.square(), -1) / d + projections.eps).sqrt()  # (N, 2, H), as layer_norm's
    gain = norm_weight[:, None, :] / (_tree_sum(std) / len(qk))[..., None]
    qk.div_(std[..., None]).mul_(norm_weight[:, None]).add_(norm_bias[:, None])
    codes, qk_scale = _fixed_point(qk.reshape(len(qk), 2 * dim))
    qk_scale = qk_scale.reshape(2 * heads, d)
    moments = _gram(codes.reshape(len(qk), 2 * heads, d).transpose(0, 1)) * (qk_scale[..., None] * qk_scale[:, None])
    return gain, (moments / len(qk)).reshape(2, heads, d, d)


@contextmanager
def _one_thread():
    """torch on one thread for the block: LAPACK's eigh and inverse (MKL) give other last bits with other thread
    counts, and those bits would reach the basis file and the codes."""
    with _THREADS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _tree_sum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The sum along `dim`, pairwise in a fixed order (halves added elementwise): the same bits on any threads."""
    while t.shape[dim] > 1:
        size, half = t.shape[dim], t.shape[dim] // 2
        pairs = t.narrow(dim, 0, half) + t.narrow(dim, half, half)
        t = torch.cat([pairs, t.narrow(dim, size - 1, 1)], dim) if size % 2 else pairs
    return t.squeeze(dim)


def _fixed_point(t: torch.Tensor, bits: int = BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 -> integers m (float64, |m| ≤ 2^bits) and per-column powers of two s, t ≈ m·s (rounded to
    nearest on `bits` bits below each column's largest |t|)."""
    exponents = torch.frexp(torch.maximum(t.amax(0), -t.amin(0)))[1].tolist()  # largest |t| < 2^e
    scale = torch.tensor([math.ldexp(1.0, e - bits) for e in exponents], dtype=torch.float64)
    return (t * scale.reciprocal()).round_(), scale  # powers of two: the products are exact


def _gram(m: torch.Tensor) -> torch.Tensor:
    """Σ_n m_n m_nᵀ over the tokens of (..., N, C) integers from `_fixed_point`: each CHUNK of tokens is an exact
    product, whatever order BLAS sums it in, and the chunks are added in order."""
    out = 0
    for start in range(0, m.shape[-2], CHUNK):
        chunk = m[..., start:start + CHUNK, :]
        out = out + chunk.transpose(-1, -2) @ chunk
    return out


def _exact_projection(m: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(m·scale) Wᵀ + offset for `_fixed_point` integers m (N, D): each row of W, its columns scaled like x's, is
    rounded to the bits that keep the D-term sums of integer products below 2^52 (23 at D = 384): an exact product."""
    bits = 52 - BITS - math.ceil(math.log2(m.shape[1]))
    wm, w_scale = _fixed_point((w * scale).T, bits)  # (D, 2D): a column per row of W
    return (m @ wm).mul_(w_scale).add_(offset)


def basis_bytes(basis: Basis) -> bytes:
    from safetensors.torch import save

    tensors = {}
    for i in range(len(basis.mean)):
        tensors[f"{i}.mean"], tensors[f"{i}.decode"] = basis.mean[i].contiguous(), basis.decode[i].contiguous()
    return canonical_safetensors(save(tensors, metadata={"format": "attncache inputs_klt basis"}))


def load_basis(data: bytes, layers: int, dim: int, where: str) -> Basis:
    """Parse and check the file's bytes against the manifest's geometry (safetensors: no pickle)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CacheFormatError(f"{where}: not a valid safetensors file ({' '.join(str(exc).split())[:200]})") from exc
    expected = {f"{i}.{name}" for i in range(layers) for name in ("mean", "decode")}
    if set(tensors) != expected:
        raise CacheFormatError(f"{where}: tensors {sorted(set(tensors) ^ expected)[:4]} do not match the "
                               "manifest's layers")
    for name, t in tensors.items():
        want = (dim,) if name.endswith(".mean") else (dim, dim)
        if tuple(t.shape) != want or t.dtype != torch.float32 or not t.isfinite().all():
            raise CacheFormatError(f"{where}: tensor {name} must be finite float32 of shape {want}")
    try:
        return Basis(torch.stack([tensors[f"{i}.mean"] for i in range(layers)]),
                     torch.stack([tensors[f"{i}.decode"] for i in range(layers)]))
    except ValueError as exc:
        raise CacheFormatError(f"{where}: {exc}") from exc
