"""Evaluation: a student's class probabilities on eval views, top-1, and `attncache eval` with the paper's ensemble.

The ensemble averages the class probabilities of the student and of a fine-tuned teacher (an `attncache train
--mode finetune` run) on the same eval views. A copy-mode student is evaluated with the val cache's maps, as it was
trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .device import parse_device
from .errors import AttncacheError
from .files import StrictJSONError, read_json
from .sources import open_source
from .teacher import TeacherSpec, read_state_dict
from .train.checkpoint import CONFIG
from .train.loader import eval_stream, make_loader
from .train.maps import CachedMaps
from .train.modes import get_mode
from .train.predict import accuracy, predict
from .train.student import StudentSpec, create_student


def evaluate_run(run: str, val_cache: str | None = None, val_data: str | None = None,
                 ensemble_with: str | None = None, weights: str = "model", device: str = "cpu",
                 batch_size: int = 64, workers: int = 0, storage_options: dict | None = None) -> dict:
    """Top-1 of the run's student; with `ensemble_with`, also of the fine-tuned run alone and of the average."""
    student = TrainedStudent(run, weights, device)
    val_cache = val_cache or student.options["val_cache"]
    val_data = val_data or student.options["val_data"]
    probs, labels, keys = student.predict(val_cache, val_data, batch_size, workers, storage_options)
    results = {"run": str(student.run), "mode": student.mode.name, "weights": student.file.name,
               **{f"student_{k}": v for k, v in accuracy(probs, labels).items()}}
    if ensemble_with is not None:
        partner = TrainedStudent(ensemble_with, "model", device)  # --ema chooses the student's weights only
        p_probs, p_labels, p_keys = partner.predict(val_cache, val_data, batch_size, workers, storage_options)
        if p_keys != keys or not torch.equal(p_labels, labels):
            raise AttncacheError(f"`ensemble_with` {ensemble_with}: evaluated on other images than the student")
        results.update({f"finetuned_{k}": v for k, v in accuracy(p_probs, labels).items()})
        results.update({f"ensemble_{k}": v for k, v in accuracy((probs + p_probs) / 2, labels).items()})
    return results


class TrainedStudent:
    """A trained student rebuilt from its run directory (config.json + model/ema safetensors)."""

    def __init__(self, path: str, weights: str, device: str):
        path = Path(path)
        self.run = path if path.is_dir() else path.parent
        try:
            config = read_json(self.run / CONFIG)
            self.options, self.layers = config["options"], config["layers"]
            self.mode = get_mode(self.options["mode"])
            self.teacher = TeacherSpec.from_json(config["teacher"])
            self.spec = StudentSpec(**config["student"])
        except (OSError, StrictJSONError, KeyError, TypeError) as exc:
            raise AttncacheError(f"{path}: not an attncache training run (no readable {CONFIG})") from exc
        self.file = file = path if path.is_file() else self.run / f"{weights}.safetensors"
        if not file.is_file():
            ema = "; a run trained without `ema` has no ema.safetensors" if weights == "ema" else ""
            raise AttncacheError(f"{file}: no such weights (is the run finished?{ema})")
        self.device = parse_device(device)
        self.model = create_student(self.spec)
        try:
            self.model.load_state_dict(read_state_dict(file, "`checkpoint`"))
        except RuntimeError as exc:
            raise AttncacheError(f"{file}: does not fit the run's student ({str(exc)[:200]})") from exc
        self.model.to(self.device).eval()

    def predict(self, val_cache: str | None, val_data: str | None, batch_size: int, workers: int,
                storage_options: dict | None = None):
        from .cache import open_cache

        cache = open_cache(val_cache, storage_options) if val_cache else None
        if self.mode.eval_with_maps and cache is None:
            raise AttncacheError(f"{self.run}: a {self.mode.name}-mode student needs the teacher's maps: "
                                 "pass `val_cache`")
        if cache is not None and self.mode.eval_with_maps \
                and cache.teacher.weights_sha256 != self.teacher.weights_sha256:
            raise AttncacheError(f"`val_cache` {val_cache}: made by other teacher weights than {self.run}'s")
        source = open_source(val_data, "val", option="val_data") if val_data else None
        stream = eval_stream(cache, source, self.teacher, self.spec.num_classes, batch_size,
                             with_maps=self.mode.eval_with_maps)
        if stream is None:
            raise AttncacheError("pass `val_cache` and/or `val_data` (the run has none recorded)")
        maps = CachedMaps(cache, self.layers, self.mode, self.device) if self.mode.eval_with_maps else None
        probs, labels = predict(self.model, make_loader(stream, workers), self.layers, maps, self.device)
        return probs, labels, stream.keys()
