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
    with pytest.raises(AttncacheError, match="--layers"):
        parse_layers(spec, 4)
