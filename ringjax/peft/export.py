"""Save and load only the trainable parameters: safetensors + a JSON config.

LoRA can also be written in the Hugging Face PEFT layout (`adapter_model.safetensors` +
`adapter_config.json`) so PyTorch users can load it with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ringjax.errors import RingjaxError
from ringjax.models.checkpoint_io import flatten
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig
from ringjax.peft.config import PeftConfig

WEIGHTS, CONFIG = "trainable.safetensors", "trainable_config.json"

# Hugging Face module path of each projection, per architecture ({i}: layer index).
HF_MODULES = {
    "bert": {"query": "encoder.layer.{i}.attention.self.query", "key": "encoder.layer.{i}.attention.self.key",
             "value": "encoder.layer.{i}.attention.self.value", "attn_out": "encoder.layer.{i}.attention.output.dense",
             "ffn_in": "encoder.layer.{i}.intermediate.dense", "ffn_out": "encoder.layer.{i}.output.dense"},
    "gpt2": {"qkv": "h.{i}.attn.c_attn", "attn_out": "h.{i}.attn.c_proj", "ffn_in": "h.{i}.mlp.c_fc",
             "ffn_out": "h.{i}.mlp.c_proj"},
    "llama": {"query": "layers.{i}.self_attn.q_proj", "key": "layers.{i}.self_attn.k_proj",
              "value": "layers.{i}.self_attn.v_proj", "attn_out": "layers.{i}.self_attn.o_proj",
              "ffn_gate": "layers.{i}.mlp.gate_proj", "ffn_up": "layers.{i}.mlp.up_proj", "ffn_out": "layers.{i}.mlp.down_proj"},
}
HF_MODULES["roberta"] = HF_MODULES["bert"]
HF_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}


def trainable_only(params: dict, mask: dict) -> dict:
    return {k: v for k, v in flatten(jax.tree.map(lambda m, p: p if m else None, mask, params)).items() if v is not None}


def save_trainable(directory, params: dict, mask: dict, cfg: ModelConfig, spec: PeftConfig, head: HeadConfig | None,
                   extra: dict | None = None) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in trainable_only(params, mask).items()}
    save_file(tensors, str(directory / WEIGHTS))
    config = {"model": dataclasses.asdict(cfg), "peft": dataclasses.asdict(spec),
              "head": dataclasses.asdict(head) if head else None, **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return [directory / WEIGHTS, directory / CONFIG]


def load_trainable(directory, params: dict) -> dict:
    """`params` with the saved trainable leaves put back (shapes checked)."""
    path = Path(directory) / WEIGHTS
    if not path.exists():
        raise RingjaxError(f"{path} not found; train with --out {directory} first (it is written when training ends)")
    saved = load_file(str(path))
    flat = flatten(params)
    unknown = sorted(set(saved) - set(flat))
    if unknown:
        raise RingjaxError(f"{path} holds parameters this model lacks: {unknown[:10]}; was it trained with another method?")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(flat[k].shape):
            raise RingjaxError(f"{path}: {k} has shape {v.shape}, the model expects {flat[k].shape}")
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.numpy.asarray(saved.get("/".join(k.key for k in p), x)), params
    )


def export_hf_peft(directory, params: dict, cfg: ModelConfig, spec: PeftConfig, base_model: str) -> list[Path]:
    """LoRA weights as Hugging Face PEFT saves them (lora_A (r, in), lora_B (out, r))."""
    if spec.kind != "lora":
        raise RingjaxError("the Hugging Face PEFT layout is for LoRA runs; use --format ringjax for other methods")
    if spec.train_norms:
        raise RingjaxError("the Hugging Face PEFT layout holds LoRA factors only, and this run also trained layer norms; "
                           "use --format ringjax to keep them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules, prefix = HF_MODULES[cfg.arch], HF_PREFIX[cfg.arch]
    conv1d = cfg.arch == "gpt2"  # GPT-2's Conv1D stores weights (in, out)
    tensors = {}
    lora = params["peft"]["blocks"]["lora"]
    for name, ab in lora.items():
        for i in range(cfg.num_layers):
            module = "base_model.model." + prefix + modules[name].format(i=i)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"][i]).T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"][i]).T)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": spec.lora_rank, "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({modules[n].rsplit(".", 1)[-1] for n in lora}), "fan_in_fan_out": conv1d,
        "task_type": "SEQ_CLS" if cfg.is_encoder else "CAUSAL_LM", "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return [directory / "adapter_model.safetensors", directory / "adapter_config.json"]
