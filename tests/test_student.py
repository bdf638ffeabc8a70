"""Attention injection and transfer losses against independent references: the plain formulas and timm itself."""

from __future__ import annotations

import timm
import torch
from conftest import TINY_VIT, reference_maps
from safetensors.torch import load_file

from attncache.errors import AttncacheError
from attncache.train.losses import distill_loss, gta_loss
from attncache.train.modes import MODES
from attncache.train.student import (
    StudentSpec,
    TransferAttention,
    check_geometry,
    create_student,
    load_pretrained,
    student_forward,
)


def tiny_student(num_classes=3, seed=0):
    spec = StudentSpec(TINY_VIT["name"], dict(TINY_VIT["args"]), TINY_VIT["image_size"], num_classes)
    return create_student(spec, seed=seed), spec


def random_probs(b, h, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, n, generator=g) * 3).softmax(-1)


def test_copy_injection_is_softmax_map_times_own_v():
    model, _ = tiny_student()
    attn = model.blocks[0].attn
    assert type(attn) is TransferAttention  # built by timm through its attn_layer hook
    x = torch.randn(2, 17, 64)
    probs = random_probs(2, 4, 17)
    attn.transfer_probs = probs
    out = attn(x)
    attn.transfer_probs = None
    # plain formula: v from the qkv projection, per head probs @ v, heads concatenated, output projection
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    v = qkv[..., 128:].reshape(2, 17, 4, 16).transpose(1, 2)
    expected = (probs @ v).transpose(1, 2).reshape(2, 17, 64) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # without a map the swapped class is timm's attention, bit for bit
    plain = timm.models.vision_transformer.Attention.forward(attn, x)
    torch.testing.assert_close(attn(x), plain, rtol=0, atol=0)


def test_copy_gradients_reach_v_but_not_transferred_qk():
    model, _ = tiny_student()
    images = torch.randn(2, 3, 32, 32)
    maps = torch.stack([random_probs(2, 4, 17, seed=1)], dim=1)
    out, _ = student_forward(model, images, [0], "inject", maps)
    out.sum().backward()
    g0, g1 = model.blocks[0].attn.qkv.weight.grad, model.blocks[1].attn.qkv.weight.grad
    assert torch.count_nonzero(g0[:128]) == 0  # q and k rows of the transferred layer: no gradient at all
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias.grad[:128]) == 0
    assert torch.count_nonzero(g0[128:]) > 0  # its own V learns
    assert torch.count_nonzero(g1[:128]) > 0  # the untransferred layer's q/k learn as usual
    # the map is what the layer used: another map gives another output
    out2, _ = student_forward(model, images, [0], "inject", torch.stack([random_probs(2, 4, 17, seed=2)], 1))
    assert not torch.allclose(out, out2)
    assert model.blocks[0].attn.transfer_probs is None  # nothing left behind for the next forward


def test_distill_records_timms_own_logits():
    model, _ = tiny_student()
    reference = reference_maps(model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                               [0, 1], "logits")
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, recorded = student_forward(model, x, [0, 1], "record")
    torch.testing.assert_close(torch.stack(recorded, 1), reference, rtol=0, atol=1e-5)
    _, cls_rows = student_forward(model, x, [0, 1], "record_cls")
    torch.testing.assert_close(torch.stack(cls_rows, 1), reference[:, :, :, :1], rtol=0, atol=1e-5)
    # recording does not change the forward
    plain = timm.create_model(TINY_VIT["name"], num_classes=3, img_size=32, **TINY_VIT["args"]).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)


def test_distill_loss_is_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(2, 2, 3, 5, 5, generator=g)).softmax(-1)
    s = [torch.randn(2, 3, 5, 5, generator=g) for _ in range(2)]
    expected = 0.0
    for layer in range(2):
        total = 0.0
        for b in range(2):
            for h in range(3):
                for q in range(5):
                    log_s = torch.log_softmax(s[layer][b, h, q], -1)
                    total += -sum(float(t[b, layer, h, q, j] * log_s[j]) for j in range(5))
        expected += total / (2 * 3 * 5)
    assert abs(distill_loss(t, s).item() - expected) < 1e-5


def test_gta_penalty_by_hand():
    # teacher [CLS] row logits all 0; student rows 1, 2 (layer 0) and a single 3 (layer 1):
    t = torch.zeros(1, 2, 2, 1, 3)
    s0 = torch.tensor([[[[1.0, 1.0, 1.0]], [[2.0, 2.0, 2.0]]]])  # heads: sum of squares 3 and 12 -> mean 7.5
    s1 = torch.tensor([[[[0.0, 3.0, 0.0]], [[0.0, 0.0, 0.0]]]])  # heads: 9 and 0 -> mean 4.5
    assert gta_loss(t, [s0, s1]).item() == 12.0
    # from a full logits map, gta keeps exactly the [CLS]-query rows
    maps = torch.randn(2, 2, 3, 4, 4)
    assert torch.equal(MODES["gta"].teacher_targets(maps, "logits"), maps[:, :, :, :1])
    torch.testing.assert_close(MODES["copy"].teacher_targets(maps, "logits"), maps.softmax(-1))


def test_student_checkpoint_keys_are_timms():
    model, spec = tiny_student()
    plain = timm.create_model(spec.model, num_classes=3, img_size=32, **TINY_VIT["args"])
    plain.load_state_dict(model.state_dict(), strict=True)


def test_student_geometry_must_fit_the_cache(tiny_teacher):
    _, teacher = tiny_teacher.options().build()
    wrong = StudentSpec(TINY_VIT["name"], {**TINY_VIT["args"], "num_heads": 2}, 32, 3)
    try:
        check_geometry(create_student(wrong), wrong, teacher, [0], "cache X")
    except AttncacheError as exc:
        assert "num_heads 2 vs 4" in str(exc) and "cache X" in str(exc)
    else:
        raise AssertionError("head mismatch accepted")
    shallow = StudentSpec(TINY_VIT["name"], {**TINY_VIT["args"], "depth": 1}, 32, 3)
    try:
        check_geometry(create_student(shallow), shallow, teacher, [0, 1], "cache X")
    except AttncacheError as exc:
        assert "needs layer 1" in str(exc)
    else:
        raise AssertionError("too shallow student accepted")
    ok = StudentSpec(TINY_VIT["name"], {**TINY_VIT["args"], "mlp_ratio": 2.0}, 32, 3)  # other width of MLP: fits
    check_geometry(create_student(ok), ok, teacher, [0, 1], "cache X")


def test_pretrained_start_copies_the_teacher_body(tiny_teacher):
    _, teacher = tiny_teacher.options().build()
    model, _ = tiny_student(num_classes=5)
    sha = load_pretrained(model, load_file(str(tiny_teacher.weights)), "test")
    assert sha == teacher.weights_sha256
    saved = load_file(str(tiny_teacher.weights))
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.head.weight.shape == (5, 64)  # fresh head for the new task
