"""clintune: clinical text classification under tight compute and data limits.

Train a classifier on your notes (a pretrained encoder adapted by full fine-tuning, a frozen
backbone, LoRA or IA3, topped by a head), measure its quality and cost the same way for every run,
and use it: ``clintune.train(...)``, ``clintune.load(dir).predict(texts)``.
"""
__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import ClintuneError  # noqa: E402
from .api import TrainResult, evaluate, predict, train  # noqa: E402
from .modeling import Classifier, load  # noqa: E402
from .heads import HEADS, register_head  # noqa: E402
from .methods import METHODS, register_method  # noqa: E402

__all__ = ["TrainConfig", "ClintuneError", "TrainResult", "train", "evaluate", "predict", "load", "Classifier",
           "HEADS", "register_head", "METHODS", "register_method", "__version__"]
