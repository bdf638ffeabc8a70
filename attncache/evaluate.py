"""`attncache eval`: top-1 of a trained student, and of its ensemble with a fine-tuned teacher.

The ensemble averages the class probabilities of the student and of a fine-tuned teacher (an `attncache train
--mode finetune` run) on the same eval views, as in the attention-transfer paper. A copy-mode student is evaluated
with the val cache's maps, as it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import AttncacheError
from .loader import make_loader
from .student import MAP_MODES, StudentSpec, create_student, enable_transfer
from .teachers import TeacherSpec, read_state_dict
from .train import CONFIG, CachedMaps, accuracy, eval_stream, open_cache_option, predict


def evaluate_run(run: str, val_cache: str | None = None, val_data: str | None = None,
                 ensemble_with: str | None = None, weights: str = "model", device: str = "cpu",
                 batch_size: int = 64, workers: int = 0) -> dict:
    """Top-1 of the run's student; with `ensemble_with`, also of the fine-tuned run alone and of the average."""
    student = _Student(run, weights, device)
    val_cache = val_cache or student.options["val_cache"]
    val_data = val_data or student.options["val_data"]
    probs, labels, keys = student.predict(val_cache, val_data, batch_size, workers)
    results = {"run": str(student.run), "mode": student.mode, "weights": weights,
               **{f"student_{k}": v for k, v in accuracy(probs, labels).items()}}
    if ensemble_with is not None:
        partner = _Student(ensemble_with, weights, device)
        p_probs, p_labels, p_keys = partner.predict(val_cache, val_data, batch_size, workers)
        if p_keys != keys or not torch.equal(p_labels, labels):
            raise AttncacheError(f"--ensemble-with {ensemble_with}: evaluated on other images than the student")
        results.update({f"finetuned_{k}": v for k, v in accuracy(p_probs, labels).items()})
        results.update({f"ensemble_{k}": v for k, v in accuracy((probs + p_probs) / 2, labels).items()})
    return results


class _Student:
    """A trained student rebuilt from its run directory (config.json + model/ema safetensors)."""

    def __init__(self, path: str, weights: str, device: str):
        path = Path(path)
        self.run = path if path.is_dir() else path.parent
        if not (self.run / CONFIG).is_file():
            raise AttncacheError(f"{path}: not an attncache training run (no {CONFIG})")
        config = json.loads((self.run / CONFIG).read_text())
        self.options, self.layers = config["options"], config["layers"]
        self.mode = self.options["mode"]
        self.teacher = TeacherSpec.from_json(config["teacher"])
        self.spec = StudentSpec(**config["student"])
        file = path if path.is_file() else self.run / f"{weights}.safetensors"
        if not file.is_file():
            raise AttncacheError(f"{file}: no such weights (is the run finished? with --ema it has ema.safetensors)")
        self.device = torch.device(device)
        self.model = create_student(self.spec)
        if self.mode in MAP_MODES:
            enable_transfer(self.model, self.layers)
        state = read_state_dict(file)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise AttncacheError(f"{file}: does not fit the run's student ({str(exc)[:200]})") from exc
        self.model.to(self.device).eval()

    def predict(self, val_cache: str | None, val_data: str | None, batch_size: int, workers: int):
        cache = open_cache_option(val_cache, "--val-cache")
        needs_maps = self.mode == "copy"
        if needs_maps and cache is None:
            raise AttncacheError(f"{self.run}: a copy-mode student needs the teacher's maps: pass --val-cache")
        if cache is not None and needs_maps and cache.teacher.weights_sha256 != self.teacher.weights_sha256:
            raise AttncacheError(f"--val-cache {val_cache}: made by other teacher weights than {self.run}'s")
        stream = eval_stream(cache, val_data, self.teacher, self.spec.num_classes, batch_size, with_maps=needs_maps)
        if stream is None:
            raise AttncacheError("pass --val-cache and/or --val-data (the run has none recorded)")
        maps = CachedMaps(cache, self.layers, "copy", self.device) if needs_maps else None
        probs, labels = predict(self.model, make_loader(stream, workers), self.layers, maps, self.device)
        keys = [s["key"] for s in stream.samples]
        return probs, labels, keys
