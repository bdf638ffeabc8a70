"""Teacher construction and weight loading: safetensors, timm and MAE checkpoints, refusal of anything else."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import TINY_VIT
from safetensors.torch import load_file, save_file

from attncache import AttncacheError
from attncache.teacher import TeacherOptions, parse_kwargs, read_state_dict, resolve_name


def _build(t, weights=None):
    return TeacherOptions(t.name, weights=str(weights) if weights else None, pretrained=False,
                          image_size=t.image_size, args=t.args).build()


def _same_weights(model, state):
    sd = model.state_dict()
    assert set(sd) == set(state)
    for k, v in state.items():
        assert torch.equal(sd[k], v), k


def test_safetensors_weights(tiny_teacher):
    state = load_file(str(tiny_teacher.weights))
    model, spec = _build(tiny_teacher, tiny_teacher.weights)
    _same_weights(model, state)
    assert spec.weights_source == "file:tiny_vit.safetensors"
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_random_init_is_reproducible_and_differs_from_other_weights(tiny_teacher, other_tiny_teacher):
    a, spec_a = _build(tiny_teacher)
    b, spec_b = _build(tiny_teacher)
    assert spec_a.weights_source == "random" and spec_a.weights_sha256 == spec_b.weights_sha256
    _, spec_other = _build(other_tiny_teacher, other_tiny_teacher.weights)
    assert spec_other.weights_sha256 != spec_a.weights_sha256


def test_mae_checkpoint_with_decoder_and_mask_token(tmp_path, tiny_teacher):
    """An MAE pretraining checkpoint: {'model': encoder + decoder_* + mask_token}, plus optimizer-free extras."""
    state = load_file(str(tiny_teacher.weights))
    mae = dict(state)
    mae["mask_token"] = torch.zeros(1, 1, 64)
    mae["decoder_embed.weight"] = torch.randn(32, 64)
    mae["decoder_pos_embed"] = torch.randn(1, 17, 32)
    mae["decoder_blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    mae["decoder_norm.weight"] = torch.ones(32)
    mae["decoder_pred.weight"] = torch.randn(8 * 8 * 3, 32)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": mae, "epoch": 799}, path)  # plain ints are fine for weights_only loading
    model, spec = _build(tiny_teacher, path)
    _same_weights(model, state)
    assert spec.weights_source == "file:mae_pretrain.pth"
    _, ref = _build(tiny_teacher, tiny_teacher.weights)
    assert spec.weights_sha256 == ref.weights_sha256  # the hash is of the weights, not of the file


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_pth_state_dict_layouts(tmp_path, tiny_teacher, wrap):
    state = load_file(str(tiny_teacher.weights))
    obj = {"plain": state, "state_dict": {"state_dict": state},
           "module_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    model, _ = _build(tiny_teacher, path)
    _same_weights(model, state)


def test_pickle_with_an_arbitrary_object_is_refused_without_running_it(tmp_path, tiny_teacher):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = dict(load_file(str(tiny_teacher.weights)))
    path = tmp_path / "evil.pth"
    torch.save({"model": state, "extra": Payload()}, path)
    with pytest.raises(AttncacheError, match=f"`teacher.weights` {path}: cannot read weights"):
        _build(tiny_teacher, path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a raw pickle (protocol 2, as torch uses), not even a torch archive
        pickle.dump({"model": state, "extra": Payload()}, f, protocol=2)
    with pytest.raises(AttncacheError, match="cannot read weights"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([torch.zeros(3)], "not a state dict of tensors"),
        ({"blocks.0.attn.qkv.weight": torch.zeros(3), "lr": 0.1}, "not a state dict of tensors"),
        ("just a string", "not a state dict of tensors"),
    ],
)
def test_weights_that_are_not_a_state_dict(tmp_path, tiny_teacher, content, match):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(AttncacheError, match=match):
        _build(tiny_teacher, path)


def test_weights_file_garbage_or_missing(tmp_path, tiny_teacher):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AttncacheError, match=f"`teacher.weights` {bad}: cannot read weights"):
        _build(tiny_teacher, bad)
    with pytest.raises(AttncacheError, match="no such file"):
        _build(tiny_teacher, tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "other_args",
    [
        dict(patch_size=8, depth=3, embed_dim=64, num_heads=4),  # an extra block: unexpected keys
        dict(patch_size=8, depth=1, embed_dim=64, num_heads=4),  # a block short: missing keys
        dict(patch_size=8, depth=2, embed_dim=32, num_heads=4),  # other width: shape mismatch
        "reg",  # a DINOv2 layout with registers (reg_token) and LayerScale (ls1/ls2), patch 14
    ],
)
def test_weights_of_another_architecture_are_refused(tmp_path, tiny_teacher, reg_teacher, other_args):
    if other_args == "reg":
        other, _ = TeacherOptions(reg_teacher.name, image_size=28, pretrained=False, args=reg_teacher.args).build()
    else:
        other, _ = TeacherOptions(TINY_VIT["name"], image_size=32, pretrained=False, args=other_args).build()
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(AttncacheError, match=f"`teacher.weights` {path}: does not"):
        _build(tiny_teacher, path)


def test_geometry_and_errors():
    _, spec = TeacherOptions("demo", pretrained=False).build()
    assert (spec.image_size, spec.patch_size, spec.depth, spec.num_heads, spec.num_tokens) == (32, 8, 4, 4, 17)
    assert resolve_name("dinov2_vits14_reg") == "vit_small_patch14_reg4_dinov2.lvd142m"
    with pytest.raises(AttncacheError, match="unknown teacher 'no_such_vit'"):
        TeacherOptions("no_such_vit", pretrained=False).build()
    with pytest.raises(AttncacheError, match="not a timm VisionTransformer"):
        TeacherOptions("resnet18", pretrained=False).build()
    with pytest.raises(AttncacheError, match="image size 30 is not a multiple of its patch size 8"):
        TeacherOptions("demo", image_size=30, pretrained=False).build()
    with pytest.raises(AttncacheError, match="image size 30 is not a multiple of its patch size 14"):
        TeacherOptions("vit_small_patch14_reg4_dinov2", image_size=30, pretrained=False,
                       args=dict(depth=1, embed_dim=32, num_heads=2)).build()


def test_parse_kwargs():
    assert parse_kwargs(["patch_size=8", "qkv_bias=false", "drop_rate=0.0", "act_layer=gelu"]) == {
        "patch_size": 8, "qkv_bias": False, "drop_rate": 0.0, "act_layer": "gelu"}
    with pytest.raises(AttncacheError, match="KEY=VALUE"):
        parse_kwargs(["depth"])


# ---------------------------------------------------------------------------------------------------------------
# regressions from the foundation review


DIFF = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)


def test_attention_variants_are_refused_by_type_not_by_attribute_names():
    """Regression: the teacher check was duck-typed (q_norm, k_norm, scale, num_heads), so timm's DiffAttention
    models passed and captured 8 "heads" for a 4-head manifest. Only timm's standard Attention is accepted."""
    from timm.layers import Attention

    from attncache.train.student import StudentSpec, create_student

    diff = TeacherOptions("vit_dwee_patch16_reg1_gap_256", pretrained=False, image_size=32, args=DIFF)
    with pytest.raises(AttncacheError, match="block 0: attention DiffAttention is not timm's standard Attention"):
        diff.build()
    # as a student, passing attn_layer= would silently replace DiffAttention: the architecture is checked first
    with pytest.raises(AttncacheError, match="DiffAttention is not timm's standard Attention"):
        create_student(StudentSpec("vit_dwee_patch16_reg1_gap_256", DIFF, 32, 3))

    class LooksLikeAttention(Attention):  # same attributes, other maps
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x.flip(1), attn_mask, is_causal)

    opts = TeacherOptions(TINY_VIT["name"], pretrained=False, image_size=32,
                          args={**TINY_VIT["args"], "attn_layer": LooksLikeAttention})
    with pytest.raises(AttncacheError, match="LooksLikeAttention is not timm's standard Attention"):
        opts.build()


