"""What `attncache extract` takes, and the checks that need no teacher and no image (they run first)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..codecs import Codec, get_codec
from ..device import parse_device
from ..errors import ConfigError
from ..store.format import STORE_FORMATS
from ..store.fs import is_url
from ..teacher import PAYLOADS, TeacherOptions
from ..views import Augmentation


@dataclass
class ExtractConfig:
    teacher: TeacherOptions
    data: str
    out: str
    format: str = "zarr"
    views: int = 1
    split: str = "train"
    layers: str = "all"
    payload: str | None = None  # None: the codec's default (probs for fp16, qk for qk/lowrank, logits for cls)
    codec: str = "fp16"
    codec_params: dict = field(default_factory=dict)
    batch_size: int = 32
    device: str = "cpu"
    seed: int = 0
    augment: Augmentation = field(default_factory=Augmentation)  # RandAugment, erasing, mixup/cutmix (train split)
    num_shards: int = 1  # independent jobs writing this cache (a SLURM array); this is job `shard_index`
    shard_index: int = 0
    records_per_shard: int | None = None
    embed_images: bool = False
    workers: int = 2
    limit: int | None = None  # only the first N images (smoke runs, benchmarks)
    amp: bool = False  # bf16 autocast for the teacher on CUDA; maps are still formed in fp32
    repair: bool = False  # re-hash every file of a finished cache and rewrite the shards that differ
    progress: bool = True
    stage: str | None = None  # `out` a URL: the local staging directory (default under ~/.cache/attncache/stage)
    storage_options: dict = field(default_factory=dict)  # `out` a URL: fsspec options (endpoint, credentials, ...)
    ignore_free_space: bool = False  # start even when `out` (or `stage`) clearly has too little room for the cache


def check_options(cfg: ExtractConfig) -> Codec:
    """Option errors before anything is built or read; returns the codec."""
    if cfg.format not in STORE_FORMATS:
        raise ConfigError(f"`format` {cfg.format!r}: expected one of {STORE_FORMATS}")
    if cfg.embed_images and cfg.format != "wds":
        raise ConfigError("`embed_images` needs `format` wds (a zarr cache joins images by key)")
    for name in ("batch_size", "workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"`{name}` {getattr(cfg, name)}: must be >= 1")
    if cfg.records_per_shard is not None and cfg.records_per_shard < 1:
        raise ConfigError(f"`records_per_shard` {cfg.records_per_shard}: must be >= 1")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        raise ConfigError(f"`num_shards` {cfg.num_shards} `shard_index` {cfg.shard_index}: expected "
                          "0 <= shard index < number of shards")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"`limit` {cfg.limit}: must be >= 1")
    if cfg.augment.enabled and cfg.split != "train":
        raise ConfigError("`split` val draws timm's deterministic eval view: augmentation and mixing are for "
                          "training views")
    parse_device(cfg.device, "`device`")
    codec = get_codec(cfg.codec, **cfg.codec_params)
    if cfg.payload is not None and cfg.payload not in PAYLOADS:
        raise ConfigError(f"`payload` {cfg.payload!r}: expected one of {PAYLOADS}")
    if cfg.payload is not None and cfg.payload not in codec.payloads:
        raise ConfigError(f"`codec` {cfg.codec} encodes payload {' or '.join(codec.payloads)}, "
                          f"not `payload` {cfg.payload}")
    return codec


def check_paths(cfg: ExtractConfig) -> None:
    """A local `data` that cannot be read and an `out` that cannot be written, named before a teacher is built
    (building one may download weights for minutes, or fail on an unreachable hub first). A missing `data` is
    open_source's error, which also runs before the teacher."""
    data = Path(cfg.data)
    local = not (cfg.data == "demo" or cfg.data.startswith("demo:") or "://" in cfg.data
                 or cfg.data.startswith("pipe:") or "{" in cfg.data)
    if local and data.exists() and not os.access(data, os.R_OK | (os.X_OK if data.is_dir() else 0)):
        raise ConfigError(f"`data` {cfg.data}: not readable (permission denied)")
    if is_url(cfg.out):
        return  # the remote side is checked when it is contacted; the staging directory is the local `out`
    out = Path(cfg.out).absolute()
    existing = out
    while not existing.exists() and existing != existing.parent:  # the folder `out` would be created in
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise ConfigError(f"`out` {cfg.out}: cannot be created ({existing} is not a directory)")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"`out` {cfg.out}: cannot be {'written' if existing == out else 'created'} (no write "
                          f"permission on {existing}, or a read-only filesystem)")
