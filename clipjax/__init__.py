"""clipjax: CLIP and the systems built on it, in JAX/Flax."""

from clipjax import convert
from clipjax.models import (CLIP, abstract_params, create_model, get_config, init_params,
                            logical_axes)
from clipjax.models.variants import names as list_models
from clipjax.tokenizer import tokenize

__all__ = ["CLIP", "abstract_params", "convert", "create_model", "get_config", "init_params",
           "list_models", "logical_axes", "tokenize"]
__version__ = "0.1.0"
