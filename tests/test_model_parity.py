"""Every port against outputs recorded once from the Hugging Face PyTorch models (fp32)."""

from pathlib import Path

import numpy as np
import pytest

import ringjax

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4


def _real_positions_max_diff(got, want, mask):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(got)[keep] - want[keep]).max())


def test_minilm_last_hidden_state_matches_hugging_face():
    ref = np.load(FIXTURES / "minilm_reference.npz")
    model = ringjax.load_model("minilm")
    out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], token_type_ids=ref["token_type_ids"])
    assert _real_positions_max_diff(out.last_hidden_state, ref["last_hidden_state"], ref["attention_mask"]) < TOL


@pytest.mark.parametrize(
    "name, head, num_labels",
    [
        ("tiny-bert-sharded", "classification", 2),
        ("tiny-roberta", "classification", 3),
        ("tiny-gpt2", "lm", 0),
        ("tiny-llama", "lm", 0),
        ("tiny-qwen2", "lm", 0),
    ],
)
def test_tiny_checkpoint_matches_hugging_face(name, head, num_labels):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = ringjax.load_model(str(FIXTURES / name), head=head, num_labels=num_labels or 2)
    kwargs = {"token_type_ids": ref["token_type_ids"]} if "token_type_ids" in ref else {}
    out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], **kwargs)
    mask = ref["attention_mask"]
    assert _real_positions_max_diff(out.last_hidden_state, ref["last_hidden_state"], mask) < TOL
    if head == "lm":
        assert _real_positions_max_diff(out.logits, ref["logits"], mask) < TOL
    else:
        assert float(np.abs(np.asarray(out.logits) - ref["logits"]).max()) < TOL
