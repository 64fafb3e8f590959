"""CLIP towers and the two-tower model."""

from clipjax.models.clip import CLIP, abstract_params, create_model, init_params, logical_axes
from clipjax.models.variants import get_config, names

__all__ = ["CLIP", "abstract_params", "create_model", "get_config", "init_params",
           "logical_axes", "names"]
