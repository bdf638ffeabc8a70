"""AttentionCapture against timm's own explicit attention path, and the --layers grammar."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_maps, render_sample

from attncache.errors import AttncacheError
from attncache.sources import open_source
from attncache.teacher import AttentionCapture, parse_layers
from attncache.views import ViewPolicy


def _rendered_batch(teacher, spec, n=6, seed=3):
    """Real rendered train views of demo images (random crops and flips), at the teacher's geometry."""
    source = open_source("demo:2")
    samples = source.scan()[:n]
    policy = ViewPolicy(views_per_image=1, seed=seed)
    xs = []
    for (_, data), s in zip(source.iter_bytes(range(len(samples))), samples, strict=True):
        view = policy.draw(s.key, s.width, s.height, spec.image_size)[0]
        xs.append(render_sample(data, view, spec))
    return torch.stack(xs)


def _teacher(t):
    return t.options().build()


@pytest.mark.parametrize("payload", ["probs", "logits"])
@pytest.mark.parametrize("layers", ["all", "0", "reference", "1"])
def test_capture_matches_timm_explicit_path(tiny_teacher, payload, layers):
    model, spec = _teacher(tiny_teacher)
    idx = parse_layers(layers, spec.depth)
    x = _rendered_batch(tiny_teacher, spec)
    got = AttentionCapture(model, idx, payload)(x)
    assert got.dtype == torch.float32
    assert got.shape == (len(x), len(idx), spec.num_heads, spec.num_tokens, spec.num_tokens) == (6, len(idx), 4, 17, 17)
    ref = reference_maps(tiny_teacher.timm_model(), x, idx, payload)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if payload == "probs":
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
        assert (got >= 0).all()
    else:  # the logits are genuinely pre-softmax: not rows summing to one, and their softmax is timm's probs
        probs = reference_maps(tiny_teacher.timm_model(), x, idx, "probs")
        torch.testing.assert_close(got.softmax(-1), probs, rtol=0, atol=1e-6)
        assert not torch.allclose(got.sum(-1), torch.ones(got.shape[:-1]))


def test_capture_registers_and_layerscale(reg_teacher):
    """DINOv2 layout: CLS + 4 register tokens (5 prefix tokens) before the patches; LayerScale in the blocks."""
    model, spec = _teacher(reg_teacher)
    assert spec.num_prefix_tokens == 5 and spec.num_tokens == 5 + (28 // 14) ** 2 == 9
    assert type(model.blocks[0].ls1).__name__ == "LayerScale"
    x = _rendered_batch(reg_teacher, spec, n=4)
    for payload in ("probs", "logits"):
        got = AttentionCapture(model, [0, 1], payload)(x)
        assert got.shape == (4, 2, 2, 9, 9)
        torch.testing.assert_close(got, reference_maps(reg_teacher.timm_model(), x, [0, 1], payload),
                                   rtol=1e-5, atol=1e-6)


def test_capture_stops_after_last_layer_without_changing_maps(tiny_teacher):
    """Capturing only layer 0 gives exactly the layer-0 slice of an all-layer capture (early stop is harmless)."""
    model, spec = _teacher(tiny_teacher)
    x = _rendered_batch(tiny_teacher, spec, n=3)
    only0 = AttentionCapture(model, [0], "probs")(x)
    model2, _ = _teacher(tiny_teacher)
    both = AttentionCapture(model2, [0, 1], "probs")(x)
    assert torch.equal(only0[:, 0], both[:, 0])
    assert not torch.allclose(both[:, 0], both[:, 1])  # different layers really differ


def test_capture_rejects_unknown_payload(tiny_teacher):
    model, _ = _teacher(tiny_teacher)
    with pytest.raises(AttncacheError, match="payload"):
        AttentionCapture(model, [0], "attention")


@pytest.mark.parametrize(
    ("spec", "depth", "expected"),
    [
        ("all", 4, [0, 1, 2, 3]),
        (None, 3, [0, 1, 2]),
        ("reference", 12, list(range(9))),  # the first depth - 3
        ("reference", 24, list(range(21))),
        ("reference", 2, [0]),  # never empty
        ("0,2", 4, [0, 2]),
        ("2,0,2", 4, [0, 2]),  # sorted, deduplicated
        ("1-3", 4, [1, 2, 3]),
        ("0, 4-5", 6, [0, 4, 5]),
        ([3, 1], 4, [1, 3]),
    ],
)
def test_parse_layers(spec, depth, expected):
    assert parse_layers(spec, depth) == expected


@pytest.mark.parametrize("spec", ["4", "0,9", "-1", "a", "1-", "3-1", "", "0;1", "1.5", [5]])
def test_parse_layers_rejects(spec):
    with pytest.raises(AttncacheError, match="`layers`"):
        parse_layers(spec, 4)


def _attention_inputs(model, x, layers):
    """Each captured block's attention input (norm1's output), recorded by a hook on a deep copy."""
    import copy

    model = copy.deepcopy(model)
    inputs, handles = {}, []
    for i in layers:
        handles.append(model.blocks[i].attn.register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone())))
    return model, inputs, handles


