"""Wiring of a training run: everything checkable is checked before the run directory is claimed.

Order: options (config.py), caches (manifests, layers, payload, geometry), the teacher (live, or the cache's),
images (every cached key found, a spread of them hashed), the student (architecture and geometry), then the run
directory (rundir.py: a different run is refused, a run that never saved a checkpoint is re-claimed), and only then
the loop (engine.py) and its workers.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..cache import Cache, open_cache
from ..device import parse_device
from ..distributed import World
from ..errors import AttncacheError, ConfigError
from ..files import StrictJSONError, read_json
from ..rundir import FINISHED, RESUME, RunDir
from ..sources import open_source
from ..teacher import TeacherSpec, geometry_differences, parse_layers
from ..views import Augmentation, ViewPolicy
from .checkpoint import CHECKPOINT, CONFIG, METRICS, RESULTS, check_checkpoint_room
from .config import RUNTIME_OPTIONS, TrainConfig, check_options
from .curves import EVENTS
from .engine import Engine
from .loader import RenderSpec, ViewStream, check_images, eval_stream
from .maps import CachedMaps, LiveMaps
from .modes import Mode, get_mode
from .student import check_geometry, create_student, load_pretrained, student_spec, teacher_state


def run_dir(out: str | Path) -> RunDir:
    return RunDir(out, kind="training run", plan_file=CONFIG, done_file=RESULTS,
                  started=lambda path, old: (path / CHECKPOINT).is_file(), discard=_discard,
                  differences=_differences)


def _differences(old: dict, new: dict) -> list[str]:
    options = sorted(k for k in set(old.get("options", {})) | set(new["options"])
                     if old.get("options", {}).get(k) != new["options"].get(k))
    rest = [k for k in new if k != "options" and old.get(k) != new[k]]
    return ([f"options {options}"] if options else []) + rest


def _discard(out: Path, old: dict) -> None:
    """An unstarted run (no checkpoint): its config, metrics and their curves go; nothing else of it exists."""
    for name in (CONFIG, METRICS):
        (out / name).unlink(missing_ok=True)
    for folder in ("checkpoints", EVENTS):
        if (out / folder).is_dir() and not (out / folder).is_symlink():
            shutil.rmtree(out / folder)


class Trainer:
    def __init__(self, cfg: TrainConfig, evaluate: bool = True):
        """`evaluate=False` (benchmarks) builds no val stream and needs no val cache."""
        check_options(cfg)
        self.cfg, self.mode = cfg, get_mode(cfg.mode)
        self.out, self.device = Path(cfg.out), parse_device(cfg.device, "`device`")
        self.world = World.from_env(self.device)  # torchrun: DDP over its ranks; alone: one process
        self.device = self.world.device(self.device)
        if cfg.batch_size % self.world.size:
            raise ConfigError(f"`batch_size` {cfg.batch_size} is the global batch: it must divide evenly over "
                              f"the {self.world.size} ranks")
        self.cache = self._open_cache("cache")
        self.val_cache = self._open_cache("val_cache")
        self.live_teacher, self.teacher = self._teacher()
        self.layers = self._transfer_layers()
        for cache, option in ((self.cache, "cache"), (self.val_cache, "val_cache")):
            if cache is not None:
                needs_maps = self.mode.needs_maps and self.live_teacher is None and (
                    option == "cache" or self.mode.eval_with_maps)
                check_cache_serves(cache, option, self.teacher, self.layers, self.mode, needs_maps)
        self.train_stream, self.num_classes = self._train_stream()
        self.teacher_drop_path = self._teacher_drop_path()
        self.val_stream = self._val_stream() if evaluate and self.world.is_main else None  # rank 0 evaluates
        self.model, self.student_spec = self._student()
        self.engine = Engine(cfg, self.mode, self.model, self.layers, self._maps(self.cache), self._val_maps(evaluate),
                             self.train_stream, self.val_stream, self.device, self.out,
                             {"student": self.student_spec.to_json(), "layers": self.layers},
                             teacher_drop_path=self.teacher_drop_path, world=self.world)

    # -- setup -----------------------------------------------------------------------------------------------

    def _open_cache(self, option: str) -> Cache | None:
        """The cache the option `option` names, if any; its errors say which option it was."""
        root = getattr(self.cfg, option)
        if root is None:
            return None
        try:
            return open_cache(root, self.cfg.storage_options)
        except AttncacheError as exc:
            raise AttncacheError(f"`{option}` {exc}") from exc

    def _teacher(self) -> tuple[torch.nn.Module | None, TeacherSpec]:
        cache, opts = self.cache, self.cfg.teacher
        if opts.name is None:
            if cache is None:
                raise ConfigError("pass `cache` (or `teacher.name` for a live teacher): the student copies the "
                                  "teacher's architecture")
            return None, cache.teacher
        live = self.mode.needs_maps  # scratch/finetune only need the architecture
        opts = replace(opts, image_size=opts.image_size or (cache.teacher.image_size if cache else None),
                       args=opts.args or (dict(cache.teacher.model_args) if cache else {}),
                       pretrained=opts.pretrained and live)
        model, spec = opts.build(self.device)
        if cache is not None:
            same_geometry(spec, cache.teacher, "`teacher.name`", "`cache`")
        return (model if live else None), spec

    def _transfer_layers(self) -> list[int]:
        if not self.mode.needs_maps:
            return []
        if self.cfg.layers is None and self.mode.layers == "cached":
            return list(self.cache.layers) if self.cache is not None and self.live_teacher is None else \
                list(range(self.teacher.depth))
        return parse_layers(self.cfg.layers or "reference", self.teacher.depth)

    def _train_stream(self) -> tuple[ViewStream, int]:
        cfg = self.cfg
        source = open_source(cfg.data, "train") if cfg.data else None
        common = dict(render_spec=RenderSpec.of(self.teacher), batch_size=cfg.batch_size // self.world.size,
                      shuffle=True, seed=cfg.seed, source=source, rank=self.world.rank,
                      world_size=self.world.size)
        if self.cache is not None:
            check_augmentation(self.cache, cfg.augment)
            check_images(self.cache, source, "cache", "data")
            stream = ViewStream(cache=self.cache, with_maps=self.live_teacher is None and self.mode.needs_maps,
                                **common)
            classes = self.cache.manifest["dataset"]["classes"]
            low, high = self.cache.label_range()
            if low < 0:
                raise AttncacheError(f"`cache` {self.cache.root}: training needs labels, and some samples have "
                                     "none (extract from class folders)")
            return stream, max(len(classes), 1 + high)
        if source is None:
            raise ConfigError("pass `data` (train images) or `cache`")
        samples = [s.to_json() for s in source.scan()]
        stream = ViewStream(samples=samples, policy=ViewPolicy(split="train", augment=cfg.augment),
                            depth=self.teacher.depth, **common)
        classes = source.classes
        unlabeled = next((s["key"] for s in samples if s["label"] < 0), None)
        if unlabeled is not None:
            raise AttncacheError(f"training needs labels: sample {unlabeled!r} has none (use class folders)")
        return stream, max(len(classes), 1 + max(s["label"] for s in samples))

    def _teacher_drop_path(self) -> float:
        """The rate of the drop-path masks the training views carry; the student's own drop-path must match it
        (its transferred blocks reuse the masks, the others draw at that rate)."""
        policy = self.cache.policy if self.cache is not None else self.train_stream.policy
        rate = policy.augment.teacher_drop_path
        if rate and self.mode.needs_maps and self.cfg.drop_path != rate:
            raise ConfigError(f"the training views carry the teacher's drop-path masks at rate {rate}: train "
                              f"with `drop_path` {rate} (got {self.cfg.drop_path})")
        return rate

    def _val_stream(self) -> ViewStream | None:
        cfg = self.cfg
        if self.mode.eval_with_maps and self.val_cache is None and self.live_teacher is None:
            raise ConfigError(f"{self.mode.name} mode evaluates with the teacher's maps of the eval views: pass "
                              "`val_cache` (a cache extracted from the val split)")
        source = open_source(cfg.val_data, "val", option="val_data") if cfg.val_data else None
        return eval_stream(self.val_cache, source, self.teacher, self.num_classes, cfg.batch_size,
                           with_maps=self.mode.eval_with_maps and self.live_teacher is None)

    def _student(self):
        cfg = self.cfg
        spec = student_spec(self.teacher, self.num_classes, cfg.student, cfg.drop_path, cfg.student_args)
        model = create_student(spec, seed=cfg.seed)
        check_geometry(model, spec, self.teacher, self.layers, cfg.cache or cfg.teacher.name or "the teacher")
        if self.mode.starts_from_teacher:
            state = teacher_state(cfg.teacher.weights, cfg.teacher.pretrained, self.teacher, self.mode)
            where = f"`teacher.weights` {cfg.teacher.weights or self.teacher.model}"
            start_sha256 = load_pretrained(model, state, where)
            if self.mode.needs_maps and self.live_teacher is None and start_sha256 != self.teacher.weights_sha256:
                raise AttncacheError(
                    f"`mode` {self.mode.name} regularises towards the model it starts from, but `teacher.weights` "
                    f"({start_sha256[:12]}) are not the weights that made the maps "
                    f"({self.teacher.weights_sha256[:12]})")
        return model.to(self.device), spec

    def _maps(self, cache: Cache | None):
        if not self.mode.needs_maps:
            return None
        if self.live_teacher is not None:
            return LiveMaps(self.live_teacher, self.layers, self.mode, self.teacher_drop_path,
                            amp=self.cfg.amp and self.device.type == "cuda")  # as the engine's autocast
        return CachedMaps(cache, self.layers, self.mode, self.device) if cache is not None else None

    def _val_maps(self, evaluate: bool):
        return self._maps(self.val_cache) if self.mode.eval_with_maps and evaluate else None

    def run_config(self) -> dict:
        """What decides this run's result: options plus the identity of the caches and teacher weights."""
        options = {k: v for k, v in asdict(self.cfg).items() if k not in RUNTIME_OPTIONS}
        caches = {flag: {"fingerprint": c.manifest["dataset"]["fingerprint"],
                         "weights_sha256": c.teacher.weights_sha256}
                  for flag, c in (("cache", self.cache), ("val_cache", self.val_cache)) if c is not None}
        return {"options": options, "student": self.student_spec.to_json(), "layers": self.layers,
                "teacher": self.teacher.to_json(), "caches": caches}

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run, resume, or (if finished) return the results of the run."""
        config = run_dir(self.out)
        with config:
            state = None
            if self.world.is_main:  # rank 0 claims and writes; the others follow its state
                try:
                    state = config.claim(self.run_config())
                    if state != FINISHED:
                        check_checkpoint_room(self.out, self.model, self.cfg.ema is not None)
                except AttncacheError as exc:
                    self.world.broadcast(exc)
                    raise
            state = self.world.broadcast(state)
            if isinstance(state, AttncacheError):
                raise state  # rank 0's error, of its type (a ConfigError is spelled as options on every rank)
            if state == FINISHED:
                try:
                    return read_json(self.out / RESULTS)
                except (OSError, StrictJSONError) as exc:
                    raise AttncacheError(f"{self.out / RESULTS}: unreadable ({exc})") from exc
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the run's randomness (drop-path) is its own
                return self.engine.fit(resume=state == RESUME and (self.out / CHECKPOINT).is_file())


def check_augmentation(cache: Cache, wanted: Augmentation) -> None:
    """A cache's views carry their augmentation: asking for other augmentation than the cache holds is an error
    (mixing or augmenting only the student's input would show it pixels its teacher never saw)."""
    held = cache.policy.augment
    if wanted.enabled and wanted != held:
        diff = [f"{k} {getattr(held, k)!r} (asked: {getattr(wanted, k)!r})" for k in vars(wanted)
                if getattr(held, k) != getattr(wanted, k)]
        raise AttncacheError(f"`cache` {cache.root}: its views were drawn with other augmentation: "
                             f"{'; '.join(diff)}. Extract a cache with that augmentation (with the same `recipe`, "
                             "say), or drop the augmentation options: a cache's views carry their own")


def same_geometry(a: TeacherSpec, b: TeacherSpec, what_a: str, what_b: str) -> None:
    diff = geometry_differences(vars(a), vars(b))
    if diff:
        raise AttncacheError(f"{what_a} and {what_b} have different teacher geometry: " + "; ".join(diff))


def check_cache_serves(cache: Cache, option: str, teacher: TeacherSpec, layers: list[int], mode: Mode,
                       needs_maps: bool) -> None:
    """Does the cache of option `option` hold what the run consumes from it (same teacher, the layers, the
    payload)?"""
    named = f"`{option}` {cache.root}"
    same_geometry(cache.teacher, teacher, f"`{option}`", "the teacher")
    if cache.teacher.weights_sha256 != teacher.weights_sha256 and needs_maps:
        raise AttncacheError(f"{named}: made by other teacher weights "
                             f"({cache.teacher.weights_sha256[:12]} vs {teacher.weights_sha256[:12]})")
    if not needs_maps:
        return
    missing = [i for i in layers if i not in cache.layers]
    if missing:
        raise AttncacheError(f"{named}: holds layers {cache.layers}, `mode` {mode.name} needs {layers} "
                             f"(missing {missing}); pass `layers`, or extract a cache with those layers")
    if mode.targets == "probs" and cache.codec.query_rows != "all":
        raise AttncacheError(f"{named}: codec {cache.codec.name!r} keeps only [CLS]-query rows; `mode` "
                             f"{mode.name} needs whole maps (extract with codec fp16, qk, lowrank, sqrtq or logq)")
    if mode.targets == "cls_logits" and cache.decodes_to != "logits":
        raise AttncacheError(f"{named}: holds softmax probabilities; `mode` {mode.name} regularises attention "
                             "logits (extract with codec qk, lowrank or cls, or payload logits)")


def train(cfg: TrainConfig) -> dict:
    """Run, resume, or (if finished) return the results of a training run."""
    return Trainer(cfg).run()
