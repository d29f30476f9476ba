"""ptjax: prompt tuning on frozen Flax T5 / GPT-2 models (Lester et al. 2021, in JAX)."""
from ptjax.errors import PtjaxError
from ptjax.models.common import PromptInputs
from ptjax.models.model import Model, load_model
from ptjax.trained import TrainedRun, load_run

__version__ = "0.1.0"
__all__ = ["Model", "PromptInputs", "PtjaxError", "TrainedRun", "load_model", "load_run"]
