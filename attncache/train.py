"""The training loop: cached (or live) teacher maps -> student -> loss -> AdamW, with exact resume.

Order of work, cheapest checks first: options, cache manifests (layers, payload, geometry), image join (every cached
key must be found), student construction and geometry, then the run directory. Only then do workers start.

A run directory holds `config.json` (what decides the result), `metrics.jsonl`, `checkpoints/last.pt` (written
atomically at each epoch end, every --save-every steps, on --max-steps and on Ctrl-C), and at the end
`model.safetensors` (+ `ema.safetensors`) and `results.json`. Re-running the same command resumes from the
checkpoint and gives the same weights as an uninterrupted run; a finished run is a no-op; a different run in the same
directory is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import Cache, open_cache
from .capture import AttentionCapture, parse_layers
from .data import open_source
from .errors import AttncacheError
from .loader import RenderSpec, ViewStream, batches, make_loader
from .losses import classification_loss, distill_loss, gta_loss, teacher_targets
from .store.format import atomic_write_bytes, atomic_write_json
from .student import (
    MAP_MODES,
    MODES,
    PRETRAINED_MODES,
    check_geometry,
    create_student,
    enable_transfer,
    load_pretrained,
    student_forward,
    student_spec,
)
from .teachers import TeacherSpec, build_teacher, geometry_differences
from .views import ViewPolicy

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
CHECKPOINT = "checkpoints/last.pt"
# Options that change how a run executes, not what it computes: they may differ when a run is resumed.
RUNTIME_OPTIONS = ("progress", "max_steps", "log_every", "save_every", "workers", "device")


@dataclass
class TrainConfig:
    mode: str
    out: str
    cache: str | None = None  # train cache (maps + views); without it, views are drawn live from --data
    data: str | None = None  # train images, joined to the cache by key (not needed with embedded images)
    val_cache: str | None = None
    val_data: str | None = None
    student: str | None = None  # default: the teacher's own architecture
    student_args: dict = field(default_factory=dict)
    teacher: str | None = None  # live teacher (instead of cached maps), and the architecture without a cache
    weights: str | None = None  # teacher weights: live teacher, and the starting point of gta / finetune
    pretrained: bool = True
    image_size: int | None = None
    teacher_args: dict = field(default_factory=dict)
    layers: str | None = None  # transferred layers; default: first depth-3 (copy/distill), all cached (gta)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta2: float = 0.999
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    distill_weight: float = 3.0
    gta_weight: float = 0.1
    drop_path: float = 0.0
    clip_grad: float | None = None
    ema: float | None = None  # EMA decay, e.g. 0.9999
    mixup: float = 0.0
    cutmix: float = 0.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    workers: int = 2
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps; the schedule spans all epochs
    save_every: int | None = None  # also checkpoint every N steps
    log_every: int = 10
    progress: bool = True


def train(cfg: TrainConfig) -> dict:
    """Run, resume, or (if finished) return the results of a training run."""
    return Trainer(cfg).run()


# ---------------------------------------------------------------------------------------------------------------
# where the maps come from


class CachedMaps:
    """Decode a batch's compact fields on the training device and keep the transferred layers."""

    def __init__(self, cache: Cache, layers: list[int], mode: str, device: torch.device):
        self.cache, self.mode, self.device = cache, mode, device
        self.positions = None if layers == cache.layers else [cache.layers.index(i) for i in layers]

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        fields = {k: v.to(self.device, non_blocking=True) for k, v in batch["fields"].items()}
        maps = self.cache.codec.decode(fields)
        if self.positions is not None:
            maps = maps[:, self.positions]
        return teacher_targets(maps, self.cache.decodes_to, self.mode)


class LiveMaps:
    """The same targets from a live teacher, on the images the student is about to see."""

    def __init__(self, model: torch.nn.Module, layers: list[int], mode: str):
        self.payload = "logits" if mode == "gta" else "probs"
        self.capture, self.mode = AttentionCapture(model, layers, self.payload), mode

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        return teacher_targets(self.capture(images), self.payload, self.mode)


# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, evaluate: bool = True):
        """`evaluate=False` (benchmarks) builds no val stream and needs no val cache."""
        self.cfg = cfg
        _check_options(cfg)
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device)
        self.cache = open_cache_option(cfg.cache, "--cache")
        self.val_cache = open_cache_option(cfg.val_cache, "--val-cache")
        self.live_teacher, self.teacher = self._teacher()
        self.layers = self._transfer_layers()
        for cache, flag in ((self.cache, "--cache"), (self.val_cache, "--val-cache")):
            if cache is not None:
                _check_cache_serves(cache, flag, self.teacher, self.layers, cfg.mode,
                                    needs_maps=cfg.mode in MAP_MODES and self.live_teacher is None
                                    and (flag == "--cache" or cfg.mode == "copy"))
        self.render_spec = RenderSpec.of(self.teacher)
        self.train_stream, self.num_classes = self._train_stream()
        self.val_stream = self._val_stream() if evaluate else None
        self._build_student()
        self.maps = self._map_source(self.cache)
        self.val_maps = self._map_source(self.val_cache) if cfg.mode == "copy" and evaluate else None
        self.steps_per_epoch = sum(len(self.train_stream.plan(0, w, max(1, cfg.workers)))
                                   for w in range(max(1, cfg.workers)))
        if self.steps_per_epoch == 0:
            raise AttncacheError(f"--batch-size {cfg.batch_size}: larger than the training set "
                                 f"({len(self.train_stream.epoch_items(0))} images per epoch)")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.use_amp = cfg.amp and self.device.type == "cuda"

    # -- setup -----------------------------------------------------------------------------------------------

    def _teacher(self) -> tuple[torch.nn.Module | None, TeacherSpec]:
        cfg, cache = self.cfg, self.cache
        if cfg.teacher is None:
            if cache is None:
                raise AttncacheError("pass --cache (or --teacher for a live teacher): the student copies the "
                                     "teacher's architecture")
            return None, cache.teacher
        live = cfg.mode in MAP_MODES  # scratch/finetune only need the architecture
        model, spec = build_teacher(
            cfg.teacher, image_size=cfg.image_size or (cache.teacher.image_size if cache else None),
            weights=cfg.weights, pretrained=cfg.pretrained and live,
            teacher_args=cfg.teacher_args or (dict(cache.teacher.model_args) if cache else {}),
            device=self.device)
        if cache is not None:
            _check_same_geometry(spec, cache.teacher, "--teacher", "--cache")
        return (model if live else None), spec

    def _transfer_layers(self) -> list[int]:
        cfg = self.cfg
        if cfg.mode not in MAP_MODES:
            return []
        if cfg.layers is None and cfg.mode == "gta":
            return list(self.cache.layers) if self.cache is not None and self.live_teacher is None else \
                list(range(self.teacher.depth))
        return parse_layers(cfg.layers or "reference", self.teacher.depth)

    def _train_stream(self) -> tuple[ViewStream, int]:
        cfg = self.cfg
        source = open_source(cfg.data, "train") if cfg.data else None
        common = dict(render_spec=self.render_spec, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                      source=source)
        if self.cache is not None:
            _check_images(self.cache, source, "--cache", "--data")
            stream = ViewStream(cache=self.cache, with_maps=self.live_teacher is None
                                and cfg.mode in MAP_MODES, **common)
            samples, classes = self.cache.samples, self.cache.manifest["dataset"]["classes"]
        else:
            if source is None:
                raise AttncacheError("pass --data (train images) or --cache")
            samples = [s.to_json() for s in source.scan()]
            stream = ViewStream(samples=samples, policy=ViewPolicy(split="train"), **common)
            classes = source.classes
        unlabeled = next((s["key"] for s in samples if s["label"] < 0), None)
        if unlabeled is not None:
            raise AttncacheError(f"training needs labels: sample {unlabeled!r} has none (use class folders)")
        return stream, max(len(classes), 1 + max(s["label"] for s in samples))

    def _val_stream(self) -> ViewStream | None:
        cfg = self.cfg
        if cfg.mode == "copy" and self.val_cache is None and self.live_teacher is None:
            raise AttncacheError("copy mode evaluates with the teacher's maps of the eval views: pass --val-cache "
                                 "(extracted with --split val)")
        return eval_stream(self.val_cache, cfg.val_data, self.teacher, self.num_classes, cfg.batch_size,
                           with_maps=cfg.mode == "copy" and self.live_teacher is None)

    def _build_student(self) -> None:
        cfg = self.cfg
        self.student_spec = student_spec(self.teacher, self.num_classes, cfg.student, cfg.drop_path,
                                         cfg.student_args)
        self.model = create_student(self.student_spec, seed=cfg.seed)
        check_geometry(self.model, self.student_spec, self.teacher, self.layers,
                       self.cfg.cache or self.cfg.teacher or "the teacher")
        if cfg.mode in PRETRAINED_MODES:
            start_sha256 = load_pretrained(self.model, cfg.weights, self.teacher, cfg.mode)
            if cfg.mode == "gta" and start_sha256 != self.teacher.weights_sha256:
                raise AttncacheError(
                    f"--mode gta regularises towards the model it starts from, but --weights "
                    f"({start_sha256[:12]}) are not the weights that made the maps "
                    f"({self.teacher.weights_sha256[:12]})")
        enable_transfer(self.model, self.layers)
        self.model.to(self.device)

    def _map_source(self, cache: Cache | None):
        if self.cfg.mode not in MAP_MODES:
            return None
        if self.live_teacher is not None:
            return LiveMaps(self.live_teacher, self.layers, self.cfg.mode)
        return CachedMaps(cache, self.layers, self.cfg.mode, self.device) if cache is not None else None

    def _optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self.model, self.cfg.weight_decay, self.model.no_weight_decay())
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, self.cfg.beta2))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to min_lr; a pure function of the step (exact resume for free)."""
        cfg = self.cfg
        warmup = min(self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))

    def run_config(self) -> dict:
        """What decides this run's result: options plus the identity of the caches and teacher weights."""
        options = {k: v for k, v in asdict(self.cfg).items() if k not in RUNTIME_OPTIONS}
        caches = {flag: {"fingerprint": c.manifest["dataset"]["fingerprint"],
                         "weights_sha256": c.teacher.weights_sha256}
                  for flag, c in (("cache", self.cache), ("val_cache", self.val_cache)) if c is not None}
        return {"options": options, "student": self.student_spec.to_json(), "layers": self.layers,
                "teacher": self.teacher.to_json(), "caches": caches}

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        state = self._claim_run_dir()
        if state == "finished":
            return json.loads((self.out / RESULTS).read_text())
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the run's randomness (drop-path) is its own: seeded here
            torch.manual_seed(self.cfg.seed)
            return self._run(state)

    def _run(self, state: str) -> dict:
        cfg = self.cfg
        self.optimizer = self._optimizer()
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema)
        step, epoch, consumed = 0, 0, {}
        if state == "resume":
            step, epoch, consumed = self._load_checkpoint()
            self._log(f"resuming at epoch {epoch}, step {step}")
        self._truncate_metrics(step)
        self.train_stream.resume_at(epoch, consumed)  # batches each worker already delivered in this epoch
        loader = make_loader(self.train_stream, cfg.workers, pin_memory=self.device.type == "cuda")
        val_loader = make_loader(self.val_stream, cfg.workers) if self.val_stream is not None else None
        self.tb = _tensorboard(self.out)
        metrics = {}
        try:
            while epoch < cfg.epochs:
                stopped = cfg.max_steps is not None and step >= cfg.max_steps
                if not stopped:
                    step, consumed, stopped = self._train_epoch(loader, epoch, step, consumed)
                if stopped:
                    self._save_checkpoint(step, epoch, consumed)
                    return {"stopped_at_step": step, "epoch": epoch}
                epoch, consumed = epoch + 1, {}
                metrics = self._evaluate(val_loader, epoch, step)
                self._save_checkpoint(step, epoch, consumed)
        except KeyboardInterrupt:
            self._save_checkpoint(step, epoch, consumed)
            raise
        finally:
            if self.tb is not None:
                self.tb.close()
        return self._finish(step, metrics)

    def _train_epoch(self, loader, epoch: int, step: int, consumed: dict) -> tuple[int, dict, bool]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        self.model.train()
        window, window_images, window_start = [], 0, time.perf_counter()
        columns = [TextColumn(f"epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.1f} img/s  loss {task.fields[loss]:.4f}"),
                   TimeRemainingColumn()]
        with Progress(*columns, disable=not cfg.progress) as progress:
            done = sum(consumed.values())
            task = progress.add_task("train", total=self.steps_per_epoch, completed=done, rate=0.0, loss=0.0)
            for batch in batches(loader):
                losses = self.train_step(batch, self.lr_at(step))
                step += 1
                consumed[batch["worker"]] = batch["index"] + 1
                window.append(losses)
                window_images += len(batch["labels"])
                if step % cfg.log_every == 0 or sum(consumed.values()) == self.steps_per_epoch:
                    rate = window_images / max(1e-9, time.perf_counter() - window_start)
                    record = {"kind": "train", "step": step, "epoch": epoch, "lr": self.lr_at(step - 1),
                              **{k: sum(w[k].item() for w in window) / len(window) for k in window[0]},
                              "images_per_s": rate}
                    self._write_metrics(record)
                    progress.update(task, rate=rate, loss=record["loss"])
                    window, window_images, window_start = [], 0, time.perf_counter()
                progress.advance(task)
                if cfg.save_every and step % cfg.save_every == 0:
                    self._save_checkpoint(step, epoch, consumed)
                if cfg.max_steps is not None and step >= cfg.max_steps \
                        and sum(consumed.values()) < self.steps_per_epoch:
                    return step, consumed, True  # mid-epoch stop; at an epoch end, eval runs first
        return step, consumed, False

    def train_step(self, batch: dict, lr: float) -> dict[str, torch.Tensor]:
        """One optimisation step on one batch from the loader; returns detached losses."""
        images, labels, targets = self.to_device(batch)
        return self.optimize(images, labels, targets, lr)

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images and labels on the device, and the teacher targets decoded there (or computed live)."""
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return images, labels, (self.maps(batch, images) if self.maps is not None else None)

    def optimize(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                 lr: float) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            out, recorded = student_forward(self.model, images, self.layers, _forward_mode(cfg.mode), targets)
            ce = classification_loss(out, labels, cfg.label_smoothing)
            if cfg.mode == "distill":
                transfer = cfg.distill_weight * distill_loss(targets, recorded)
            elif cfg.mode == "gta":
                transfer = cfg.gta_weight * gta_loss(targets, recorded)
            else:
                transfer = torch.zeros((), device=self.device)
            loss = ce + transfer
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss.detach(), "ce": ce.detach(), "transfer": transfer.detach()}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext()

    def evaluate_model(self, model: torch.nn.Module, loader) -> dict:
        """Top-1 and cross-entropy of `model` on the val stream (copy mode: with the teacher's eval maps)."""
        probs, labels = predict(model, loader, self.layers, self.val_maps, self.device, self._autocast)
        return accuracy(probs, labels)

    def _evaluate(self, val_loader, epoch: int, step: int) -> dict:
        if val_loader is None:
            return {}
        metrics = {f"val_{k}": v for k, v in self.evaluate_model(self.model, val_loader).items()}
        if self.ema is not None:
            ema = self.evaluate_model(self.ema.module, val_loader)
            metrics.update(val_top1_ema=ema["top1"], val_loss_ema=ema["loss"])
        self._write_metrics({"kind": "eval", "step": step, "epoch": epoch, **metrics})
        self._log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _finish(self, step: int, metrics: dict) -> dict:
        from safetensors.torch import save_file

        save_file(_plain_state(self.model), str(self.out / "model.safetensors"))
        if self.ema is not None:
            save_file(_plain_state(self.ema.module), str(self.out / "ema.safetensors"))
        results = {"mode": self.cfg.mode, "epochs": self.cfg.epochs, "steps": step, **metrics,
                   "student": self.student_spec.to_json(), "layers": self.layers}
        atomic_write_json(self.out / RESULTS, results)
        return results

    # -- run directory and checkpoints -------------------------------------------------------------------------

    def _claim_run_dir(self) -> str:
        """'new', 'resume' or 'finished'; refuses a directory holding something else."""
        out, config = self.out, self.run_config()
        if (out / CONFIG).exists():
            old = json.loads((out / CONFIG).read_text())
            if json.dumps(old, sort_keys=True) != json.dumps(config, sort_keys=True):
                changed = sorted(k for k in set(old.get("options", {})) | set(config["options"])
                                 if old.get("options", {}).get(k) != config["options"].get(k))
                detail = f" (options {changed} differ)" if changed else " (caches or teacher differ)"
                raise AttncacheError(f"--out {out}: holds another training run{detail}; choose another --out")
            if (out / RESULTS).exists():
                return "finished"
            return "resume" if (out / CHECKPOINT).exists() else "new"
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AttncacheError(f"--out {out}: not empty and not an attncache training run")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, config)
        return "new"

    def _save_checkpoint(self, step: int, epoch: int, consumed: dict) -> None:
        import io

        state = {
            "step": step, "epoch": epoch, "workers": self.cfg.workers,
            "consumed": {str(k): v for k, v in consumed.items()},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.out / CHECKPOINT, buf.getvalue())

    def _load_checkpoint(self) -> tuple[int, int, dict]:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise AttncacheError(f"{path}: unreadable checkpoint ({exc}); delete it to restart the run") from exc
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        consumed = {int(k): v for k, v in state["consumed"].items()}
        if consumed and state["workers"] != self.cfg.workers:
            if self.cache is not None and self.cache.manifest["store"]["format"] == "wds":
                raise AttncacheError(f"{path}: stopped mid-epoch with --workers {state['workers']}; webdataset "
                                     "streams are split by worker, resume with the same --workers")
            # Round-robin streams: the first `done` global batches were trained on, whatever the worker count.
            done, workers = sum(consumed.values()), max(1, self.cfg.workers)
            consumed = {w: max(0, (done - w + workers - 1) // workers) for w in range(workers)}
        return state["step"], state["epoch"], consumed

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they are about to be recomputed)."""
        path = self.out / METRICS
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())

    def _write_metrics(self, record: dict) -> None:
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def _log(self, msg: str) -> None:
        if self.cfg.progress:
            from rich.console import Console

            Console(stderr=True).print(f"attncache: {msg}", markup=False, highlight=False, emoji=False)


# ---------------------------------------------------------------------------------------------------------------
# checks


def _check_options(cfg: TrainConfig) -> None:
    if cfg.mode not in MODES:
        raise AttncacheError(f"--mode {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if cfg.mixup or cfg.cutmix:
        raise AttncacheError(
            "--mixup/--cutmix: the cache carries no mixed views, and mixing only the student's input would show it "
            "pixels its teacher never saw; mixed-view extraction is not supported yet")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise AttncacheError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    if cfg.workers < 0:
        raise AttncacheError(f"--workers {cfg.workers}: must be >= 0")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise AttncacheError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.mode in MAP_MODES and cfg.cache is None and cfg.teacher is None:
        raise AttncacheError(f"--mode {cfg.mode} needs teacher maps: pass --cache (or --teacher for a live teacher)")


def open_cache_option(root: str | None, flag: str) -> Cache | None:
    """open_cache for a command-line option: errors name the option (`--val-cache ...: ...`)."""
    if root is None:
        return None
    try:
        return open_cache(root)
    except AttncacheError as exc:
        raise AttncacheError(f"{flag} {exc}") from exc


def _check_same_geometry(a: TeacherSpec, b: TeacherSpec, flag_a: str, flag_b: str) -> None:
    diff = geometry_differences(vars(a), vars(b))
    if diff:
        raise AttncacheError(f"{flag_a} and {flag_b} have different teacher geometry: " + "; ".join(diff))


def _check_cache_serves(cache: Cache, flag: str, teacher: TeacherSpec, layers: list[int], mode: str,
                        needs_maps: bool) -> None:
    """Does this cache hold what the run consumes from it (same teacher, the layers, the payload)?"""
    _check_same_geometry(cache.teacher, teacher, flag, "the teacher")
    if cache.teacher.weights_sha256 != teacher.weights_sha256 and needs_maps:
        raise AttncacheError(f"{flag} {cache.root}: made by other teacher weights "
                             f"({cache.teacher.weights_sha256[:12]} vs {teacher.weights_sha256[:12]})")
    if not needs_maps:
        return
    missing = [i for i in layers if i not in cache.layers]
    if missing:
        raise AttncacheError(f"{flag} {cache.root}: holds layers {cache.layers}, --mode {mode} needs {layers} "
                             f"(missing {missing}); pass --layers or extract with --layers covering them")
    if mode != "gta" and cache.codec.query_rows != "all":
        raise AttncacheError(f"{flag} {cache.root}: codec {cache.codec.name!r} keeps only [CLS]-query rows; "
                             f"--mode {mode} needs whole maps (extract with --codec fp16, qk, lowrank, sqrtq or logq)")
    if mode == "gta" and cache.decodes_to != "logits":
        raise AttncacheError(f"{flag} {cache.root}: holds softmax probabilities; --mode gta regularises "
                             "attention logits (extract with --codec qk, lowrank or cls, or --payload logits)")


def _check_images(cache: Cache, source, cache_flag: str, data_flag: str) -> None:
    if cache.manifest["store"].get("embed_images"):
        return
    if source is None:
        raise AttncacheError(f"{cache_flag} {cache.root} does not embed images: pass {data_flag}")
    missing = source.missing_keys([s["key"] for s in cache.samples])
    if missing:
        raise AttncacheError(f"{data_flag} {source.description}: {len(missing)} cached image(s) not found, "
                             f"e.g. {missing[0]!r}")


def eval_stream(val_cache: Cache | None, val_data: str | None, teacher: TeacherSpec, num_classes: int,
                batch_size: int, with_maps: bool) -> ViewStream | None:
    """The evaluation views: a val cache's (joined to --val-data unless embedded), else centre crops of --val-data."""
    source = open_source(val_data, "val") if val_data else None
    if val_cache is None and source is None:
        return None
    common = dict(render_spec=RenderSpec.of(teacher), batch_size=batch_size, shuffle=False, source=source)
    if val_cache is not None:
        _check_images(val_cache, source, "--val-cache", "--val-data")
        stream = ViewStream(cache=val_cache, with_maps=with_maps, **common)
        samples = val_cache.samples
    else:
        samples = [s.to_json() for s in source.scan()]
        stream = ViewStream(samples=samples, policy=ViewPolicy(split="val", crop_pct=teacher.crop_pct), **common)
    bad = next((s for s in samples if not 0 <= s["label"] < num_classes), None)
    if bad is not None:
        raise AttncacheError(f"validation sample {bad['key']!r}: label {bad['label']} outside the "
                             f"{num_classes} training classes")
    return stream


@torch.no_grad()
def predict(model: torch.nn.Module, loader, layers: list[int], maps, device: torch.device,
            autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (in the stream's order) and labels; copy-mode students get the eval maps."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in batches(loader):
        images = batch["images"].to(device, non_blocking=True)
        targets = maps(batch, images) if maps is not None else None
        with autocast():
            out, _ = student_forward(model, images, layers, "copy" if targets is not None else "plain", targets)
        probs.append(out.float().softmax(-1).cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    nll = -probs.clamp_min(1e-12).log().gather(1, labels[:, None]).mean().item()
    return {"top1": 100.0 * (probs.argmax(-1) == labels).float().mean().item(), "loss": nll,
            "images": len(labels)}


def _forward_mode(mode: str) -> str:
    return mode if mode in MAP_MODES else "plain"


def _plain_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is always written
        return None
    return SummaryWriter(str(out / "tensorboard"))
