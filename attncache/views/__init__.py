"""Views: explicit parameters (view.py, augment.py) drawn by a policy (policy.py), turned into pixels by `render`."""

from .augment import AugmentOp, DropPathMask, Erase, drop_path_keep, erase_noise
from .policy import Augmentation, ViewPolicy, center_crop_view, key_seed, random_resized_crop_view
from .view import INTERPOLATIONS, Mix, View, mix_pixels, render

__all__ = ["INTERPOLATIONS", "AugmentOp", "Augmentation", "DropPathMask", "Erase", "Mix", "View", "ViewPolicy",
           "center_crop_view", "drop_path_keep", "erase_noise", "key_seed", "mix_pixels", "random_resized_crop_view",
           "render"]