def test_unreachable_hub_fails_in_seconds_with_one_line(monkeypatch):
    """Regression: an offline hub teacher retried for 56 s before failing. The download host is probed first
    (here a closed local port stands for the hub, whatever the machine's network)."""
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached either
    start = time.perf_counter()
    with pytest.raises(AttncacheError, match=r"cannot reach 127.0.0.1 to download the weights of "
                                             r"'vit_tiny_patch16_224.augreg_in21k' \(offline\?\): "
                                             r"pass `teacher.weights`"):
        TeacherOptions("vit_tiny_patch16_224.augreg_in21k", pretrained=True).build()
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(("content", "match"), [
    (b"\x00" * 100, "not a .safetensors file or a torch checkpoint"),
    (bytes(range(256)) * 4, "not a .safetensors file or a torch checkpoint"),
    (b"PK\x03\x04" + bytes(200), "a damaged torch file"),
    (b"\x80\x02" + b"junk" * 50, "a truncated or damaged pickle file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{" + b"x" * 40, "a damaged safetensors file"),
])
def test_junk_weights_get_a_message_that_says_what_is_wrong(tmp_path, tiny_teacher, content, match):
    """Regression: junk weights gave `cannot read weights (174812789)`."""
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(AttncacheError, match=f"`teacher.weights` {path}: cannot read weights: {match}") as info:
        _build(tiny_teacher, path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
