"""Flax ports of Hugging Face transformers, as pure functions plus an NNX wrapper."""

from ringjax.models.backbone import Output, encode, forward
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig
from ringjax.models.hub import load_config, load_tokenizer, resolve
from ringjax.models.model import Model, assemble, load_backbone, load_model, random_backbone

__all__ = [
    "HeadConfig", "Model", "ModelConfig", "Output", "assemble", "encode", "forward", "load_backbone",
    "load_config", "load_model", "load_tokenizer", "random_backbone", "resolve",
]
