"""ptjax: prompt tuning on frozen Flax T5 / GPT-2 models (Lester et al. 2021, in JAX)."""
import os

# Quiet by default, before any of them is imported: transformers logs "PyTorch was not
# found..." on import where torch is absent (the demo's install) although ptjax only uses
# its tokenizers and hub files; TensorFlow's C++ banner (TFDS tasks) likewise. Either can
# be turned back on by setting the variable.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ptjax.errors import PtjaxError  # noqa: E402 (after the variables above)
from ptjax.models.common import PromptInputs  # noqa: E402
from ptjax.models.model import Model, load_model  # noqa: E402
from ptjax.multirun import MultiRun, load_runs  # noqa: E402
from ptjax.trained import TrainedRun, load_run  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "MultiRun", "PromptInputs", "PtjaxError", "TrainedRun", "load_model",
           "load_run", "load_runs"]
