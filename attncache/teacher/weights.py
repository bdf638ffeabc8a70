"""Weight files: safetensors, timm checkpoints and MAE `{'model': ...}` .pth, read without running any code.

`.pth` files are loaded with `torch.load(weights_only=True)`, which refuses pickled objects other than tensors and
plain containers; a file of another kind is named as such in one line, before any model is touched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import AttncacheError

# Keys of a pretraining checkpoint that a frozen ViT teacher does not use (MAE decoder, mask token, heads).
IGNORED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "head_drop.")


def state_dict_sha256(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, dtypes, bytes), independent of the file they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch.save's zip archive
    if head[:1] == b"\x80":
        return "pickle"  # a legacy torch.save / plain pickle
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20):
        return "safetensors"
    return "unknown"


def read_state_dict(path: str | Path, flag: str = "`teacher.weights`") -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects; errors are one line naming the file."""
    path = Path(path)
    where = f"{flag} {path}"
    if not path.is_file():
        raise AttncacheError(f"{where}: no such file")
    kind = _kind(path)
    if kind == "unknown":
        raise AttncacheError(f"{where}: cannot read weights: not a .safetensors file or a torch checkpoint")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
        raise AttncacheError(f"{where}: cannot read weights: {_reason(exc, kind)}") from exc
    # Unwrap the usual checkpoint containers: MAE {'model': ...}, Lightning {'state_dict': ...}, EMA.
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AttncacheError(f"{where}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _reason(exc: Exception, kind: str) -> str:
    import pickle

    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        return "it holds Python objects besides tensors, which could run code when loaded (refused)"
    if isinstance(exc, (EOFError, KeyError, pickle.UnpicklingError)):
        return f"a truncated or damaged {kind} file"
    first = " ".join(str(exc).split())[:160]
    return f"a damaged {kind} file ({first or type(exc).__name__})"


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a ViT body's weights (heads and MAE decoder ignored) through timm's remapping; errors name `where`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    # timm's filter would silently resample a patch embedding of another patch size: that is another teacher.
    theirs, ours = state.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
    if theirs is not None and tuple(theirs.shape) != tuple(ours.shape):
        raise AttncacheError(f"{where}: does not match the teacher: patch embedding "
                             f"{tuple(theirs.shape)} vs {tuple(ours.shape)} (another patch size or width?)")
    try:
        state = checkpoint_filter_fn(state, model)  # timm's own remapping (pos-embed resize, original layouts)
    except Exception as exc:  # noqa: BLE001
        raise AttncacheError(f"{where}: does not fit {type(model).__name__}: {exc}") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = " ".join(str(exc).split())
        raise AttncacheError(f"{where}: does not match the teacher architecture "
                             f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from exc
    missing = [k for k in missing if not k.startswith(IGNORED_PREFIXES)]
    if missing or unexpected:
        raise AttncacheError(
            f"{where}: does not match the teacher architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]})"
        )
