"""ringjax: collaborative, parameter-efficient fine-tuning of pretrained transformers across devices."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # ringjax uses transformers without PyTorch on purpose

from ringjax.errors import RingjaxError
from ringjax.models import HeadConfig, Model, ModelConfig, load_model, load_tokenizer
from ringjax.peft import PeftConfig, preset

__version__ = "0.1.0"
__all__ = ["HeadConfig", "Model", "ModelConfig", "PeftConfig", "RingjaxError", "load_model", "load_tokenizer", "preset"]
