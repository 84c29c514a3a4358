"""Shared test set-up: 8 emulated CPU devices (set before jax is imported) and tiny models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with MiniLM's real tokenizer: real loading, fast compiles."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    import ringjax
    from ringjax.models import random_backbone

    directory = tmp_path_factory.mktemp("tiny-bert")
    minilm = ringjax.models.resolve("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, directory / name)
    hf = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
          "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128,
          "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
    (directory / "config.json").write_text(json.dumps(hf))
    cfg = ringjax.ModelConfig.from_hf(hf)
    tree = random_backbone(cfg, jax.random.key(0))
    names = {"embed/word": "embeddings.word_embeddings.weight", "embed/position": "embeddings.position_embeddings.weight",
             "embed/token_type": "embeddings.token_type_embeddings.weight", "embed/norm/scale": "embeddings.LayerNorm.weight",
             "embed/norm/bias": "embeddings.LayerNorm.bias"}
    layer = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
             "attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}
    tensors = {hf_name: np.asarray(tree[a][b] if "/" not in b else tree[a][b.split("/")[0]][b.split("/")[1]])
               for ours, hf_name in names.items() for a, b in [ours.split("/", 1)]}
    for ours, hf_name in layer.items():
        for i in range(cfg.num_layers):
            p = tree["blocks"][ours]
            if "kernel" in p:
                tensors[f"encoder.layer.{i}.{hf_name}.weight"] = np.asarray(p["kernel"][i]).T.copy()
                tensors[f"encoder.layer.{i}.{hf_name}.bias"] = np.asarray(p["bias"][i])
            else:
                tensors[f"encoder.layer.{i}.{hf_name}.weight"] = np.asarray(p["scale"][i])
                tensors[f"encoder.layer.{i}.{hf_name}.bias"] = np.asarray(p["bias"][i])
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several local processes joined by jax.distributed (gloo)")
