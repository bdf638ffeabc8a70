#!/usr/bin/env python
"""Why `inputs_klt`: the measurements that chose a fitted basis in the logit metric over other ways of making the
attention inputs smaller. Real DINOv2-S/14 at 224 px; the first half of the photos fits, the second half measures.

Studies (each prints a markdown table):
- `metric`: the codec's basis (codecs/inputs_klt.py, `fit_basis`) against the same KLT without the metric (plain PCA
  of x), one uniform step, zigzag codes coefficient-major under blosc-zstd + bit shuffle, as the codec stores them;
- `allocation`: how much a per-layer choice of bits (greedy, to a mean-KL target) would give the `inputs` codec;
- `svd`: a per-view rank-r truncation of each layer's x (what rank the logits need);
- `prediction`: how much of x a neighbouring patch predicts (the coding gain spatial DPCM could give).

    python benchmarks/real_images.py photos /tmp/real/photos
    python benchmarks/inputs_klt_study.py --weights $W --images /tmp/real/photos/photos --limit 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numcodecs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs_variants import logits_of, quantise, row_kl, stored, teacher_and_photos  # noqa: E402

from attncache.codecs.inputs import hadamard  # noqa: E402
from attncache.codecs.inputs_klt import fit_basis, zigzag  # noqa: E402
from attncache.teacher.projections import from_model  # noqa: E402

BITSHUFFLE = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE, blocksize=1 << 20)


def capture_inputs(model, images):
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    return torch.stack([inputs[i] for i in range(len(model.blocks))], 1)  # (V, L, N, D)


def kl_summary(kls) -> str:
    k = torch.cat(kls)
    return f"{k.mean():.1e} | {torch.quantile(k, 0.99):.1e}"


def study_metric(model, x, fit, held, raw):
    print("| basis | step | ratio vs raw fp16 maps | KL mean | KL p99 |\n|---|---|---|---|---|")
    blocks, dim = model.blocks, x.shape[-1]
    fitted = fit_basis(x[fit], from_model(model, list(range(len(blocks)))))
    plain = []
    for i in range(len(blocks)):  # the same KLT without the metric: eigenvectors of x's own covariance
        xs = x[fit, i].reshape(-1, dim).double()
        mean = xs.mean(0)
        rotation = torch.linalg.eigh((xs - mean).T @ (xs - mean) / len(xs))[1]
        plain.append((mean.float(), rotation.float(), rotation.T.float()))
    bases = {"fitted, logit metric (inputs_klt)": [(fitted.mean[i], fitted.encode[i], fitted.decode[i])
                                                   for i in range(len(blocks))],
             "fitted, no metric (plain PCA)": plain}
    for name, basis in bases.items():
        for step in (0.005, 0.02, 0.07) if name.startswith("fitted, logit") else (0.1, 0.2, 0.4, 0.8):
            kls, nbytes = [], 0
            for i, b in enumerate(blocks):
                mean, enc, dec = basis[i]
                codes = torch.round((x[held, i] - mean) @ enc / step)
                kls.append(row_kl(logits_of(b.attn, x[held, i]), logits_of(b.attn, mean + (codes * step) @ dec)))
                c = zigzag(codes.to(torch.int32)).transpose(-1, -2).contiguous().numpy()
                nbytes += sum(len(BITSHUFFLE.encode(np.ascontiguousarray(v))) for v in c)
            print(f"| {name} | {step} | {raw * len(blocks) * len(range(*held.indices(len(x)))) / nbytes:.2f}x | "
                  f"{kl_summary(kls)} |", flush=True)


def study_allocation(model, x, held, raw):
    blocks, h = model.blocks, hadamard(x.shape[-1])
    res = {}
    for i, b in enumerate(blocks):
        ref = logits_of(b.attn, x[held, i])
        for bits in range(3, 9):
            yq, arrays = quantise(x[held, i] @ h, bits, "both")
            res[i, bits] = (row_kl(ref, logits_of(b.attn, yq @ h)), stored(arrays))
    views = len(range(*held.indices(len(x))))

    def stats(alloc):
        k = torch.cat([res[i, b][0] for i, b in enumerate(alloc)])
        return k.mean().item(), torch.quantile(k, 0.99).item(), \
            raw * len(blocks) * views / sum(res[i, b][1] for i, b in enumerate(alloc))

    print("| mean KL target | uniform bits | ratio | per-layer bits (greedy) | ratio | KL mean | KL p99 |\n"
          "|---|---|---|---|---|---|---|")
    for target in (1e-4, 1e-3, 1e-2):
        uniform = min((b for b in range(3, 9) if stats([b] * len(blocks))[0] <= target), default=8)
        alloc = [8] * len(blocks)
        while True:  # lower the layer whose lost bit costs the least KL per byte saved, while the target holds
            options = []
            for i in range(len(blocks)):
                if alloc[i] > 3 and stats(t := alloc[:i] + [alloc[i] - 1] + alloc[i + 1:])[0] <= target:
                    dk = stats(t)[0] - stats(alloc)[0]
                    options.append((dk / (res[i, alloc[i]][1] - res[i, alloc[i] - 1][1]), t))
            if not options:
                break
            alloc = min(options)[1]
        m, p, r = stats(alloc)
        print(f"| {target:.0e} | {uniform} | {stats([uniform] * len(blocks))[2]:.2f}x | {alloc} | {r:.2f}x | {m:.1e} | "
              f"{p:.1e} |", flush=True)


def study_svd(model, x, held):
    print("| layer | " + " | ".join(f"rank {r}: energy, KL" for r in (32, 64, 128, 192)) + " |\n|---|" + "---|" * 4)
    for i in (0, 3, 6, 9, 11):
        xs = x[held, i]
        mean = xs.mean(1, keepdim=True)
        u, s, vh = torch.linalg.svd(xs - mean, full_matrices=False)
        energy = (s ** 2).cumsum(-1) / (s ** 2).sum(-1, keepdim=True)
        ref = logits_of(model.blocks[i].attn, xs)
        cells = []
        for r in (32, 64, 128, 192):
            approx = mean + (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
            kl = row_kl(ref, logits_of(model.blocks[i].attn, approx)).mean()
            cells.append(f"{energy[..., r - 1].mean():.3f}, {kl:.1e}")
        print(f"| {i} | " + " | ".join(cells) + " |", flush=True)


def study_prediction(x, held, prefix: int, grid: int):
    print("| layer | var / residual var, left neighbour | mean of left and upper |\n|---|---|---|")
    h = hadamard(x.shape[-1])
    for i in (0, 3, 6, 9, 11):
        g = (x[held, i, prefix:] @ h).reshape(-1, grid, grid, x.shape[-1])
        cur, left, up = g[:, 1:, 1:], g[:, 1:, :-1], g[:, :-1, 1:]

        def gain(pred, cur=cur):
            a = (cur * pred).sum() / (pred * pred).sum()  # the best scalar predictor coefficient
            return (cur.var() / (cur - a * pred).var()).item()

        print(f"| {i} | {gain(left):.2f} | {gain((left + up) / 2):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--studies", nargs="+", default=["metric", "allocation", "svd", "prediction"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, spec, images = teacher_and_photos(args.weights, args.images, args.limit)
    x = capture_inputs(model, images)
    half = len(images) // 2
    fit, held = slice(0, half), slice(half, len(images))
    raw = spec.num_heads * spec.num_tokens ** 2 * 2  # raw fp16 maps per layer and view
    print(f"{len(images)} photos: fitted on {half}, measured on {len(images) - half}\n")
    with torch.no_grad():
        for name in args.studies:
            print(f"\n## {name}\n")
            if name == "metric":
                study_metric(model, x, fit, held, raw)
            elif name == "allocation":
                study_allocation(model, x, held, raw)
            elif name == "svd":
                study_svd(model, x, held)
            else:
                study_prediction(x, held, spec.num_prefix_tokens, spec.image_size // spec.patch_size)


if __name__ == "__main__":
    main()
