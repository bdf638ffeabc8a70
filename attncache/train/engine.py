"""The optimisation loop: a step, an epoch, evaluation, checkpoints; stops cleanly and resumes to the bit.

- The schedule (linear warm-up, then cosine) is a pure function of the step.
- The run's randomness (drop-path) comes from the global torch RNG, seeded at the start and saved in every
  checkpoint; nothing else draws from it (the loaders have private generators).
- Ctrl-C and SIGTERM set a flag; the loop stops at the next step boundary (or abandons the evaluation in progress),
  saves a checkpoint with the true position and raises `RunInterrupted`. Re-running the same command resumes.
- Under torchrun (DDP): each rank trains on its share of every global batch, gradients are averaged by
  DistributedDataParallel, the logged losses are averaged over ranks, the ranks agree at every step on whether to
  stop, and only rank 0 evaluates and writes files (checkpoints hold every rank's RNG state).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch

from ..distributed import World
from ..errors import AttncacheError, ConfigError, RunInterrupted
from ..files import AppendLog, atomic_write_bytes, atomic_write_json
from ..teacher import drop_path_masks
from .checkpoint import (
    EMA_MODEL,
    METRICS,
    MODEL,
    RESULTS,
    Position,
    Window,
    device_rng_state,
    load_checkpoint,
    restore_device_rng,
    save_checkpoint,
)
from .config import TrainConfig
from .curves import NoCurves, open_curves
from .loader import ViewStream, batches, make_loader
from .losses import classification_loss, mixed_targets
from .modes import Mode
from .predict import accuracy, predict
from .student import student_forward


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag read at step boundaries; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NoLog:
    """The metrics log of a rank other than 0: it writes nothing (only rank 0 reads, syncs or counts its log)."""

    def append(self, record: dict) -> None:
        pass

    def truncate(self, lines: int) -> None:
        pass


class Engine:
    def __init__(self, cfg: TrainConfig, mode: Mode, model: torch.nn.Module, layers: list[int], maps, val_maps,
                 train_stream: ViewStream, val_stream: ViewStream | None, device: torch.device, out: Path,
                 results_extra: dict, teacher_drop_path: float = 0.0, world: World = World()):
        """`teacher_drop_path`: the rate of the drop-path masks the training views carry (0: none)."""
        self.cfg, self.mode, self.model, self.layers = cfg, mode, model, layers
        self.maps, self.val_maps, self.device, self.out = maps, val_maps, device, out
        self.train_stream, self.val_stream = train_stream, val_stream
        self.steps_per_epoch = train_stream.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(f"`batch_size` {cfg.batch_size}: larger than the training set "
                                 f"({len(train_stream.epoch_items(0))} images per epoch)")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.use_amp = cfg.amp and device.type == "cuda"
        self.results_extra = results_extra
        self.teacher_drop_path = teacher_drop_path
        self.world = world
        self.wrapper = None  # DistributedDataParallel around the model, under torchrun
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema = None
        self.curves = NoCurves()  # TensorBoard's copy of the metrics lines (fit opens it)

    # -- one step ------------------------------------------------------------------------------------------------

    def init_state(self) -> None:
        """The optimizer (AdamW; no weight decay on biases, norms, position embeddings, tokens; with `layer_decay`,
        timm's per-layer lr scales) and the EMA."""
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        cfg = self.cfg
        if cfg.layer_decay is not None:
            groups = param_groups_layer_decay(self.model, cfg.weight_decay, self.model.no_weight_decay(),
                                              layer_decay=cfg.layer_decay)
        else:
            groups = param_groups_weight_decay(self.model, cfg.weight_decay, self.model.no_weight_decay())
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, self.cfg.beta2))
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapper = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=self.cfg.ema)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to min_lr; a pure function of the step (exact resume for free)."""
        cfg = self.cfg
        warmup = min(self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images and labels (soft targets for mixed views) on the device, and the teacher targets decoded there
        (or computed live)."""
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        if "lam" in batch:  # mixed views: soft targets, label smoothing included
            # non_blocking: a blocking copy waits for the device to finish the previous step (a stall per step)
            labels = mixed_targets(labels, batch["partner_labels"].to(self.device, non_blocking=True),
                                   batch["lam"].to(self.device, non_blocking=True), self.model.num_classes,
                                   self.cfg.label_smoothing)
        return images, labels, (self.maps(batch, images) if self.maps is not None else None)

    def train_step(self, batch: dict, lr: float) -> dict[str, torch.Tensor]:
        """One optimisation step on one batch from the loader; returns detached losses."""
        return self.optimize(*self.to_device(batch), lr, batch.get("drop_path_keep"))

    def optimize(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                 lr: float, drop_path_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`drop_path_keep`: the teacher's drop-path masks of these views, reused by the transferred blocks."""
        cfg, mode = self.cfg, self.mode
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        masks = drop_path_masks(self.model, drop_path_keep, self.teacher_drop_path, blocks=self.layers)
        with self.autocast(), masks:
            out, recorded = student_forward(self.model, images, self.layers, mode.attention, targets,
                                            wrapper=self.wrapper)
            ce = classification_loss(out, labels, cfg.label_smoothing)
            transfer = mode.transfer(cfg, targets, recorded) if mode.transfer else torch.zeros((), device=self.device)
            loss = ce + transfer
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss.detach(), "ce": ce.detach(), "transfer": transfer.detach()}

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext()

    # -- the run -------------------------------------------------------------------------------------------------

    def fit(self, resume: bool) -> dict:
        """Train from the start or from the checkpoint to the end (or to `max_steps`, or to a signal)."""
        cfg = self.cfg
        self.init_state()
        self.log = AppendLog(self.out / METRICS) if self.world.is_main else NoLog()  # rank 0 writes the metrics
        if resume:
            ck = load_checkpoint(self.out, self.steps_per_epoch, self.world.size)
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.module.load_state_dict(ck["ema"])
            torch.set_rng_state(ck["rng_cpu"][self.world.rank])
            restore_device_rng(ck["rng_cuda"][self.world.rank], self.device)
            self.pos, self.window = ck["position"], ck["window"]
            self.log.truncate(ck["metrics_lines"])  # lines after the checkpoint are about to be recomputed
            self._say(f"resuming at epoch {self.pos.epoch}, step {self.pos.step}")
        else:
            torch.manual_seed(cfg.seed)
            self.pos, self.window = Position(), Window()
            self.log.truncate(0)
        pin = self.device.type == "cuda"  # pinned batches: the step's copies to the device are asynchronous
        train_loader = make_loader(self.train_stream, cfg.workers, pin_memory=pin)
        val_loader = make_loader(self.val_stream, cfg.workers, pin_memory=pin) if self.val_stream is not None else None
        self.curves = self._open_curves()
        with StopRequest() as stop, self.curves:
            while self.pos.epoch < cfg.epochs:
                if self.pos.batch < self.steps_per_epoch:
                    reason = self._train_epoch(train_loader, stop)
                    if reason == "max_steps":
                        self.save()
                        return {"stopped_at_step": self.pos.step, "epoch": self.pos.epoch}
                    if reason == "signal":
                        self._interrupted(stop)
                evaluated, stopping = self._evaluate(val_loader, stop)
                if evaluated:  # the epoch is done, its evaluation logged: a stop now must not redo it
                    self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)
                if stopping:
                    self._interrupted(stop)
                self.save()
        return self._finish()

    def _train_epoch(self, loader, stop: StopRequest) -> str | None:
        """Batches of the current epoch from the current position; returns why it stopped early, if it did."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, pos, spe = self.cfg, self.pos, self.steps_per_epoch
        self.model.train()
        self.train_stream.set_position(pos.epoch, pos.batch)
        columns = [TextColumn(f"epoch {pos.epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.1f} img/s{task.fields[mine]}  loss {task.fields[loss]:.4f}"),
                   TimeRemainingColumn()]
        window_start = time.perf_counter()
        stream = batches(loader)
        with Progress(*columns, disable=not cfg.progress) as bar:
            task = bar.add_task("train", total=spe, completed=pos.batch, rate=0.0, loss=0.0, mine="")
            while pos.batch < spe:
                if self._agree_to_stop(stop, stop.requested):  # every rank stops at the same step
                    return "signal"
                if cfg.max_steps is not None and pos.step >= cfg.max_steps:
                    return "max_steps"
                try:
                    batch = next(stream)
                except (RuntimeError, StopIteration) as exc:
                    if stop.requested:  # Ctrl-C reached the loader's workers too: they are gone
                        return "signal"
                    raise AttncacheError(f"the training loader failed at epoch {pos.epoch}, batch {pos.batch}: "
                                         f"{exc}") from exc
                if (batch["epoch"], batch["index"]) != (pos.epoch, pos.batch):
                    raise RuntimeError(f"loader out of order: got batch {batch['index']} of epoch {batch['epoch']}, "
                                       f"expected {pos.batch} of {pos.epoch}")
                losses = self.train_step(batch, self.lr_at(pos.step))
                pos.step, pos.batch = pos.step + 1, pos.batch + 1
                self.window.add(losses, len(batch["labels"]))
                if pos.step % cfg.log_every == 0 or pos.batch == spe:
                    self._reduce_window()
                    means = self.window.means()
                    local = self.window.images / max(1e-9, time.perf_counter() - window_start)
                    rate = local * self.world.size  # the ranks step in lockstep on equal shares of each batch
                    if self.world.is_main:
                        self._record({"kind": "train", "step": pos.step, "epoch": pos.epoch,
                                      "lr": self.lr_at(pos.step - 1), **means, "images_per_s": rate})
                    mine = f" (rank {self.world.rank}: {local:.1f})" if self.world.distributed else ""
                    bar.update(task, rate=rate, loss=means["loss"], mine=mine)
                    self.window, window_start = Window(), time.perf_counter()
                bar.advance(task)
                if cfg.save_every and pos.step % cfg.save_every == 0:
                    self.save()
        for _ in stream:  # let the loader finish its epoch (persistent workers start the next one cleanly)
            raise RuntimeError("the loader yielded more batches than the epoch has")
        return None

    def evaluate_model(self, model: torch.nn.Module, loader, should_stop=lambda: False) -> dict | None:
        """Top-1 and cross-entropy of `model` on the val stream (copy mode: with the teacher's eval maps)."""
        self.val_stream.set_position(0, 0)
        result = predict(model, loader, self.layers, self.val_maps, self.device, self.autocast, should_stop)
        return None if result is None else accuracy(*result)

    def _evaluate(self, loader, stop: StopRequest) -> tuple[bool, bool]:
        """Evaluate at an epoch end and log it (rank 0; the others wait at the next collective). Returns (done,
        stop): done is False if a signal came first (nothing is logged then, the epoch's evaluation is redone on
        resume); stop, whether the run stops here (a signal during or after it, on any rank)."""
        if loader is None:
            return True, self._agree_to_stop(stop, stop.requested)
        metrics = {}
        models = [("", self.model)] + ([("_ema", self.ema.module)] if self.ema is not None else [])
        for suffix, model in models:
            result = self.evaluate_model(model, loader, lambda: stop.requested)
            if result is None:
                return False, self._agree_to_stop(stop, True)
            metrics.update({f"val_top1{suffix}": result["top1"], f"val_loss{suffix}": result["loss"]})
            if not suffix:
                metrics["val_images"] = result["images"]
        self._record({"kind": "eval", "step": self.pos.step, "epoch": self.pos.epoch + 1, **metrics})
        self._say(f"epoch {self.pos.epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return True, self._agree_to_stop(stop, stop.requested)

    def _record(self, record: dict) -> None:
        """A metrics line, and its curves (rank 0)."""
        self.log.append(record)
        self.curves.add(record)

    def _open_curves(self) -> NoCurves:
        """TensorBoard curves, rewritten from the metrics lines kept so far (rank 0, unless turned off)."""
        if not (self.cfg.tensorboard and self.world.is_main):
            return NoCurves()
        return open_curves(self.out, self.log.read(), self._say)

    def _agree_to_stop(self, stop: StopRequest, local: bool) -> bool:
        """Whether any rank wants to stop (just `local` alone); a rank that got no signal stops as if SIGTERM."""
        if not self.world.all_max(local):
            return False
        if stop.signum is None:
            stop.signum = signal.SIGTERM
        return True

    def _reduce_window(self) -> None:
        """Every rank's window sums become their mean over ranks (a no-op alone). Done before a line is logged
        and before a checkpoint, so a resumed run (which restores the mean on every rank) logs the same lines."""
        if not self.world.distributed:
            return
        import torch.distributed as dist

        sums = self.window.folded().sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        self.window.sums = {k: v / self.world.size for k, v in zip(keys, t.tolist(), strict=True)}

    def save(self) -> None:
        """A checkpoint of the run (a collective under torchrun: every rank hands in its RNG, rank 0 writes)."""
        self._reduce_window()
        rng_cpu = self.world.gather(torch.get_rng_state())
        rng_cuda = self.world.gather(device_rng_state(self.device))
        if not self.world.is_main:
            return
        self.log.sync()
        self.curves.flush()  # the viewer sees every line up to the checkpoint
        save_checkpoint(self.out, position=self.pos, window=self.window, metrics_lines=self.log.lines,
                        steps_per_epoch=self.steps_per_epoch, model=self.model, optimizer=self.optimizer,
                        ema=self.ema, rng_cpu=rng_cpu, rng_cuda=rng_cuda)

    def _interrupted(self, stop: StopRequest) -> None:
        self.save()
        name = signal.Signals(stop.signum).name
        raise RunInterrupted(stop.signum, f"{name}: stopped at step {self.pos.step} (epoch {self.pos.epoch}, "
                                          f"batch {self.pos.batch}); checkpoint saved in {self.out}; run the same "
                                          "command again to resume")

    def _finish(self) -> dict:
        if not self.world.is_main:
            return self.world.broadcast(None)
        return self.world.broadcast(self._write_results())

    def _write_results(self) -> dict:
        from safetensors.torch import save

        atomic_write_bytes(self.out / MODEL, save(_plain_state(self.model)))
        if self.ema is not None:
            atomic_write_bytes(self.out / EMA_MODEL, save(_plain_state(self.ema.module)))
        last_eval = next((r for r in reversed(self.log.read()) if r.get("kind") == "eval"), {})
        results = {"mode": self.cfg.mode, "epochs": self.cfg.epochs, "steps": self.pos.step,
                   **{k: v for k, v in last_eval.items() if k.startswith("val_")}, **self.results_extra}
        atomic_write_json(self.out / RESULTS, results)
        return results

    def _say(self, msg: str) -> None:
        if self.cfg.progress and self.world.is_main:
            from rich.console import Console

            Console(stderr=True).print(f"attncache: {msg}", markup=False, highlight=False, emoji=False)


def _plain_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
