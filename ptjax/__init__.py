"""ptjax: prompt tuning on frozen Flax T5 / GPT-2 models (Lester et al. 2021, in JAX)."""
from ptjax.errors import PtjaxError
from ptjax.models.model import Model, load_model

__version__ = "0.1.0"
__all__ = ["Model", "PtjaxError", "load_model"]
