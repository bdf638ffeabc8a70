#!/usr/bin/env python
"""How to quantise a ViT's attention inputs: the variants measured before choosing the `inputs` codec's scheme.

For each captured layer, the block's attention input x (N × D, the output of norm1) is quantised in several ways,
the logits are recomputed with the teacher's own q/k projections, and the per-row KL(p ‖ p̂) of the maps is reported
with the compressed size (blosc-zstd, level 3, as int8 codes + fp16 scales) against raw fp16 maps.

Variants:
- scales: per token, per channel, or both (channel first, then token: what the codec does);
- rotation: none, a random orthogonal matrix, or block-diagonal Hadamard (block 64 or 128);
- low rank: a fixed per-layer basis fitted on half the images (plain PCA, or PCA in the metric the q/k projections
  induce), errors measured on the other half;
- across layers: the residual stream's change from the previous layer, quantised closed-loop.

    python benchmarks/real_images.py photos /tmp/real/photos
    python benchmarks/inputs_variants.py --weights $W --images /tmp/real/photos/photos --limit 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numcodecs
import numpy as np
import torch
from PIL import Image

from attncache.codecs.inputs import hadamard
from attncache.teacher import TeacherOptions


def logits_of(attn, x):
    b, n, _ = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
    qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return (attn.q_norm(qkv[0]) * attn.scale) @ attn.k_norm(qkv[1]).transpose(-2, -1)


def row_kl(lp, lq):
    p, q = lp.log_softmax(-1), lq.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).flatten()


BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.NOSHUFFLE)


def stored(arrays) -> int:
    return sum(len(BLOSC.encode(np.ascontiguousarray(a))) for a in arrays)


def quantise(y, bits, scales):
    top = 2 ** (bits - 1) - 1
    if scales == "token":
        s = (y.abs().amax(-1, keepdim=True) / top).clamp_min(1e-8)
        codes = torch.round(y / s).clamp(-top, top)
        return codes * s.half().float(), [codes.to(torch.int8).numpy(), s.half().numpy()]
    channel = y.abs().amax(-2, keepdim=True).clamp_min(1e-8)
    if scales == "channel":
        s = channel / top
        codes = torch.round(y / s).clamp(-top, top)
        return codes * s.half().float(), [codes.to(torch.int8).numpy(), s.half().numpy()]
    z = y / channel
    token = (z.abs().amax(-1, keepdim=True) / top).clamp_min(1e-8)
    codes = torch.round(z / token).clamp(-top, top)
    return (codes * token.half().float() * channel.half().float(),
            [codes.to(torch.int8).numpy(), channel.half().numpy(), token.half().numpy()])


def report(name, kls, nbytes, raw):
    k = torch.cat(kls)
    print(f"| {name} | {raw / nbytes:.2f}x | {k.mean():.2e} | {torch.quantile(k, 0.99):.2e} | {k.max():.2e} |",
          flush=True)


def teacher_and_photos(weights: str, folder: str, limit: int):
    """The real DINOv2-S at 224 px and timm's eval view of the first `limit` PNGs of `folder`."""
    import timm

    model, spec = TeacherOptions("vit_small_patch14_dinov2", weights=weights, image_size=224,
                                 pretrained=False).build()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**{**cfg, "input_size": (3, 224, 224)})
    paths = sorted(Path(folder).glob("*.png"))[:limit]
    return model, spec, torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, spec, images = teacher_and_photos(args.weights, args.images, args.limit)
    residual, inputs = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: residual.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    hooks += [b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
              for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    blocks, dim, n = model.blocks, spec.embed_dim, len(images)
    raw = n * len(blocks) * spec.num_heads * spec.num_tokens ** 2 * 2
    torch.manual_seed(0)
    rotations = {"none": None, "random": torch.linalg.qr(torch.randn(dim, dim))[0],
                 "hadamard": hadamard(dim)}
    print(f"{n} images, {len(blocks)} layers, raw fp16 maps {raw / n:,.0f} bytes/view\n")
    print("| variant | ratio vs raw fp16 maps | KL mean | KL p99 | KL max |\n|---|---|---|---|---|")
    with torch.no_grad():
        x = inputs
        nbytes = sum(stored([x[i].half().numpy()]) for i in range(len(blocks)))
        report("fp16 x", [row_kl(logits_of(b.attn, x[i]), logits_of(b.attn, x[i].half().float()))
                          for i, b in enumerate(blocks)], nbytes, raw)
        for rot_name, rot in rotations.items():
            for scales in ("token", "channel", "both"):
                for bits in (8, 7, 6, 5, 4):
                    kls, nbytes = [], 0
                    for i, b in enumerate(blocks):
                        y = x[i] @ rot if rot is not None else x[i]
                        yq, arrays = quantise(y, bits, scales)
                        xq = yq @ rot.T if rot is not None else yq
                        kls.append(row_kl(logits_of(b.attn, x[i]), logits_of(b.attn, xq)))
                        nbytes += stored(arrays)
                    report(f"{rot_name} rotation, {scales} scales, {bits} bit", kls, nbytes, raw)
        fit, held = slice(0, n // 2), slice(n // 2, n)
        for metric in ("plain", "qk"):
            for rank in (96, 128, 192):
                kls, nbytes = [], 0
                for i, b in enumerate(blocks):
                    xf = x[i][fit].reshape(-1, dim)
                    mu = xf.mean(0)
                    w = b.attn.qkv.weight[:2 * dim]
                    if metric == "plain":
                        root = torch.eye(dim)
                    else:  # minimise the error of x·W_qᵀ and x·W_kᵀ: M = W_qᵀW_q + W_kᵀW_k = R Rᵀ
                        evals, u = torch.linalg.eigh(w.T @ w)
                        root = u * evals.clamp_min(1e-8).sqrt()
                    c = root.T @ (xf - mu).T @ (xf - mu) @ root
                    basis = torch.linalg.eigh(c)[1][:, -rank:]
                    y = (x[i][held] - mu) @ root @ basis
                    yq, arrays = quantise(y, 8, "both")
                    xq = mu + yq @ basis.T @ torch.linalg.inv(root)
                    kls.append(row_kl(logits_of(b.attn, x[i][held]), logits_of(b.attn, xq)))
                    nbytes += stored(arrays)
                report(f"fixed basis ({metric} metric), rank {rank}, 8 bit (held-out half)", kls, nbytes * 2, raw)
        for bits in (8, 6):
            kls, nbytes, have = [], 0, None
            for i, b in enumerate(blocks):
                target = residual[i] if have is None else residual[i] - have
                yq, arrays = quantise(target, bits, "both")
                have = yq if have is None else have + yq
                kls.append(row_kl(logits_of(b.attn, b.norm1(residual[i])), logits_of(b.attn, b.norm1(have))))
                nbytes += stored(arrays)
            report(f"residual change across layers (closed loop), both scales, {bits} bit", kls, nbytes, raw)


if __name__ == "__main__":
    main()
