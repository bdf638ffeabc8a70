"""What `attncache train` takes, and the option checks that need no cache, image or model (they run first)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..device import parse_device
from ..errors import ConfigError
from ..teacher import TeacherOptions
from ..views import Augmentation
from .modes import get_mode

# Options that change how a run executes, not what it computes: they may differ when a run is resumed.
RUNTIME_OPTIONS = ("progress", "max_steps", "log_every", "save_every", "workers", "device", "storage_options",
                   "tensorboard")


@dataclass
class TrainConfig:
    mode: str
    out: str
    cache: str | None = None  # train cache (maps + views); without it, views are drawn live from `data`
    data: str | None = None  # train images, joined to the cache by key (not needed with embedded images)
    val_cache: str | None = None
    val_data: str | None = None
    storage_options: dict = field(default_factory=dict)  # fsspec options of remote caches (credentials, ...)
    student: str | None = None  # default: the teacher's own architecture
    student_args: dict = field(default_factory=dict)
    # The teacher: with a name, a live teacher (map modes) or the architecture (no cache); its weights are also
    # where gta/finetune start. Without a name, the cache's teacher.
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    layers: str | None = None  # transferred layers; default: first depth-3 (copy/distill), all cached (gta)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay (timm's param_groups_layer_decay), e.g. 0.75
    beta2: float = 0.999
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    distill_weight: float = 3.0
    gta_weight: float = 0.1
    drop_path: float = 0.0
    clip_grad: float | None = None
    ema: float | None = None  # EMA decay, e.g. 0.9999
    # Augmentation of live views (no `cache`). A cache's views carry their own; given with a cache, it must match.
    augment: Augmentation = field(default_factory=Augmentation)
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    workers: int = 2
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps; the schedule spans all epochs
    save_every: int | None = None  # also checkpoint every N steps
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True  # RUN/tensorboard/ event files mirroring metrics.jsonl (needs the tensorboard package)


def check_student_args(cfg: TrainConfig) -> None:
    """Arguments that would be silently lost: without `student` the student is the teacher's architecture (with the
    teacher's args), and timm.create_model drops keyword arguments whose value is None (`init_values=None` would
    leave LayerScale on)."""
    if cfg.student_args and cfg.student is None:
        raise ConfigError(f"`student_args` {sorted(cfg.student_args)} without `student`: the default student is the "
                          "teacher's architecture with the teacher's args; name the `student` they are for")
    unset = sorted(k for k, v in cfg.student_args.items() if v is None)
    if unset:
        raise ConfigError(f"`student_args` {unset[0]}=None: timm drops arguments set to None, so the model would "
                          "keep its default; pass a value (init_values=0 turns LayerScale off)")


def check_options(cfg: TrainConfig) -> None:
    mode = get_mode(cfg.mode)
    for name in ("epochs", "batch_size", "log_every", "max_steps", "save_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"`{name}` {getattr(cfg, name)}: must be >= 1")
    if cfg.workers < 0:
        raise ConfigError(f"`workers` {cfg.workers}: must be >= 0")
    if not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"`drop_path` {cfg.drop_path}: expected 0 <= p < 1")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"`layer_decay` {cfg.layer_decay}: expected 0 < decay <= 1")
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        raise ConfigError(f"`ema` {cfg.ema}: expected a decay in (0, 1)")
    check_student_args(cfg)
    parse_device(cfg.device, "`device`")
    if cfg.teacher.name is None and cfg.teacher.weights is not None and not mode.starts_from_teacher:
        raise ConfigError(f"`teacher.weights` without `teacher.name`: `mode` {cfg.mode} takes the teacher's maps "
                          "from `cache` and does not start from its weights (name the teacher too for a live one)")
    if mode.needs_maps and cfg.cache is None and cfg.teacher.name is None:
        raise ConfigError(f"`mode` {cfg.mode} needs teacher maps: pass `cache` (or `teacher.name` for a live "
                          "teacher)")
    if mode.starts_from_teacher and cfg.teacher.weights is None and not cfg.teacher.pretrained:
        raise ConfigError(f"`mode` {cfg.mode} starts from the teacher's weights: pass `teacher.weights` (or turn "
                          "`teacher.pretrained` on to download them)")