def test_amp_capture_forms_maps_in_fp32(tiny_teacher):
    """Regression: under --amp the hooks ran inside autocast and formed the maps from bf16 q and k (logits off by
    7e-4 on a real teacher, 10x the fp16 storage error) while the docs promised fp32 maps. Under autocast the
    capture recomputes q and k in fp32 from the block's own input: the logits equal the plain float64 formula on
    that input to fp32 round-off, where the bf16 ones the block itself used are far off."""
    model, spec = _teacher(tiny_teacher)
    x = _rendered_batch(tiny_teacher, spec)
    probe, inputs, handles = _attention_inputs(model, x, [0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe.forward_features(x)  # the same autocast forward, to see what each block received
    for h in handles:
        h.remove()
    with AttentionCapture(model, [0, 1], "logits") as capture, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = capture(x)
    assert logits.dtype == torch.float32
    for j, layer in enumerate([0, 1]):
        attn = model.blocks[layer].attn
        t = inputs[layer].double()
        qkv = torch.nn.functional.linear(t, attn.qkv.weight.double(), attn.qkv.bias.double())
        q, k = qkv.reshape(len(x), -1, 3, 4, 16).permute(2, 0, 3, 1, 4)[:2]
        exact = (q * attn.scale) @ k.transpose(-2, -1)
        err = (logits[:, j].double() - exact).abs().max().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the block computes under autocast
            bf16 = (attn.qkv(inputs[layer]).reshape(len(x), -1, 3, 4, 16).permute(2, 0, 3, 1, 4))
        bf16_logits = ((bf16[0].float() * attn.scale) @ bf16[1].float().transpose(-2, -1)).double()
        assert err < 1e-5 < (bf16_logits - exact).abs().max().item() / 10, err


@pytest.mark.parametrize("payload", ["probs", "logits", "qk", "inputs"])
def test_capture_keeps_timms_fused_attention_and_leaves_no_trace(tiny_teacher, payload):
    """Regression: capture switched the blocks to timm's explicit attention path, and `bench extract`'s "plain
    inference" baseline timed that slower path with the hooks still attached (efficiency 1.23). The blocks keep
    fused attention while capturing; after `close()` the model has no hook and computes what it did before."""
    model, spec = _teacher(tiny_teacher)
    x = _rendered_batch(tiny_teacher, spec, n=3)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    with torch.no_grad():
        before = model.forward_features(x)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*a, **kw):
        calls.append(1)
        return sdpa(*a, **kw)

    with AttentionCapture(model, [0, 1], payload) as capture:
        torch.nn.functional.scaled_dot_product_attention = counting_sdpa
        try:
            capture(x)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    assert len(calls) == 2 and fused == [True, True]  # both captured blocks ran timm's fused kernel
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), before)


def test_inputs_payload_is_each_blocks_attention_input(reg_teacher):
    """payload "inputs": exactly what each captured block's attention received (its norm1 output), on the DINOv2
    layout with registers and LayerScale; the maps of timm's explicit path follow from it and the block's weights."""
    model, spec = _teacher(reg_teacher)
    x = _rendered_batch(reg_teacher, spec, n=2)
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    with AttentionCapture(model, [0, 1], "inputs") as capture:
        got = capture(x)
    assert got.shape == (2, 2, spec.num_tokens, spec.embed_dim)
    assert torch.equal(got[:, 0], seen[0]) and torch.equal(got[:, 1], seen[1])
