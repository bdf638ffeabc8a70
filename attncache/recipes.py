"""The attention-transfer reference recipes as presets of `extract` and `train` options.

Values are those of the reference implementation (github.com/alexlioralexli/attention-transfer: README recipes and
`main_finetune.py` defaults; docs/training.md lists each with its source). Any option given explicitly overrides
the preset. The peak learning rate follows the reference's rule lr = blr x batch / 256, so a preset adapts to the
batch size you train with; the final lr keeps the reference's ratio to the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import ConfigError
from .extract.config import ExtractConfig
from .train.config import TrainConfig
from .train.modes import MODES
from .views import Augmentation

# Both recipes train on the same views: timm's create_transform with RandAugment and erasing, then timm's Mixup.
REFERENCE_AUGMENTATION = Augmentation(randaugment="rand-m9-mstd0.5-inc1", erase_prob=0.25, erase_mode="pixel",
                                      erase_count=1, mixup=0.8, cutmix=1.0, mix_prob=1.0, mix_switch=0.5)
# The distill recipe's teacher also runs with the student's drop-path masks (rate 0.2): the cache stores them.
DISTILL_AUGMENTATION = replace(REFERENCE_AUGMENTATION, teacher_drop_path=0.2)
# train_config and extract_config also take the augmentation's fields one by one (`mixup=0.0`)
AUGMENTATION_OPTIONS = frozenset(f.name for f in fields(Augmentation))


@dataclass(frozen=True)
class Recipe:
    mode: str
    epochs: int
    warmup_epochs: float
    blr: float  # peak lr per 256 images of batch
    min_lr_ratio: float  # final lr / peak lr
    weight_decay: float
    beta2: float
    layer_decay: float | None
    drop_path: float
    ema: float = 0.9999
    label_smoothing: float = 0.1
    augment: Augmentation = REFERENCE_AUGMENTATION

    def train_options(self, batch_size: int, lr: float | None = None) -> dict:
        lr = lr if lr is not None else self.blr * batch_size / 256
        return {"mode": self.mode, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs, "lr": lr,
                "min_lr": lr * self.min_lr_ratio, "weight_decay": self.weight_decay, "beta2": self.beta2,
                "layer_decay": self.layer_decay, "drop_path": self.drop_path, "ema": self.ema,
                "label_smoothing": self.label_smoothing, "augment": self.augment}

    @property
    def presets(self) -> frozenset[str]:
        """The options this recipe sets, by the flat names `train_config` and `extract_config` take (augmentation
        field by field). A front end whose options all have defaults passes only those of these the user gave:
        an option passed at its default would mask the recipe's value."""
        return frozenset(self.train_options(batch_size=256)) - {"augment"} | AUGMENTATION_OPTIONS


RECIPES: dict[str, Recipe] = {
    # ViT-L, batch 2048: peak lr 8e-3 decaying to the reference's min_lr 2e-3 (ratio 1/4); layer decay 0.75.
    "at-copy": Recipe(mode="copy", epochs=100, warmup_epochs=5, blr=1e-3, min_lr_ratio=0.25, weight_decay=0.05,
                      beta2=0.999, layer_decay=0.75, drop_path=0.0),
    # ViT-L, batch 2048: peak lr 8e-4 to MAE's default min_lr 1e-6; beta2 0.95, wd 0.3, drop-path 0.2.
    "at-distill": Recipe(mode="distill", epochs=200, warmup_epochs=20, blr=1e-4, min_lr_ratio=1e-6 / 8e-4,
                         weight_decay=0.3, beta2=0.95, layer_decay=None, drop_path=0.2,
                         augment=DISTILL_AUGMENTATION),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"`recipe` {name!r}: expected one of {sorted(RECIPES)}")
    return RECIPES[name]


def train_config(recipe: str | None = None, **options) -> TrainConfig:
    """A TrainConfig from a recipe, with `options` (the ones the user gave) taking precedence. Options may name
    single augmentation fields (`mixup=0.0`), which override the recipe's augmentation field by field."""
    preset = {}
    if recipe is not None:
        r = get_recipe(recipe)
        preset = r.train_options(options.get("batch_size", _default(TrainConfig, "batch_size")), options.get("lr"))
    elif options.get("mode") is None:
        raise ConfigError(f"pass `mode` ({', '.join(MODES)}) or `recipe`")
    options = _merge_augmentation(options, preset.get("augment", Augmentation()))
    return TrainConfig(**{**preset, **options})


def extract_config(recipe: str | None = None, **options) -> ExtractConfig:
    """An ExtractConfig whose views follow a recipe's augmentation; options override it (field by field too)."""
    base = get_recipe(recipe).augment if recipe is not None else Augmentation()
    return ExtractConfig(**_merge_augmentation(options, base))


def _merge_augmentation(options: dict, base: Augmentation) -> dict:
    single = {k: options[k] for k in AUGMENTATION_OPTIONS & set(options)}
    rest = {k: v for k, v in options.items() if k not in AUGMENTATION_OPTIONS}
    return {**rest, "augment": replace(rest.get("augment", base), **single)}


def _default(cls, name: str):
    return next(f.default for f in fields(cls) if f.name == name)
