"""What only a GPU would show, shown on a CPU: a training step that never waits for the device, the capture's fp32
under a caller's TF32 setting, the CUDA generator in checkpoints, torchrun's per-rank GPU and process group.

The step runs on PyTorch's `meta` device, which holds shapes and no values: reading a value back (`.item()`,
`float()`, `.cpu()`, a data-dependent branch), which on a GPU waits for every queued kernel, raises there. A dispatch
mode records each copy from host memory to that device: on a GPU a copy without `non_blocking` also waits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attncache.recipes import RECIPES
from attncache.teacher import AttentionCapture
from attncache.train import TrainConfig, Trainer
from attncache.train.checkpoint import device_rng_state, restore_device_rng
from attncache.train.loader import batches, make_loader
from attncache.train.maps import LiveMaps, _layer_selector

aten = torch.ops.aten
META = torch.device("meta")


class HostToDevice(TorchDispatchMode):
    """(shape, non_blocking) of every copy of a CPU tensor to the meta device."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[tuple, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is aten._to_copy.default and args[0].device.type == "cpu" and out.device == META:
            self.copies.append((tuple(args[0].shape), bool(kwargs.get("non_blocking"))))
        elif func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device == META:
            self.copies.append((tuple(args[1].shape), bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))))
        return out


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_a_training_step_never_waits_for_the_device(tmp_path, recipe_wds, mode):
    """Regression: with mixed views and the teacher's drop-path masks (the at-distill recipe's views), every step
    copied the masks to the device twice per transferred block and the mixing partners' labels and lambdas once
    each, all synchronously: 2 x layers + 2 stalls per step on a GPU. Now the batch's tensors go over once each,
    asynchronously (the loader pins them), and nothing is read back. (A live teacher's capture needs a device
    that autocast knows, which meta is not; its drop-path masks take the same path.)"""
    rate = RECIPES["at-distill"].augment.teacher_drop_path
    engine = Trainer(TrainConfig(mode=mode, out=str(tmp_path / "run"), cache=str(recipe_wds), batch_size=2,
                                 workers=0, progress=False, drop_path=rate), evaluate=False).engine
    engine.device = engine.maps.device = META
    engine.model.to(META)
    engine.init_state()
    loader = batches(make_loader(engine.train_stream, 0))
    engine.train_step(next(loader), 1e-3)  # the first step also moves what stays on the device (none here)
    batch = next(loader)
    assert {"drop_path_keep", "partner_labels", "lam"} <= set(batch)
    with HostToDevice() as transfers:
        losses = engine.train_step(batch, 1e-3)
    assert all(v.device == META for v in losses.values())
    assert transfers.copies and all(non_blocking for _, non_blocking in transfers.copies), transfers.copies
    sent = ["images", "labels", "partner_labels", "lam", "drop_path_keep", *batch["fields"]]
    assert len(transfers.copies) <= len(sent), (sent, transfers.copies)


def test_the_capture_forms_its_maps_in_ieee_fp32_whatever_the_callers_matmul_precision(tiny_teacher):
    """Regression: a caller's `torch.set_float32_matmul_precision("high")` (TF32 on a GPU, which training scripts
    often switch on) reached the capture's own q·kᵀ products, so "maps formed in fp32" kept 10 mantissa bits.
    The capture's products run at "highest"; the caller's setting is left as it was."""
    model, spec = tiny_teacher.options().build()
    x = torch.randn(2, 3, spec.image_size, spec.image_size)

    class Products(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (aten.bmm.default, aten.mm.default, aten.addmm.default):
                self.seen.append((tuple(out.shape[-2:]), torch.get_float32_matmul_precision()))
            return out

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for payload, autocast in (("probs", False), ("logits", True)):
            Products.seen = []
            with AttentionCapture(model, [0, 1], payload) as capture, Products(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                capture(x)
            logit_products = {p for shape, p in Products.seen if shape == (spec.num_tokens, spec.num_tokens)}
            assert logit_products == {"highest"}, (payload, Products.seen)
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_checkpoints_hold_the_training_devices_cuda_generator_only(monkeypatch):
    """A CPU run saves no CUDA state; a CUDA run its own device's. Older checkpoints hold every visible GPU's
    state: the training device's entry is restored, and a device beyond them is a one-line error."""
    from attncache.errors import AttncacheError

    assert device_rng_state(torch.device("cpu")) == []
    restore_device_rng([], torch.device("cuda", 1))  # written by a CPU run: nothing to restore
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_to.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    assert device_rng_state(torch.device("cuda", 3)) == ["state of cuda:3"]
    restore_device_rng(["mine"], torch.device("cuda", 3))
    restore_device_rng(["gpu0", "gpu1", "gpu2"], torch.device("cuda", 2))
    restore_device_rng(["gpu0", "gpu1"], torch.device("cuda"))
    assert set_to == [("mine", torch.device("cuda", 3)), ("gpu2", torch.device("cuda", 2)),
                      ("gpu0", torch.device("cuda"))]
    with pytest.raises(AttncacheError, match="CUDA generators of 2 GPUs"):
        restore_device_rng(["gpu0", "gpu1"], torch.device("cuda", 5))
    restore_device_rng(["gpu0"], torch.device("cpu"))  # a CUDA checkpoint resumed on a CPU: no CUDA generator


def test_a_torchrun_rank_on_cuda_takes_its_own_gpu_before_joining(monkeypatch):
    """Regression: every rank left cuda:0 current and joined a pure nccl group, so the object collectives (plans,
    RNG states) all staged through GPU 0 and the CPU tensors of the loss and stop collectives were refused."""
    import torch.distributed as dist

    from attncache import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("join", backend)))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    world = distributed.World.from_env(torch.device("cuda"))
    assert (world.rank, world.size, world.local_rank) == (3, 4, 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("join", "cpu:gloo,cuda:nccl")]
    assert world.device(torch.device("cuda")) == torch.device("cuda", 1)
    calls.clear()
    distributed.World.from_env(torch.device("cpu"))
    assert calls == [("join", "gloo")]


def test_the_live_teacher_runs_under_the_training_autocast(tiny_teacher):
    """With --amp (bf16 autocast on CUDA) the live teacher's forward runs under autocast as `extract --amp` runs
    it, its maps still formed in fp32; it ran in fp32, several times slower on a GPU than the cached baseline it
    is compared with. (The CPU's autocast stands in for CUDA's here.)"""
    model, spec = tiny_teacher.options().build()
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    modes = []
    model.blocks[0].mlp.register_forward_hook(lambda m, a, out: modes.append(torch.is_autocast_enabled("cpu")))
    from attncache.train.modes import MODES

    for amp in (False, True):
        maps = LiveMaps(model, [0, 1], MODES["copy"], amp=amp)(dict(), x)
        assert maps.dtype == torch.float32 and maps.shape[:2] == (2, 2)
    assert modes == [False, True]


def test_a_run_of_cached_layers_is_selected_by_a_slice_others_by_an_index_on_the_device():
    """A Python list as the index of a device tensor becomes a tensor copied to the device synchronously on every
    step; the selection is made once."""
    maps = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    assert _layer_selector(None, torch.device("cpu")) is None
    run = _layer_selector([1, 2, 3], torch.device("cpu"))
    assert run == slice(1, 4) and torch.equal(maps[:, run], maps[:, [1, 2, 3]])
    picked = _layer_selector([0, 3], torch.device("cpu"))
    assert isinstance(picked, torch.Tensor) and torch.equal(maps[:, picked], maps[:, [0, 3]])
    assert _layer_selector([0, 3], META).device == META
