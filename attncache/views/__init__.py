"""Views: explicit parameters (view.py) drawn by a policy (policy.py), turned into pixels by `render`."""

from .policy import ViewPolicy, center_crop_view, key_seed, random_resized_crop_view
from .view import INTERPOLATIONS, View, render

__all__ = ["INTERPOLATIONS", "View", "ViewPolicy", "center_crop_view", "key_seed", "random_resized_crop_view",
           "render"]
